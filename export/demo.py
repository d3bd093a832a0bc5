"""The built-in demo model: a small LLaVA trained on vtc's synthetic visual-QA task, shipped with vtc.

It is a normal HF checkpoint (config.json, model.safetensors, word-level tokenizer, chat template,
preprocessor config, model card) committed under export/data/demo-model and installed as package data,
so the default `vtc-export build` needs no download and no training. `make train-demo`
(tools/train_demo.py) retrains it from scratch; its model card records the command, seed and metrics.

Shapes that matter for compression: 128 px images, 8 px patches -> 16 x 16 = 256 visual tokens (CLIP
"default" strategy, last encoder layer); each cell of the task's 4 x 4 grid is 4 x 4 patches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vtc.runtime.errors import ModelError

DEMO_VERSION = 2
DEMO_NOTICE = ("demo model: a 2.6M-parameter LLaVA trained on synthetic coloured shapes (it answers questions "
               "about colour, shape, presence, position, count and left/above relations, nothing else)")
DEMO_QUESTION = "what color is the circle?"  # about examples/shapes.png (answer: red)


def cache_root() -> Path:
    return Path(os.environ.get("VTC_CACHE", Path.home() / ".cache" / "vtc"))


def demo_dir() -> Path:
    """The committed checkpoint (package data); VTC_DEMO_MODEL points elsewhere (e.g. a fresh `make train-demo`)."""
    return Path(os.environ.get("VTC_DEMO_MODEL") or Path(__file__).parent / "data" / "demo-model")


def ensure_demo_checkpoint(progress=None) -> Path:
    """Path of the demo checkpoint; a clear error if the package was installed without it."""
    target = demo_dir()
    if not ((target / "model.safetensors").is_file() and (target / "config.json").is_file()):
        raise ModelError(f"The built-in demo model is missing from {target}.",
                         "Reinstall vtc from a full checkout (the weights are package data), run `make train-demo`, "
                         "or pass --model DIR.")
    return target


def demo_info(checkpoint_dir: Path) -> dict:
    """vtc_demo.json: training command, seed and metrics ({} for a checkpoint that is not the demo)."""
    try:
        return json.loads((Path(checkpoint_dir) / "vtc_demo.json").read_text())
    except (OSError, ValueError):
        return {}


def is_demo(checkpoint_dir: Path) -> bool:
    return (Path(checkpoint_dir) / "vtc_demo.json").is_file()
