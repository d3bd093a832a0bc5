"""Seeded random test images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(seed: int) -> Image.Image:
    """A 200x150 RGB image of uniform random pixels (numpy default_rng(seed))."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
