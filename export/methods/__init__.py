"""Compression-method registry: name -> small module defining `METHOD`, imported on demand."""

from __future__ import annotations

import importlib

from vtc.runtime.errors import MethodError

_REGISTRY: dict[str, str] = {
    "none": "none",
    "pool": "pool",
    "cls-attn": "cls_attn",
    "visionzip": "visionzip",
    "tome": "tome",
    "fastv": "fastv",
    "tokencarve": "tokencarve",
    "divprune": "divprune",
    "random": "random",
    "uniform": "uniform",
}


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str):
    """The method object for `name`; unknown names fail with the list of methods."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown compression method {name!r}.", f"Available: {', '.join(_REGISTRY)}.")
    return importlib.import_module(f"{__name__}.{_REGISTRY[name]}").METHOD


def all_methods():
    return [get(n) for n in _REGISTRY]
