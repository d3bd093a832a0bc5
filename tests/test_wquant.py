"""Weight-only quantization of the LLM graphs (vtc.export.wquant): every linear layer becomes int8/int4 +
DequantizeLinear, ONNX Runtime runs each on its fused MatMulNBits kernel, the graph computes what HF's
model computes with the same quantized weights, and the manifest, lint, TensorRT and CLI know about it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest

from tests.helpers.builds import nullstep
from vtc.export import wquant
from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError, BackendError, UsageError
from vtc.runtime.pipeline import VLM

GROUP = 32  # divides the tiny model's hidden (64) and intermediate (128) sizes
LINEARS = 14  # mha-default: 2 decoder layers x q/k/v/o/gate/up/down
MATMULS = 8  # q/k/v and gate/up fused (wquant.sibling_groups): 2 layers x qkv/o/gate-up/down


def _quantized_copy(art, tmp_path, dtype: str, **kw):
    out = tmp_path / f"art-{dtype}"
    shutil.copytree(art, out)
    result = wquant.quantize_graph(out / "llm.onnx", dtype, GROUP, expect=LINEARS, **kw)
    m = mf.load(out, check_files=False)
    rec = wquant.WeightsRecord(dtype=dtype, group_size=GROUP if dtype == "int4" else None, algo="rtn",
                               min_tensorrt="10.15" if dtype == "int4" else "10.1")
    rec.add("llm", result)
    m = dataclasses.replace(m, weights=rec.info(), files=mf.file_table(out))
    (out / mf.MANIFEST).write_text(m.to_json())
    return out, result


@pytest.fixture(scope="module")
def quantized(art, tmp_path_factory):
    root = tmp_path_factory.mktemp("wq")
    return {d: _quantized_copy(art, root, d) for d in ("int8", "int4")}


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_linear_is_quantized_and_fused_by_onnx_runtime(quantized, dtype):
    out, result = quantized[dtype]
    assert result.layers == LINEARS and result.matmuls == MATMULS and not result.lm_head
    assert result.opset == (21 if dtype == "int4" else 18)
    ratio = result.bytes_after / result.bytes_before  # int8: 1/4 + scales; int4: 1/8 + scales (of float32)
    assert ratio < (0.27 if dtype == "int8" else 0.16), ratio
    model = onnx.load(str(out / "llm.onnx"), load_external_data=False)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # plugin-free: no com.microsoft in the file
    assert [lin.head for lin in wquant.find_linears(model)] == [True]  # only the LM head stays a float weight
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == MATMULS
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.name.endswith(".fused.split")]
    assert sorted(len(n.output) for n in splits) == [2, 2, 3, 3]  # gate/up and q/k/v of each layer
    onnx.checker.check_model(str(out / "llm.onnx"))
    modes = {(out / f).stat().st_mode & 0o777 for f in ("llm.onnx", "llm.onnx.data", "vision.onnx")}
    assert len(modes) == 1, modes  # replaced files keep the artifact's permissions
    fast = wquant.fast_path(out / "llm.onnx")  # what ONNX Runtime 1.32 runs after its graph optimizations
    assert fast["matmulnbits"] == {8 if dtype == "int8" else 4: MATMULS}, fast
    assert fast["unfused"] == [] and "DequantizeLinear" not in fast["ops"]
    # int4 keeps --group-size; per-channel int8 runs in blocks of K (64 or 128 here), not ONNX Runtime's default
    # 32 (vtc.runtime.backend.PER_CHANNEL_BLOCK: a 32-block carries a float32 scale per 32 weights)
    assert fast["block_sizes"] == ({8: [64, 128]} if dtype == "int8" else {4: [GROUP]}), fast


def test_lm_head_int8(art, tmp_path):
    out, result = _quantized_copy(art, tmp_path, "int4", lm_head=True)
    assert result.layers == LINEARS + 1 and result.matmuls == MATMULS + 1 and result.lm_head
    fast = wquant.fast_path(out / "llm.onnx")  # the head runs on MatMulNBits too (8 bits), next to the int4 layers
    assert fast["matmulnbits"] == {4: MATMULS, 8: 1} and fast["unfused"] == [], fast
    assert fast["block_sizes"] == {4: [GROUP], 8: [64]}, fast  # the head: per channel, K = hidden = 64


def test_rms_norms_export_in_the_form_onnx_runtime_fuses(art):
    """torch.rsqrt exports as Sqrt + Reciprocal, which ONNX Runtime does not fuse; the exporter rewrites it to
    Div (vtc.export.onnx_export.rms_norm_as_div), so each RMSNorm runs as one SimplifiedLayerNormalization."""
    model = onnx.load(str(art / "llm.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "Reciprocal"]
    fast = wquant.fast_path(art / "llm.onnx")
    assert fast["ops"].get("SimplifiedLayerNormalization") == 2 * 2 + 1, fast["ops"]  # 2 per layer + the final norm


@pytest.fixture
def exact_matmulnbits(monkeypatch):
    """ONNX Runtime's MatMulNBits at accuracy_level 1 (float32 compute) instead of the default 4, which also
    quantizes the activations to int8: the graph's own numerics, for comparison with HF."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class Options(base):
        def __init__(self):
            super().__init__()
            self.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")

    monkeypatch.setattr(ort, "SessionOptions", Options)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_graph_equals_hf_with_the_same_quantized_weights(quantized, tiny_checkpoints, dtype, exact_matmulnbits):
    from vtc.export import parity
    from vtc.export.build import BuildArgs, prepare

    bp = prepare(BuildArgs(model=str(tiny_checkpoints["mha-default"]), method="none", weights=dtype, group_size=GROUP,
                           max_seq_len=256, text_budget=48, lm_head="fp"), nullstep, check_output=False)
    wquant.fake_quantize(bp)  # HF's modeling code on q * s (the fixture's graphs keep a float head)
    report = parity.check(None, bp.adapter, bp.model, bp.method, bp.plan, bp.spec, max_new_tokens=16,
                          vlm=VLM(quantized[dtype][0]))
    assert report["ok"] and report["greedy_tokens"]["equal"], report  # HF generate's tokens, fp32 tolerances


