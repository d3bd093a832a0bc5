"""Torch-free image preprocessing, equal to the checkpoint's Hugging Face image processor.

Mirrors the PIL backend of transformers 5.x (``CLIPImageProcessorPil`` / ``LlavaImageProcessorPil``, i.e.
``transformers.image_processing_backends.PilBackend``): RGB conversion, optional pad-to-square (LLaVA),
PIL resize, center crop, rescale, normalize, in that order and with the same dtypes, so the pixel values
are bit-for-bit those of the slow processor. The torchvision backend (``CLIPImageProcessor`` in 5.x when
torchvision is installed) resizes differently and is not what this module reproduces.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vtc.runtime.errors import InputError, ModelError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Processor types (after dropping a "Fast"/"Pil" suffix) -> whether `do_pad` means LLaVA's pad-to-square.
SUPPORTED_TYPES = {"CLIPImageProcessor": False, "LlavaImageProcessor": True}
RESAMPLE_FILTERS = {0, 1, 2, 3, 4, 5}  # PIL: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert an image file like ``transformers.image_utils.load_image``.

    That is what HF processors do with a path: ``ImageOps.exif_transpose`` (upright photos) then a plain
    ``.convert("RGB")`` (transparent pixels keep their stored colour). A PIL image handed to a processor
    directly is instead composited onto white (``convert_to_rgb``, applied by ``ImagePreprocessor.__call__``).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"Image file {str(p)!r} does not exist.", "Check the path and pass an existing image file.")
    if p.is_dir():
        raise InputError(f"Image path {str(p)!r} is a directory, not an image file.",
                         "Pass the path of one image file.")
    try:
        with Image.open(p) as img:
            img.load()  # force a full decode: catches truncated and corrupt files now, not mid-inference
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error,
            Image.DecompressionBombError) as err:
        raise InputError(
            f"Cannot read {str(p)!r} as an image ({type(err).__name__}: {err}).",
            "Pass a complete, uncorrupted image file (JPEG, PNG, WebP, ...).",
        ) from err


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Mirror ``transformers.image_transforms.convert_to_rgb`` (5.x): transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image_processor_config(checkpoint_dir: str | Path) -> dict:
    """Mirror ``ImageProcessingMixin.get_image_processor_dict`` for a local directory.

    The config nested in ``processor_config.json["image_processor"]`` (what transformers 5.x saves) wins,
    else ``preprocessor_config.json``.
    """
    d = Path(checkpoint_dir)
    for name, nested in (("processor_config.json", True), ("preprocessor_config.json", False)):
        path = d / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelError(f"Cannot parse {str(path)!r}: {err}.", "Restore it from the original checkpoint.") from err
        cfg = data.get("image_processor") if nested and isinstance(data, dict) else data
        if isinstance(cfg, dict):
            return cfg
    raise ModelError(f"{str(d)!r} has no image processor config (preprocessor_config.json, or processor_config.json "
                     "with an 'image_processor' entry).", "Save the checkpoint's processor with save_pretrained.")


def _size_dict(value: Any, default_to_square: bool, key: str) -> dict[str, int]:
    """Mirror ``image_processing_utils.get_size_dict``: int / [h, w] / dict -> a validated size dict."""
    if isinstance(value, bool) or value is None:
        raise ModelError(f"preprocessor_config.json: {key!r} is {value!r}, not a size.", "Fix the checkpoint config.")
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict) and set(value) in ({"height", "width"}, {"shortest_edge"}):
        return {k: int(v) for k, v in value.items()}
    raise ModelError(
        f"preprocessor_config.json: {key}={value!r} is not supported (vtc implements "
        "{'shortest_edge'} and {'height', 'width'}).",
        "Use a checkpoint whose image processor resizes by shortest edge or to a fixed height/width.",
    )


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    """A per-channel mean/std as three floats (a scalar is broadcast, as ``normalize`` does)."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ModelError(f"preprocessor_config.json: {key} has {len(values)} values, not 3.", "Fix the config.")
    return (float(values[0]), float(values[1]), float(values[2]))


