"""`vtc-export lint | engine | compare` and the TensorRT flags of `build` and `run` (parsing: vtc.export.cli).

lint     vtc.export.lint on every graph; exit 1 on an error. Needs onnx, not TensorRT.
engine   builds the engines on this GPU into an existing artifact (export on a workstation, build on the
         device): lint, build into a temporary directory inside the artifact, then swap the engines in
         and rewrite the manifest (written last, atomically: os.replace).
compare  feeds recorded from one ONNX Runtime (CPU) generation (prefill + decode steps, real KV cache)
         to every graph on two backends and compares their outputs with Polygraphy's Comparator.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
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
BACKEND_SPECS = {"ort": ("onnxruntime", {"provider": "cpu"}), "ort-cuda": ("onnxruntime", {"provider": "cuda"}),
                 "ort-tensorrt": ("onnxruntime", {"provider": "tensorrt"}), "tensorrt": ("tensorrt", {})}


# -- shared flags ----------------------------------------------------------------------------------
def engine_options(args) -> dict:
    """--precision/--workspace/--timing-cache/--builder-optimization-level as EngineOptions fields."""
    return {"precision": args.precision, "workspace_gb": args.workspace, "timing_cache": args.timing_cache,
            "builder_optimization_level": args.builder_optimization_level}


def build_engine_options(args) -> dict:
    """For `build`: the options only mean something with --backend tensorrt."""
    opts = engine_options(args)
    if args.backend != "tensorrt":
        given = [f"--{k.replace('_gb', '').replace('_', '-')}" for k, v in opts.items()
                 if v is not None and not (k == "precision" and v == "fp16")]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --backend tensorrt.", "Add --backend tensorrt, or drop them.")
        return {}
    from vtc.export.tensorrt import check_backend

    check_backend("tensorrt", opts)  # fails at once, before any export work, without TensorRT
    return opts


def runtime_backend(name: str, provider: str, threads: int | None):
    """`run --backend/--provider`; an ONNX Runtime backend's `fallback` says why it left the asked provider."""
    from vtc.runtime.backend import get_backend

    if name == "tensorrt":
        if provider != "cpu":
            raise UsageError("--provider selects ONNX Runtime's execution provider.", "Drop it with --backend tensorrt.")
        return get_backend("tensorrt")
    return get_backend("onnxruntime", threads=threads, provider=provider)


# -- lint ------------------------------------------------------------------------------------------
def lint(args, console) -> int:
    import json

    from vtc.export.lint import lint_artifact

    report = lint_artifact(Path(args.artifact), target_cc=args.target_cc)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_lint(console, report, verbose=True)
    return 0 if report.ok else 1


def print_lint(console, report, verbose: bool = False) -> None:
    src = report.source
    status = "[green]ok[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    console.print(f"TensorRT {report.tensorrt_version} lint of {', '.join(report.graphs)}: {status}, "
                  f"{len(report.warnings)} warning(s) [dim](rules: {src['repository']} {src['path']} @ "
                  f"{src['commit'][:12]})[/]")
    for f in report.findings if verbose else report.errors:
        color = "red" if f.level == "error" else "yellow"
        console.print(f"  [{color}]{f.level}[/] {f.line()}", highlight=False)
        if verbose and f.source:
            console.print(f"      [dim]source: {f.source}[/]", highlight=False)


# -- engine ----------------------------------------------------------------------------------------
def engine(args, console, step) -> int:
    from vtc.export.tensorrt import EngineOptions, check_backend

    opts = check_backend("tensorrt", engine_options(args))  # fails at once without TensorRT
    info = build_engines_in_place(Path(args.artifact), opts or EngineOptions(), step)
    console.print(f"engines: TensorRT {info.tensorrt_version} on {info.device} (compute capability "
                  f"{info.compute_capability}), {info.precision}")
    for name, entry in info.graphs.items():
        size = (Path(args.artifact) / entry["file"]).stat().st_size
        console.print(f"  {name:<10} {entry['file']:<24} {size / 2**20:8.1f} MiB  profiles {entry['profiles']}")
    console.print(f"next: vtc-export run {args.artifact} --backend tensorrt --image IMG --prompt \"...\"")
    return 0


