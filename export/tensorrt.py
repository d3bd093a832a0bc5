"""TensorRT engines from an artifact's ONNX graphs, as Polygraphy loaders (nothing runs until called).

    SaveBytes(EngineBytesFromNetwork(NetworkFromOnnxPath(graph.onnx),
                                     config=CreateConfig(fp16|bf16, profiles, memory_pool_limits, ...),
                                     save_timing_cache=FILE), path=engines/graph.plan)

(Polygraphy's own `convert` pattern: the serialized engine is written as built, never deserialized here.)

* Profiles come from the manifest (`GraphSpec.profiles`): one TensorRT optimization profile per named
  profile, in order (llm: 0 = prefill with seq in [K+1, K+text_budget] and past_seq = 0; 1 = decode with
  seq = 1 and past_seq = max_seq_len), so one engine holds the weights once. opt = the shortest prompt
  plus OPT_TEXT_TOKENS text tokens. A dim named by a string instead of a number (FastV's `select`:
  "prompt length") takes the range of the same dim in the graph that produces its inputs (`llm_pre`).
* Precision: the graphs are float32; fp16/bf16 let TensorRT lower layers (weakly typed network, TF32
  off). A graph with QuantizeLinear/DequantizeLinear (a quantized KV cache) is built with explicit
  quantization: the int8 / fp8 flags are enabled for exactly the types its Q/DQ nodes use; FP8 needs
  compute capability >= 8.9 and is refused on older GPUs (Jetson Orin is 8.7) before building.
* The manifest records, per artifact, the TensorRT version, GPU name and compute capability the engines
  were built for; the runtime refuses them anywhere else (`vtc.runtime.trt_backend`).

Constructing the loaders needs only Polygraphy (`pip install 'vtc[tensorrt]'`); calling them needs
TensorRT and a GPU. `require_tensorrt()` fails at once, with what to install, where TensorRT is absent.
"""

from __future__ import annotations

import collections.abc
from dataclasses import asdict, dataclass
from pathlib import Path

from vtc.runtime.errors import BackendError, ExportError, UsageError

PRECISIONS = ("fp16", "bf16", "fp32")
BACKENDS = ("onnxruntime", "tensorrt")
OPT_TEXT_TOKENS = 32  # opt shape for prefill: K + 1 + this many text tokens (a typical VQA prompt), capped
ENGINE_DIR = "engines"
INSTALL_TRT = ("Install TensorRT 10.x on the GPU host (x86_64/SBSA: pip install tensorrt-cu12; Jetson: it comes "
               "with JetPack, sudo apt install python3-libnvinfer), cuda-python (pip install cuda-python) and "
               "Polygraphy (pip install 'vtc[tensorrt]').")
INSTALL_POLYGRAPHY = "Install Polygraphy: pip install 'vtc[tensorrt]' (or pip install polygraphy)."


@dataclass(frozen=True)
class EngineOptions:
    """What `--precision/--workspace/--timing-cache/--builder-optimization-level` asked for."""

    precision: str = "fp16"
    workspace_gb: float | None = None  # None = TensorRT's default (the device's memory)
    timing_cache: str | None = None  # read before and updated after each build
    builder_optimization_level: int | None = None  # 0..5; None = TensorRT's default (3)

    def validate(self) -> "EngineOptions":
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}.",
                             "Pass --precision fp16 (default), bf16 or fp32.")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise UsageError(f"--workspace {self.workspace_gb} must be a positive number of GiB.", "Example: --workspace 4.")
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise UsageError(f"--builder-optimization-level {level} is outside 0..5.", "Pass 0 (fast build) to 5.")
        if self.timing_cache and not Path(self.timing_cache).expanduser().parent.is_dir():
            raise UsageError(f"--timing-cache {self.timing_cache}: its directory does not exist.",
                             "Create it, or choose another path.")
        return self

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * (1 << 30))

    @property
    def timing_cache_path(self) -> str | None:
        return None if self.timing_cache is None else str(Path(self.timing_cache).expanduser())


# -- availability ----------------------------------------------------------------------------------
def require_polygraphy() -> None:
    try:
        import polygraphy  # noqa: F401
    except ImportError as e:
        raise BackendError(f"Polygraphy is not installed ({e}).", INSTALL_POLYGRAPHY) from e


