"""pool and cls-attn against transcriptions of their reference code, on random inputs.

cls-attn follows FasterVLM (Theia-4869/FasterVLM @ f5d5f12): clip_encoder.py `feature_select`
(attentions[select_layer][:, :, 0, 1:]) and llava_arch.py `encode_images` (mean over heads, topk,
boolean index mask, so kept tokens stay in original order). pool is 2-D average pooling of the
projected grid (torch's avg_pool2d, the LLaVolta-style pooling baseline).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtc.export import methods
from vtc.export.models.base import VisualFeatures, VisualSpec


def _spec(side: int, has_cls: bool) -> VisualSpec:
    return VisualSpec(num_tokens=side * side + has_cls, grid=(side, side), has_cls=has_cls, cls_attention=True,
                      embed_dim=32)


def ref_fastervlm(features, attentions, k):
    """features [1, N, C] (patches), attentions [1, H, 1+N, 1+N] of the select layer."""
    image_attentions = attentions[:, :, 0, 1:].mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=k, dim=1)[1]
    index_masks = torch.zeros(features.shape[:2], dtype=torch.bool)
    index_masks.scatter_(1, token_indices, True)
    return features[index_masks][None], index_masks[0].nonzero()[:, 0]


@pytest.mark.parametrize("side, ratio", [(24, 0.25), (24, 0.11), (24, 0.5), (8, 0.25), (6, 0.25)])
def test_cls_attn_matches_fastervlm(side, ratio):
    method = methods.get("cls-attn")
    spec = _spec(side, has_cls=False)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        n = side * side
        feats = torch.randn(1, n, 32, generator=g)
        att = torch.softmax(torch.randn(1, 4, 1 + n, 1 + n, generator=g), dim=-1)
        plan = method.plan(spec, ratio, {})
        ref_feats, ref_idx = ref_fastervlm(feats, att, plan.k)
        vf = VisualFeatures(embeds=feats, _cls_attn=att[:, :, 0, 1:].mean(dim=1))
        embeds, kept, token_map = method.compress(vf, spec, plan)
        assert kept[0].tolist() == ref_idx.tolist()
        torch.testing.assert_close(embeds, ref_feats, atol=1e-5, rtol=0)
        assert sorted(i for i in token_map[0].tolist() if i >= 0) == list(range(plan.k))


@pytest.mark.parametrize("side, ratio, window", [(24, 0.25, 2), (24, 0.11, 3), (24, 0.0625, 4), (8, 0.25, 2), (6, 0.25, 2)])
def test_pool_matches_avg_pool2d(side, ratio, window):
    method = methods.get("pool")
    spec = _spec(side, has_cls=False)
    plan = method.plan(spec, ratio, {})
    assert plan.options["window"] == window
    x = torch.randn(1, side * side, 32)
    ref = F.avg_pool2d(x.view(1, side, side, 32).permute(0, 3, 1, 2), window).flatten(2).transpose(1, 2)
    embeds, kept, token_map = method.compress(VisualFeatures(embeds=x), spec, plan)
    torch.testing.assert_close(embeds, ref, atol=1e-5, rtol=0)
    rows = torch.arange(side) // window
    expected = (rows[:, None] * (side // window) + rows[None, :]).reshape(-1)
    assert token_map[0].tolist() == expected.tolist()


def test_full_strategy_keeps_cls():
    """With "full", [CLS] is visual token 0: cls-attn and pool always keep it (documented extension)."""
    spec = _spec(8, has_cls=True)
    x = torch.randn(1, 65, 32)
    vf = VisualFeatures(embeds=x, _cls_attn=torch.rand(1, 64))
    for name in ("cls-attn", "pool"):
        method = methods.get(name)
        embeds, kept, token_map = method.compress(vf, spec, method.plan(spec, 0.25, {}))
        assert kept[0, 0].item() == 0 and token_map[0, 0].item() == 0
        torch.testing.assert_close(embeds[0, 0], x[0, 0])
