"""Calibration and evaluation pairs (image path, prompt).

The default set ships with the project's dependencies: the real photographs scikit-image bundles in
its wheel (skimage/data: astronaut, coffee, chelsea, rocket, ...), read from the installed package
directory without importing skimage. The built-in demo model, which knows nothing but coloured shapes,
calibrates instead on scenes and questions of its own synthetic task (`synthetic_pairs`, a seed no
evaluation uses by default). Users pass their own: --calib-images DIR (jpg/png/webp/bmp) and
--calib-prompts FILE.jsonl ({"prompt": "..."} per line), paired round-robin.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vtc.runtime.errors import InputError, UsageError

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
          "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
          "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
          "clock_motion.png", "horse.png")
CALIB_PROMPTS = ("Describe the image.", "What is in the picture?", "What colours do you see?",
                 "Is there a person in this photo?", "What is in the top left corner?", "Count the objects.")
EVAL_PROMPTS = ("What is the main object?", "Describe the scene in detail.", "What is at the bottom?",
                "Is it indoors or outdoors?")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def skimage_photos() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default calibration set needs scikit-image's bundled photographs, and scikit-image "
                         "is not installed.", "pip install scikit-image, or pass --calib-images DIR --calib-prompts FILE.")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    found = [data / name for name in PHOTOS if (data / name).is_file()]
    if len(found) < 10:
        raise UsageError(f"only {len(found)} sample photographs found in {data}.", "Reinstall scikit-image.")
    return found


def default_pairs(split: str) -> list[tuple[Path, str]]:
    """split "calib": 2 prompts for each of the first 2/3 of the photos (~28 pairs); "eval": the other
    photos with held-out prompts (>= 20 pairs, none shared with "calib")."""
    photos = skimage_photos()
    cut = (2 * len(photos)) // 3
    if split == "calib":
        return [(p, CALIB_PROMPTS[(2 * i + j) % len(CALIB_PROMPTS)]) for i, p in enumerate(photos[:cut]) for j in range(2)]
    held = photos[cut:]
    return [(p, q) for p in held for q in EVAL_PROMPTS][: max(20, len(held) * len(EVAL_PROMPTS))]


SYNTHETIC_CALIB_SEED = 2  # vtc-export eval --dataset synthetic uses seed 1, the demo's training scenes seed 0


def synthetic_pairs(out_dir: str | Path, n: int = 30, seed: int = SYNTHETIC_CALIB_SEED) -> list[tuple[Path, str]]:
    """n (image, question) pairs of the synthetic visual-QA task, images written as PNG under out_dir."""
    from vtc.runtime.synthetic_vqa import examples

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, ex in enumerate(examples(seed, n)):
        path = out_dir / f"calib-{seed}-{i:03d}.png"
        ex.image.save(path)
        pairs.append((path, ex.question))
    return pairs


def user_pairs(images_dir: str | Path, prompts_file: str | Path) -> list[tuple[Path, str]]:
    images_dir, prompts_file = Path(images_dir), Path(prompts_file)
    if not images_dir.is_dir():
        raise UsageError(f"--calib-images {images_dir} is not a directory.", "Pass a directory of images.")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"--calib-images {images_dir} has no images ({', '.join(IMAGE_SUFFIXES)}).",
                         "Put a few dozen representative images there.")
    if not prompts_file.is_file():
        raise UsageError(f"--calib-prompts {prompts_file} does not exist.", 'Pass a JSONL file: {"prompt": "..."} per line.')
    prompts = []
    for n, raw in enumerate(prompts_file.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{prompts_file}:{n} is not UTF-8 ({e}).", "Save the prompts file as UTF-8.") from e
        if not line.strip():
            continue
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError, RecursionError) as e:
            raise InputError(f"{prompts_file}:{n} is not a JSON object ({e}).", 'Each line: {"prompt": "..."}.') from e
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{prompts_file}:{n} has no non-empty 'prompt' string.", 'Each line: {"prompt": "..."}.')
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"--calib-prompts {prompts_file} has no prompts.", 'Add lines like {"prompt": "Describe the image."}.')
    count = max(len(images), len(prompts))
    return [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(count)]
