"""FastV and TokenCarve: selection vs transcriptions of the published code, and end-to-end parity.

The transcriptions below are our own code, line by line after the reference functions:
- FastV: pkunlp-icler/FastV @ d165972, src/FastV/lmms-eval/fastv_kvcache.py, FastVLlamaModel.forward
  (the `layer_idx == K` branch).
- TokenCarve: ShawnTan86/TokenCarve @ a57bd59, TokenCarve/modeling_llama.py, LlamaModel.forward
  (the `layer_idx == Token_carve_work_layer` branch).
Documented tie-break, applied in both: the Borda top-R (`img_token_rank.topk`) orders equal scores by
lower token index; sorts by value order equal values by lower index. The reference takes the SVD in
float32; `svd_dtype` lets the test check the float64 path exactly and measure float32 agreement.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.builds import nullstep
from tests.helpers.images import random_image
from tests.helpers.matrix import parity_cases
from tests.helpers.parity import PROMPT
from vtc.export import methods, models
from vtc.export.reference import reference_generate
from vtc.runtime import selectors
from vtc.runtime.pipeline import VLM


def _topk_tiebreak(values: torch.Tensor, k: int) -> torch.Tensor:
    """topk with equal values ordered by lower index (the documented tie-break)."""
    order = sorted(range(values.shape[0]), key=lambda i: (-float(values[i]), i))
    return torch.tensor(order[:k])


def ref_tokencarve(hidden, attn_avg_last, sys_length, n, t, w=0.5, svd_dtype=torch.float32):
    """Transcription of TokenCarve's work-layer branch. hidden [S, D] = layer_outputs[0][0]."""
    rank, merge_nums = int(1.5 * t), int(t / 2)
    img_attn = attn_avg_last[sys_length:sys_length + n]
    av_rank = _topk_tiebreak(img_attn, n)  # torch.sort(descending=True)
    x = hidden.to(svd_dtype)[sys_length:sys_length + n, :]
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    contributions = torch.sum(torch.abs(u @ torch.diag(s)), dim=1)
    sv_rank = _topk_tiebreak(contributions, n)
    weighting = torch.arange(n, 0, -1, dtype=torch.float64)
    score = torch.zeros(n, dtype=torch.float64)
    score[av_rank] += weighting * w
    score[sv_rank] += weighting * (1 - w)
    top = _topk_tiebreak(score, rank) + sys_length
    metric = hidden / hidden.norm(dim=-1, keepdim=True)
    set_length = int(0.5 * len(top))
    scores = metric[top[set_length:]] @ metric[top[:set_length]].T
    max_values, max_index = scores.max(dim=-1)
    reduce = min(set_length, merge_nums)
    by_value = _topk_tiebreak(max_values, max_values.shape[0])
    merge_b, remaining = by_value[:reduce], by_value[reduce:]
    real_b, real_a = top[merge_b + set_length], top[max_index[merge_b]]
    out = hidden.clone()
    out.scatter_reduce_(0, real_a.unsqueeze(1).expand(-1, out.size(1)), hidden[real_b], reduce="mean")
    keep = torch.cat((torch.arange(sys_length), top[:set_length], top[remaining + set_length],
                      torch.arange(sys_length + n, hidden.shape[0]))).sort().values
    return keep, out[keep]


def ref_fastv(last_attention, sys_length, n, k):
    """Transcription of FastV's pruning branch: last_attention [1, H, S, S] of layer K-1."""
    seq = last_attention.shape[-1]
    score = last_attention.mean(dim=1)[0][-1][sys_length:sys_length + n]
    top = score.topk(k).indices + sys_length
    return torch.cat((torch.arange(sys_length), top, torch.arange(sys_length + n, seq))).sort().values


def _inputs(seed, seq, d, heads=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, d, generator=g)
    att = torch.softmax(torch.randn(1, heads, seq, seq, generator=g) * 3, dim=-1)
    return hidden, att


