"""`visionzip`: agreement with a transcription of the reference, ONNX parity, and bad input.

The transcription follows dvlab-research/VisionZip @ 3151f6d, visionzip/clip_encoder.py
`CLIPVisionTower_VisionZip.forward` line by line (batch 1), with one documented tie-break applied
in both: the dominant top-k is a stable descending sort (lower index first on equal scores) and
argmax takes the first maximum (torch's documented rule, as in the reference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.builds import refused_before_export
from tests.helpers.graphs import assert_static_graph
from tests.helpers.images import random_image
from tests.helpers.matrix import parity_cases
from tests.helpers.parity import check_against_reference
from tests.helpers.tiny import write_siglip_llava
from vtc.export.methods import visionzip as vz
from vtc.export.models.base import VisualSpec


def reference_visionzip(attn_weights, hidden_states, metric, dominant_num: int, contextual_num: int):
    """The reference's selection and merging; returns (hidden_states_save, kept, token_map), the last two
    derived from its masks (dominant in original order, then targets; -> output slot per token)."""
    b, t, c = hidden_states.shape
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = torch.sort(cls_attention_sum, dim=1, descending=True, stable=True).indices[:, :dominant_num] + 1
    all_indices = torch.cat([torch.zeros((b, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(b, dominant_num + 1, c)
    metric_filtered = metric[mask].view(b, t - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(b, t - (dominant_num + 1), c)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(b, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    contextual_tokens = hidden_states_filtered[:, target_indices, :] + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    # bookkeeping (not in the reference): original indices behind each output token, and each token's slot
    dom = torch.arange(t)[~mask[0]]
    rest = torch.arange(t)[mask[0]]
    token_map = torch.empty(t, dtype=torch.int64)
    token_map[dom] = torch.arange(dominant_num + 1)
    token_map[rest[target_indices]] = dominant_num + 1 + torch.arange(contextual_num)
    token_map[rest[others]] = dominant_num + 1 + similarity[0].argmax(dim=1)
    return hidden_states_save[0], torch.cat([dom, rest[target_indices]]), token_map


def _random_inputs(n_patches: int, seed: int, heads: int = 4, dv: int = 32, dh: int = 8, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    t = n_patches + 1
    logits = torch.randn(1, heads, 1, t, generator=g)
    if ties:  # few distinct scores and duplicated keys: many exact ties in both rankings
        logits = torch.randint(0, 3, (1, 1, 1, t), generator=g).float().expand(1, heads, 1, t)
    attn = torch.softmax(logits, dim=-1)  # [1, H, 1, T]: row 0 ([CLS]) is all the reference reads
    states = torch.randn(1, t, dv, generator=g)
    metric = torch.randn(1, t, dh, generator=g)
    if ties:
        metric = metric[:, torch.randint(0, 6, (t,), generator=g)]
    return attn, states, metric


def _agree(n_patches: int, k: int, seed: int, ties: bool = False) -> float:
    d, c = vz.split_budget(k)
    attn, states, metric = _random_inputs(n_patches, seed, ties=ties)
    ref_tokens, ref_kept, ref_map = reference_visionzip(attn, states, metric, d - 1, c)
    tokens, kept, token_map = vz.visionzip_select(attn[0, :, 0, 1:].mean(dim=0), states[0], metric[0], d, c, True)
    assert kept.tolist() == ref_kept.tolist()
    assert token_map.tolist() == ref_map.tolist()
    diff = float((tokens - ref_tokens).abs().max())
    assert diff <= 1e-5
    return diff


@pytest.mark.parametrize("n_patches,k", [(576, 64), (576, 128), (576, 192), (576, 144), (64, 16), (64, 32), (36, 9),
                                         (36, 5)])
def test_selection_matches_reference_transcription(n_patches, k):
    for seed in range(3):
        _agree(n_patches, k, seed)


@pytest.mark.parametrize("n_patches,k", [(576, 64), (64, 16)])
def test_ties_follow_the_documented_tie_break(n_patches, k):
    attn, _, _ = _random_inputs(n_patches, 5, ties=True)
    assert len(set(attn[0, :, 0, 1:].sum(0).tolist())) < n_patches // 2, "the input should have ties"
    _agree(n_patches, k, 5, ties=True)


def test_budget_split_is_the_references():
    assert [vz.split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    spec = VisualSpec(num_tokens=576, grid=(24, 24), has_cls=False, cls_attention=True, embed_dim=8,
                      feature_layers=(23,))
    plan = vz.METHOD.plan(spec, 0.25, {})
    assert (plan.k, plan.options["dominant"], plan.options["contextual"]) == (144, 122, 22)
    plan = vz.METHOD.plan(spec, 0.25, {"dominant": "54", "contextual": "10"})
    assert plan.k == 64


def _plan(name, ratio, tiny_checkpoints):
    from vtc.export import methods, models

    adapter = models.resolve(tiny_checkpoints[name])
    model = adapter.load(tiny_checkpoints[name])
    spec = adapter.visual_spec(model)
    m = methods.get("visionzip")
    return adapter, model, spec, m, m.plan(spec, ratio, {})


@pytest.mark.parametrize("name,ratio", [(c.config, c.ratio) for c in parity_cases("visionzip")])
def test_onnx_equals_pytorch_reference(name, ratio, tiny_checkpoints, artifact_factory):
    art = artifact_factory(name, "visionzip", ratio)
    assert_static_graph(art / "vision.onnx")
    out = check_against_reference(art, tiny_checkpoints[name], "visionzip", ratio, random_image(11))
    ref, plan, spec = out.ref, out.plan, out.spec
    assert len(set(ref.tokens)) > 1
    # every visual token lands in an output token; [CLS] is the first dominant token (-1 = not a visual token)
    assert min(ref.token_map) >= 0 and len(ref.kept_index) == plan.k
    assert ref.kept_index[0] == (0 if spec.has_cls else -1)


def test_cls_drop_option_eager(tiny_checkpoints):
    from vtc.export.reference import reference_visual

    adapter, model, spec, m, _ = _plan("mha-default", 0.25, tiny_checkpoints)
    plan = m.plan(spec, 0.25, {"cls": "drop"})
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32))
    embeds, kept, token_map = reference_visual(adapter, model, m, plan, spec, image)
    assert embeds.shape[1] == plan.k == 16 and kept.min() >= 0 and token_map.min() >= 0
    assert sorted(set(token_map[0].tolist())) == list(range(16))


def test_no_cls_checkpoint_is_refused_before_export(tmp_path):
    msg = refused_before_export(write_siglip_llava(tmp_path / "siglip"), "visionzip", 0.25, tmp_path / "out")
    assert "[CLS]" in msg


def test_impossible_split_is_refused(tiny_checkpoints, tmp_path):
    msg = refused_before_export(tiny_checkpoints["mqa-layer-1"], "visionzip", 0.25, tmp_path / "out",
                                method_options={"dominant": "30", "contextual": "10"})
    assert "visionzip cannot make" in msg
