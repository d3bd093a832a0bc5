"""One backend interface for the runtime; ONNX Runtime is its first implementation.

A backend opens the artifact's graphs as `GraphSession`s. A session's `run(feeds)` validates the
feed names against the manifest (`run`), then calls `run_impl` (Polygraphy's infer/infer_impl split).
Feeds are numpy arrays; the KV cache arrays are bound without copies (OrtValue shares their memory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from vtc.runtime.errors import BackendError, InputError
from vtc.runtime.manifest import GraphSpec


class GraphSession:
    """One loaded graph. Subclasses implement `run_impl`."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.calls = 0  # run() calls, and seconds inside the backend's own inference call (set by
        self.seconds = 0.0  # run_impl), so profilers can split runtime overhead from backend time

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError(f"graph {self.spec.file}: missing inputs {missing}, unexpected inputs {extra}.",
                             "This is a runtime/artifact mismatch: rebuild the artifact with this vtc.")
        self.calls += 1
        return self.run_impl(feeds)

    def run_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class OrtSession(GraphSession):
    def __init__(self, path: Path, spec: GraphSpec, threads: int | None, provider: str = "cpu"):
        super().__init__(spec)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = {"cpu": ["CPUExecutionProvider"]}.get(provider)
        if providers is None:
            raise BackendError(f"ONNX Runtime provider {provider!r} is not supported by this runtime yet.",
                               "Use --provider cpu.")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
            raise BackendError(f"ONNX Runtime could not load {path}: {e}", "Rebuild the artifact.") from e
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        self._bound: dict[str, tuple[np.ndarray, object]] = {}  # name -> (array, OrtValue sharing its memory)

    def _value(self, name: str, array: np.ndarray):
        """OrtValue for a feed; reused while the same array object is fed again (the KV cache views)."""
        hit = self._bound.get(name)
        if hit is not None and hit[0] is array:
            return hit[1]
        value = self._ortvalue(np.ascontiguousarray(array))
        if array.flags.c_contiguous:
            self._bound[name] = (array, value)
        return value

    def run_impl(self, feeds):
        values = {k: self._value(k, v) for k, v in feeds.items()}
        t0 = time.perf_counter()
        outs = self.session.run_with_ort_values(self.output_names, values)
        self.seconds += time.perf_counter() - t0
        return [o.numpy() for o in outs]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, threads: int | None = None, provider: str = "cpu"):
        self.threads = threads or int(os.environ.get("VTC_THREADS", "0")) or None
        self.provider = provider

    def open(self, artifact_dir: Path, spec: GraphSpec) -> GraphSession:
        return OrtSession(Path(artifact_dir) / spec.file, spec, self.threads, self.provider)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "version": ort.__version__, "provider": self.provider,
                "threads": self.threads or "default"}


def get_backend(name: str = "onnxruntime", **kwargs):
    if name in ("onnxruntime", "ort"):
        return OrtBackend(**kwargs)
    raise BackendError(f"unknown runtime backend {name!r}.", "Available: onnxruntime.")
