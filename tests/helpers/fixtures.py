"""Module fixtures shared by the CLI-level test files (import them into a test module to use them)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints) -> Path:
    return tiny_checkpoints["mha-default"]


@pytest.fixture(scope="module")
def art(artifact_factory) -> Path:
    """A built artifact (shared: never modify it; copy it)."""
    return artifact_factory("mha-default", "none")


@pytest.fixture
def build_spy(monkeypatch) -> list:
    """Names of the variants vtc.export.build.build is called for (the sweep tests: what was rebuilt)."""
    from vtc.export import build as build_mod

    calls, real = [], build_mod.build

    def spy(args, step, **kw):
        calls.append(Path(args.output).name)
        return real(args, step, **kw)

    monkeypatch.setattr(build_mod, "build", spy)
    return calls
