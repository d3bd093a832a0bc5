"""`divprune`: the exported selection against a transcription of the reference, and end-to-end parity.

The reference is vbdi/divprune @ 799e2d9, LLaVA/llava/model/llava_arch.py (`pairwise_cosine_similarity`,
`DivPrune`), transcribed below in plain PyTorch with its own loop. Tie-break in both: torch.argmax /
ONNX ArgMax return the lowest index among equal maxima. On tie-free inputs (checked at every step) the
kept indices must be identical; the one deliberate deviation (already-picked tokens cannot be picked
again) only shows on duplicated tokens and is pinned down by `test_duplicates_*`.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.graphs import vision_graph_ops
from tests.helpers.matrix import parity_cases
from tests.helpers.parity import check_parity
from vtc.export import methods
from vtc.export.methods.base import Plan, gather_sorted
from vtc.export.methods.divprune import greedy_max_min
from vtc.export.models.base import VisualFeatures, VisualSpec
from vtc.runtime.errors import MethodError
from vtc.runtime.pipeline import VLM

METHOD = methods.get("divprune")


def reference_divprune(feats: torch.Tensor, k: int, check_ties: bool = True) -> torch.Tensor:
    """Transcription of the reference `DivPrune(visual_feature_vectors, ...)`: feats [N, D] -> s [K] in
    selection order (threshold_terms = k; the reference derives it as int(round(ratio * N)))."""
    norm_matrix = feats / feats.norm(dim=1, keepdim=True)  # pairwise_cosine_similarity
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())  # [N, N] distance
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]  # [N]
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
            scores = torch.min(m2, dim=0).values  # [N]
        if check_ties:
            assert int((scores == scores.max()).sum()) == 1, f"tie at step {i}: the input is not tie-free"
        s[i] = torch.argmax(scores)
    return s


def _run_method(x: torch.Tensor, k: int, has_cls: bool = False):
    """The project's method on embeds x [N, D]: (embeds [1, K, D], kept [1, K], token_map [1, N])."""
    n, d = x.shape
    spec = VisualSpec(num_tokens=n, grid=(1, n - int(has_cls)), has_cls=has_cls, cls_attention=True, embed_dim=d)
    plan = Plan(method="divprune", ratio=k / n, n=n, k=k)
    return METHOD.compress(VisualFeatures(embeds=x[None]), spec, plan)


@pytest.mark.parametrize("n,k", [(576, 64), (576, 128), (576, 144), (576, 192), (576, 1), (576, 576),
                                 (64, 16), (65, 16), (36, 9), (64, 32), (65, 33)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_reference_transcription(n, k, seed):
    g = torch.Generator().manual_seed(1000 * n + 10 * k + seed)
    x = torch.randn(n, 96, generator=g) + 0.3 * torch.randn(1, 96, generator=g)  # shared offset: cos not ~0
    s_ref = reference_divprune(x, k)
    assert torch.equal(greedy_max_min(1.0 - _cos(x), k), s_ref), "selection order differs"
    embeds, kept, token_map = _run_method(x, k)
    ref_embeds, ref_kept, ref_map = gather_sorted(x[None], s_ref)
    assert kept.tolist() == ref_kept.tolist() == [sorted(s_ref.tolist())]
    assert token_map.tolist() == ref_map.tolist()
    assert float((embeds - ref_embeds).abs().max()) <= 1e-5
    assert kept.dtype == token_map.dtype == torch.int64 and embeds.shape == (1, k, 96)


def _cos(x):
    xn = x / x.norm(dim=1, keepdim=True)
    return xn @ xn.t()


def test_budget_rule_matches_reference_round():
    """K = round(ratio * N), as the reference's int(round(threshold_ratio * image_feature_length))."""
    spec = VisualSpec(num_tokens=576, grid=(24, 24), has_cls=False, cls_attention=True, embed_dim=8)
    for ratio in (0.111, 0.2222, 0.25, 1 / 3, 0.5):
        assert METHOD.plan(spec, ratio, {}).k == int(round(ratio * 576))


def test_ties_go_to_lowest_index():
    """Exact ties (equal distances): both pick the lowest index. 4 points on two axes, all equidistant."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    s_ref = reference_divprune(x, 3, check_ties=False)
    assert s_ref.tolist() == [0, 2, 1]  # first: all nearest-other distances 1 -> 0; then 2 (distance 2); then 1
    assert greedy_max_min(1.0 - _cos(x), 3).tolist() == s_ref.tolist()


def test_duplicates_are_not_picked_twice():
    """The one deviation: the reference can re-pick a selected token when only duplicates remain
    (its own distance 0 ties with theirs); vtc picks the next unselected duplicate: K distinct tokens."""
    eye = torch.eye(3)
    x = eye[[0, 0, 1, 1, 2, 2]]  # three directions, each twice (exact distances 0 and 1)
    assert reference_divprune(x, 5, check_ties=False).tolist() == [0, 2, 4, 0, 0]
    assert greedy_max_min(1.0 - _cos(x), 5).tolist() == [0, 2, 4, 1, 3]
    _embeds, kept, token_map = _run_method(x, 5)
    assert kept.tolist() == [[0, 1, 2, 3, 4]] and token_map.tolist() == [[0, 1, 2, 3, 4, -1]]


def test_full_strategy_cls_competes_like_any_token():
    """With [CLS] among the visual tokens DivPrune treats it as one more candidate (no forced keep)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(65, 32, generator=g)
    x[0] = x[1] + 1e-3 * torch.randn(32, generator=g)  # [CLS] nearly duplicates patch 1: not diverse
    _embeds, kept, _map = _run_method(x, 16, has_cls=True)
    assert kept[0].tolist() == sorted(reference_divprune(x, 16).tolist())


# -- exported artifacts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,ratio", [(c.config, c.ratio) for c in parity_cases("divprune")])
def test_divprune_parity(name, ratio, tiny_checkpoints, artifact_factory):
    check_parity(name, "divprune", ratio, tiny_checkpoints, artifact_factory)


def test_divprune_graph_is_unrolled(artifact_factory):
    """K static steps, one ArgMax each; no Loop (checked in check_parity)."""
    art = artifact_factory("mha-default", "divprune", 0.25)
    ops = [n.op_type for n in vision_graph_ops(art)]
    assert ops.count("ArgMax") == VLM(art).manifest.compression.k_visual == 16


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_option_fails_before_export(tiny_checkpoints, tmp_path):
    from vtc.export.build import BuildArgs, build

    steps = []

    def step(label):
        steps.append(label)
        raise AssertionError(f"build reached step {label!r} despite a bad option")

    out = tmp_path / "out"
    with pytest.raises(MethodError, match="has no option 'seed'"):
        build(BuildArgs(model=str(tiny_checkpoints["mha-default"]), method="divprune", ratio=0.25,
                        method_options={"seed": "1"}, output=str(out)), step)
    assert steps == [] and not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(MethodError):
        METHOD.parse_options({"k": "3"})
    assert METHOD.parse_options({}) == {}


def test_listed_with_paper_and_reference():
    assert METHOD.where == "after projector" and "2503.02175" in METHOD.paper and "799e2d9" in METHOD.reference
    assert METHOD.summary and METHOD.options == ()
    assert "divprune" in methods.names()
