"""`random` and `uniform` baselines: index properties, [CLS] handling, end-to-end parity, bad options."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.matrix import parity_cases
from tests.helpers.parity import check_parity
from vtc.export import methods
from vtc.export.methods.random import random_subset
from vtc.export.methods.uniform import stride_indices
from vtc.export.models.base import VisualFeatures, VisualSpec
from vtc.runtime.errors import MethodError

RANDOM, UNIFORM = methods.get("random"), methods.get("uniform")


def _spec(n: int, has_cls: bool) -> VisualSpec:
    side = math.isqrt(n - int(has_cls))
    return VisualSpec(num_tokens=n, grid=(side, side), has_cls=has_cls, cls_attention=True, embed_dim=8)


def _kept(method, n: int, ratio: float, has_cls: bool = False, **opts):
    """(plan, kept [K], token_map [N]) of `method` on random embeds [1, N, 8]."""
    spec = _spec(n, has_cls)
    plan = method.plan(spec, ratio, {k: str(v) for k, v in opts.items()})
    embeds = torch.randn(1, n, 8)
    out, kept, token_map = method.compress(VisualFeatures(embeds=embeds), spec, plan)
    assert torch.equal(out[0], embeds[0, kept[0]])  # the kept rows, in order
    return plan, kept[0].tolist(), token_map[0].tolist()


def _check_index_set(kept: list[int], token_map: list[int], n: int, k: int) -> None:
    assert len(kept) == k == len(set(kept)) and kept == sorted(kept) and 0 <= kept[0] and kept[-1] < n
    assert token_map == [kept.index(i) if i in kept else -1 for i in range(n)]


# -- uniform ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(576, 0.25), (576, 64 / 576), (576, 192 / 576), (576, 0.3), (64, 0.25),
                                     (36, 0.25), (49, 0.5), (576, 1 / 576), (576, 575 / 576)])
def test_uniform_formula_and_spread(n, ratio):
    plan, kept, token_map = _kept(UNIFORM, n, ratio)
    k = plan.k
    assert kept == [math.floor((i + 0.5) * n / k) for i in range(k)]
    _check_index_set(kept, token_map, n, k)
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {n // k, -(-n // k)}  # evenly spread: every gap is floor or ceil of N/K
    assert kept[0] <= n / (2 * k) and n - 1 - kept[-1] <= n / (2 * k)  # centred margins


def test_uniform_576_quarter_is_every_fourth_from_two():
    assert stride_indices(576, 144) == list(range(2, 576, 4))


@pytest.mark.parametrize("n,ratio", [(65, 0.25), (577, 0.25), (65, 0.01)])
def test_uniform_full_strategy_keeps_cls(n, ratio):
    plan, kept, token_map = _kept(UNIFORM, n, ratio, has_cls=True)
    assert kept[0] == 0 and plan.k == max(2, round(ratio * n))
    assert kept[1:] == [1 + j for j in stride_indices(n - 1, plan.k - 1)]
    _check_index_set(kept, token_map, n, plan.k)


# -- random ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(576, 0.25), (576, 64 / 576), (64, 0.25), (36, 0.25), (576, 1.0 / 576),
                                     (576, 1.0)])
def test_random_seeded_distinct_sorted(n, ratio):
    plan, kept, token_map = _kept(RANDOM, n, ratio, seed=7)
    _check_index_set(kept, token_map, n, plan.k)
    assert kept == list(random_subset(n, plan.k, 7))
    assert _kept(RANDOM, n, ratio, seed=7)[1] == kept  # same seed: same set, whatever the image
    if 1 < plan.k < n:
        assert _kept(RANDOM, n, ratio, seed=8)[1] != kept
    assert _kept(RANDOM, n, ratio)[0].options == {"seed": 0}


def test_random_subset_is_pinned_and_roughly_uniform():
    """The draw is a partial Fisher-Yates on random.Random(seed).random(): pinned values catch any
    change of the generator; over many seeds every position is kept about K/N of the time."""
    assert random_subset(10, 3, 0) == (5, 7, 8)
    assert random_subset(576, 8, 0) == (151, 179, 236, 243, 296, 436, 452, 486)
    counts = torch.zeros(36)
    for seed in range(400):
        counts[list(random_subset(36, 9, seed))] += 1
    assert float(counts.sum()) == 400 * 9
    assert float(counts.min()) > 0.5 * 100 and float(counts.max()) < 1.5 * 100  # expected 100 each


def test_random_full_strategy_keeps_cls():
    plan, kept, token_map = _kept(RANDOM, 65, 0.25, has_cls=True, seed=3)
    assert kept[0] == 0 and kept[1:] == [1 + j for j in random_subset(64, plan.k - 1, 3)]
    _check_index_set(kept, token_map, 65, plan.k)


# -- exported artifacts ----------------------------------------------------------------------------
@pytest.mark.parametrize("method,name,ratio",
                         [(c.method, c.config, c.ratio) for c in parity_cases("uniform", "random")])
def test_baseline_parity(method, name, ratio, tiny_checkpoints, artifact_factory):
    """ratio 0.25 on every tiny config (the other ratio, with [CLS], is covered by the index tests above
    and by divprune's parity at 0.5: builds are the slow part of this file)."""
    check_parity(name, method, ratio, tiny_checkpoints, artifact_factory)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,raw,match", [
    ("random", {"seed": "abc"}, "not a int"),
    ("random", {"seed": "1.5"}, "not a int"),
    ("random", {"seed": "-1"}, "negative"),
    ("random", {"window": "2"}, "has no option 'window'"),
    ("uniform", {"seed": "0"}, "has no option 'seed'"),
])
def test_bad_options_fail_before_export(method, raw, match, tiny_checkpoints, tmp_path):
    from vtc.export.build import BuildArgs, build

    def step(label):
        raise AssertionError(f"build reached step {label!r} despite a bad option")

    with pytest.raises(MethodError, match=match):
        methods.get(method).parse_options(raw)
    out = tmp_path / "out"
    with pytest.raises(MethodError, match=match):
        build(BuildArgs(model=str(tiny_checkpoints["mha-default"]), method=method, ratio=0.25, method_options=raw,
                        output=str(out)), step)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_listed():
    for m in (RANDOM, UNIFORM):
        assert m.where == "after projector" and m.summary and m.paper and m.name in methods.names()
    assert [o.name for o in RANDOM.options] == ["seed"] and UNIFORM.options == ()
