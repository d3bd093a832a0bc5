"""Shared fixtures: tiny random LLaVA checkpoints of real HF classes, and artifacts built from them.

Three configs cover multi-head and grouped-query attention (including multi-query), both
`vision_feature_select_strategy` values and two feature layers. Built once per session.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vtc.export.random_llava import RandomLlavaSpec, write_random_llava  # noqa: E402

TINY = {
    # name: (spec, seed)
    "mha-default": (RandomLlavaSpec(heads=4, kv_heads=4, strategy="default", feature_layer=-2), 1),
    "gqa-full": (RandomLlavaSpec(heads=4, kv_heads=2, strategy="full", feature_layer=-2, hidden=96, intermediate=160), 2),
    "mqa-layer-1": (RandomLlavaSpec(image_size=84, heads=4, kv_heads=1, strategy="default", feature_layer=-1,
                                    vision_layers=2, layers=3, vocab=300), 3),
}


def nullstep(_label):
    return contextlib.nullcontext()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_random_llava(root / name, spec, seed) for name, (spec, seed) in TINY.items()}


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory, tiny_checkpoints):
    """build(name, method, ratio, **kw) -> artifact path; each distinct build happens once per session."""
    from vtc.export.build import BuildArgs, build

    root = tmp_path_factory.mktemp("art")
    cache: dict = {}

    def make(name: str, method: str = "none", ratio: float | None = None, **kw) -> Path:
        key = (name, method, ratio, repr(sorted(kw.items())))
        if key not in cache:
            out = root / f"{name}-{method}-{ratio}-{len(cache)}"
            args = BuildArgs(model=str(tiny_checkpoints[name]), method=method, ratio=ratio, output=str(out),
                             max_seq_len=kw.pop("max_seq_len", 256), text_budget=kw.pop("text_budget", 48), **kw)
            cache[key] = build(args, nullstep).path
        return cache[key]

    return make
