"""`tome`: agreement with a transcription of the reference, schedules, ONNX parity, and bad input.

The transcription follows facebookresearch/ToMe @ af95e4b: tome/merge.py `bipartite_soft_matching`
(class_token=True), `merge_wavg` and `merge_source`, and tome/patch/timm.py `ToMeBlock.forward` /
`ToMeAttention.forward` (proportional attention), here on HF CLIP encoder layers. One documented
tie-break is applied in both: the edge ranking is a stable descending sort (lower index first),
max over b takes the first maximum. Outputs are compared after ordering the groups by their lowest
original index (the project's output order; inside the encoder both keep ToMe's order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers.builds import refused_before_export
from tests.helpers.graphs import assert_static_graph
from tests.helpers.images import random_image
from tests.helpers.matrix import parity_cases
from tests.helpers.parity import check_against_reference
from tests.helpers.tiny import TINY, write_siglip_llava
from vtc.export.methods import tome
from vtc.export.models.base import VisualSpec


def reference_bipartite_soft_matching(metric, r: int):
    """bipartite_soft_matching(metric, r, class_token=True) -> merge(x, mode)."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merge_wavg(merge, x, size=None):
    size = torch.ones_like(x[..., 0, None]) if size is None else size
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def reference_merge_source(merge, x, source=None):
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def ordered(x, source):
    """Reference output ordered by group representative: (x [Tf, C], kept [Tf], token_map [T0])."""
    rep = source[0].argmax(dim=1)  # first original index in each group (source rows are 0/1)
    order = torch.argsort(rep)
    return x[0, order], rep[order], source[0, order].argmax(dim=0)


def test_merge_matches_reference_transcription_random():
    """Chained merges on random tokens and metrics, CLIP-L/336 sized (577 tokens, 23 blocks) and tiny."""
    diffs = []
    for t0, k_final, seed in [(577, 65, 0), (577, 129, 1), (577, 193, 2), (65, 17, 3), (65, 33, 4), (37, 10, 5)]:
        g = torch.Generator().manual_seed(seed)
        layers = 23 if t0 == 577 else 2
        rs = tome.schedule(t0, layers, k_final)
        x = torch.randn(1, t0, 16, generator=g)
        ref_x, ref_size, source = x, None, None
        mine, size, token_map = x[0], torch.ones(t0, 1), torch.arange(t0)
        for r in rs:
            metric = torch.randn(1, mine.shape[0], 8, generator=g)
            merge = reference_bipartite_soft_matching(metric, r)
            source = reference_merge_source(merge, ref_x, source)
            ref_x, ref_size = reference_merge_wavg(merge, ref_x, ref_size)
            mine, size, new_pos = tome.bipartite_merge(mine, size, metric[0], r)
            token_map = new_pos[token_map]
            diffs.append(float((mine - ref_x[0]).abs().max()))
            assert torch.equal(size, ref_size[0])
        assert mine.shape[0] == k_final
        got_x, got_kept, got_map = tome.order_groups(mine[None], token_map)
        ref_x, ref_kept, ref_map = ordered(ref_x, source)
        assert got_kept.tolist() == ref_kept.tolist() and got_map.tolist() == ref_map.tolist()
        assert float((got_x[0] - ref_x).abs().max()) <= 1e-5
    assert max(diffs) <= 1e-5


def test_ties_follow_the_documented_tie_break():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(6, 8, generator=g)[torch.randint(0, 6, (65,), generator=g)]  # duplicated keys: ties
    x = torch.randn(65, 16, generator=g)
    merge = reference_bipartite_soft_matching(metric[None].clone(), 24)
    ref_x, _ = reference_merge_wavg(merge, x[None])
    mine, _, _ = tome.bipartite_merge(x, torch.ones(65, 1), metric, 24)
    assert float((mine - ref_x[0]).abs().max()) <= 1e-5


