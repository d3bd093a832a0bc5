"""Decode cost that follows the context: attention reads only the filled part of each layer's cache.

The runtime feeds each layer's whole preallocated cache, `past_key.i` [1, Hkv, max_seq_len, Dh] (a
zero-copy view, bound once), and `past_lengths` [L] says how much of it is filled. Traced as is, every
decode step would multiply the query with all max_seq_len positions and mask the unfilled ones, so a
build for long conversations pays for them on every short one. After export this pass puts, in front of
every use of a past tensor, a `Slice` to its layer's filled length:

    past_key.i [1, Hkv, P, Dh] --(DequantizeLinear, for int8/fp8 caches)--> Slice(axis 2, 0 .. past_lengths[j])
        --> every former consumer (attention MatMul, the mask's Shape, ...)

so attention, masks and shapes all follow the filled length; the cache itself is still never copied
as a whole (the slice is the O(context) read attention does anyway). For a quantized cache the slice
goes after the DequantizeLinear: TensorRT takes INT8/FP8 tensors only straight into Q/DQ. Prefill
(`past_seq` = 0) slices an empty tensor.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

ZERO, AXIS = "vtc_past_slice_start", "vtc_past_slice_axis"


def _layers(inputs: set[str]) -> list[int]:
    """Global layer ids of the segment's past inputs, in `past_lengths` order."""
    return sorted(int(n.split(".", 1)[1]) for n in inputs if n.startswith("past_key."))


def slice_past_to_length(path: Path) -> int:
    """Rewrite the LLM graph at `path` in place; returns the number of past tensors sliced."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    if "past_lengths" not in inputs:
        return 0
    dq_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inputs}
    front, after, renamed = [], {}, {}
    for j, layer in enumerate(_layers(inputs)):
        length = f"vtc_past_length.{layer}"  # [1]: past_lengths[j]
        front.append(helper.make_node("Slice", ["past_lengths", f"vtc_past_index.{layer}", f"vtc_past_index_end.{layer}"],
                                      [length], name=f"vtc_past_length_{layer}"))
        graph.initializer.extend([helper.make_tensor(f"vtc_past_index.{layer}", TensorProto.INT64, [1], [j]),
                                  helper.make_tensor(f"vtc_past_index_end.{layer}", TensorProto.INT64, [1], [j + 1])])
        for kind in ("key", "value"):
            src = f"past_{kind}.{layer}"
            tensor = dq_of.get(src, src)  # float: the input itself; int8/fp8: its DequantizeLinear output
            filled = f"{tensor}.filled"
            node = helper.make_node("Slice", [tensor, ZERO, length, AXIS], [filled], name=f"vtc_slice_{kind}_{layer}")
            (after.setdefault(tensor, []) if tensor != src else front).append(node)
            renamed[tensor] = filled
    if not renamed:
        return 0
    graph.initializer.extend([helper.make_tensor(ZERO, TensorProto.INT64, [1], [0]),
                              helper.make_tensor(AXIS, TensorProto.INT64, [1], [2])])
    nodes = list(front)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
        for out in node.output:
            nodes.extend(after.get(out, []))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate shapes that named the full `past_seq`; re-inferred by the runtimes
    onnx.save(model, str(path))
    return len(renamed)
