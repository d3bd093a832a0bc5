"""Torch-free image preprocessing, equal to the checkpoint's Hugging Face image processor.

Mirrors the PIL backend of transformers 5.x (``CLIPImageProcessorPil`` / ``LlavaImageProcessorPil``, i.e.
``transformers.image_processing_backends.PilBackend``): RGB conversion, optional pad-to-square (LLaVA),
PIL resize, center crop, rescale, normalize, in that order and with the same dtypes, so the pixel values
are bit-for-bit those of the slow processor. The torchvision backend (``CLIPImageProcessor`` in 5.x when
torchvision is installed) resizes differently and is not what this module reproduces.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vtc.runtime.errors import InputError, ModelError, VtcError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Processor types (after dropping a "Fast"/"Pil" suffix) -> whether `do_pad` means LLaVA's pad-to-square.
SUPPORTED_TYPES = {"CLIPImageProcessor": False, "LlavaImageProcessor": True}
# Idefics3 / SmolVLM: resize, then a static tile layout + global image (TiledPreprocessor, below).
TILED_TYPES = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")
# Qwen2-VL / Qwen2.5-VL: HF resizes each image to its own multiple of 28 (smart_resize); vtc resizes every image to
# the build's static size (`build --image-size H W`, default below) and cuts the patches inside the vision graph.
PATCH_TYPES = ("Qwen2VLImageProcessor",)
STATIC_IMAGE_SIZE = (448, 448)  # (H, W) when the build names none: 16 x 16 merged tokens = 256 visual tokens
SUPPORTED_TYPES["Qwen2VLImageProcessor"] = False
RESAMPLE_FILTERS = {0, 1, 2, 3, 4, 5}  # PIL: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
# Input bounds, checked on the header (before any decode) and again before every pad/resize/crop, so an
# image's memory cost is bounded whatever its file size: a 168-byte 30000x1 PNG would otherwise be padded
# or resized to gigabytes. PIL's own limit (a warning at 89 MP, an error at 179 MP) is far above these.
MAX_IMAGE_PIXELS = 40_000_000  # width x height of an input image (e.g. 7300 x 5475)
MAX_IMAGE_SIDE = 16_384  # its longer side, in pixels
MAX_WORK_PIXELS = 64_000_000  # any image preprocessing makes from it (pad-to-square, resize, crop): 8000 x 8000


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
    if not p.is_file():
        raise InputError(f"Image path {str(p)!r} is not a regular file (a device, pipe or socket).",
                         "Pass the path of one image file.")
    try:
        with warnings.catch_warnings():  # PIL warns from 89 MP: the check below refuses those in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)  # lazy: reads the header only
        with img:
            check_image_size(*img.size, what=repr(str(p)))  # before the decode allocates anything
            img.load()  # force a full decode: catches truncated and corrupt files now, not mid-inference
            return ImageOps.exif_transpose(img).convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's own limit, past ours: the header says more than 179 MP
        raise InputError(f"{str(p)!r} is too large an image ({err})",
                         f"vtc takes at most {MAX_IMAGE_PIXELS / 1e6:g} megapixels: downscale it first.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as err:
        raise InputError(
            f"Cannot read {str(p)!r} as an image ({type(err).__name__}: {err}).",
            "Pass a complete, uncorrupted image file (JPEG, PNG, WebP, ...).",
        ) from err


def check_image_size(width: int, height: int, what: str = "the image") -> None:
    """Refuse an input image over MAX_IMAGE_PIXELS or MAX_IMAGE_SIDE (or an empty one) with an InputError."""
    if width < 1 or height < 1:
        raise InputError(f"{what} is {width}x{height} pixels: it has no pixels.", "Pass a non-empty image.")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {width}x{height} pixels ({width * height / 1e6:.3g} MP); vtc takes at most "
                         f"{MAX_IMAGE_PIXELS / 1e6:g} MP and {MAX_IMAGE_SIDE} pixels a side.",
                         "Downscale or crop the image first (a VLM sees it at a few hundred pixels a side anyway).")


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
    if (d / "video_preprocessor_config.json").is_file():  # e.g. a Qwen2-VL checkpoint saved for video only
        raise ModelError(f"{str(d)!r} has only video settings (video_preprocessor_config.json) and no image processor "
                         "config; vtc compresses the visual tokens of images.",
                         "Add the checkpoint's preprocessor_config.json (its image processor), as the published "
                         "checkpoint has it.")
    raise ModelError(f"{str(d)!r} has no image processor config (preprocessor_config.json, or processor_config.json "
                     "with an 'image_processor' entry).", "Save the checkpoint's processor with save_pretrained.")


def _size_dict(value: Any, default_to_square: bool, key: str) -> dict[str, int]:
    """Mirror ``image_processing_utils.get_size_dict``: int / [h, w] / dict -> a validated size dict."""
    if isinstance(value, bool) or value is None:
        raise ModelError(f"preprocessor_config.json: {key!r} is {value!r}, not a size.", "Fix the checkpoint config.")
    if isinstance(value, int):
        side = _side(value, key)
        return {"height": side, "width": side} if default_to_square else {"shortest_edge": side}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": _side(value[0], key), "width": _side(value[1], key)}
    if isinstance(value, dict) and set(value) in ({"height", "width"}, {"shortest_edge"}):
        return {k: _side(v, f"{key}.{k}") for k, v in value.items()}
    raise ModelError(
        f"preprocessor_config.json: {key}={value!r} is not supported (vtc implements "
        "{'shortest_edge'} and {'height', 'width'}).",
        "Use a checkpoint whose image processor resizes by shortest edge or to a fixed height/width.",
    )


def _side(value: Any, key: str) -> int:
    """One image side in a size dict: a positive whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value != int(value) \
            or value < 1:
        raise ModelError(f"preprocessor_config.json: {key}={value!r} is not a positive whole number of pixels.",
                         "Fix the config.")
    return int(value)