def reference_tome_encoder(layers, x, rs):
    """ToMeBlock.forward + ToMeAttention.forward (prop_attn, trace_source) on CLIP encoder layers."""
    size, source = None, None
    for layer, r in zip(layers, rs):
        attn, h = layer.self_attn, layer.layer_norm1(x)
        b, n, c = h.shape
        q, k, v = (p(h).reshape(b, n, attn.num_heads, c // attn.num_heads).permute(0, 2, 1, 3)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        x_attn = attn.out_proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
        x = x + x_attn
        if r > 0:
            merge = reference_bipartite_soft_matching(k.mean(1), r)
            source = reference_merge_source(merge, x, source)
            x, size = reference_merge_wavg(merge, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, source


@pytest.mark.parametrize("name", list(TINY))
def test_encoder_matches_reference_transcription(name, tiny_checkpoints):
    from vtc.export import models

    adapter = models.resolve(tiny_checkpoints[name])
    model = adapter.load(tiny_checkpoints[name])
    spec = adapter.visual_spec(model)
    plan = tome.METHOD.plan(spec, 0.25, {})
    pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 112, 112)).astype(np.float32))
    pixels = pixels[..., : adapter.image_size(model), : adapter.image_size(model)]
    stem = adapter.vision_stem(model)
    layers = [block.layer for block in stem.blocks]  # the HF CLIP layers themselves, for the transcription
    with torch.no_grad():
        embeds, kept, token_map = tome.METHOD.vision_forward(adapter, model, pixels, spec, plan)
        x, source = reference_tome_encoder(layers, stem.embed(pixels), plan.options["schedule"])
        x, ref_kept, ref_map = ordered(x, source)
        ref = stem.project(x[None] if spec.has_cls else x[None, 1:])
    drop = int(not spec.has_cls)  # "default": [CLS] (group 0) is not a visual token
    assert kept[0].tolist() == (ref_kept[drop:] - drop).tolist()
    assert token_map[0].tolist() == (ref_map[drop:] - drop).tolist()
    assert float((embeds - ref).abs().max()) <= 1e-5


def test_no_merging_equals_hf_features(tiny_checkpoints):
    """With r = 0 everywhere the encoder walk (with log(1) = 0 added) is HF's get_image_features."""
    from vtc.export import models
    from vtc.export.methods.base import Plan

    adapter = models.resolve(tiny_checkpoints["gqa-full"])
    model = adapter.load(tiny_checkpoints["gqa-full"])
    spec = adapter.visual_spec(model)
    plan = Plan("tome", 1.0, spec.num_tokens, spec.num_tokens, {"r": 0, "schedule": [0, 0]})
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, kept, token_map = tome.METHOD.vision_forward(adapter, model, pixels, spec, plan)
        hf = model.model.get_image_features(pixels, vision_feature_layer=-2, vision_feature_select_strategy="full")
    assert float((embeds[0] - hf.pooler_output[0]).abs().max()) <= 1e-5
    assert kept[0].tolist() == token_map[0].tolist() == list(range(65))


def test_schedules():
    assert tome.schedule(65, 2, 17) == [32, 16]  # the maximum: half of the mergeable tokens per block
    assert tome.schedule(65, 2, 33) == [16, 16]
    assert tome.schedule(65, 2, 32) == [17, 16]  # remainder to the earlier block
    assert tome.schedule(65, 2, 18) == [30, 17]  # raised from 24 so the 50% cap of block 2 can still reach K
    assert tome.schedule(577, 23, 65) == [23] * 6 + [22] * 17
    assert tome.constant_schedule(65, 2, 40) == [32, 16]
    clip_l = VisualSpec(num_tokens=576, grid=(24, 24), has_cls=False, cls_attention=True, embed_dim=8,
                        feature_layers=(23,))
    for k in (64, 128, 192, 144):
        plan = tome.METHOD.plan(clip_l, k / 576, {})
        assert plan.k == k and 577 - sum(plan.options["schedule"]) == k + 1
    assert tome.METHOD.plan(clip_l, 0.5, {"r": "8"}).k == 576 - 8 * 23
    tiny_full = VisualSpec(num_tokens=65, grid=(8, 8), has_cls=True, cls_attention=True, embed_dim=8,
                           feature_layers=(2,))
    plan = tome.METHOD.plan(tiny_full, 0.25, {})  # round(16.25) = 16 < 17 = K_min = ceil(16.25): rounded up
    assert (plan.k, plan.options["schedule"]) == (17, [32, 16])


@pytest.mark.parametrize("name,ratio", [(c.config, c.ratio) for c in parity_cases("tome")])
def test_onnx_equals_pytorch_reference(name, ratio, tiny_checkpoints, artifact_factory):
    art = artifact_factory(name, "tome", ratio)
    assert_static_graph(art / "vision.onnx")
    out = check_against_reference(art, tiny_checkpoints[name], "tome", ratio, random_image(11))
    ref, plan, vlm = out.ref, out.plan, out.vlm
    assert vlm.manifest.compression.options["schedule"] == plan.options["schedule"]
    assert len(set(ref.tokens)) > 1
    assert ref.kept_index == sorted(ref.kept_index) and sorted(set(ref.token_map)) == list(range(plan.k))


def test_unreachable_budget_is_refused_before_export(tiny_checkpoints, tmp_path):
    msg = refused_before_export(tiny_checkpoints["mha-default"], "tome", 0.1, tmp_path / "out")
    assert "at least 16 of 64" in msg


def test_no_cls_checkpoint_is_refused_before_export(tmp_path):
    msg = refused_before_export(write_siglip_llava(tmp_path / "siglip"), "tome", 0.25, tmp_path / "out")
    assert "[CLS]" in msg
