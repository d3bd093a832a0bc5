"""`vtc-export lint`: would TensorRT's ONNX parser accept every graph of an artifact?

The rules are data (`export/data/tensorrt_onnx_ops.json`): onnx-tensorrt's operator support matrix for
one stated TensorRT version (repository, path and commit in the file), plus the restrictions of that
matrix that can be checked mechanically. Per graph (loaded without external data):

  opset       the default-domain opset is in the supported range; no other domain (plugins) is used
  operators   every node's op is in the matrix and marked supported
  dtypes      the node's data type is one the matrix lists for the op; INT8/FP8 only through
              QuantizeLinear/DequantizeLinear (a Cast to or from them is rejected)
  constraints TopK sorted=1 and K < 3840; no scatter with a reduction; constant axes / Q/DQ scales;
              Q/DQ zero points 0; FP8 needs compute capability >= 8.9
  shapes      no data-dependent shapes: no NonZero/Unique/...; no shape input (Reshape's shape,
              TopK's K, Range's limits, ...) computed from input VALUES (shapes are fine)
  weights     weight-only quantization (build --weights): an INT8/INT4 initializer -> DequantizeLinear ->
              the weight input of MatMul/Gemm; per-axis or singly blocked scales (INT4: even last dim);
              INT4 needs opset 21 and so a newer TensorRT than the table's (`weight_only` in the rules
              file): an error naming that version unless the target (`tensorrt_version`) has it

TopK's K is resolved to a number where it is a constant; a K computed from input shapes (FastV's
`select`: K = seq - (N - K_kept)) is evaluated at the corners of the manifest's profiles and reported
as a warning with its bound (an error if the bound reaches 3840). Every finding names the graph, the
node and the rule's source.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vtc.export.lint_graph import ONNX_TYPE, GraphView, ShapeEvaluator
from vtc.runtime.errors import ExportError, UsageError

RULES_FILE = Path(__file__).parent / "data" / "tensorrt_onnx_ops.json"
TYPE_INPUT = {"Where": 1}  # which input carries the op's data type (default 0)
TYPE_OUTPUT = {"Constant", "ConstantOfShape"}  # ops whose data type is their output's


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    level: str  # "error" | "warning"
    message: str
    source: str = ""

    def line(self) -> str:
        return f"{self.graph}: node {self.node!r} ({self.op}): {self.message}"


@dataclass
class LintReport:
    tensorrt_version: str
    source: dict
    graphs: list = field(default_factory=list)
    findings: list = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "source": self.source, "graphs": self.graphs,
                "ok": self.ok, "findings": [asdict(f) for f in self.findings]}

    def raise_if_errors(self) -> None:
        if self.ok:
            return
        shown = "; ".join(f.line() for f in self.errors[:3])
        more = f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
        raise ExportError(f"TensorRT {self.tensorrt_version} cannot parse this artifact: {shown}{more}.",
                          "Run `vtc-export lint DIR` for every finding and its source; the graph must change "
                          "(a method or export bug: please report it).")


@functools.lru_cache(maxsize=1)
def rules() -> dict:
    return json.loads(RULES_FILE.read_text())


# -- entry points ----------------------------------------------------------------------------------
def lint_artifact(artifact_dir: Path, target_cc: str | None = None, tensorrt_version: str | None = None) -> LintReport:
    """Lint every graph of a built artifact (its manifest's graphs and profiles). `tensorrt_version`: the
    TensorRT the engines will be built with (default: the rules table's); it decides only the findings
    that name a minimum version (INT4 weights)."""
    from vtc.runtime import manifest as mf

    check_target_cc(target_cc)  # before the artifact is read
    check_tensorrt_version(tensorrt_version)
    m = mf.load(Path(artifact_dir), check_files="sizes")
    return lint_graphs(Path(artifact_dir), m.graphs, target_cc, tensorrt_version)


def lint_graphs(directory: Path, graphs: dict, target_cc: str | None = None,
                tensorrt_version: str | None = None) -> LintReport:
    """graphs: {name: GraphSpec}; the ONNX files are read from `directory` without external data."""
    import onnx

    from vtc.export.tensorrt import graph_profiles

    r = rules()
    report = LintReport(tensorrt_version=r["tensorrt_version"], source=r["source"])
    for name, spec in graphs.items():
        model = onnx.load(str(Path(directory) / spec.file), load_external_data=False)
        report.graphs.append(name)
        report.findings += lint_model(model, name, corners(graph_profiles(name, graphs)), target_cc, tensorrt_version)
    return report


def corners(profiles: dict) -> list[dict]:
    """Every combination of each profile's dim endpoints: {"seq": [5, 9], "past_seq": 0} -> 2 bindings."""
    out = []
    for dims in profiles.values():
        keys = list(dims)
        ends = [v if isinstance(v, list) else [v] for v in dims.values()]
        out += [dict(zip(keys, combo)) for combo in itertools.product(*ends)]
    return out or [{}]


def lint_model(model, graph: str, bindings: list[dict] | None = None, target_cc: str | None = None,
               tensorrt_version: str | None = None) -> list[Finding]:
    """All findings for one ONNX model; `bindings` are concrete values of its symbolic dims."""
    g = GraphView(model)
    checks = (_check_opset, _check_nodes, _check_io, _check_data_dependence, _check_topk)
    found: list[Finding] = []
    for check in checks:
        found += check(g, graph, bindings or [{}], target_cc)
    return found + _check_weight_only(g, graph, tensorrt_version or rules()["tensorrt_version"])


def _name(node) -> str:
    return node.name or (node.output[0] if node.output else "?")


def _find(graph, node, level, message, source="") -> Finding:
    return Finding(graph=graph, node=_name(node), op=node.op_type, level=level, message=message, source=source)


# -- checks ----------------------------------------------------------------------------------------
def _check_opset(g: GraphView, graph, _bindings, _cc) -> list[Finding]:
    r = rules()["opset"]
    out = []
    weights = _weight_dqs(g)
    int4_opset = rules()["weight_only"]["int4"]["opset"] if any(d == "INT4" for _, d in weights) else None
    for imp in g.model.opset_import:
        if imp.version == int4_opset:
            continue  # the opset INT4 weights need: _check_weight_only names the TensorRT version it takes
        if imp.domain in ("", "ai.onnx") and not r["min"] <= imp.version <= r["max"]:
            out.append(Finding(graph, "<model>", "opset", "error", f"default-domain opset {imp.version} is outside "
                               f"TensorRT {rules()['tensorrt_version']}'s {r['min']}..{r['max']}.", r["source"]))
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            out.append(_find(graph, n, "error", f"op of domain {n.domain!r}: a custom op needs a TensorRT plugin; "
                             "vtc graphs must be plugin-free.", rules()["source"]["path"] + " lists ai.onnx "
                             "operators only; plugin-free graphs: docs/DESIGN.md"))
    return out


def _check_nodes(g: GraphView, graph, _bindings, target_cc) -> list[Finding]:
    r = rules()
    out = []
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            continue
        entry = r["operators"].get(n.op_type)
        if entry is None or not entry["supported"]:
            why = "is not in the support matrix" if entry is None else "is marked unsupported"
            out.append(_find(graph, n, "error", f"{n.op_type} {why}.", r["source"]["path"]))
            continue
        if n.op_type != "Cast":  # Cast: both ends, by its own rule below
            out += _check_dtype(g, graph, n, entry)
        for rule in r["constraints"].get(n.op_type, []):
            out += _CONSTRAINTS[rule["check"]](g, graph, n, rule, target_cc)
        if n.op_type in r["reduce_axes_constant"]["ops"] and len(n.input) > 1 and n.input[1] \
                and not g.is_constant(n.input[1]):
            out.append(_find(graph, n, "error", "`axes` is not an initializer.", r["reduce_axes_constant"]["source"]))
    return out


def _check_dtype(g: GraphView, graph, n, entry) -> list[Finding]:
    allowed = entry.get("types")
    if not allowed:
        return []
    if n.op_type in TYPE_OUTPUT:
        tensor = n.output[0]
    else:
        idx = TYPE_INPUT.get(n.op_type, 0)
        tensor = n.input[idx] if len(n.input) > idx else ""
    dtype = g.types.get(tensor)
    if not tensor or dtype is None or dtype in allowed:
        return []
    return [_find(graph, n, "error", f"data type {dtype} of {tensor!r} is not one of {', '.join(allowed)}.",
                  rules()["source"]["path"] + f" {n.op_type} row")]


def _c_attribute(g, graph, n, rule, _cc):
    value = g.attr(n, rule["name"], rule.get("default"))
    if isinstance(value, bytes):
        value = value.decode()
    if value == rule["equals"]:
        return []
    return [_find(graph, n, "error", f"attribute {rule['name']}={value!r}; TensorRT needs {rule['equals']!r}.",
                  rule["source"])]


def _c_attribute_absent(g, graph, n, rule, _cc):
    if g.attr(n, rule["name"]) is None:
        return []
    return [_find(graph, n, "error", f"attribute {rule['name']!r} is not supported (scatter with a reduction).",
                  rule["source"])]


def _c_constant_input(g, graph, n, rule, _cc):
    i = rule["input"]
    if len(n.input) <= i or not n.input[i] or g.is_constant(n.input[i]):
        return []
    return [_find(graph, n, "error", f"`{rule['what']}` ({n.input[i]!r}) must be a build-time constant "
                  "(initializer or Constant).", rule["source"])]


def _c_zero_point(g, graph, n, rule, _cc):
    i = rule["input"]
    if len(n.input) <= i or not n.input[i]:
        return []
    value = g.const(n.input[i])
    if value is None:
        level, msg = ("warning", "zero point is stored externally; not checked.") if g.is_constant(n.input[i]) \
            else ("error", "zero point is not a constant.")
        return [_find(graph, n, level, msg, rule["source"])]
    if np.all(value.astype(np.float64) == 0):
        return []
    return [_find(graph, n, "error", "zero point is not 0 (TensorRT quantization is symmetric).", rule["source"])]


def _c_output_dtype(g, graph, n, rule, target_cc):
    dtype = g.types.get(n.output[0]) if n.output else None
    if dtype is None:
        return []
    if dtype not in rule["allowed"]:
        return [_find(graph, n, "error", f"quantizes to {dtype}; TensorRT activations quantize to "
                      f"{' or '.join(rule['allowed'])}.", rule["source"])]
    return _fp8_finding(graph, n, target_cc) if dtype == "FP8" else []


def _fp8_finding(graph, n, target_cc) -> list[Finding]:
    need = rules()["fp8_min_compute_capability"]
    if target_cc is None:
        return [_find(graph, n, "warning", f"FP8 needs compute capability >= {need['value']} (Ada, Hopper, Thor); "
                      "it cannot run on Jetson Orin (8.7): use an INT8 KV cache there.", need["source"])]
    if _cc_tuple(target_cc) < _cc_tuple(need["value"]):
        return [_find(graph, n, "error", f"FP8 needs compute capability >= {need['value']}; the target is "
                      f"{target_cc}.", need["source"])]
    return []


def _cc_tuple(cc: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(cc).split("."))


def check_target_cc(target_cc: str | None) -> None:
    """--target-cc is a compute capability MAJOR.MINOR (8.7 Orin, 8.9 Ada, 9.0 Hopper) or None: a UsageError."""
    if target_cc is None:
        return
    parts = str(target_cc).split(".")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 2 for p in parts):
        raise UsageError(f"--target-cc {target_cc!r} is not a compute capability MAJOR.MINOR.",
                         "Pass e.g. --target-cc 8.7 (Jetson Orin), 8.9 (Ada) or 9.0 (Hopper).")


def _c_no_quantized(g, graph, n, rule, _cc):
    allowed = rules()["operators"]["Cast"]["types"]
    src = g.types.get(n.input[0]) if n.input else None
    dst = ONNX_TYPE.get(g.attr(n, "to"))
    bad = [t for t in (src, dst) if t is not None and t not in allowed]
    if not bad:
        return []
    hint = (" INT8/FP8 exist in TensorRT only through quantization: use QuantizeLinear/DequantizeLinear with a "
            "constant scale." if set(bad) & set(rules()["dtypes"]["quantized"]) else "")
    return [_find(graph, n, "error", f"Cast {src} -> {dst}: TensorRT's Cast supports {', '.join(allowed)}.{hint}",
                  rule["source"])]


def _c_max_outputs(g, graph, n, rule, _cc):
    used = [o for o in n.output if o]
    if len(used) <= rule["count"]:
        return []
    return [_find(graph, n, "error", f"{len(used)} outputs are used; only the first is supported.", rule["source"])]


def _c_k_below(*_args):
    return []  # TopK's K needs the whole graph (constant or shape-derived): see _check_topk


_CONSTRAINTS = {"attribute": _c_attribute, "attribute_absent": _c_attribute_absent, "constant_input": _c_constant_input,
                "zero_point_zero": _c_zero_point, "output_dtype": _c_output_dtype, "no_quantized_types": _c_no_quantized,
                "max_outputs": _c_max_outputs, "k_below": _c_k_below}


def _check_io(g: GraphView, graph, _bindings, target_cc) -> list[Finding]:
    """I/O types TensorRT knows; INT8/FP8 inputs must feed only DequantizeLinear, such outputs must come
    from QuantizeLinear. Nodes with subgraphs (If/Loop/Scan) are flagged: their bodies are not linted."""
    quant = set(rules()["dtypes"]["quantized"])
    src = rules()["dtypes"]["source"]
    out = []
    for v in (*g.model.graph.input, *g.model.graph.output):
        dtype = g.types.get(v.name)
        if dtype is not None and dtype not in rules()["dtypes"]["supported"]:
            out.append(Finding(graph, v.name, "I/O", "error", f"network input/output of type {dtype}.", src))
    for n in g.nodes:
        if any(a.type in (5, 10) for a in n.attribute):  # AttributeProto.GRAPH / GRAPHS
            out.append(_find(graph, n, "warning", "has a subgraph, which lint does not inspect.", ""))
    for v in g.model.graph.input:
        if g.types.get(v.name) in quant:
            users = g.consumers.get(v.name, [])
            bad = [u for u in users if u.op_type != "DequantizeLinear"]
            for u in bad:
                out.append(_find(graph, u, "error", f"reads {g.types[v.name]} input {v.name!r} directly; TensorRT "
                                 "needs a DequantizeLinear first.", src))
            if users and not bad:
                out.append(Finding(graph, v.name, "input", "warning", f"{g.types[v.name]} network input feeding "
                                   "DequantizeLinear (explicit quantization): check the engine on the device.", src))
    for v in g.model.graph.output:
        producer = g.producer.get(v.name)
        if g.types.get(v.name) in quant and producer is not None and producer.op_type != "QuantizeLinear":
            out.append(_find(graph, producer, "error", f"produces {g.types[v.name]} output {v.name!r} without "
                             "QuantizeLinear.", src))
    return out


def _check_data_dependence(g: GraphView, graph, _bindings, _cc) -> list[Finding]:
    """Forward taint: which tensors' VALUES depend on input values; shape inputs must not."""
    r = rules()["data_dependent_shapes"]
    values: dict[str, bool] = {i: True for i in g.inputs}  # True = depends on input values
    shapes: dict[str, bool] = {}  # True = its SHAPE depends on input values
    out = []
    for n in g.nodes:  # ONNX nodes are topologically sorted
        ins = [i for i in n.input if i]
        if n.op_type in ("Shape", "Size"):
            v_dep, s_dep = shapes.get(ins[0], False), False
        else:
            v_dep = any(values.get(i, False) for i in ins)
            s_dep = any(shapes.get(i, False) for i in ins)
            if n.op_type in r["ops"]:
                s_dep = True
                out.append(_find(graph, n, "error", "output shape depends on input values (data-dependent shape).",
                                 r["source"]))
            bad = [n.input[i] for i in r["shape_inputs"].get(n.op_type, []) if i < len(n.input) and n.input[i]
                   and values.get(n.input[i], False)]
            if bad:
                s_dep = True
                out.append(_find(graph, n, "error", f"shape input {bad[0]!r} is computed from input values "
                                 "(data-dependent shape).", r["source"]))
        for o in n.output:
            values[o], shapes[o] = v_dep, s_dep
    return out


def _check_topk(g: GraphView, graph, bindings, _cc) -> list[Finding]:
    rule = next(c for c in rules()["constraints"]["TopK"] if c["check"] == "k_below")
    limit = rule["limit"]
    out = []
    for n in g.nodes:
        if n.op_type != "TopK" or len(n.input) < 2:
            continue
        ev = ShapeEvaluator(g)
        ks = [ev.value(n.input[1], b) for b in bindings]
        if all(k is not None for k in ks) and not ev.used_shapes:
            k = int(np.max(ks[0]))
            if k >= limit:
                out.append(_find(graph, n, "error", f"K = {k}; TensorRT needs K < {limit}.", rule["source"]))
            continue
        if ev.data_dependent:
            continue  # reported by _check_data_dependence
        known = [int(np.max(k)) for k in ks if k is not None]
        if len(known) == len(ks):
            bound, how = max(known), "computed from input shapes"
        else:
            axis = g.attr(n, "axis", -1)
            dims = [ev.shape(n.input[0], b) for b in bindings]
            lens = [d[axis] for d in dims if d is not None and d[axis] is not None]
            bound, how = (max(lens), "not resolved; bounded by the axis length") if lens else (None, "not resolved")
        if bound is None:
            out.append(_find(graph, n, "warning", f"dynamic K ({how}): no bound from the profiles; TensorRT needs "
                             f"K < {limit}.", rule["source"]))
        elif bound >= limit:
            out.append(_find(graph, n, "error", f"dynamic K ({how}) reaches {bound} under the manifest profiles; "
                             f"TensorRT needs K < {limit}.", rule["source"]))
        else:
            out.append(_find(graph, n, "warning", f"dynamic K ({how}): at most {bound} under the manifest profiles "
                             f"(< {limit}).", rule["source"]))
    return out


# -- weight-only quantization (build --weights) -----------------------------------------------------
def _version(v: str) -> tuple[int, ...]:
    """"10.3.0.26" -> (10, 3, 0); a part's leading digits only ("0rc1" -> 0)."""
    import re

    parts = [int(m.group()) if (m := re.match(r"\d+", x)) else 0 for x in str(v).split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check_tensorrt_version(version: str | None) -> None:
    """A target TensorRT version is MAJOR.MINOR[.PATCH] or None: a UsageError."""
    if version is None:
        return
    parts = str(version).split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise UsageError(f"TensorRT version {version!r} is not MAJOR.MINOR.", "Pass e.g. 10.3 (JetPack 6) or 10.15.")


def weight_only_min_tensorrt(dtype: str) -> str | None:
    """The oldest TensorRT that takes weights of `dtype` (int8 | int4) in vtc's form; None for float."""
    entry = rules()["weight_only"].get(dtype)
    return None if entry is None else entry["min_tensorrt"]


def required_tensorrt(model) -> str:
    """The oldest TensorRT that parses this graph: the table's, or newer for INT4 weights."""
    need = rules()["tensorrt_version"]
    for _, dtype in _weight_dqs(GraphView(model)):
        v = rules()["weight_only"][dtype.lower()]["min_tensorrt"]
        need = v if _version(v) > _version(need) else need
    return need


def _weight_dqs(g: GraphView) -> list[tuple[object, str]]:
    """(DequantizeLinear node, "INT8" | "INT4") for every DQ of an integer initializer (a weight)."""
    return [(n, g.types[n.input[0]]) for n in g.nodes if n.op_type == "DequantizeLinear" and n.input
            and g.types.get(n.input[0]) in ("INT8", "INT4") and n.input[0] in g.consts]


def _check_weight_only(g: GraphView, graph, target: str) -> list[Finding]:
    w = rules()["weight_only"]
    out = []
    for n, dtype in _weight_dqs(g):
        entry = w[dtype.lower()]
        if _version(target) < _version(entry["min_tensorrt"]):
            out.append(_find(graph, n, "error", f"{dtype} weights (DequantizeLinear, opset {entry['opset']}) need "
                             f"TensorRT >= {entry['min_tensorrt']}; the target is TensorRT {target}.", entry["source"]))
        users = g.consumers.get(n.output[0], [])
        bad = [u for u in users if u.op_type not in w["consumers"] or list(u.input).index(n.output[0]) != 1]
        if not users or bad:
            out.append(_find(graph, n, "error", f"weight-only {dtype} DequantizeLinear must feed only the weight (second) "
                             f"input of {'/'.join(w['consumers'])}.", w["about"]))
        out += _check_weight_scale(g, graph, n, dtype, w["blocked"]["source"])
    return out


def _check_weight_scale(g: GraphView, graph, n, dtype: str, source: str) -> list[Finding]:
    shape, scale = g.shapes.get(n.input[0]), g.shapes.get(n.input[1]) if len(n.input) > 1 else None
    if shape is None or scale is None:
        return []
    axis = g.attr(n, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if len(scale) == 1 and scale[0] == shape[axis]:
        ok, why = True, ""
    elif len(scale) == len(shape):
        blocked = [i for i, (a, b) in enumerate(zip(shape, scale)) if a != b]
        ok = len(blocked) == 1 and scale[blocked[0]] and shape[blocked[0]] % scale[blocked[0]] == 0
        why = "the scale must block exactly one dimension by an integer block size"
    else:
        ok, why = len(scale) == 0 or (len(scale) == 1 and scale[0] == 1), "the scale's shape fits neither per-axis nor blocked"
    out = [] if ok else [_find(graph, n, "error", f"scale {scale} for weight {shape}: {why}.", source)]
    if dtype == "INT4" and shape and shape[-1] % 2:
        out.append(_find(graph, n, "error", f"INT4 weight {shape} has an odd last dimension.", source))
    return out