def _finite(value: Any) -> bool:
    """A real, finite number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _number(value: Any, key: str) -> float:
    if not _finite(value):
        raise ModelError(f"preprocessor_config.json: {key}={value!r} is not a finite number.", "Fix the config.")
    return float(value)


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    """A per-channel mean/std as three floats (a scalar is broadcast, as ``normalize`` does)."""
    if not isinstance(value, (list, tuple)):
        value = [_number(value, key)] * 3
    if len(value) != 3:
        raise ModelError(f"preprocessor_config.json: {key} has {len(value)} values, not 3.", "Fix the config.")
    return (_number(value[0], key), _number(value[1], key), _number(value[2], key))


def _processor_type(cfg: dict) -> str:
    """The processor class name as ``AutoImageProcessor`` resolves it, without the backend suffix."""
    name = cfg.get("image_processor_type") or ""
    if not isinstance(name, str):
        raise ModelError(f"preprocessor_config.json: image_processor_type={name!r} is not a class name.",
                         "Fix the config.")
    if not name and cfg.get("feature_extractor_type"):
        name = str(cfg["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    base = name.removesuffix("Fast").removesuffix("Pil")
    if base not in SUPPORTED_TYPES and base not in TILED_TYPES:
        raise ModelError(
            f"Image processor {name or '(none given)'!r} is not supported by vtc's preprocessing "
            f"(supported: {', '.join(sorted([*SUPPORTED_TYPES, *TILED_TYPES]))}).",
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


def _static_size(cfg: dict) -> dict:
    """A Qwen2-VL processor config at a static size: its own {height, width} (an artifact's normalised form), or
    STATIC_IMAGE_SIZE for a checkpoint's dynamic {shortest_edge, longest_edge} / min_pixels, max_pixels; no crop."""
    size = cfg.get("size")
    static = isinstance(size, dict) and set(size) == {"height", "width"}
    hw = (size["height"], size["width"]) if static else STATIC_IMAGE_SIZE
    return {**cfg, "size": {"height": hw[0], "width": hw[1]}, "do_center_crop": False}


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


def _pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Mirror ``LlavaImageProcessorPil.pad_to_square`` (image centred, floor offset, `color` around it) on an
    RGB image. The same uint8 pixels as HF's numpy padding, made in one PIL buffer instead of a numpy array
    plus the PIL copy the resize needs."""
    width, height = image.size
    if height == width:
        return image
    side = max(height, width)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
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
    def from_config(cls, cfg: dict, error: type[VtcError] = ModelError) -> ImagePreprocessor:
        """Build from a ``preprocessor_config.json`` dict, resolving defaults like ``PilBackend.__init__``.

        Any bad value is one ``error`` (ModelError for a checkpoint's config; the artifact check passes
        ArtifactError for a manifest's ``preprocess``), never a KeyError/TypeError/ValueError."""
        try:
            return cls._from_config(cfg)
        except ModelError as e:
            if error is ModelError:
                raise
            raise error(e.what.replace("preprocessor_config.json: ", "image processor config: "), e.fix) from e
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as e:  # a safety net
            raise error(f"image processor config: {type(e).__name__}: {str(e)[:200]}.",
                        "Fix the config (or rebuild the artifact).") from e

    @classmethod
    def _from_config(cls, cfg: dict) -> ImagePreprocessor:
        if not isinstance(cfg, dict):
            raise ModelError(f"preprocessor_config.json: the config is a {type(cfg).__name__}, not an object.",
                             "Fix the config.")
        base = _processor_type(cfg)
        if base in TILED_TYPES:
            from vtc.runtime.tiling import TiledPreprocessor

            return TiledPreprocessor.from_processor_config(cfg, base)
        _check_unsupported(cfg, base)
        if base in PATCH_TYPES:
            cfg = _static_size(cfg)
        size = _size_dict(_pick(cfg, "size", {"shortest_edge": 224}), bool(_pick(cfg, "default_to_square", False)),
                          "size")
        crop = _size_dict(_pick(cfg, "crop_size", {"height": 224, "width": 224}), True, "crop_size")
        do_center_crop = bool(_pick(cfg, "do_center_crop", True))
        if do_center_crop and "height" not in crop:
            raise ModelError(f"preprocessor_config.json: crop_size={crop} needs height and width.", "Fix the config.")
        resample = _pick(cfg, "resample", 3)
        if not _finite(resample) or resample not in RESAMPLE_FILTERS:
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
            rescale_factor=_number(_pick(cfg, "rescale_factor", 1 / 255), "rescale_factor"),
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
        self.check_size(*image.size)  # before any copy, pad or resize
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise InputError(f"Image mode is {image.mode!r}, not RGB, and the processor does not convert it.",
                             "Convert the image to RGB first (load_image does).")
        if self.do_pad_to_square:
            color = tuple(int(m * 255) for m in self.image_mean)
            if not all(0 <= c <= 255 for c in color):
                raise ModelError(f"image processor config: image_mean {list(self.image_mean)} gives the pad colour "
                                 f"{color}, outside 0-255.", "Fix image_mean (values in 0-1), or rebuild the artifact.")
            image = _pad_to_square(image, color)
        if self.do_resize:
            height, width = _resize_hw((image.height, image.width), self.shortest_edge, self.resize_hw)
            image = image.resize((width, height), resample=self.resample)
        arr = np.asarray(image)
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_hw)
        return arr

    def check_size(self, width: int, height: int, what: str = "the image") -> None:
        """Refuse (InputError) an image over MAX_IMAGE_PIXELS / MAX_IMAGE_SIDE, or one that pad-to-square,
        the resize or the center crop would turn into more than MAX_WORK_PIXELS, before any of them runs."""
        check_image_size(width, height, what)
        h, w = height, width
        if self.do_pad_to_square and h != w:
            h = w = max(h, w)
            self._check_work("padding it to a square", width, height, w, h, what,
                             f"Crop or downscale it to at most {math.isqrt(MAX_WORK_PIXELS)} pixels on its longer side.")
        if self.do_resize:
            h, w = _resize_hw((h, w), self.shortest_edge, self.resize_hw)
            ratio = MAX_WORK_PIXELS // self.shortest_edge ** 2 if self.resize_hw is None else None
            self._check_work("resizing it", width, height, w, h, what,
                             f"Crop it to an aspect ratio of at most {ratio}:1." if ratio else
                             "This artifact's resize size is too large: rebuild it from a sane checkpoint config.")
        if self.do_center_crop:
            self._check_work("center-cropping it", width, height, max(w, self.crop_hw[1]), max(h, self.crop_hw[0]),
                             what, "This artifact's crop size is too large: rebuild it from a sane checkpoint config.")

    @staticmethod
    def _check_work(step: str, width: int, height: int, w: int, h: int, what: str, fix: str) -> None:
        if w * h > MAX_WORK_PIXELS:
            raise InputError(f"{what} is {width}x{height} pixels: {step} would make a {w}x{h} image "
                             f"({w * h / 1e6:.3g} MP), over vtc's limit of {MAX_WORK_PIXELS / 1e6:g} MP for the images "
                             "preprocessing makes.", fix)

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
