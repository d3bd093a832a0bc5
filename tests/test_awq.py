"""AWQ (vtc.calibration.awq): the torch quantizers equal the ONNX pass's, the folding keeps the float
model, and the searched scales cut the int4 error of a layer whose inputs have outlier channels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vtc.calibration import awq
from vtc.export import wquant


def _onnx_pass_dequant(w: torch.Tensor, dtype: str, group: int | None) -> np.ndarray:
    """What the ONNX pass's DequantizeLinear computes for an nn.Linear weight [out, in] (W^T in the graph)."""
    wt = w.detach().numpy().T.astype(np.float32)  # [K, N]
    absmax = np.abs(wt).max(axis=0) if group is None else wquant.block_absmax(wt, group)
    s = wquant.scales_for(absmax, dtype)
    q = wquant.quantize_rows(wt, s, dtype, group)
    return (q.astype(np.float32) * (s[None, :] if group is None else np.repeat(s, group, axis=0))).T


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_torch_quantizers_equal_the_onnx_pass(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    w[3] = 0.0  # an all-zero output channel / block: scale 1, q 0
    got = awq.pseudo_quantize(w, 16) if dtype == "int4" else awq.pseudo_quantize_int8(w)
    np.testing.assert_array_equal(got.numpy(), _onnx_pass_dequant(w, dtype, 16 if dtype == "int4" else None))
    part = got[5, :16] if dtype == "int4" else got[5]  # one int4 block / one int8 row: multiples of its scale
    step = part.abs().max() / (7 if dtype == "int4" else 127)
    assert torch.allclose(part / step, torch.round(part / step), atol=1e-3)


def _tiny_decoder(seed: int = 0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32, max_position_embeddings=256)
    return LlamaModel(cfg).eval()


def _inputs(n: int = 6, seq: int = 24, outliers=(3, 17, 40), seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(n):
        x = torch.randn(1, seq, 64, generator=g)
        x[..., list(outliers)] *= 25.0  # a few activation channels far larger than the rest (the AWQ premise)
        xs.append(x)
    return xs


def _error(layer, hs, kws, ref) -> float:
    got = awq._run(layer, hs, kws)
    return awq._error(ref, got)


def _quantized(layer, group):
    q = copy.deepcopy(layer)
    for lin in wquant._llama_linears(q).values():
        lin.weight.data = awq.pseudo_quantize(lin.weight.data, group)
    return q


def test_awq_beats_rtn_on_outlier_channels():
    dec = _tiny_decoder()
    hs, kws = awq.layer0_inputs(dec, _inputs())
    layer = dec.layers[0]
    ref = awq._run(layer, hs, kws)
    rtn = _error(_quantized(layer, 16), hs, kws, ref)
    scaled = copy.deepcopy(layer)
    _, report, _ = awq.scale_layer(scaled, hs, kws, 16)
    assert awq._error(ref, awq._run(scaled, hs, kws)) < 1e-10  # folding keeps the float layer
    searched = _error(_quantized(scaled, 16), hs, kws, ref)
    assert len(report) == 4  # q/k/v, o (MHA: v and o weights have one shape), gate/up, down
    assert all(g["awq_error"] <= g["rtn_error"] for g in report)
    assert any(g["alpha"] > 0 for g in report)
    assert searched < 0.7 * rtn, (searched, rtn)  # measured 2026-12-01: 8.5e-7 vs 1.62e-6 (0.52x)


def test_apply_over_a_decoder_keeps_the_float_model():
    dec = _tiny_decoder(2)
    x = _inputs(n=2, seed=3)
    before = [dec(inputs_embeds=e).last_hidden_state for e in x]
    summary, clips = awq.apply(dec, _inputs(n=4, seed=4), 16)
    after = [dec(inputs_embeds=e).last_hidden_state for e in x]
    assert max(float((a - b).abs().max().detach()) for a, b in zip(before, after)) < 1e-4
    assert summary["pairs"] == 4 and len(summary["layers"]) == 2
    assert summary["awq_error_sum"] <= summary["rtn_error_sum"]
    assert len(clips) == 2 * 5 and all(c.shape[0] == 64 // 16 or c.shape[0] == 128 // 16 for c in clips.values())


def test_clip_search_never_worse_and_clips_heavy_tailed_blocks():
    torch.manual_seed(5)
    w = torch.distributions.StudentT(3.0).sample((32, 64)) * 0.02  # heavy tails: a block's max is an outlier
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(5))
    clip, before, after = awq.search_clip(w, x, 16)
    assert clip.shape == (32, 4) and after <= before
    assert after < 0.97 * before, (after, before)  # measured 2026-12-01: 0.954x
    clipped = float((clip < w.reshape(32, 4, 16).abs().amax(dim=-1)).float().mean())
    assert 0.2 < clipped < 0.9, clipped  # measured: 51% of the blocks


def test_awq_build_path_graph_equals_hf_with_its_quantized_weights(tiny_checkpoints, tmp_path, monkeypatch):
    """Scales and clipping searched on the torch model, the graph exported and quantized with the clips:
    the graph's logits equal HF's (the export wrapper's eager forward) on the same q * s weights."""
    import onnxruntime as ort

    from tests.helpers.builds import nullstep
    from vtc.export.build import BuildArgs, graph_loaders, prepare
    from vtc.export.llm import KVQuant

    from tests.helpers.images import random_image

    images = tmp_path / "calib"
    images.mkdir()
    for i in range(3):  # a small --calib-images/--calib-prompts set keeps the search quick
        random_image(i).save(images / f"{i}.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{q}"}}\n' for q in ("describe the image", "what color is it", "how many")))
    bp = prepare(BuildArgs(model=str(tiny_checkpoints["mha-default"]), method="none", weights="int4", group_size=32,
                           weights_algo="awq", calib_images=str(images), calib_prompts=str(prompts), max_seq_len=256,
                           text_budget=48), nullstep, check_output=False)
    summary = wquant.prepare(bp, nullstep)
    assert summary["awq_error_sum"] <= summary["rtn_error_sum"]
    assert summary["clip"]["linears"] == 10 and summary["clip"]["error_after_sum"] <= summary["clip"]["error_before_sum"]
    n = bp.lm.num_layers
    graphs = {"llm": graph_loaders(bp, KVQuant.float32(n))["llm"](tmp_path / "llm.onnx")}
    record = wquant.quantize_step(tmp_path, bp, graphs, nullstep)
    assert record.layers == 15 and record.lm_head  # 2 layers x 7 + the LM head (int8, the default)
    assert record.graphs["llm"]["clipped"] == 10 and record.awq["pairs"] == 3
    wquant.fake_quantize(bp)
    lm = bp.adapter.static_cache_lm(bp.model)
    g = torch.Generator().manual_seed(0)
    seq, heads, dh = 7, bp.lm.num_kv_heads, bp.lm.head_dim
    feeds = {"inputs_embeds": torch.randn(1, seq, bp.lm.hidden_size, generator=g), "position_ids": torch.arange(seq)[None],
             "past_lengths": torch.zeros(n, dtype=torch.int64), "logits_index": torch.tensor([seq - 1])}
    past = [torch.zeros(1, heads, 0, dh) for _ in range(2 * n)]
    with torch.no_grad():
        want = lm(feeds["inputs_embeds"], feeds["position_ids"], feeds["past_lengths"], feeds["logits_index"], past)[0]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # float32 compute: the graph's numerics
    sess = ort.InferenceSession(str(tmp_path / "llm.onnx"), so, providers=["CPUExecutionProvider"])
    inputs = {k: v.numpy() for k, v in feeds.items()}
    inputs.update({f"past_{kind}.{i}": past[0].numpy() for i in range(n) for kind in ("key", "value")})
    got = sess.run(["logits"], inputs)[0]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5 * max(1.0, float(want.abs().max())))


def test_calibration_tokens_are_capped_by_the_widest_input(monkeypatch):
    dec = _tiny_decoder()
    monkeypatch.setattr(awq, "FEATURE_BYTES", 4 * 128 * 50)  # 50 tokens at down_proj's 128 inputs
    kept = awq.within_budget([torch.zeros(1, 20, 64)] * 5, dec)
    assert len(kept) == 2  # 40 tokens; a third pair would pass 50
    assert len(awq.within_budget([torch.zeros(1, 80, 64)] * 3, dec)) == 1  # always at least one pair