@pytest.mark.parametrize("n, t", [(576, 64), (576, 128), (576, 192), (64, 16), (36, 9), (64, 5)])
def test_tokencarve_matches_reference(n, t):
    for seed in range(3):
        sys_length, tail, d = 7, 5, 96
        hidden, att = _inputs(seed, sys_length + n + tail, d)
        last = att.mean(dim=1)[0][-1]
        keep_ref, hidden_ref = ref_tokencarve(hidden, last, sys_length, n, t, svd_dtype=torch.float64)
        sel = selectors.tokencarve(hidden.numpy(), last.numpy(), sys_length, n, t)
        assert sel.keep.tolist() == keep_ref.tolist()
        assert sel.image_kept.shape[0] == t
        np.testing.assert_allclose(sel.hidden, hidden_ref.numpy(), atol=1e-5)


def test_tokencarve_float32_reference_agreement():
    """The published code's float32 SVD vs our float64: selections agree on random inputs at 576."""
    agree = 0
    for seed in range(10):
        hidden, att = _inputs(100 + seed, 7 + 576 + 5, 96)
        last = att.mean(dim=1)[0][-1]
        keep_ref, _ = ref_tokencarve(hidden, last, 7, 576, 128, svd_dtype=torch.float32)
        agree += selectors.tokencarve(hidden.numpy(), last.numpy(), 7, 576, 128).keep.tolist() == keep_ref.tolist()
    assert agree >= 9, f"float32-reference agreement {agree}/10"


@pytest.mark.parametrize("n, k", [(576, 144), (576, 288), (64, 16), (65, 16)])
def test_fastv_matches_reference(n, k):
    fastv = methods.get("fastv")
    for seed in range(3):
        hidden, att = _inputs(seed, 5 + n + 9, 32)
        keep_ref = ref_fastv(att, 5, n, k)
        kept_hidden, keep = fastv.select(hidden[None], att.mean(dim=1)[0][-1][None], torch.tensor([5]), n, k)
        assert keep[0].tolist() == keep_ref.tolist()
        assert torch.equal(kept_hidden[0], hidden[keep_ref])


@pytest.mark.parametrize("method,name,ratio,opts",
                         [(c.method, c.config, c.ratio, c.options) for c in parity_cases("fastv", "tokencarve")],
                         ids=[f"{c.method}-{c.config}-{c.ratio}" for c in parity_cases("fastv", "tokencarve")])
def test_in_llm_parity(method, name, ratio, opts, tiny_checkpoints, artifact_factory):
    """opts: tiny configs with 2 LLM layers can only split at layer 1 (the matrix says so)."""
    art = artifact_factory(name, method, ratio, method_options=dict(opts))
    vlm = VLM(art)
    adapter = models.resolve(tiny_checkpoints[name])
    model = adapter.load(tiny_checkpoints[name])
    spec = adapter.visual_spec(model)
    m = methods.get(method)
    plan = m.plan(spec, ratio, dict(opts))
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(random_image(5))
    ref = reference_generate(adapter, model, m, plan, spec, torch.from_numpy(pixels), prompt.before, prompt.after, 32)
    res = vlm.generate_from(pixels, prompt, 32, ignore_eos=True)
    assert res.kept_indices == ref.kept_index and len(res.kept_indices) == plan.k
    assert res.token_map == ref.token_map
    assert res.token_ids == ref.tokens
    lengths = vlm.cache.lengths - 32 + 1  # after prefill: visual + text per layer
    expected = np.array(vlm.manifest.compression.kv_visual_per_layer) + prompt.num_text
    assert lengths.tolist() == expected.tolist()