def build_engines_in_place(art: Path, options, step):
    """Lint, build into art/.engines.partial-*, then swap in art/engines and rewrite the manifest last."""
    from vtc.export.lint import lint_graphs
    from vtc.export.tensorrt import ENGINE_DIR, build_engines
    from vtc.runtime import manifest as mf

    m = mf.load(art, check_files=True)
    with step("checking the graphs against TensorRT's ONNX parser support (lint)"):
        lint_graphs(art, m.graphs).raise_if_errors()
    tmp = Path(tempfile.mkdtemp(prefix=".engines.partial-", dir=art))
    staged = art / (mf.MANIFEST + ".partial")
    old = art / f".{ENGINE_DIR}.old-{time.strftime('%H%M%S')}"
    try:
        info = build_engines(art, m.graphs, options, step, out_dir=tmp)
        files = {k: v for k, v in m.files.items() if not k.startswith(ENGINE_DIR + "/")}
        for p in sorted(tmp.iterdir()):
            files[f"{ENGINE_DIR}/{p.name}"] = {"sha256": mf.sha256_file(p), "bytes": p.stat().st_size}
        staged.write_text(dataclasses.replace(m, engines=info, files=files).to_json())
        if (art / ENGINE_DIR).exists():
            (art / ENGINE_DIR).rename(old)
        tmp.rename(art / ENGINE_DIR)
        os.replace(staged, art / mf.MANIFEST)  # last: the manifest names only files that are in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        staged.unlink(missing_ok=True)
        if old.exists() and not (art / ENGINE_DIR).exists():
            old.rename(art / ENGINE_DIR)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return info


# -- compare ---------------------------------------------------------------------------------------
def compare(args, console, step) -> int:
    import json

    from vtc.runtime import manifest as mf

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKEND_SPECS]
    if len(names) != 2 or unknown:
        raise UsageError(f"--backends {args.backends!r}: give two of {', '.join(BACKEND_SPECS)}.",
                         "Example: --backends ort,tensorrt.")
    art = Path(args.artifact)
    m = mf.load(art, check_files=True)
    backends = [_backend(b) for b in names]  # TensorRT or cuda-python missing: one clear error, here
    atol, rtol = _tolerances(args, m)
    with step(f"recording feeds from one ONNX Runtime generation ({args.decode_steps} decode steps)"):
        feeds = record_feeds(art, args.image, args.prompt, args.decode_steps)
    rows = []
    for graph, graph_feeds in feeds.items():
        with step(f"comparing {graph} ({len(graph_feeds)} feed sets) on {' vs '.join(names)}"):
            rows += compare_graph(art, m.graphs[graph], graph, graph_feeds, backends, names, atol, rtol)
    _print_rows(console, rows, names, atol, rtol)
    if args.json:
        Path(args.json).write_text(json.dumps({"backends": names, "atol": atol, "rtol": rtol, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] and r["polygraphy_ok"] for r in rows) else 1


def _backend(spec: str):
    from vtc.runtime.backend import get_backend

    name, kwargs = BACKEND_SPECS[spec]
    return get_backend(name, **kwargs)


def _tolerances(args, m) -> tuple[float, float]:
    precision = m.engines.precision if m.engines is not None and "tensorrt" in args.backends else "fp32"
    atol, rtol = TOLERANCES[precision]
    return (args.atol if args.atol is not None else atol), (args.rtol if args.rtol is not None else rtol)


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
    """graph name -> feed dicts of one greedy generation on ONNX Runtime (CPU)."""
    from vtc.runtime.backend import OrtBackend
    from vtc.runtime.pipeline import VLM
    from vtc.runtime.preprocess import load_image

    recorder = _Recorder(OrtBackend(provider="cpu"))
    vlm = VLM(art, backend=recorder, check_files=False)
    pixels = vlm.prepare_image(load_image(image) if image else _test_image())
    vlm.generate_from(pixels, vlm.prepare_prompt(prompt), max_new_tokens=decode_steps + 1, ignore_eos=True)
    by_file = {g.file: name for name, g in vlm.manifest.graphs.items()}
    return {by_file[f]: feeds for f, feeds in recorder.feeds.items() if feeds}


def _test_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (336, 336), (240, 240, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((30, 40, 150, 160), fill=(200, 40, 40))
    d.ellipse((170, 60, 300, 190), fill=(40, 90, 200))
    d.polygon([(60, 300), (160, 190), (260, 300)], fill=(40, 160, 70))
    return img


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


def _print_rows(console, rows: list, names: list, atol: float, rtol: float) -> None:
    from rich.table import Table

    table = Table(title=f"{names[0]} vs {names[1]} (Polygraphy comparator: |a-b| <= {atol:g} + {rtol:g}*|b|; "
                  "integer outputs exact)")
    for col in ("graph", "output", "feeds", "max-abs", "cosine", "ok", "graph verdict (Polygraphy)"):
        table.add_column(col)
    yes_no = {True: "[green]yes[/]", False: "[red]NO[/]"}
    for r in rows:
        table.add_row(r["graph"], r["output"], str(r["feeds"]), f"{r['max_abs']:.2e}", f"{r['cosine']:.7f}",
                      yes_no[r["ok"]], yes_no[r["polygraphy_ok"]])
    console.print(table)
