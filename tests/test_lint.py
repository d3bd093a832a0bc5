"""`vtc-export lint`: TensorRT ONNX-parser support of every graph, from a cited data file (no TensorRT needed).

* Every method's artifact passes (fp32 KV, the artifacts the parity tests build: same keys, built once).
* Every KV dtype the build offers (the KV tests' pool artifacts). The vision graph depends only on the
  method and the LLM graphs only on the layout and the KV dtype: every method (fp32) x every KV dtype
  (pool) covers method x KV dtype; the built product is the `slow` test (make test-all).
* Hand-made graphs with known-unsupported patterns are rejected with the node named, and the CLI says so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.matrix import LINT_CONFIG, LINT_MATRIX, LINT_RATIO, PARITY_MATRIX
from vtc.export.cli import main
from vtc.runtime import manifest as mf
from vtc.export.lint import RULES_FILE, lint_artifact, lint_model

def method_artifact(artifact_factory, method: str, **kw) -> Path:
    """The parity matrix's LINT_CONFIG artifact of `method` (same keys: the session builds it once)."""
    from vtc.export import methods

    if not methods.get(method).compresses:
        return artifact_factory(LINT_CONFIG, method, **kw)
    case = next(c for c in PARITY_MATRIX if (c.config, c.method, c.ratio) == (LINT_CONFIG, method, LINT_RATIO))
    opts = {"method_options": dict(case.options)} if case.options else {}  # 2-layer tiny LLM: split at 1
    return artifact_factory(LINT_CONFIG, method, LINT_RATIO, **kw, **opts)


def kv_dtypes() -> list:
    from vtc.export.build import KV_DTYPES, BuildArgs

    assert "kv_cache" in BuildArgs.__dataclass_fields__
    # fp32: every method's artifact above; bf16: only with bf16 graphs (tests/test_dtype.py lints those)
    return [d for d in KV_DTYPES if d not in ("fp32", "bf16")]


def summary(report) -> str:
    return "; ".join(f.line() for f in report.errors[:5])


# -- every method, every KV dtype ------------------------------------------------------------------
@pytest.mark.parametrize("method", LINT_MATRIX)
def test_every_method_passes_lint(method, artifact_factory):
    report = lint_artifact(method_artifact(artifact_factory, method))
    assert report.ok, summary(report)
    topk = [f for f in report.warnings if f.op == "TopK"]
    if method == "fastv":  # select: K = seq - (N - K_kept), resolved from shapes and bounded by the profiles
        assert topk and all(f.graph == "select" and "at most 64" in f.message for f in topk), topk
    else:
        assert not topk, topk  # every other TopK has a constant K


@pytest.mark.parametrize("kv", kv_dtypes())
def test_every_kv_dtype_passes_lint(kv, artifact_factory):
    """The KV tests' artifacts (same keys: built once). The split layout's segments are the same layer
    code as `llm` (StaticCacheLM over a layer range); the full product is test_full_matrix_passes_lint."""
    report = lint_artifact(artifact_factory("gqa-full", "pool", 0.25, kv_cache=kv))
    assert report.ok, summary(report)


@pytest.mark.slow
@pytest.mark.parametrize("kv", kv_dtypes())
@pytest.mark.parametrize("method", LINT_MATRIX)
def test_full_matrix_passes_lint(method, kv, artifact_factory):
    """Every method x every KV dtype, each built (make test-all)."""
    report = lint_artifact(method_artifact(artifact_factory, method, kv_cache=kv))
    assert report.ok, summary(report)


# -- known-unsupported patterns --------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opset=18, domain_ops=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domain_ops]
    return helper.make_model(graph, opset_imports=opsets)


