"""vtc.runtime: run a built artifact on the device (numpy, ONNX Runtime or TensorRT; never torch).

    from vtc.runtime import VLM, get_backend, load_manifest

    vlm = VLM("artifacts/demo-llava-pool-r0.25", backend=get_backend("onnxruntime", threads=4))
    print(vlm.generate("cat.jpg", "What is this?").text)
    manifest = load_manifest("artifacts/demo-llava-pool-r0.25")

The names are resolved on first use (PEP 562), so `import vtc.runtime.errors` loads neither ONNX
Runtime nor the pipeline.
"""

from __future__ import annotations

import importlib

__all__ = ["VLM", "get_backend", "load_manifest"]

# public name -> (module, attribute)
_LAZY = {"VLM": ("vtc.runtime.pipeline", "VLM"), "get_backend": ("vtc.runtime.backend", "get_backend"),
         "load_manifest": ("vtc.runtime.manifest", "load")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
