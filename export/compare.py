"""Every graph's outputs on two backends, compared with Polygraphy's Comparator (`vtc-export compare`).

The feeds are recorded from one greedy ONNX Runtime (CPU) generation on the artifact (prefill + decode
steps, the real KV cache), so every graph sees the inputs it sees in use. Each graph then runs those
feeds on both backends, wrapped as Polygraphy runners, and per output the table reports:

    max_abs    max |a - b| over every element of every feed set
    cosine     a . b / (|a| |b|) over all of them (float64)
    ok         |a - b| <= atol + rtol * |b| for every element (integer outputs: a == b)
    polygraphy_ok   Polygraphy's own verdict for the graph with the same tolerances

Polygraphy is imported when a graph is compared; the recording needs only the runtime.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vtc.runtime.errors import UsageError

# Comparator tolerances (atol, rtol; |a - b| <= atol + rtol * |b| for every element) by engine precision.
# fp32: TF32 is off, differences are summation order only. fp16/bf16: 10/7 mantissa bits per op,
# accumulated over the layers of the tiny-to-7B models vtc targets. Integer outputs (kept indices,
# token maps) must be equal.
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (1e-1, 1e-1)}
# --backends name -> vtc.runtime.get_backend(name, **kwargs)
BACKEND_SPECS = {"ort": ("onnxruntime", {"provider": "cpu"}), "ort-cuda": ("onnxruntime", {"provider": "cuda"}),
                 "ort-tensorrt": ("onnxruntime", {"provider": "tensorrt"}), "tensorrt": ("tensorrt", {})}
DEFAULT_PROMPT = "Describe the image."


def _no_step(_label: str):
    return contextlib.nullcontext()


def backend_names(text: str) -> list[str]:
    """`--backends A,B`: exactly two names of BACKEND_SPECS (the same one twice is allowed)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKEND_SPECS]
    if len(names) != 2 or unknown:
        raise UsageError(f"--backends {text!r}: give two of {', '.join(BACKEND_SPECS)}.",
                         "Example: --backends ort,tensorrt.")
    return names


def open_backend(spec: str):
    """The runtime backend for one BACKEND_SPECS name (TensorRT or cuda-python missing: a BackendError)."""
    from vtc.runtime.backend import get_backend

    name, kwargs = BACKEND_SPECS[spec]
    return get_backend(name, **kwargs)


def tolerances(m, names: list[str], atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol): the given ones, else TOLERANCES of the engines' precision when a TensorRT backend is
    compared and the artifact has engines, else fp32's."""
    trt = m.engines is not None and any("tensorrt" in n for n in names)
    default_atol, default_rtol = TOLERANCES[m.engines.precision if trt else "fp32"]
    return (default_atol if atol is None else atol), (default_rtol if rtol is None else rtol)


def compare_artifact(art: Path, names: list[str], image: str | None = None, prompt: str = DEFAULT_PROMPT,
                     decode_steps: int = 2, atol: float | None = None, rtol: float | None = None,
                     step=_no_step) -> dict:
    """{"backends", "atol", "rtol", "rows"}: one row per graph output (see the module docstring)."""
    from vtc.runtime import manifest as mf

    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
        raise UsageError(f"--decode-steps must be at least 1 (got {decode_steps}): it is the number of decode steps "
                         "whose feeds are recorded.", "Pass e.g. --decode-steps 2 (the default).")
    m = mf.load(Path(art), check_files="sizes")
    backends = [open_backend(b) for b in names]  # TensorRT or cuda-python missing: one clear error, here
    atol, rtol = tolerances(m, names, atol, rtol)
    with step(f"recording feeds from one ONNX Runtime generation ({decode_steps} decode steps)"):
        feeds = record_feeds(Path(art), image, prompt, decode_steps)
    rows = []
    for graph, graph_feeds in feeds.items():
        with step(f"comparing {graph} ({len(graph_feeds)} feed sets) on {' vs '.join(names)}"):
            rows += compare_graph(Path(art), m.graphs[graph], graph, graph_feeds, backends, names, atol, rtol)
    return {"backends": names, "atol": atol, "rtol": rtol, "rows": rows}


class _Recorder:
    """Wraps a backend: every session keeps a copy of each feed dict it is given (the KV views change)."""

    def __init__(self, inner):
        self.inner, self.feeds = inner, {}

    def open(self, artifact_dir, spec):
        from vtc.runtime.backend import GraphSession

        inner, sink = self.inner.open(artifact_dir, spec), self.feeds.setdefault(spec.file, [])

        class Recording(GraphSession):
            def run_impl(self, feeds):
                sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
                out = inner.run(feeds)
                self.seconds = inner.seconds
                return out

        return Recording(spec)