def _x(name="x", shape=("seq", 8), dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _y(name="y", dtype=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _f32(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.float32), name)


BAD = {
    "nonzero": (lambda: _model([helper.make_node("NonZero", ["x"], ["y"], name="bad_nonzero")], [_x()],
                               [_y(dtype=TensorProto.INT64)]), "bad_nonzero", "data-dependent"),
    "unique": (lambda: _model([helper.make_node("Unique", ["x"], ["y"], name="bad_unique")], [_x()], [_y()]),
               "bad_unique", "marked unsupported"),
    "topk_k_too_large": (lambda: _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big_topk", axis=-1)], [_x(shape=(1, 5000))],
        [_y("v"), _y("i", TensorProto.INT64)], [_i64("k", [4096])]), "big_topk", "K = 4096"),
    "topk_unsorted": (lambda: _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="unsorted_topk", axis=-1, sorted=0)],
        [_x(shape=(1, 50))], [_y("v"), _y("i", TensorProto.INT64)], [_i64("k", [4])]), "unsorted_topk", "sorted=0"),
    "topk_dynamic_k_too_large": (lambda: _model(
        [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=2),
         helper.make_node("TopK", ["x", "s"], ["v", "i"], name="dyn_topk", axis=-1)],
        [_x(shape=(1, "seq"))], [_y("v"), _y("i", TensorProto.INT64)]), "dyn_topk", "reaches 4000"),
    "scatter_reduction": (lambda: _model(
        [helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], name="scatter_add", reduction="add")],
        [_x(shape=(4, 8)), _x("idx", (4, 8), TensorProto.INT64), _x("upd", (4, 8))], [_y()]), "scatter_add",
        "reduction"),
    "scatternd_reduction": (lambda: _model(
        [helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="scatternd_max", reduction="max")],
        [_x(shape=(4, 8)), _x("idx", (2, 1), TensorProto.INT64), _x("upd", (2, 8))], [_y()]), "scatternd_max",
        "reduction"),
    "reshape_from_values": (lambda: _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_by_value")],
        [_x(), _x("shape", (2,), TensorProto.INT64)], [_y()]), "reshape_by_value", "data-dependent"),
    "cast_to_int8": (lambda: _model([helper.make_node("Cast", ["x"], ["y"], name="cast_int8", to=TensorProto.INT8)],
                                    [_x()], [_y(dtype=TensorProto.INT8)]), "cast_int8", "QuantizeLinear"),
    "qdq_scale_not_constant": (lambda: _model(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q_dynamic_scale"),
         helper.make_node("DequantizeLinear", ["q", "c"], ["y"], name="dq")],
        [_x(), _x("s", (), TensorProto.FLOAT)], [_y()], [_f32("c", 0.1)]), "q_dynamic_scale", "build-time constant"),
    "qdq_zero_point": (lambda: _model(
        [helper.make_node("QuantizeLinear", ["x", "c", "zp"], ["q"], name="q_zero_point"),
         helper.make_node("DequantizeLinear", ["q", "c"], ["y"], name="dq")],
        [_x()], [_y()], [_f32("c", 0.1), numpy_helper.from_array(np.array(3, np.int8), "zp")]),
        "q_zero_point", "zero point is not 0"),
    "squeeze_axes_input": (lambda: _model(
        [helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze_dyn")],
        [_x(shape=(1, 8)), _x("axes", (1,), TensorProto.INT64)], [_y()]), "squeeze_dyn", "axes"),
    "double_matmul": (lambda: _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm_double")],
        [_x(dtype=TensorProto.DOUBLE), _x("w", (8, 8), TensorProto.DOUBLE)], [_y(dtype=TensorProto.DOUBLE)]),
        "mm_double", "DOUBLE"),
    "custom_op": (lambda: _model([helper.make_node("FancyAttention", ["x"], ["y"], name="plugin_node",
                                                   domain="com.example")], [_x()], [_y()], domain_ops=["com.example"]),
                  "plugin_node", "plugin"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_known_unsupported_pattern_is_rejected_with_the_node_named(case):
    make, node, text = BAD[case]
    findings = lint_model(make(), "g", [{"seq": 4000}])
    errors = [f for f in findings if f.level == "error"]
    assert any(f.node == node and text in f.message for f in errors), [f.line() for f in findings]
    assert all(f.source or f.op == "opset" for f in errors)


def test_opset_outside_the_supported_range():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_x()], [_y()], opset=21)
    errors = [f for f in lint_model(model, "g") if f.level == "error"]
    assert any("opset 21" in f.message for f in errors)


