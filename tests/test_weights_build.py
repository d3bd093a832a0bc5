"""`build --weights int8|int4` end to end (issue 14): the build quantizes the LLM graphs, holds them to HF on
exactly the weights they store (parity), measures them against float weights (the manifest's accuracy report),
and `verify` repeats the check from the checkpoint. Combined with an in-LLM method and an int8 KV cache, and
through the memory-lean parity probe. The pass itself is tested in test_wquant.py, AWQ in test_awq.py.
"""

from __future__ import annotations

import pytest

from tests.helpers.builds import nullstep
from vtc.export import build as build_mod
from vtc.export.build import BuildArgs, build
from vtc.runtime import load_manifest


def _build(src, out, **kw):
    args = BuildArgs(model=str(src), output=str(out), max_seq_len=256, text_budget=48, **kw)
    return build(args, nullstep)


def test_int4_with_fastv_and_int8_kv_in_one_build_then_verify(tiny_checkpoints, tmp_path):
    from vtc.export.verify import verify

    built = _build(tiny_checkpoints["mha-default"], tmp_path / "a", method="fastv", ratio=0.25, method_options={"layer": "1"}, weights="int4",
                   group_size=32, kv_cache="int8")
    m = load_manifest(built.path)
    w = m.weights
    assert w.dtype == "int4" and w.group_size == 32 and w.algo == "rtn" and w.layers == 15  # 2 layers x 7 + head
    assert w.lm_head  # int8, the default with quantized weights
    assert 0 < w.bytes_after < 0.3 * w.bytes_before
    assert w.accuracy["logits_cosine_median"] > 0.9, w.accuracy  # vs float weights, held-out pairs
    assert m.parity["ok"] and "int4 weights" in m.parity["reference"]
    assert m.kv_cache.dtype == "int8" and m.kv_cache.accuracy
    assert verify(built.path, tokens=6)["ok"]


def test_awq_build_is_checked_on_the_scaled_weights(tiny_checkpoints, tmp_path):
    built = _build(tiny_checkpoints["gqa-full"], tmp_path / "a", weights="int4", group_size=32, weights_algo="awq",
                   ratio=1.0, method="none", lm_head="fp")
    m = load_manifest(built.path)
    assert m.weights.algo == "awq" and m.weights.awq and m.parity["ok"]
    assert not m.weights.lm_head and m.weights.layers == 14  # --lm-head fp: the head stays float
    assert m.parity["greedy_tokens"]["equal"]


def test_int8_weights_through_the_lean_probe(tiny_checkpoints, tmp_path, monkeypatch):
    """A 7B build checks a probe of the first and last layers: quantized like the artifact's LLM graph."""
    monkeypatch.setattr(build_mod, "LEAN_ABOVE_BYTES", 0)
    monkeypatch.setattr(build_mod, "_available_bytes", lambda: 0)
    built = _build(tiny_checkpoints["mqa-layer-1"], tmp_path / "a", weights="int8", dtype="fp16")
    m = load_manifest(built.path)
    assert m.parity["ok"] and m.parity["scope"]["llm_layers_checked"] == [0, 2]
    assert m.weights.layers == 22 and "skipped" in m.weights.accuracy  # 3 layers x 7 + head; the model was freed


@pytest.mark.parametrize("argv,message", [
    (["--weights", "int4", "--group-size", "48"], "group"),
    (["--weights-algo", "awq"], "awq"),
    (["--lm-head", "int8"], "--lm-head int8"),
])
def test_bad_weight_flags_exit_2_before_any_export(argv, message, tiny_checkpoints, tmp_path, capsys):
    from vtc.export.cli import main

    code = main(["build", "--model", str(tiny_checkpoints["mha-default"]), "--output", str(tmp_path / "a"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err.lower() and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_int8_head_of_tied_embeddings_leaves_the_embeddings_float(tiny_checkpoints, tmp_path):
    """Qwen2.5-VL with tied embeddings: the LM head becomes int8 in the graph (and in the parity reference), while
    the embedding table the runtime looks tokens up in stays the float one."""
    import numpy as np
    from safetensors.numpy import load_file

    src = tiny_checkpoints["qwen25-tied"]
    built = build(BuildArgs(model=str(src), output=str(tmp_path / "a"), max_seq_len=256, text_budget=64, weights="int8",
                            ratio=1.0, method="none", image_size=(112, 112)), nullstep)
    m = load_manifest(built.path)
    assert m.weights.lm_head and m.parity["ok"] and m.parity["greedy_tokens"]["equal"]
    table = np.load(built.path / "embed_tokens.npy")
    weights = load_file(str(src / "model.safetensors"))
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    np.testing.assert_array_equal(table, embed.astype(table.dtype))