def _processor_type(cfg: dict) -> str:
    """The processor class name as ``AutoImageProcessor`` resolves it, without the backend suffix."""
    name = cfg.get("image_processor_type") or ""
    if not name and cfg.get("feature_extractor_type"):
        name = str(cfg["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    base = name.removesuffix("Fast").removesuffix("Pil")
    if base not in SUPPORTED_TYPES:
        raise ModelError(
            f"Image processor {name or '(none given)'!r} is not supported by vtc's preprocessing "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))}).",
            "Use a LLaVA/CLIP-style checkpoint, or add this processor to vtc.runtime.preprocess.",
        )
    return base


def _check_unsupported(cfg: dict, base: str) -> None:
    """Raise ModelError for keys that would change the math in ways this module does not implement."""
    if cfg.get("use_square_size"):
        raise ModelError("preprocessor_config.json: use_square_size=true is not supported.", "Set an explicit size.")
    if cfg.get("do_pad") and not SUPPORTED_TYPES[base] and cfg.get("pad_size") is not None:
        raise ModelError("preprocessor_config.json: do_pad with pad_size is not supported for CLIP processors.",
                         "Remove pad_size or use a checkpoint without padding.")
    fmt = cfg.get("data_format")
    if fmt not in (None, "channels_first"):
        raise ModelError(f"preprocessor_config.json: data_format={fmt!r} is not supported.", "Use channels_first.")
    if cfg.get("input_data_format") not in (None, "channels_last", "channels_first"):
        raise ModelError("preprocessor_config.json: input_data_format is not supported.", "Remove it.")


def _pick(cfg: dict, key: str, default: Any) -> Any:
    """A config value, or the class default when absent or null (``BaseImageProcessor._set_attributes``)."""
    value = cfg.get(key)
    return default if value is None else value


