"""LLM position schemes by name (the manifest's `lm.rope`, set by the architecture's adapter).

"1d": one RoPE position per token, 0..S-1 over the prompt as the LLM sees it (a prompt compressed before the
LLM is renumbered); tokens pruned inside the LLM keep their original positions and decode continues at the
unpruned prompt length (vtc.runtime.lm).

"mrope": Qwen2-VL's multimodal RoPE, position_ids [3, 1, S] (temporal, height, width). Text before the image:
0..s-1 in all three rows; visual token (r, c) of the image's rows x cols merged grid, starting at s: (s, s + r,
s + c); the text after it: s + max(rows, cols) + j (HF get_rope_index). A compressed image keeps each kept token's
original (t, h, w) (`kept`: its index on the grid) and the text after it keeps its uncompressed positions. Decode
continues at the largest position + 1 (HF's rope_deltas), the same in all three rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from vtc.runtime.errors import ArtifactError


def _one_d(seq: int, image_start: int = 0, kept=None, grid=None) -> np.ndarray:
    return np.arange(seq, dtype=np.int64)[None]  # [1, S]


def _mrope(seq: int, image_start: int = 0, kept=None, grid=None) -> np.ndarray:
    """[3, 1, S] for before (image_start tokens) + K visual tokens (`kept` [K] grid indices) + after."""
    s, rows, cols = image_start, int(grid[0]), int(grid[1])
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    k = kept.size
    pos = np.empty((3, 1, seq), dtype=np.int64)
    pos[:, 0, :s] = np.arange(s)
    pos[0, 0, s:s + k] = s
    pos[1, 0, s:s + k] = s + kept // cols
    pos[2, 0, s:s + k] = s + kept % cols
    pos[:, 0, s + k:] = s + max(rows, cols) + np.arange(seq - s - k)
    return pos


@dataclass(frozen=True)
class Scheme:
    """A position scheme: `lead` = the position_ids dims before the sequence ((1,) = [1, S]; (3, 1) = [3, 1, S])."""

    name: str
    lead: tuple
    prefill: Callable

    def __call__(self, seq: int, image_start: int = 0, kept=None, grid=None) -> np.ndarray:
        """Prefill position_ids of a prompt of `seq` tokens (the visual tokens at `image_start`, `kept` their grid
        indices on the manifest's `compression.grid`)."""
        return self.prefill(seq, image_start, kept, grid)

    @property
    def decode_shape(self) -> tuple:
        return (*self.lead, 1)


_REGISTRY: dict[str, Scheme] = {"1d": Scheme("1d", (1,), _one_d), "mrope": Scheme("mrope", (3, 1), _mrope)}


def get(name: str) -> Scheme:
    """The scheme `name` (the manifest's lm.rope)."""
    if name not in _REGISTRY:
        raise ArtifactError(f"the artifact's LLM uses positions {name!r}, which this vtc does not have "
                            f"(it has {', '.join(_REGISTRY)}).", "Upgrade vtc, or rebuild the artifact with this vtc.")
    return _REGISTRY[name]