@pytest.mark.parametrize("dtype,bound", [("int8", 0.999), ("int4", 0.95)])
def test_logits_close_to_float_weights(art, quantized, dtype, bound):
    """Against the float artifact (runtime defaults, accuracy_level 4) on the parity prompt."""
    from vtc.export.parity import parity_inputs

    fp, q = VLM(art), VLM(quantized[dtype][0])
    prompt, pixels = parity_inputs(fp)
    a = np.asarray(fp.prefill(prompt, fp.encode_image(pixels)[0]), np.float64).ravel()
    b = np.asarray(q.prefill(prompt, q.encode_image(pixels)[0]), np.float64).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    print(f"{dtype} logits cosine vs float weights: {cos:.6f}")
    assert cos >= bound, cos


def test_manifest_round_trip_and_old_manifests(art, quantized):
    m = mf.load(quantized["int4"][0])
    assert m.weights.dtype == "int4" and m.weights.group_size == GROUP and m.weights.layers == LINEARS
    assert mf.parse(m.to_json()) == m
    raw = json.loads((art / mf.MANIFEST).read_text())
    raw.pop("weights", None)  # written before the field existed
    assert mf.parse(json.dumps(raw)).weights is None
    bad = json.loads(m.to_json())
    bad["weights"]["layers"] += 1
    with pytest.raises(ArtifactError, match="weights.layers"):
        mf.parse(json.dumps(bad))
    bad = json.loads(m.to_json())
    bad["weights"]["dtype"] = "int8"
    with pytest.raises(ArtifactError, match="group_size"):
        mf.parse(json.dumps(bad))


