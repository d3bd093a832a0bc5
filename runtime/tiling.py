"""Idefics3 / SmolVLM image preprocessing at a static tile layout, equal to HF's PIL image processor.

Mirrors ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil`` (transformers 5.x; the two are the same
code): RGB conversion, a resize of the longer side to ``size["longest_edge"]`` (aspect kept, the other side
made even, capped at 4096), then

* splits (R, C): a resize to exactly (R*T, C*T) pixels, T = ``max_image_size["longest_edge"]`` (the vision
  encoder's side), cut into R x C tiles of T x T in row-major order, plus the global image: that resized image
  resized again to T x T, last;
* splits 0 (global image only, HF's ``do_image_splitting=False``): a resize to T x T;

each output rescaled and normalised. HF chooses the multiple of T per image (``resize_for_vision_encoder``:
each side rounded UP to a multiple of T); vtc fixes it at build time, so its output equals HF's exactly
whenever HF would choose the same layout for the image, and otherwise is that layout anyway (static shapes).

For splits (R, C) the first resize targets ``max(R, C) * T`` (HF's processor called with
``size={"longest_edge": max(R, C) * T}``, the documented way to pick SmolVLM's resolution; for the published
checkpoints, whose ``size`` is 4 T, that is the checkpoint's own setting when max(R, C) = 4). With that size
HF's rule gives the longer side exactly max(R, C) tiles and the shorter side 1..max(R, C), so every R, C >= 1
is reachable except 1 x 1: an image that fits in one tile is never split (HF returns the image alone, which is
splits 0). The first resize is capped at 4096 pixels (HF's MAX_IMAGE_SIZE), so a side never gets more than
ceil(4096 / T) tiles. `check_layout` refuses anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from vtc.runtime.errors import InputError, ModelError, UsageError, VtcError

MAX_IMAGE_SIZE = 4096  # HF's cap on the first resize (image_processing_*_idefics3/smolvlm.MAX_IMAGE_SIZE)
LANCZOS = 1  # PIL's LANCZOS, the class default of both processors


def check_layout(splits: tuple[int, int], tile: int, error: type[VtcError] = UsageError) -> None:
    """`error` unless HF's processor can produce `splits` (rows, cols) for tiles of `tile` pixels."""
    rows, cols = splits
    most = math.ceil(MAX_IMAGE_SIZE / tile)
    if (rows, cols) == (0, 0):
        return
    if rows < 1 or cols < 1:
        raise error(f"image splits {rows} {cols}: a tile grid needs at least one row and one column.",
                         "Pass --image-splits R C with R, C >= 1, or --image-splits 0 for the global image only.")
    if (rows, cols) == (1, 1):
        raise error("image splits 1 1: the processor never splits an image that fits in one tile; it passes "
                         "the image alone, which is --image-splits 0.", "Pass --image-splits 0, or a grid with "
                         "more than one tile (e.g. 2 2).")
    if max(rows, cols) > most:
        raise error(f"image splits {rows} {cols}: the processor resizes the longer side to at most "
                         f"{MAX_IMAGE_SIZE} pixels, i.e. at most {most} tiles of {tile} pixels.",
                         f"Pass at most {most} rows and {most} columns.")


