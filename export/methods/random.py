"""`random`: keep a seeded, uniformly random subset of K tokens (random-pruning baseline).

The subset is drawn once, at export time, from `seed` (option, default 0) and baked into the vision
graph as a constant index set: it is IMAGE-INDEPENDENT (every image keeps the same positions), and a
rebuild with the same (N, K, seed) gives the same set on any platform and Python version.

Draw: a partial Fisher-Yates shuffle of range(M) driven only by `random.Random(seed).random()` (the
one stream Python guarantees to be stable across versions; `sample`/`randrange` are not):
  for i in 0 .. k-1:  j = i + floor(u_i * (M - i)),  swap(a[i], a[j])        (u_i in [0, 1))
the first k entries, sorted ascending, are the kept patches: a uniform k-subset (up to the 2^-53
granularity of u_i).

[CLS]: with the "full" feature strategy token 0 is the vision [CLS]; like `uniform`, `cls-attn` and
`pool` it is always kept and the k = K - 1 others are drawn from the patches (K >= 2 then).
"""

from __future__ import annotations

import functools
import random as _random

import torch

from vtc.export.methods.base import Method, Option, Plan, gather_sorted
from vtc.export.methods.uniform import with_cls
from vtc.runtime.errors import MethodError


@functools.lru_cache(maxsize=64)
def random_subset(m: int, k: int, seed: int) -> tuple[int, ...]:
    """k distinct indices of range(m), sorted; a partial Fisher-Yates shuffle seeded with `seed`."""
    rng = _random.Random(seed)
    a = list(range(m))
    for i in range(k):
        j = i + int(rng.random() * (m - i))
        a[i], a[j] = a[j], a[i]
    return tuple(sorted(a[:k]))


class RandomSubset(Method):
    name = "random"
    where = "after projector"
    summary = ("Keep a seeded random subset of K tokens, drawn at export time (the same for every image); "
               "[CLS] always kept when it is a visual token.")
    paper = "random-pruning baseline"
    reference = "-"
    options = (Option("seed", int, 0, "Seed (integer >= 0) of the export-time draw of the kept subset."),)

    def parse_options(self, raw: dict[str, str]) -> dict:
        out = super().parse_options(raw)
        if out["seed"] < 0:
            raise MethodError(f"option seed={out['seed']} of method 'random' is negative.",
                              "Pass an integer seed >= 0, e.g. --method-opt seed=0.")
        return out

    def feasible_k(self, spec, ratio, options) -> int:
        k = super().feasible_k(spec, ratio, options)
        return max(k, 2) if spec.has_cls else k

    def indices(self, spec, plan: Plan) -> list[int]:
        m = spec.num_tokens - int(spec.has_cls)
        return with_cls(list(random_subset(m, plan.k - int(spec.has_cls), plan.options["seed"])), spec.has_cls)

    def compress(self, feats, spec, plan: Plan):
        index = torch.tensor(self.indices(spec, plan), dtype=torch.int64)  # [K] constant
        return gather_sorted(feats.embeds, index)  # ([1, K, D], [1, K], [1, N])


METHOD = RandomSubset()