def record_feeds(art: Path, image: str | None, prompt: str, decode_steps: int) -> dict[str, list]:
    """graph name -> feed dicts of one greedy generation on ONNX Runtime (CPU); no image: COMPARE shapes."""
    from vtc.runtime.backend import OrtBackend
    from vtc.runtime.images import COMPARE, shapes_image
    from vtc.runtime.pipeline import VLM
    from vtc.runtime.preprocess import load_image

    recorder = _Recorder(OrtBackend(provider="cpu"))
    vlm = VLM(art, backend=recorder, check_files=False)
    pixels = vlm.prepare_image(load_image(image) if image else shapes_image(336, COMPARE))
    p = vlm.prepare_prompt(prompt)
    room = vlm.cache.max_len - p.num_text - max(vlm.manifest.compression.kv_visual_per_layer) - 1  # + the prefill token
    if decode_steps > room:
        raise UsageError(f"--decode-steps {decode_steps} does not fit: the prompt leaves room for {max(room, 0)} decode "
                         f"steps in the artifact's {vlm.cache.max_len}-position cache.",
                         f"Pass --decode-steps {max(room, 1)} or less, or a shorter --prompt.")
    vlm.generate_from(pixels, p, max_new_tokens=decode_steps + 1, ignore_eos=True)
    by_file = {g.file: name for name, g in vlm.manifest.graphs.items()}
    return {by_file[f]: feeds for f, feeds in recorder.feeds.items() if feeds}


class _Runner:
    """Factory for a Polygraphy BaseRunner over a vtc GraphSession (Polygraphy imported lazily)."""

    @staticmethod
    def make(backend, art: Path, spec, name: str):
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata

        class VtcRunner(BaseRunner):
            def __init__(self):
                super().__init__(name=name)
                self.session = None

            def activate_impl(self):
                self.session = backend.open(art, spec)

            def get_input_metadata_impl(self):
                meta = TensorMetadata()
                for t in spec.inputs:
                    dtype = np.dtype(np.uint8) if t.dtype == "float8_e4m3fn" else np.dtype(t.dtype)
                    meta.add(t.name, dtype, [d if isinstance(d, int) else None for d in t.shape])
                return meta

            def infer_impl(self, feed_dict):
                t0 = time.perf_counter()
                outs = self.session.run(feed_dict)
                self.inference_time = time.perf_counter() - t0
                return OrderedDict(zip(self.session.output_names, outs))

            def deactivate_impl(self):
                close = getattr(self.session, "close", None)
                if close is not None:
                    close()
                self.session = None

        return VtcRunner()


def compare_graph(art: Path, spec, graph: str, feeds: list, backends: list, names: list, atol: float,
                  rtol: float) -> list[dict]:
    """One row per output: max-abs, cosine over all feed sets, and Polygraphy's pass/fail."""
    from polygraphy import comparator as pc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    runners = [_Runner.make(b, art, spec, f"{n}:{graph}") for b, n in zip(backends, names)]
    results = pc.Comparator.run(runners, data_loader=feeds)
    ints = {t.name: 0.0 for t in spec.outputs if "int" in t.dtype}  # integer outputs must match exactly
    simple = getattr(pc, "SimpleCompareFunc", None) or pc.CompareFunc.simple  # older Polygraphy: only the latter
    func = simple(atol={**ints, "": atol}, rtol={**ints, "": rtol})
    with np.errstate(divide="ignore", invalid="ignore"):  # relative errors of exact zeros are 0/0
        accuracy = pc.Comparator.compare_accuracy(results, compare_func=func)
    ok = bool(accuracy)
    (_, a), (_, b) = list(results)
    rows = []
    for t in spec.outputs:
        xs = [np.asarray(it[t.name]).astype(np.float64).ravel() for it in a]
        ys = [np.asarray(it[t.name]).astype(np.float64).ravel() for it in b]
        x, y = np.concatenate(xs), np.concatenate(ys)
        cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) if x.size and np.linalg.norm(x) * np.linalg.norm(y) else 1.0
        rows.append({"graph": graph, "output": t.name, "feeds": len(feeds),
                     "max_abs": float(np.max(np.abs(x - y))) if x.size else 0.0, "cosine": cos,
                     "exact": t.name in ints, "ok": _within(x, y, ints.get(t.name, atol), ints.get(t.name, rtol)),
                     "polygraphy_ok": ok})
    return rows


def _within(x, y, atol: float, rtol: float) -> bool:
    return bool(np.all(np.abs(x - y) <= atol + rtol * np.abs(y)))
