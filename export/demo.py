"""The built-in demo model: a LLaVA-architecture checkpoint with RANDOM weights (its text is meaningless).

It is a normal HF checkpoint (config.json, model.safetensors, tokenizer, preprocessor config, chat
template) written deterministically from a seed into the user cache on first use, so the default
`vtc-export build` needs no download. Shapes are LLaVA-1.5's where they matter for compression
(336 px, 14 px patches -> 24x24 = 576 visual tokens, feature layer -2, "default" strategy); widths
and depths are small so the whole pipeline runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = 1
DEMO_NOTICE = "demo model: random weights, its text is meaningless (it exercises the pipeline, not accuracy)"

CHAT_TEMPLATE_NOTE = "LLaVA-1.5 conversation format: 'USER: <image>\\n{question} ASSISTANT:'"


def cache_root() -> Path:
    return Path(os.environ.get("VTC_CACHE", Path.home() / ".cache" / "vtc"))


def demo_dir() -> Path:
    return cache_root() / f"demo-llava-v{DEMO_VERSION}"


def ensure_demo_checkpoint(progress=None) -> Path:
    """Path of the demo checkpoint, writing it (atomically) if it is not there yet."""
    target = demo_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_demo_checkpoint(out: Path, seed: int = 0) -> None:
    from vtc.export.random_llava import RandomLlavaSpec, write_random_llava

    spec = RandomLlavaSpec(image_size=336, vision_hidden=128, vision_layers=3, vision_heads=4, hidden=256, layers=4,
                           heads=8, kv_heads=4, intermediate=688)
    write_random_llava(out, spec, seed)
    (out / "README.md").write_text(f"# vtc demo model (v{DEMO_VERSION})\n\n{DEMO_NOTICE}.\n\n"
                                   f"Seed {seed}; {CHAT_TEMPLATE_NOTE}; written by vtc.export.demo.\n")
    (out / "vtc_demo.json").write_text(json.dumps({"demo": True, "version": DEMO_VERSION, "seed": seed}) + "\n")


def is_demo(checkpoint_dir: Path) -> bool:
    return (Path(checkpoint_dir) / "vtc_demo.json").is_file()
