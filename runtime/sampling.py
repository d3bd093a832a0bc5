"""Next-token choice from last-position logits [V]: greedy, or temperature + top-p with a seeded RNG."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vtc.runtime.errors import ArtifactError, UsageError


def _number(value) -> float | None:
    """`value` as a finite float, or None (bools, non-numbers, NaN, infinities, ints too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class SamplingConfig:
    """Validated at construction (a UsageError names the `run` flag): temperature finite and >= 0 (0 =
    greedy), top_p in (0, 1], seed a whole number >= 0."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, p, s = _number(self.temperature), _number(self.top_p), self.seed
        if t is None or t < 0:
            raise UsageError(f"--temperature {self.temperature!r} is not a finite number >= 0.",
                             "Pass 0 for greedy decoding (the default), or e.g. --temperature 0.7 to sample.")
        if p is None or not 0 < p <= 1:
            raise UsageError(f"--top-p {self.top_p!r} is not in (0, 1]: it is the share of probability mass sampled from.",
                             "Pass e.g. --top-p 0.9 (1 samples from every token).")
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise UsageError(f"--seed {self.seed!r} is not a whole number >= 0.", "Pass e.g. --seed 1.")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        # Greedy needs no RNG; creating one costs ~ms on a cold start, inside TTFT.
        self.rng = np.random.default_rng(int(cfg.seed)) if cfg.temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature <= 0:
            return int(np.argmax(logits))
        with np.errstate(over="ignore", invalid="ignore"):
            z = logits.astype(np.float64) / self.cfg.temperature
            if not math.isfinite(z.max()):  # a tiny temperature overflowed: shift first (0 for the best, < 0 else)
                z = (logits.astype(np.float64) - np.max(logits)) / self.cfg.temperature
            p = np.exp(z - z.max())
        total = p.sum()
        if not math.isfinite(total) or total <= 0:
            raise ArtifactError("the language model returned NaN or infinite logits, so no token can be sampled.",
                                "Check the artifact with `vtc-export verify DIR`, or rebuild it.")
        p /= total
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.cfg.top_p) + 1)]  # smallest set with mass >= top_p
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return int(self.rng.choice(p.shape[0], p=p))
