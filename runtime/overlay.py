"""`run --overlay`: the image as the model saw it, with the kept visual tokens highlighted.

Each output visual token gets a colour; every patch that went into it (kept, or merged into it) is
tinted with that colour and the representative patch (kept_index) is outlined. Patches that were
dropped are dimmed. Pillow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vtc.runtime.errors import InputError


def _palette(k: int) -> np.ndarray:
    """k distinct, bright colours [k, 3] (golden-angle hues)."""
    hues = (np.arange(k) * 0.618033988749895) % 1.0
    rgb = np.stack([np.abs(hues * 6 - 3) - 1, 2 - np.abs(hues * 6 - 2), 2 - np.abs(hues * 6 - 4)], -1)
    return (np.clip(rgb, 0, 1) * 200 + 55).astype(np.float32)


def render(view: np.ndarray, grid: tuple[int, int], token_map: list[int], kept: list[int], has_cls: bool) -> Image.Image:
    """view [H, W, 3] uint8; token_map [N] (-1 = dropped); kept [K] representative token indices."""
    rows, cols = grid
    h, w = view.shape[:2]
    img = view.astype(np.float32)
    patches = np.asarray(token_map[1:] if has_cls else token_map).reshape(rows, cols)
    colours = _palette(max(1, max(token_map) + 1))
    ph, pw = h / rows, w / cols
    for r in range(rows):
        for c in range(cols):
            y0, y1, x0, x1 = int(r * ph), int((r + 1) * ph), int(c * pw), int((c + 1) * pw)
            slot = patches[r, c]
            block = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = block * 0.25 if slot < 0 else block * 0.65 + colours[slot] * 0.35
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for idx in kept:
        j = idx - 1 if has_cls else idx
        if j < 0:
            continue  # the [CLS] token has no patch
        r, c = divmod(j, cols)
        draw.rectangle([int(c * pw), int(r * ph), int((c + 1) * pw) - 1, int((r + 1) * ph) - 1], outline=(255, 255, 255))
    return out


def save(path: Path, view: np.ndarray, grid, token_map, kept, has_cls: bool) -> None:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise InputError(f"--overlay {path} must end in .png or .jpg.", "Pass e.g. --overlay kept.png.")
    if not path.parent.exists():
        raise InputError(f"the folder of --overlay {path} does not exist.", "Create it or choose another path.")
    render(view, tuple(grid), token_map, kept, has_cls).save(path)
