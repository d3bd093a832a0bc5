"""Next-token choice from last-position logits [V]: greedy, or temperature + top-p with a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        # Greedy needs no RNG; creating one costs ~ms on a cold start, inside TTFT.
        self.rng = np.random.default_rng(cfg.seed) if cfg.temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.cfg.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.cfg.top_p) + 1)]  # smallest set with mass >= top_p
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return int(self.rng.choice(p.shape[0], p=p))