def require_tensorrt():
    """The tensorrt module, or a BackendError saying what to install (nothing else is attempted): Polygraphy
    first, then vtc.runtime.trt_backend's TensorRT check with the exporter's install hint."""
    from vtc.runtime.trt_backend import import_tensorrt

    require_polygraphy()
    return import_tensorrt("TensorRT is not importable on this host", INSTALL_TRT)


def check_backend(backend: str, options: dict) -> EngineOptions | None:
    """Validate `build --backend ...` and its engine options once, before any export work: the options
    (only the flags the user gave) apply to --backend tensorrt only, and TensorRT must import for it."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}.", "Pass --backend tensorrt.")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(EngineOptions.__dataclass_fields__))
    if unknown:
        raise UsageError(f"unknown TensorRT build options {unknown}.", "Known: " + ", ".join(EngineOptions.__dataclass_fields__))
    if backend != "tensorrt":
        if given:
            flags = ", ".join(f"--{k.replace('_gb', '').replace('_', '-')}" for k in given)
            raise UsageError(f"{flags} only apply with --backend tensorrt.", "Add --backend tensorrt, or drop them.")
        return None
    opts = EngineOptions(**given).validate()
    require_tensorrt()
    return opts


# -- profiles --------------------------------------------------------------------------------------
def graph_profiles(name: str, graphs: dict) -> dict:
    """The named profiles of graph `name` with every dim a number or [lo, hi]. A dim given as text
    (select's "prompt length") takes that dim's range in the graph whose outputs feed this one."""
    spec = graphs[name]
    ins = {t.name for t in spec.inputs}
    out = {}
    for pname, dims in spec.profiles.items():
        resolved = {}
        for dim, value in dims.items():
            if isinstance(value, (int, list)):
                resolved[dim] = value
                continue
            feeders = [s for n, s in graphs.items() if n != name and ins & {t.name for t in s.outputs}]
            found = [s.profiles.get(pname, {}).get(dim) for s in feeders]
            found = [v for v in found if isinstance(v, (int, list))]
            if not found:
                raise ExportError(f"graph {name}: profile {pname!r} gives {dim} as {value!r}, and no graph feeding "
                                  "it gives a range.", "Rebuild the artifact with this vtc.")
            resolved[dim] = found[0]
        out[pname] = resolved
    return out


def _bounds(value) -> tuple[int, int, int]:
    """(min, opt, max) of a profile dim: a number, or [lo, hi] with opt = lo + OPT_TEXT_TOKENS (capped)."""
    if isinstance(value, int):
        return value, value, value
    lo, hi = value
    return lo, min(hi, lo + OPT_TEXT_TOKENS), hi


def trt_profiles(spec, profiles: dict) -> list:
    """One Polygraphy Profile per named profile: (min, opt, max) for every input of the graph."""
    from polygraphy.backend.trt import Profile

    out = []
    for pname, dims in profiles.items():
        profile = Profile()
        for t in spec.inputs:
            shapes = []
            for d in t.shape:
                if isinstance(d, int):
                    shapes.append((d, d, d))
                elif d in dims:
                    shapes.append(_bounds(dims[d]))
                else:
                    raise ExportError(f"graph {spec.file}: input {t.name} has dim {d!r}, which profile {pname!r} "
                                      "does not set.", "Rebuild the artifact with this vtc.")
            profile.add(t.name, *(tuple(s[i] for s in shapes) for i in range(3)))
        out.append(profile)
    return out or [Profile()]


# -- the loaders -----------------------------------------------------------------------------------
class PoolLimits(collections.abc.Mapping):
    """`CreateConfig(memory_pool_limits=...)` without importing TensorRT until the config is built:
    the key (trt.MemoryPoolType.WORKSPACE) is resolved when Polygraphy iterates the mapping."""

    def __init__(self, workspace: int):
        self.workspace = workspace

    def _items(self) -> dict:
        import tensorrt as trt

        return {trt.MemoryPoolType.WORKSPACE: self.workspace}

    def __getitem__(self, key):
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"PoolLimits(workspace={self.workspace})"


def quantized_types(onnx_path: Path) -> set[str]:
    """The quantized types ("INT8", "FP8") the graph's QuantizeLinear/DequantizeLinear nodes use."""
    import onnx

    from vtc.export.lint_graph import GraphView

    g = GraphView(onnx.load(str(onnx_path), load_external_data=False))
    found = set()
    for n in g.nodes:
        if n.op_type == "QuantizeLinear" and n.output:
            found.add(g.types.get(n.output[0]))
        elif n.op_type == "DequantizeLinear" and n.input:
            found.add(g.types.get(n.input[0]))
    return found & {"INT8", "FP8"}


REDUCED = {"float16": "fp16", "bfloat16": "bf16"}  # graph dtypes (build --dtype) that make a strongly typed network


def graph_dtype(spec) -> str:
    """The float dtype a graph computes in: that of its first floating-point input (build --dtype)."""
    return next((t.dtype for t in spec.inputs if t.dtype in ("float32", *REDUCED)), "float32")


def create_config(spec, profiles: dict, options: EngineOptions, quantized: set[str] = frozenset()):
    """Polygraphy's CreateConfig for one graph (lazy: TensorRT is imported when it is called).

    A float32 graph is weakly typed: --precision lets TensorRT lower layers, and the INT8/FP8 flags are
    set for its Q/DQ. An fp16/bf16 graph (build --dtype) is built strongly typed: every tensor keeps the
    type the graph gives it, so no precision flag is set (TensorRT refuses them on such networks)."""
    from polygraphy.backend.trt import CreateConfig

    weak = graph_dtype(spec) not in REDUCED
    return CreateConfig(
        tf32=False, fp16=weak and options.precision == "fp16", bf16=weak and options.precision == "bf16",
        int8=weak and "INT8" in quantized, fp8=weak and "FP8" in quantized,  # explicit quantization: Q/DQ, no calibrator
        profiles=trt_profiles(spec, profiles),
        memory_pool_limits=None if options.workspace_bytes is None else PoolLimits(options.workspace_bytes),
        load_timing_cache=options.timing_cache_path,
        builder_optimization_level=options.builder_optimization_level)


def engine_loader(onnx_path: Path, engine_path: Path, spec, profiles: dict, options: EngineOptions,
                  quantized: set[str] = frozenset()):
    """SaveBytes(EngineBytesFromNetwork(NetworkFromOnnxPath(...), config, timing cache), path): call it
    to build and write the engine (returns the serialized engine)."""
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    typed = graph_dtype(spec) in REDUCED
    # the parser resolves external data next to the file; fp16/bf16 graphs: strongly typed (create_config)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if typed else None)
    build = EngineBytesFromNetwork(network, config=create_config(spec, profiles, options, quantized),
                                   save_timing_cache=options.timing_cache_path)
    return SaveBytes(build, path=str(engine_path))


# -- building --------------------------------------------------------------------------------------
def check_device(quantized: set[str], device) -> None:
    """FP8 Q/DQ needs compute capability >= 8.9: refuse before spending minutes on a build."""
    from vtc.export.lint import _cc_tuple, rules

    need = rules()["fp8_min_compute_capability"]["value"]
    if "FP8" in quantized and _cc_tuple(device.compute_capability) < _cc_tuple(need):
        raise BackendError(f"the graphs use an FP8 KV cache, which needs compute capability >= {need}; this GPU "
                           f"({device.name}) is {device.compute_capability}.",
                           "Rebuild the artifact with --kv-cache int8 (or fp16) for this device.")


def check_version(directory: Path, graphs: dict, version: str) -> None:
    """INT4 weights (opset 21) need a newer TensorRT than the lint table's: refuse an older one, naming the
    version the graph needs (vtc.export.lint.required_tensorrt), before spending minutes on a build."""
    import onnx

    from vtc.export.lint import _version, required_tensorrt

    for name, spec in graphs.items():
        need = required_tensorrt(onnx.load(str(Path(directory) / spec.file), load_external_data=False))
        if _version(version) < _version(need):
            raise BackendError(f"graph {name} needs TensorRT >= {need} (int4 weights: DequantizeLinear with block_size, "
                               f"opset 21); this host has TensorRT {version}.",
                               "Upgrade TensorRT, or rebuild the artifact with --weights int8 (or fp).")


def build_engines(directory: Path, graphs: dict, options: EngineOptions, step, out_dir: Path | None = None):
    """Build one engine per graph into `out_dir` (default directory/engines); returns the manifest's
    EngineInfo (file paths relative to `directory`). Needs TensorRT and a GPU."""
    from vtc.runtime import manifest as mf
    from vtc.runtime.trt_backend import device_info

    trt = require_tensorrt()
    quiet_polygraphy()
    device = device_info()
    out_dir = out_dir or Path(directory) / ENGINE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = {name: quantized_types(Path(directory) / spec.file) for name, spec in graphs.items()}
    check_device(set().union(*quantized.values()), device)
    check_version(directory, graphs, trt.__version__)
    entries = {}
    for name, spec in graphs.items():
        profiles = graph_profiles(name, graphs)
        path = out_dir / f"{name}.plan"
        with step(f"building TensorRT engine for {name} ({options.precision}, {len(profiles) or 1} profile(s))"):
            engine_loader(Path(directory) / spec.file, path, spec, profiles, options, quantized[name])()
        entries[name] = {"file": (Path(ENGINE_DIR) / path.name).as_posix(), "profiles": list(profiles),
                         "quantized": sorted(quantized[name])}
    return mf.EngineInfo(tensorrt_version=trt.__version__, device=device.name,
                         compute_capability=device.compute_capability, precision=engine_precision(graphs, options),
                         graphs=entries,
                         options={k: v for k, v in asdict(options).items() if k != "precision"})


def engine_precision(graphs: dict, options: EngineOptions) -> str:
    """fp16/bf16 for strongly typed (reduced-precision) graphs, else --precision."""
    typed = {REDUCED[d] for d in (graph_dtype(s) for s in graphs.values()) if d in REDUCED}
    return typed.pop() if len(typed) == 1 else options.precision


def quiet_polygraphy() -> None:
    """Polygraphy logs every loader at INFO on stdout; the CLI shows its own progress."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


# -- the build's hooks (vtc.export.build) ----------------------------------------------------------
def lint_step(directory: Path, graphs: dict, backend: str, step):
    """TensorRT lint of the exported graphs: errors are fatal for --backend tensorrt; for an ONNX Runtime
    build they are returned (the CLI prints them) since ORT runs the artifact regardless."""
    from vtc.export.lint import lint_graphs

    target = require_tensorrt().__version__ if backend == "tensorrt" else None  # the engines' TensorRT (INT4 weights)
    with step("checking the graphs against TensorRT's ONNX parser support (lint)"):
        report = lint_graphs(directory, graphs, tensorrt_version=target)
    if backend == "tensorrt":
        report.raise_if_errors()
    return report


def engine_step(directory: Path, graphs: dict, options: EngineOptions | None, step):
    """For --backend tensorrt (options validated by check_backend): build the engines into the build's
    temporary directory. None for an ONNX Runtime build."""
    if options is None:
        return None
    return build_engines(directory, graphs, options, step)


# -- engines for an existing artifact (vtc-export engine) -----------------------------------------
def build_engines_in_place(art: Path, options: EngineOptions, step):
    """`vtc-export engine`: lint, build into art/.engines.partial-*/new (vtc.export.placement: locked by
    art/.engines.lock, a dead run's partial directory removed first), then swap in art/engines and replace
    the manifest last (os.replace): an interrupted build (exception, Ctrl-C, SIGTERM) leaves the artifact as
    it was. The old engines are deleted file by file, only those the manifest lists; an engines directory
    holding anything else is refused before the build."""
    import dataclasses

    from vtc.export import placement
    from vtc.export.lint import lint_graphs
    from vtc.runtime import manifest as mf

    mf.load(art, check_files=False)  # a missing or damaged artifact fails here, before anything is written
    prefix = ENGINE_DIR + "/"

    def listed() -> set[str]:  # the engine files the manifest lists: all that may be replaced
        return {k[len(prefix):] for k in mf.load(art, check_files=False).files if k.startswith(prefix)}

    with placement.signals_raise(), \
            placement.claim_inside(art, ENGINE_DIR, listed, Path(art) / mf.MANIFEST) as claim:
        m = mf.load(art, check_files="sizes")  # after a killed run's leftovers were settled (claim_inside)
        with step("checking the graphs against TensorRT's ONNX parser support (lint)"):
            lint_graphs(art, m.graphs, tensorrt_version=require_tensorrt().__version__).raise_if_errors()
        info = build_engines(art, m.graphs, options, step, out_dir=claim.path)
        files = {k: v for k, v in m.files.items() if not k.startswith(prefix)}
        for p in sorted(claim.path.iterdir()):
            files[f"{ENGINE_DIR}/{p.name}"] = {"sha256": mf.sha256_file(p), "bytes": p.stat().st_size}
        claim.commit(staged_manifest=dataclasses.replace(m, engines=info, files=files).to_json())
    return info