def _resize_hw(hw: tuple[int, int], shortest_edge: int | None, fixed: tuple[int, int] | None) -> tuple[int, int]:
    """Mirror ``image_transforms.get_resize_output_image_size(default_to_square=False)`` (int() truncation)."""
    if fixed is not None:
        return fixed
    height, width = hw
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _pad_to_square(arr: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """Mirror ``LlavaImageProcessorPil.pad_to_square`` on an HWC uint8 array (image centred, floor offset)."""
    height, width = arr.shape[:2]
    if height == width:
        return arr
    side = max(height, width)
    out = np.empty((side, side, arr.shape[2]), dtype=arr.dtype)
    out[...] = np.asarray(color, dtype=arr.dtype)
    if width > height:
        top = (side - height) // 2
        out[top:top + height] = arr
    else:
        left = (side - width) // 2
        out[:, left:left + width] = arr
    return out


def _center_crop(arr: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Mirror ``image_transforms.center_crop``: floor offsets, zero padding when the image is smaller."""
    height, width = arr.shape[:2]
    ch, cw = crop_hw
    top, left = (height - ch) // 2, (width - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    new_h, new_w = max(ch, height), max(cw, width)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)  # ceil division
    padded = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = arr
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + ch), max(0, left):min(new_w, left + cw)]


@dataclass(frozen=True)
class ImagePreprocessor:
    """One image -> float32 ``pixel_values`` [1, 3, H, W], as the HF slow (PIL) image processor computes it."""

    processor_type: str
    do_convert_rgb: bool
    do_pad_to_square: bool
    do_resize: bool
    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    resample: int
    do_center_crop: bool
    crop_hw: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: dict) -> ImagePreprocessor:
        """Build from a ``preprocessor_config.json`` dict, resolving defaults like ``PilBackend.__init__``."""
        base = _processor_type(cfg)
        _check_unsupported(cfg, base)
        size = _size_dict(_pick(cfg, "size", {"shortest_edge": 224}), bool(_pick(cfg, "default_to_square", False)),
                          "size")
        crop = _size_dict(_pick(cfg, "crop_size", {"height": 224, "width": 224}), True, "crop_size")
        do_center_crop = bool(_pick(cfg, "do_center_crop", True))
        if do_center_crop and "height" not in crop:
            raise ModelError(f"preprocessor_config.json: crop_size={crop} needs height and width.", "Fix the config.")
        resample = _pick(cfg, "resample", 3)
        if isinstance(resample, bool) or resample not in RESAMPLE_FILTERS:
            raise ModelError(f"preprocessor_config.json: resample={resample!r} is not a PIL filter (0-5).",
                             "Fix the config.")
        return cls(
            processor_type=base,
            do_convert_rgb=bool(_pick(cfg, "do_convert_rgb", True)),
            do_pad_to_square=SUPPORTED_TYPES[base] and bool(_pick(cfg, "do_pad", False)),
            do_resize=bool(_pick(cfg, "do_resize", True)),
            shortest_edge=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            resample=int(resample),
            do_center_crop=do_center_crop,
            crop_hw=(crop["height"], crop["width"]) if "height" in crop else None,
            do_rescale=bool(_pick(cfg, "do_rescale", True)),
            rescale_factor=float(_pick(cfg, "rescale_factor", 1 / 255)),
            do_normalize=bool(_pick(cfg, "do_normalize", True)),
            image_mean=_triple(_pick(cfg, "image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_triple(_pick(cfg, "image_std", OPENAI_CLIP_STD), "image_std"),
        )

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> ImagePreprocessor:
        """``from_config`` of the directory's image processor config (see ``read_image_processor_config``)."""
        return cls.from_config(read_image_processor_config(checkpoint_dir))

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """The (H, W) of every output, or None when it depends on the input image's aspect ratio."""
        if self.do_center_crop:
            return self.crop_hw
        if self.do_resize and self.resize_hw is not None:
            return self.resize_hw
        if self.do_resize and self.do_pad_to_square:
            return (self.shortest_edge, self.shortest_edge)
        return None

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Mirror ``PilBackend.process_image`` + ``_preprocess`` (LLaVA: pad-to-square first) for one image."""
        return self._to_float(self.view(image))

    def view(self, image: Image.Image) -> np.ndarray:
        """The image as the model sees it, before rescale/normalize: uint8 [H, W, 3] (for overlays)."""
        if not isinstance(image, Image.Image):
            raise InputError(f"Expected a PIL image, got {type(image).__name__}.", "Load it with load_image(path).")
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise InputError(f"Image mode is {image.mode!r}, not RGB, and the processor does not convert it.",
                             "Convert the image to RGB first (load_image does).")
        arr = np.asarray(image)
        if self.do_pad_to_square:
            arr = _pad_to_square(arr, tuple(int(m * 255) for m in self.image_mean))
        if self.do_resize:
            height, width = _resize_hw(arr.shape[:2], self.shortest_edge, self.resize_hw)
            arr = np.asarray(Image.fromarray(arr).resize((width, height), resample=self.resample))
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_hw)
        return arr

    def _to_float(self, arr: np.ndarray) -> np.ndarray:
        """Mirror ``image_transforms.rescale`` (float64 multiply, float32 cast) and ``normalize`` (float32)."""
        x = arr
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            x = (x - np.asarray(self.image_mean, dtype=x.dtype)) / np.asarray(self.image_std, dtype=x.dtype)
        return np.ascontiguousarray(x.astype(np.float32).transpose(2, 0, 1)[None])

    def to_dict(self) -> dict[str, Any]:
        """The normalised config (plain JSON types) for an artifact manifest; ``from_config`` reads it back."""
        raw = asdict(self)
        out: dict[str, Any] = {"image_processor_type": self.processor_type}
        for key in ("do_convert_rgb", "do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor",
                    "do_normalize"):
            out[key] = raw[key]
        if SUPPORTED_TYPES[self.processor_type]:
            out["do_pad"] = self.do_pad_to_square
        out["size"] = ({"shortest_edge": self.shortest_edge} if self.resize_hw is None
                       else {"height": self.resize_hw[0], "width": self.resize_hw[1]})
        if self.crop_hw is not None:
            out["crop_size"] = {"height": self.crop_hw[0], "width": self.crop_hw[1]}
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out
