"""Shared fixtures: tiny random checkpoints of real HF classes (tests.helpers.tiny.ALL_TINY: LLaVA, SmolVLM,
Idefics3), and artifacts built from them. Built once per session. Shared non-fixture code lives in tests/helpers/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs many commands with different --threads in one process; ONNX Runtime's shared pool is sized
# once per process (vtc.runtime.backend.shared_thread_pool), so in-process commands keep per-session pools here.
# test_runtime_isolation checks the shared pool in fresh interpreters.
os.environ["VTC_SHARED_POOL"] = "0"

from tests.helpers.builds import nullstep  # noqa: E402
from tests.helpers.tiny import ALL_TINY, write_tiny  # noqa: E402

pytest_plugins = ["tests.helpers.fixtures"]  # `ckpt` and `art`, module-scoped (a test module may define its own)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_tiny(root, name) for name in ALL_TINY}


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