def resize_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """Mirror ``get_resize_output_image_size``: the longer side to `longest` (int() of the other, made even,
    at least 1), then both scaled below MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def hf_layout(height: int, width: int, longest: int, tile: int) -> tuple[int, int]:
    """The (rows, cols) HF's processor chooses for an image of this size with do_image_splitting
    (``resize_for_vision_encoder`` then ``split_images``); (0, 0) when it does not split."""
    h, w = resize_longest(height, width, longest)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return (h // tile, w // tile) if h > tile or w > tile else (0, 0)


@dataclass(frozen=True)
class TiledPreprocessor:
    """One image -> float32 ``pixel_values`` [B, 3, T, T], B = R*C tiles + the global image (B = 1 for splits 0)."""

    processor_type: str
    do_convert_rgb: bool
    do_resize: bool
    longest_edge: int  # the first resize's target for the longer side
    tile: int  # T: max_image_size["longest_edge"], the vision encoder's input side
    splits: tuple[int, int]  # (rows, cols); (0, 0) = the global image only
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # what vtc.runtime.artifact_check reads of every preprocessor
    shortest_edge = None
    crop_hw = None

    @classmethod
    def from_processor_config(cls, cfg: dict, base: str) -> TiledPreprocessor:
        """From an HF ``preprocessor_config.json`` (splits 0 until `with_splits`) or vtc's `to_dict` form."""
        from vtc.runtime import preprocess as pp

        size, tile = cfg.get("size") or {"longest_edge": 4 * 364}, cfg.get("max_image_size") or {"longest_edge": 364}
        for key, value in (("size", size), ("max_image_size", tile)):
            if not isinstance(value, dict) or set(value) != {"longest_edge"}:
                raise ModelError(f"preprocessor_config.json: {key}={value!r} is not supported (vtc implements "
                                 "{'longest_edge': N}).", "Use the checkpoint's own processor config.")
        for key in ("do_pad", "do_image_splitting"):
            if key in cfg and not isinstance(cfg[key], bool):
                raise ModelError(f"preprocessor_config.json: {key}={cfg[key]!r} is not true or false.", "Fix the config.")
        if cfg.get("do_pad") is False:
            raise ModelError("preprocessor_config.json: do_pad=false is not supported.", "Use do_pad=true.")
        resample = pp._pick(cfg, "resample", LANCZOS)
        if not pp._finite(resample) or resample not in pp.RESAMPLE_FILTERS:
            raise ModelError(f"preprocessor_config.json: resample={resample!r} is not a PIL filter (0-5).", "Fix the config.")
        splits = cfg.get("image_splits", [0, 0])
        if not (isinstance(splits, list) and len(splits) == 2 and all(type(v) is int for v in splits)):
            raise ModelError(f"image processor config: image_splits={splits!r} is not [rows, cols].", "Rebuild the artifact.")
        out = cls(
            processor_type=base, do_convert_rgb=bool(pp._pick(cfg, "do_convert_rgb", True)),
            do_resize=bool(pp._pick(cfg, "do_resize", True)),
            longest_edge=pp._side(size["longest_edge"], "size.longest_edge"),
            tile=pp._side(tile["longest_edge"], "max_image_size.longest_edge"), splits=(splits[0], splits[1]),
            resample=int(resample), do_rescale=bool(pp._pick(cfg, "do_rescale", True)),
            rescale_factor=pp._number(pp._pick(cfg, "rescale_factor", 1 / 255), "rescale_factor"),
            do_normalize=bool(pp._pick(cfg, "do_normalize", True)),
            image_mean=pp._triple(pp._pick(cfg, "image_mean", (0.5, 0.5, 0.5)), "image_mean"),
            image_std=pp._triple(pp._pick(cfg, "image_std", (0.5, 0.5, 0.5)), "image_std"))
        check_layout(out.splits, out.tile, ModelError)
        if out.longest_edge > MAX_IMAGE_SIZE:
            raise ModelError(f"image processor config: size.longest_edge={out.longest_edge} is over HF's cap of "
                             f"{MAX_IMAGE_SIZE}.", "Fix the config.")
        return out

    def with_splits(self, splits: tuple[int, int]) -> TiledPreprocessor:
        """This processor at the static layout `splits` (see the module doc for the first resize's size)."""
        splits = (int(splits[0]), int(splits[1]))
        check_layout(splits, self.tile)
        longest = self.longest_edge if splits == (0, 0) else max(splits) * self.tile
        return replace(self, splits=splits, longest_edge=min(longest, MAX_IMAGE_SIZE))

    @property
    def num_images(self) -> int:
        """B: tiles + the global image."""
        return self.splits[0] * self.splits[1] + 1 if self.splits != (0, 0) else 1

    @property
    def resize_hw(self) -> tuple[int, int]:
        return (self.tile, self.tile)

    @property
    def output_hw(self) -> tuple[int, int]:
        return (self.tile, self.tile)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """pixel_values [B, 3, T, T] float32: the tiles row-major, then the global image."""
        from vtc.runtime.preprocess import ImagePreprocessor

        to_float = ImagePreprocessor._to_float  # the same rescale/normalize math as the other processors
        return np.concatenate([to_float(self, v) for v in self.views(image)], axis=0)

    def view(self, image: Image.Image) -> np.ndarray:
        """Every image as the model sees it, stacked top to bottom like the manifest's grid (B*g x g tokens):
        uint8 [B*T, T, 3] (for overlays)."""
        return np.concatenate(self.views(image), axis=0)

    def views(self, image: Image.Image) -> list[np.ndarray]:
        """Every output image before rescale/normalize, uint8 [T, T, 3]: the tiles, then the global image."""
        from vtc.runtime.preprocess import convert_to_rgb

        if not isinstance(image, Image.Image):
            raise InputError(f"Expected a PIL image, got {type(image).__name__}.", "Load it with load_image(path).")
        self.check_size(*image.size)
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise InputError(f"Image mode is {image.mode!r}, not RGB, and the processor does not convert it.",
                             "Convert the image to RGB first (load_image does).")
        if self.do_resize:
            height, width = resize_longest(image.height, image.width, self.longest_edge)
            image = image.resize((width, height), resample=self.resample)
        t = self.tile
        if self.splits == (0, 0):
            return [np.asarray(image.resize((t, t), resample=self.resample))]
        rows, cols = self.splits
        grid = np.asarray(image.resize((cols * t, rows * t), resample=self.resample))
        tiles = [grid[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
        whole = Image.fromarray(grid).resize((t, t), resample=self.resample)
        return [*tiles, np.asarray(whole)]

    def check_size(self, width: int, height: int, what: str = "the image") -> None:
        """The input bounds of vtc.runtime.preprocess; the images made from it are at most 4096 px (first resize)
        and 12 x 12 tiles a side, far below its work limit."""
        from vtc.runtime.preprocess import check_image_size

        check_image_size(width, height, what)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config for an artifact manifest; ``from_processor_config`` reads it back."""
        return {"image_processor_type": self.processor_type, "do_convert_rgb": self.do_convert_rgb,
                "do_resize": self.do_resize, "resample": self.resample, "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize, "do_pad": True,
                "size": {"longest_edge": self.longest_edge}, "max_image_size": {"longest_edge": self.tile},
                "image_splits": list(self.splits), "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}
