"""Quantized KV tensors as explicit Q/DQ, so TensorRT (explicit quantization) and ONNX Runtime both run them.

torch exports the cache's storage conversions as Cast(float -> int8/float8) on the new tokens and
Cast(int8/float8 -> float) on the past. TensorRT accepts INT8/FP8 tensors only through
QuantizeLinear / DequantizeLinear with a constant scale and a zero point of 0, so after export:
  Cast(x -> int8|fp8)      => QuantizeLinear(x, 1.0, 0)      (x is already x / s, clipped; Q rounds
                                                               half-to-even like torch.round)
  Cast(int8|fp8 -> float)  => DequantizeLinear(q, 1.0, 0)
  Shape(int8|fp8 input)    => Shape(its DequantizeLinear output)   (same shape; no Shape on int8/fp8)
The real per-channel scales stay where the export put them: folded into the query and the attention
output (see vtc.export.llm), so the graph never rescales the whole cache per element. Numerics are
unchanged (checked by the build's parity step).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

QUANT_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
SCALE, ZP = "vtc_kv_unit_scale", {TensorProto.INT8: "vtc_kv_zero_int8", TensorProto.FLOAT8E4M3FN: "vtc_kv_zero_fp8"}


def _types(graph) -> dict:
    return {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)}


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _constants(graph, used: set) -> None:
    graph.initializer.append(helper.make_tensor(SCALE, TensorProto.FLOAT, [], [1.0]))
    if TensorProto.INT8 in used:
        graph.initializer.append(helper.make_tensor(ZP[TensorProto.INT8], TensorProto.INT8, [], [0]))
    if TensorProto.FLOAT8E4M3FN in used:
        graph.initializer.append(helper.make_tensor(ZP[TensorProto.FLOAT8E4M3FN], TensorProto.FLOAT8E4M3FN, [], [0],
                                                    raw=False))


def cast_to_qdq(path: Path) -> int:
    """Rewrite the graph at `path` in place; returns the number of nodes rewritten."""
    model = onnx.load(str(path), load_external_data=False)
    graph, types = model.graph, _types(model.graph)
    nodes, used, dq_of_input, count = [], set(), {}, 0
    for node in graph.node:
        if node.op_type == "Cast" and _cast_to(node) in QUANT_TYPES:
            qt = _cast_to(node)
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], SCALE, ZP[qt]], list(node.output), name=node.name))
            used.add(qt)
            count += 1
        elif node.op_type == "Cast" and types.get(node.input[0]) in QUANT_TYPES:
            qt = types[node.input[0]]
            nodes.append(helper.make_node("DequantizeLinear", [node.input[0], SCALE, ZP[qt]], list(node.output), name=node.name))
            dq_of_input[node.input[0]] = node.output[0]
            used.add(qt)
            count += 1
        else:
            nodes.append(node)
    for node in nodes:
        if node.op_type == "Shape" and node.input[0] in dq_of_input:
            node.input[0] = dq_of_input[node.input[0]]
            count += 1
    if count:
        _constants(graph, used)
        inputs = {i.name for i in graph.input}
        first = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inputs]  # inputs-only: may go first
        del graph.node[:]
        graph.node.extend(first + [n for n in nodes if all(n is not f for f in first)])
        onnx.save(model, str(path))
    return count