def test_in_llm_bad_input(tiny_checkpoints):
    from vtc.export.build import BuildArgs, prepare
    from vtc.runtime.errors import MethodError

    ckpt = str(tiny_checkpoints["mha-default"])
    with pytest.raises(MethodError, match="layer=5"):
        prepare(BuildArgs(model=ckpt, method="fastv", ratio=0.25, method_options={"layer": "5"}), nullstep)
    with pytest.raises(MethodError, match="1.5"):
        prepare(BuildArgs(model=ckpt, method="tokencarve", ratio=0.8, method_options={"layer": "1"}), nullstep)
    with pytest.raises(MethodError, match="weight"):
        prepare(BuildArgs(model=ckpt, method="tokencarve", ratio=0.25, method_options={"weight": "2"}), nullstep)


@pytest.mark.slow
def test_tokencarve_paper_budgets_on_bench_model(tmp_path):
    """T = 64, 128, 192 of 576 on the bench-size random LLaVA, real layer-1 states of 10 images:
    the runtime's selection equals the reference transcription (float64 SVD) on every image, and the
    float32-SVD reference agreement is reported."""
    from vtc.export.demo import cache_root
    from vtc.export.random_llava import RandomLlavaSpec, write_random_llava

    ckpt = cache_root() / "bench-llava-v2"
    if not (ckpt / "model.safetensors").is_file():
        write_random_llava(ckpt, RandomLlavaSpec.bench(), seed=0)
    adapter = models.resolve(ckpt)
    model = adapter.load(ckpt)
    pre = adapter.static_cache_lm(model, (0, 2))
    table = adapter.embed_table(model)
    before, after = [1, 20, 30, 40], [50, 60, 70, 2, 80]
    exact, f32 = 0, 0
    for seed in range(10):
        pixels = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 3, 336, 336)).astype(np.float32))
        with torch.no_grad():
            embeds = torch.cat([table[before][None], adapter.visual_features(model, pixels).embeds, table[after][None]], 1)
            kv = tuple(torch.zeros(1, 16, 0, 64) for _ in range(4))
            hidden, last, *_ = pre(embeds, torch.arange(embeds.shape[1])[None], torch.zeros(2, dtype=torch.int64), None, kv)
        for t in (64, 128, 192):
            sel = selectors.tokencarve(hidden[0].numpy(), last[0].numpy(), len(before), 576, t)
            exact += sel.keep.tolist() == ref_tokencarve(hidden[0], last[0], len(before), 576, t, svd_dtype=torch.float64)[0].tolist()
            f32 += sel.keep.tolist() == ref_tokencarve(hidden[0], last[0], len(before), 576, t)[0].tolist()
    print(f"\ntokencarve bench-size selections equal to the reference: float64 SVD {exact}/30, float32 SVD {f32}/30")
    assert exact == 30


def test_reference_on_a_forced_selection(tiny_checkpoints):
    """Parity's re-run on the artifact's own selection (a quantized KV cache may flip FastV's ranking at a
    near-tie): forcing the reference's own kept tokens reproduces it exactly, and forcing others changes it."""
    name = "mha-default"
    adapter = models.resolve(tiny_checkpoints[name])
    model = adapter.load(tiny_checkpoints[name])
    spec = adapter.visual_spec(model)
    m = methods.get("fastv")
    plan = m.plan(spec, 0.25, {"layer": "1"})
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    before, after = [1, 5, 6], [7, 8, 9, 10]
    ref = reference_generate(adapter, model, m, plan, spec, pixels, before, after, 8)
    again = reference_generate(adapter, model, m, plan, spec, pixels, before, after, 8, ref.kept_index)
    assert again.kept_index == ref.kept_index and again.token_map == ref.token_map and again.tokens == ref.tokens
    assert all(torch.equal(a, b) for a, b in zip(again.step_logits, ref.step_logits))
    other = sorted(set(range(plan.n)) - set(ref.kept_index))[:plan.k]
    forced = reference_generate(adapter, model, m, plan, spec, pixels, before, after, 8, other)
    assert forced.kept_index == other and not torch.equal(forced.step_logits[0], ref.step_logits[0])
