"""LLM position schemes by name (the manifest's `lm.rope`, set by the architecture's adapter).

"1d": one RoPE position per token, 0..S-1 over the uncompressed prompt; pruned prompts keep their
tokens' original positions and decode continues at the unpruned prompt length (vtc.runtime.lm).
A multimodal scheme (Qwen2-VL's M-RoPE: [3, 1, S]) registers here as one more entry.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vtc.runtime.errors import ArtifactError


def _one_d(seq: int) -> np.ndarray:
    return np.arange(seq, dtype=np.int64)[None]  # [1, S]


_REGISTRY: dict[str, Callable[[int], np.ndarray]] = {"1d": _one_d}


def get(name: str) -> Callable[[int], np.ndarray]:
    """prompt length -> prefill position_ids."""
    if name not in _REGISTRY:
        raise ArtifactError(f"the artifact's LLM uses positions {name!r}, which this vtc does not have "
                            f"(it has {', '.join(_REGISTRY)}).", "Upgrade vtc, or rebuild the artifact with this vtc.")
    return _REGISTRY[name]
