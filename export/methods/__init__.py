"""Compression-method registry: name -> small module defining `METHOD`, imported on demand.

`register(method)` adds a method object at run time (a plugin, or a test's toy method); it then works
everywhere a built-in does (build, run, parity, `list`), because nothing outside a method's own module
names a method.
"""

from __future__ import annotations

import importlib

from vtc.runtime.errors import MethodError
from vtc.runtime.manifest import UNCOMPRESSED

_BUILTIN: dict[str, str] = {
    UNCOMPRESSED: "none",
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
_REGISTERED: dict[str, object] = {}  # name -> method object, added by register()
NONE = UNCOMPRESSED  # the uncompressed model ("none"): what --ratio 1.0 means for any method


def names() -> list[str]:
    return [*_BUILTIN, *(n for n in _REGISTERED if n not in _BUILTIN)]


def builtin_names() -> list[str]:
    return list(_BUILTIN)


def register(method) -> None:
    """Add (or replace) a method object under `method.name`."""
    if not method.name:
        raise MethodError("a method needs a name to be registered.", "Set the class attribute `name`.")
    _REGISTERED[method.name] = method


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def get(name: str):
    """The method object for `name`; unknown names fail with the list of methods."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise MethodError(f"unknown compression method {name!r}.", f"Available: {', '.join(names())}.")
    return importlib.import_module(f"{__name__}.{_BUILTIN[name]}").METHOD


def all_methods():
    return [get(n) for n in names()]


def compressing_names() -> list[str]:
    """Every method except the uncompressed one (what `sweep --methods all` means)."""
    return [m.name for m in all_methods() if m.compresses]


def resolve(name: str, ratio: float):
    """(method, ratio) after the ratio rule: ratio 1.0 keeps every token, so it is the `none` method
    whatever was asked; the method name is checked first (unknown names fail)."""
    method = get(name)
    return (get(NONE), 1.0) if ratio == 1.0 or not method.compresses else (method, ratio)