def test_dynamic_k_within_bound_is_a_warning_with_the_bound():
    make, _, _ = BAD["topk_dynamic_k_too_large"]
    found = lint_model(make(), "g", [{"seq": 10}, {"seq": 700}])
    assert [f.level for f in found] == ["warning"] and "at most 700" in found[0].message, found


def test_fp8_quantization_needs_sm89():
    model = _model([helper.make_node("QuantizeLinear", ["x", "c", "zp"], ["q"], name="q_fp8"),
                    helper.make_node("DequantizeLinear", ["q", "c", "zp"], ["y"], name="dq_fp8")], [_x()], [_y()],
                   [_f32("c", 0.1), helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])], opset=19)
    assert [f.level for f in lint_model(model, "g") if f.node == "q_fp8"] == ["warning"]
    orin = [f for f in lint_model(model, "g", target_cc="8.7") if f.node == "q_fp8"]
    assert [f.level for f in orin] == ["error"] and "8.9" in orin[0].message
    assert not [f for f in lint_model(model, "g", target_cc="9.0") if f.node == "q_fp8"]


def test_cli_names_the_node_of_an_unsupported_graph(artifact_factory, tmp_path, capsys):
    """A built artifact whose vision graph gained a NonZero: `vtc-export lint` exits 1 and names it."""
    art = tmp_path / "art"
    shutil.copytree(artifact_factory("mha-default", "none"), art)
    model = onnx.load(str(art / "vision.onnx"))
    model.graph.node.append(helper.make_node("NonZero", ["pixel_values"], ["nz"], name="injected_nonzero"))
    onnx.save(model, str(art / "vision.onnx"))
    raw = json.loads((art / "manifest.json").read_text())  # as a rebuild would list it (the load checks sizes)
    raw["files"]["vision.onnx"] = {"sha256": mf.sha256_file(art / "vision.onnx"),
                                   "bytes": (art / "vision.onnx").stat().st_size}
    (art / "manifest.json").write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["lint", str(art)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"error vision: node 'injected_nonzero' \(NonZero\)", out), out
    assert main(["lint", str(art), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and any(f["node"] == "injected_nonzero" for f in report["findings"])


def test_rules_file_cites_its_source():
    data = json.loads(RULES_FILE.read_text())
    src = data["source"]
    assert src["repository"] == "onnx/onnx-tensorrt" and src["path"] == "docs/operators.md"
    assert re.fullmatch(r"[0-9a-f]{40}", src["commit"])
    assert data["tensorrt_version"].startswith("10.") and data["opset"]["max"] >= 18
    assert len(data["operators"]) > 150 and not data["operators"]["NonZero"].get("restrictions")
    assert "3840" in data["operators"]["TopK"]["restrictions"]
    for op, rules in data["constraints"].items():
        assert all(r.get("source") for r in rules), op


def test_the_build_summary_groups_repeated_findings():
    """An int4 graph has the same finding on every quantized MatMul: the build prints it once with a count
    (`vtc-export lint` still lists every node)."""
    from rich.console import Console

    from vtc.export.lint import Finding, LintReport
    from vtc.export.report import print_lint

    msg = "INT4 weights (DequantizeLinear, opset 21) need TensorRT >= 10.15; the target is TensorRT 10.1."
    report = LintReport("10.1", {"repository": "r", "path": "p", "commit": "c" * 40}, ["llm"],
                        [Finding("llm", f"w{i}.dq", "DequantizeLinear", "error", msg) for i in range(3)]
                        + [Finding("llm", "nz", "NonZero", "error", "data-dependent shape.")])
    console = Console(record=True, width=400)
    print_lint(console, report)
    lines = console.export_text().splitlines()
    assert [ln for ln in lines if "TensorRT >= 10.15" in ln] == [
        f"  error llm: 3 DequantizeLinear nodes ('w0.dq', 'w1.dq', ...): {msg}"]
    assert "  error llm: node 'nz' (NonZero): data-dependent shape." in lines
    print_lint(console := Console(record=True, width=400), report, verbose=True)
    assert sum("TensorRT >= 10.15" in ln for ln in console.export_text().splitlines()) == 3
