"""Build-step callbacks for `vtc.export.build.build` / `prepare` in tests."""

from __future__ import annotations

import contextlib

import pytest

from vtc.runtime.errors import MethodError


def nullstep(_label):
    return contextlib.nullcontext()


def refused_before_export(model, method, ratio, out, **kw) -> str:
    """Build `method` on `model`: it must fail with a MethodError before any export step and write nothing.
    Returns the error message."""
    from vtc.export.build import BuildArgs, build

    steps = []

    def step(label):
        steps.append(label)
        return contextlib.nullcontext()

    with pytest.raises(MethodError) as err:
        build(BuildArgs(model=str(model), method=method, ratio=ratio, output=str(out), **kw), step)
    assert not any(s.startswith("exporting") for s in steps) and not out.exists()
    return str(err.value)