def test_lint_weight_only_rules(quantized):
    from vtc.export.lint import lint_model, required_tensorrt

    int8 = onnx.load(str(quantized["int8"][0] / "llm.onnx"), load_external_data=False)
    int4 = onnx.load(str(quantized["int4"][0] / "llm.onnx"), load_external_data=False)
    assert not [f for f in lint_model(int8, "llm") if f.level == "error"]
    errors = [f for f in lint_model(int4, "llm") if f.level == "error"]
    assert len(errors) == MATMULS and all("TensorRT >= 10.15" in f.message for f in errors)
    assert not [f for f in lint_model(int4, "llm", tensorrt_version="10.15") if f.level == "error"]
    assert (required_tensorrt(int8), required_tensorrt(int4)) == ("10.1", "10.15")
    odd = onnx.load(str(quantized["int4"][0] / "llm.onnx"), load_external_data=False)
    dq = next(n for n in odd.graph.node if n.op_type == "DequantizeLinear")
    consumer = next(n for n in odd.graph.node if dq.output[0] in n.input and n.op_type == "MatMul")
    consumer.input[0], consumer.input[1] = consumer.input[1], consumer.input[0]  # the weight as the first input
    found = [f for f in lint_model(odd, "llm", tensorrt_version="10.15") if f.level == "error"]
    assert any("weight (second) input" in f.message for f in found)


def test_tensorrt_refuses_an_older_version_by_name(quantized):
    from vtc.export.tensorrt import check_version

    for dtype in ("int8", "int4"):
        graphs = mf.load(quantized[dtype][0]).graphs
        check_version(quantized[dtype][0], graphs, "10.15.1")
    check_version(quantized["int8"][0], mf.load(quantized["int8"][0]).graphs, "10.3.0")
    with pytest.raises(BackendError, match=r"needs TensorRT >= 10\.15.*TensorRT 10\.3"):
        check_version(quantized["int4"][0], mf.load(quantized["int4"][0]).graphs, "10.3.0")


def test_group_size_that_does_not_divide_is_refused_before_export(tiny_checkpoints):
    from vtc.export.build import BuildArgs, prepare

    bp = prepare(BuildArgs(model=str(tiny_checkpoints["gqa-full"]), method="none", weights="int4", group_size=64,
                           max_seq_len=256, text_budget=48), nullstep, check_output=False)
    with pytest.raises(UsageError, match="does not divide the input dim 96.*--group-size 32 "):
        wquant.check_model(bp)


@pytest.mark.parametrize("argv,message", [
    (["--weights-algo", "awq"], "searches scales for int4 weights, but --weights is fp"),
    (["--weights", "int8", "--weights-algo", "awq"], "but --weights is int8"),
    (["--weights", "int4", "--group-size", "24"], "--group-size 24 is not a power of two"),
    (["--weights", "int4", "--group-size", "8"], "--group-size 8 is not a power of two >= 16"),
    (["--calib-images", "x", "--calib-prompts", "y"], "--calib-* also to --weights-algo awq"),
])
def test_cli_errors(argv, message, tmp_path, capsys):
    from vtc.export.cli import main

    assert main(["build", "--output", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_architecture_without_llama_linears_is_refused():
    from types import SimpleNamespace

    from torch import nn

    from vtc.runtime.errors import ModelError

    class Adapter:
        model_type = "other"

        def static_cache_lm(self, model):
            return SimpleNamespace(decoder=SimpleNamespace(layers=[nn.Sequential(nn.Linear(4, 4))]))

    bp = SimpleNamespace(args=SimpleNamespace(weights="int8", group_size=128), adapter=Adapter(), model=None)
    with pytest.raises(ModelError, match="Llama-family decoder layers.*--weights fp"):
        wquant.check_model(bp)


def test_accuracy_report_against_float_weights(quantized, tiny_checkpoints):
    """The manifest's accuracy entry: vtc.export.kvquant.accuracy's measurement on held-out pairs."""
    from vtc.export.build import BuildArgs, prepare

    bp = prepare(BuildArgs(model=str(tiny_checkpoints["mha-default"]), method="none", weights="int8",
                           max_seq_len=256, text_budget=48), nullstep, check_output=False)
    acc = wquant.accuracy(VLM(quantized["int8"][0]), bp)
    assert acc["pairs"] >= 20 and acc["new_tokens"] == 32 and "float weights" in acc["reference"]
    assert acc["logits_cosine_median"] >= 0.999, acc
    print(f"int8 accuracy vs float weights: {acc}")
