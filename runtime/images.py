"""Deterministic synthetic test images (PIL + numpy; no torch), for commands run without an image file.

    shapes_image(size, scene)    coloured shapes on a light background, drawn in a 336-px frame scaled to
                                 `size`. PATTERN: `vtc-export profile`'s default image and the first
                                 fidelity image; COMPARE: the image `vtc-export compare` records feeds from.
    checkerboard_image(size)     an 8x8 board with a yellow disc in the middle (fidelity)
    noise_image(size, seed)      smooth colour noise: 6x6 random colours resized bicubically (fidelity)
    gradient_image(size, seed)   gradients plus seeded noise: tie-free (the build's parity image)
    fidelity_images(size)        [shapes PATTERN, checkerboard, noise]: the sweep's default fidelity images

Every pixel is part of a contract: profiles, fidelity scores and backend comparisons were measured on
these exact images, so a change here changes recorded numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 336  # the shapes' coordinates are given in a FRAME x FRAME image


@dataclass(frozen=True)
class Scene:
    """A background colour and shapes: (kind, coordinates in the 336-px frame, fill), drawn in order;
    kind is an ImageDraw method: "rectangle" or "ellipse" (box x0, y0, x1, y1) or "polygon" (points)."""

    background: tuple
    shapes: tuple


_TRIANGLE = ((60, 300), (160, 190), (260, 300))
PATTERN = Scene((236, 236, 228), (("ellipse", (30, 40, 140, 150), (220, 40, 40)),
                                  ("rectangle", (180, 50, 300, 160), (40, 90, 220)),
                                  ("polygon", _TRIANGLE, (40, 170, 70))))
COMPARE = Scene((240, 240, 235), (("rectangle", (30, 40, 150, 160), (200, 40, 40)),
                                  ("ellipse", (170, 60, 300, 190), (40, 90, 200)),
                                  ("polygon", _TRIANGLE, (40, 160, 70))))


def shapes_image(size: int = FRAME, scene: Scene = PATTERN):
    """`scene` drawn on a size x size RGB image (coordinates scaled by size / 336)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), scene.background)
    d = ImageDraw.Draw(img)
    s = size / FRAME
    for kind, coords, fill in scene.shapes:
        if kind == "polygon":
            getattr(d, kind)([(x * s, y * s) for x, y in coords], fill=fill)
        else:
            getattr(d, kind)([v * s for v in coords], fill=fill)
    return img


def checkerboard_image(size: int = FRAME):
    """8x8 dark/white squares (integer cells of size // 8) and a yellow disc over the middle 40%."""
    from PIL import Image, ImageDraw

    board = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(board)
    cell = size // 8
    for r in range(8):
        for c in range(8):
            if (r + c) % 2:
                d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=(30, 30, 30))
    d.ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7], fill=(240, 200, 20))
    return board


def noise_image(size: int = FRAME, seed: int = 0):
    """Random colours on a 6x6 grid (numpy default_rng(seed)), resized bicubically to size x size."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def gradient_image(size: int, seed: int = 0):
    """Smooth gradients plus seeded noise in [0, 90): no two patches alike (tie-free token selection)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * 160 + rng.integers(0, 90, (size, size, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def fidelity_images(size: int = FRAME) -> list:
    """Three images of different statistics: shapes (PATTERN), a checkerboard with a disc, colour noise."""
    return [shapes_image(size, PATTERN), checkerboard_image(size), noise_image(size, seed=0)]
