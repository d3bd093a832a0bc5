"""`vtc-export build`: checkpoint -> compressed, validated artifact directory.

`prepare(args)` validates everything once (ratio, method and options against the model, sizes, KV and
TensorRT options, output) and returns a frozen `BuildPlan`; no file is written. `build` then runs the
steps in order, into a temporary sibling directory, and renames it into place only after parity passed
and the manifest (written last) is complete; any failure or Ctrl-C removes the temporary directory:

    kv        KV-cache dtype per layer and static scales (calibrated now, or --kv-scales)   vtc.export.kvquant
    graphs    one lazy export loader per graph (`graph_loaders`), each called with its path  vtc.export.onnx_export
              (a sweep wraps each loader in vtc.export.graph_cache.Cached)
    lint      TensorRT ONNX-parser lint (fatal only for --backend tensorrt)                  vtc.export.tensorrt
    assets    tokenizer, chat template, preprocessing config, embedding table                vtc.export.assets
    parity    the runtime, opened on the in-memory manifest, against PyTorch                 vtc.export.parity
    kv check  quantized vs float32 KV cache on held-out pairs (int8 / fp8)                   vtc.export.kvquant
    engines   TensorRT engines (--backend tensorrt)                                          vtc.export.tensorrt
    manifest  checksums of every file, written last
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vtc.runtime.errors import UsageError

DEFAULT_METHOD = "pool"
DEFAULT_RATIO = 0.25
DEFAULT_TEXT_BUDGET = 128
DEFAULT_MAX_SEQ_LEN = 1024
# Upper bound of --max-seq-len (and so of --text-budget, --parity-tokens): the KV cache is allocated for it
# at once, in the build's parity step and in every `run` (10**9 asked for 715 GiB and died at parity).
MAX_SEQ_LEN_LIMIT = 2 ** 20
KV_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}
# --dtype: the graphs' weights and activations. Default per target: fp16 for TensorRT (its engines run
# fp16 anyway); fp32 for ONNX Runtime, whose CPU kernels are float32 (an fp16 graph is upcast at load:
# same memory and compute plus casts; bf16 has no CPU kernels at all).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class BuildArgs:
    """Exactly what the user asked for; recorded verbatim in the manifest (`build_args`)."""

    model: str | None = None  # None = the built-in demo model
    method: str = DEFAULT_METHOD
    ratio: float | None = None  # None = 0.25, or 1.0 for method "none"
    method_options: dict = field(default_factory=dict)
    output: str | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    text_budget: int = DEFAULT_TEXT_BUDGET
    force: bool = False
    parity_tokens: int = 8
    kv_cache: str | None = None  # fp32 | fp16 | bf16 | int8 | fp8; None = the graph dtype
    kv_scales: str | None = None  # kv_scales.json from `vtc-export calibrate`; None = calibrate now
    calib_images: str | None = None
    calib_prompts: str | None = None
    kv_granularity: str = "channel"  # channel | head
    kv_statistic: str = "absmax"  # absmax | percentile:P
    kv_fallback: float = 0.08  # relative error above which a layer stays float16
    backend: str = "onnxruntime"  # onnxruntime | tensorrt (also builds engines: vtc.export.tensorrt)
    engine: dict = field(default_factory=dict)  # --backend tensorrt: EngineOptions (precision, workspace_gb, ...)
    dtype: str | None = None  # fp32 | fp16 | bf16: graph weights and activations; None = per backend (DTYPES)
    image_splits: tuple | None = None  # (0,) global image only, or (rows, cols) tiles + global; None = the architecture's default
    image_size: tuple | None = None  # (H, W) static image size (Qwen2-VL: multiples of 28); None = the architecture's default
    weights: str = "fp"  # fp (= dtype) | int8 (per channel) | int4 (blocked): the LLM's linear layers (vtc.export.wquant)
    group_size: int = 128  # --weights int4: block size along each linear layer's input dim
    weights_algo: str = "rtn"  # rtn | awq (int4: scales searched on the calibration set, vtc.calibration.awq)
    lm_head: str | None = None  # int8 | fp: the LM head with --weights int8|int4 (None = int8; vtc.export.wquant)


@dataclass(frozen=True)
class BuildPlan:
    """Everything the build steps need, resolved and validated once by `prepare`."""

    args: BuildArgs
    src: Path  # the checkpoint directory
    demo: bool  # the built-in demo model
    out: Path  # the artifact directory to create
    adapter: object  # vtc.export.models.base.Adapter
    model: object  # the loaded torch model
    method: object  # vtc.export.methods.base.Method (`none` for ratio 1.0)
    plan: object  # vtc.export.methods.base.Plan: N, K, options
    spec: object  # VisualSpec
    lm: object  # LMSpec
    engine: object = None  # validated EngineOptions for --backend tensorrt, else None
    dtype: str = "fp32"  # the graphs' dtype (--dtype, resolved per backend)
    kv_cache: str = "fp32"  # the KV cache storage (--kv-cache, default: dtype)

    def release_model(self) -> None:
        """Drop the PyTorch model: the one change a plan allows. The memory-lean parity check frees it
        before the runtime opens the same weights (never both in memory at once)."""
        object.__setattr__(self, "model", None)


@dataclass
class Built:
    path: Path
    manifest: object
    demo: bool
    lint: object = None  # the TensorRT lint report (vtc.export.lint) of the exported graphs


def default_output(model_name: str, method: str, ratio: float) -> Path:
    return Path("artifacts") / f"{model_name}-{method}-r{ratio:g}"


def _check_args(args: BuildArgs) -> None:
    """Everything about the arguments that needs no model."""
    if args.ratio is not None and not (0.0 < args.ratio <= 1.0):
        raise UsageError(f"--ratio {args.ratio} is out of range: it is the fraction of visual tokens KEPT.",
                         "Pass 0 < ratio <= 1 (e.g. --ratio 0.25 keeps 25%; 1.0 keeps all).")
    for name, v in (("--max-seq-len", args.max_seq_len), ("--text-budget", args.text_budget)):
        if v < 1:
            raise UsageError(f"{name} must be a positive number of tokens (got {v}).", "Pass a positive integer.")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}.", "Pass e.g. --dtype fp16.")
    if args.kv_cache is not None and args.kv_cache not in KV_DTYPES:
        raise UsageError(f"--kv-cache {args.kv_cache!r} is not one of {', '.join(KV_DTYPES)}.", "Pass e.g. --kv-cache int8.")
    if (args.calib_images is None) != (args.calib_prompts is None):
        raise UsageError("--calib-images and --calib-prompts go together.", "Pass both, or neither for the default set.")
    quantized = args.kv_cache in ("int8", "fp8")
    awq = args.weights_algo == "awq"  # AWQ calibrates on the same --calib-* set
    if not quantized and (args.kv_scales or (args.calib_images and not awq)):
        raise UsageError("--kv-scales/--calib-* apply to --kv-cache int8|fp8 (--calib-* also to --weights-algo awq), "
                         f"not {args.kv_cache}.", "Drop them, pick int8/fp8, or pass --weights int4 --weights-algo awq.")
    if not 0 < args.kv_fallback:
        raise UsageError(f"--kv-fallback-threshold must be positive (got {args.kv_fallback}).", "Pass e.g. 0.08.")
    if args.max_seq_len > MAX_SEQ_LEN_LIMIT:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is over vtc's limit of {MAX_SEQ_LEN_LIMIT} tokens (the KV "
                         "cache is allocated for all of them at once).", "Pass the context the deployment needs, "
                         f"e.g. --max-seq-len {DEFAULT_MAX_SEQ_LEN} (the default).")
    if args.text_budget >= args.max_seq_len:
        raise UsageError(f"--text-budget {args.text_budget} does not fit in --max-seq-len {args.max_seq_len}, which "
                         "also holds the visual and the generated tokens.", "Lower --text-budget or raise --max-seq-len.")
    if not 1 <= args.parity_tokens < args.max_seq_len:
        raise UsageError(f"--parity-tokens {args.parity_tokens}: the build compares 1 to {args.max_seq_len - 1} greedy "
                         "tokens with PyTorch (fewer than --max-seq-len).", "Pass e.g. --parity-tokens 8 (the default).")
    stat = args.kv_statistic
    if stat != "absmax":
        pct = stat.split(":", 1)[1] if isinstance(stat, str) and stat.startswith("percentile:") else None
        try:
            ok = pct is not None and 0 < float(pct) <= 100
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--kv-statistic {stat!r} is not absmax or percentile:P with 0 < P <= 100.",
                             "Pass e.g. --kv-statistic percentile:99.99, or absmax (the default).")
    if args.kv_granularity not in ("channel", "head"):
        raise UsageError(f"--kv-granularity {args.kv_granularity!r} is not channel or head.", "Pass one of them.")
    from vtc.export.wquant import check_args as check_weights

    check_weights(args.weights, args.group_size, args.weights_algo, args.lm_head)
    for flag, value, want_dir in (("--kv-scales", args.kv_scales, False), ("--calib-images", args.calib_images, True),
                                  ("--calib-prompts", args.calib_prompts, False)):
        path = Path(value).expanduser() if value else None
        if path is None:
            continue
        if not path.exists():
            raise UsageError(f"{flag} {value} does not exist.", "Check the path." if flag != "--kv-scales" else
                             "Create it with `vtc-export calibrate`.")
        if want_dir and not path.is_dir():
            raise UsageError(f"{flag} {value} is a file, not a directory.", "Pass the directory of calibration images.")
        if not want_dir and not path.is_file():
            raise UsageError(f"{flag} {value} is a directory, not a file." if path.is_dir() else
                             f"{flag} {value} is not a regular file.", "Pass the path of the file itself.")


def _resolve_method(args: BuildArgs):
    """(method, ratio): the default ratio, and ratio 1.0 = the uncompressed model (methods.resolve)."""
    from vtc.export import methods

    method = methods.get(args.method)  # unknown names fail here, before anything else
    if not method.compresses and args.ratio not in (None, 1.0):
        raise UsageError(f"--method {args.method} keeps every visual token, but --ratio {args.ratio} was given.",
                         "Drop --ratio, or choose a compression method (`vtc-export list`).")
    method.parse_options(args.method_options)
    ratio = DEFAULT_RATIO if args.ratio is None and method.compresses else 1.0 if args.ratio is None else args.ratio
    return methods.resolve(args.method, ratio)


def prepare(args: BuildArgs, step: Callable, check_output: bool = True) -> BuildPlan:
    """All validation, model loading and planning; no file is written."""
    from vtc.export import models
    from vtc.export.demo import ensure_demo_checkpoint, is_demo
    from vtc.export.tensorrt import check_backend

    _check_args(args)
    engine = check_backend(args.backend, args.engine)  # --backend tensorrt: TensorRT must import, before any export
    method, ratio = _resolve_method(args)
    with step("demo checkpoint" if args.model is None else "checking checkpoint"):
        src = ensure_demo_checkpoint() if args.model is None else Path(args.model).expanduser()
        adapter = models.resolve(src).with_image_splits(args.image_splits).with_image_size(args.image_size)  # static image
    demo = is_demo(src)
    name = "demo-llava" if demo else src.resolve().name
    out = Path(args.output) if args.output else default_output(name, method.name, ratio)
    if check_output:
        _check_output(out, src, args.force)
    dtype = args.dtype or ("fp16" if args.backend == "tensorrt" else "fp32")
    kv_cache = args.kv_cache or dtype
    if "bf16" in (kv_cache, dtype) and kv_cache != dtype and kv_cache not in ("int8", "fp8"):
        raise UsageError(f"--kv-cache {kv_cache} with --dtype {dtype}: a bfloat16 cache goes with bfloat16 graphs only.",
                         "Drop --kv-cache (it follows --dtype), or pass --dtype bf16.")
    with step(f"loading {adapter.model_type} checkpoint ({dtype})"):
        model = adapter.load(src, torch_dtype(dtype))
    spec, lm = adapter.visual_spec(model), adapter.lm_spec(model)
    plan = method.plan(spec, ratio, dict(args.method_options))
    method.check_lm(lm.num_layers, plan)
    widest = max(method.kv_visual_per_layer(plan, lm.num_layers))  # in-LLM methods prefill all N first
    if args.max_seq_len < widest + args.text_budget + 1:
        raise UsageError(f"--max-seq-len {args.max_seq_len} cannot hold {widest} visual + {args.text_budget} text "
                         "tokens and one generated token.",
                         f"Pass --max-seq-len {widest + args.text_budget + 256} or lower --text-budget.")
    return BuildPlan(args=args, src=src, demo=demo, out=out, adapter=adapter, model=model, method=method, plan=plan,
                     spec=spec, lm=lm, engine=engine, dtype=dtype, kv_cache=kv_cache)


def torch_dtype(flag: str):
    """--dtype / --kv-cache float flag -> torch dtype."""
    import torch

    return getattr(torch, DTYPES[flag])


def _check_output(out: Path, src: Path, force: bool) -> None:
    """The output may be new, or (with --force) an existing vtc artifact or empty directory; never a file,
    a symlink, the source checkpoint, a directory with anything its manifest does not list, or an output
    another build is writing (vtc.export.placement.check_output). Writes nothing."""
    from vtc.export import placement

    placement.check_output(out, src, force)


def build(args: BuildArgs, step: Callable, cache: Path | None = None) -> Built:
    """Run the whole build. `step(label)` is a context manager the caller uses to show progress;
    `cache`: a graph-cache directory shared by related builds (vtc.export.graph_cache).

    The output is claimed (vtc.export.placement: a lock next to it, dead builds' partial directories
    removed, checked again) and written into `.<name>.partial-XXXXXXXX/new`; commit renames it into place
    only if the output is still what it was when claimed. Any exception, Ctrl-C, SIGTERM or SIGHUP
    (BuildInterrupted) removes the partial directory and the lock; after SIGKILL the next build does."""
    from vtc.export import placement

    with placement.signals_raise():
        bp = prepare(args, step)
        with placement.claim_output(bp.out, bp.src, args.force) as claim:
            manifest, lint = _write_artifact(claim.path, bp, step, cache)
            claim.commit()
    return Built(path=bp.out, manifest=manifest, demo=bp.demo, lint=lint)


def _write_artifact(tmp: Path, bp: BuildPlan, step: Callable, cache: Path | None):
    from vtc.export import assets, kvquant, parity, wquant
    from vtc.export import tensorrt as trt_build
    from vtc.runtime import manifest as mf
    from vtc.runtime.pipeline import VLM

    args = bp.args
    if _lean(bp):
        _lean_allocator()
    awq = wquant.prepare(bp, step)  # --weights-algo awq: scales searched and folded into the model before export
    kv = kvquant.plan(tmp, bp, step)
    graphs = {}
    for name, loader in graph_loaders(bp, kv.quant, cache).items():
        with step(loader.label):
            graphs[name] = loader(tmp / f"{name}.onnx")
        del loader  # holds the model's modules
    weights = wquant.quantize_step(tmp, bp, graphs, step)  # --weights int8|int4: the LLM graphs, in place; else None
    lint = trt_build.lint_step(tmp, graphs, args.backend, step)  # fatal only for --backend tensorrt
    with step("writing tokenizer, preprocessing and embeddings"):
        side = assets.write(tmp, bp.src, bp.adapter, bp.model)
    draft = _manifest(bp, kv, graphs, side, parity={}, files={}, weights=weights)
    skipped = {"skipped": "memory-lean build: the PyTorch model was freed before the runtime opened; measure it "
                          "with `vtc-export verify` on a host with more memory"}
    if _lean(bp):
        report = _lean_parity(tmp, bp, kv, draft, step)
        if kv.quantized:
            kv.accuracy = dict(skipped)
        if weights is not None:
            weights.accuracy = dict(skipped)
    else:
        if bp.dtype == "fp32":
            ref = bp
        elif awq:  # the AWQ-scaled weights exactly as exported, in float32
            ref = dataclasses.replace(bp, model=bp.model.float())
        else:  # HF, float32, from the checkpoint
            ref = dataclasses.replace(bp, model=bp.adapter.load(bp.src))
        vlm = VLM(tmp, manifest=draft, backend=_check_backend(bp))
        if weights is not None:
            with step(f"measuring {args.weights} weights' accuracy vs float weights on held-out pairs"):
                weights.accuracy = wquant.accuracy(vlm, ref)
            wquant.fake_quantize(ref)  # parity holds the graph to HF on exactly the weights it stores
        with step(f"checking parity against PyTorch float32 ({args.parity_tokens} greedy tokens)"):
            report = parity.check(tmp, ref.adapter, ref.model, ref.method, ref.plan, ref.spec,
                                  max_new_tokens=args.parity_tokens, vlm=vlm, kv_dtype=KV_DTYPES[bp.kv_cache],
                                  graph_dtype=DTYPES[bp.dtype])
            report["reference"] = "HF transformers, float32" + (
                f", on the {args.weights} weights the graphs store (dequantized)" if weights is not None else "")
            report["scope"] = {"vision": "full", "llm": "full"}
            parity.raise_if_failed(report)
        if kv.quantized:
            with step(f"measuring {bp.kv_cache} KV accuracy vs float32 KV on held-out pairs"):
                kv.accuracy = kvquant.accuracy(vlm, ref)
        del ref, vlm
    engines = trt_build.engine_step(tmp, graphs, bp.engine, step)  # None for onnxruntime
    # the draft's model facts (the model itself may have been released), plus what the checks added
    final = dataclasses.replace(draft, parity=report, files=mf.file_table(tmp), engines=engines,
                                kv_cache=kv.info(bp.lm, args.max_seq_len),
                                weights=weights.info() if weights is not None else None)
    (tmp / mf.MANIFEST).write_text(final.to_json())  # last: its presence marks a complete artifact
    return final, lint


# Models whose float32 copy is above this are checked memory-lean (`_lean_parity`): the reference computes in
# float32 a module at a time on the build-dtype weights and is freed before the runtime opens the graphs one
# at a time, so the build's peak stays near one copy of the weights (SmolVLM-256M, 1.0 GB in float32, is lean;
# the bench-size LLaVA, 0.6 GB, is not).
LEAN_ABOVE_BYTES = 768 << 20
# ONNX Runtime's x86 CPU provider holds float32 copies of fp16 weights: a session of an LLM graph needs about
# this many bytes per parameter (measured: 2.67 GB for the 2-layer 7B-geometry graph's 0.54 B parameters).
ORT_BYTES_PER_PARAM = 5


def _lean(bp: BuildPlan) -> bool:
    return sum(p.numel() for p in bp.model.parameters()) * 4 > LEAN_ABOVE_BYTES


def _available_bytes() -> int:
    """Memory this host can still give (Linux MemAvailable; elsewhere the physical pages free)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def probe_layers(bp: BuildPlan, available: int | None = None) -> list[int] | None:
    """The decoder layers the build's parity check runs when the whole LLM graph cannot be checked on this
    host (None: it can, or the probe would be the whole LLM): the first and the last layer (in-LLM methods:
    every layer before the work layer, then the last), exported through the same code path. Decided on
    memory: an ONNX Runtime session of the whole LLM (ORT_BYTES_PER_PARAM) against what this host has,
    counting the PyTorch model as freed."""
    lm, model = bp.lm, bp.model
    w = bp.method.work_layer(bp.plan)
    keep = sorted(set(range(w) if w else [0]) | {lm.num_layers - 1})
    if len(keep) >= lm.num_layers:
        return None
    decoder = bp.adapter.static_cache_lm(model).decoder
    llm_params = sum(p.numel() for p in decoder.layers.parameters()) + lm.hidden_size * lm.vocab_size
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = (_available_bytes() if available is None else available) + model_bytes
    return keep if llm_params * ORT_BYTES_PER_PARAM > 0.8 * free else None


def _lean_allocator() -> None:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc's M_MMAP_THRESHOLD, fixed): freed
    float32 copies of weights (float32_compute) and activations then go straight back to the OS instead of
    growing the heap (measured on the 2-layer 7B geometry: the reference's peak 3.69 -> 2.95 GiB). glibc only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def _release_memory() -> None:
    """Collect, and hand freed heap pages back to the OS (glibc keeps them otherwise, and the runtime's
    sessions would come on top of the PyTorch model's freed memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _probe_manifest(tmp: Path, bp: BuildPlan, kv, draft, keep: list[int], step: Callable):
    """Cut the PyTorch model to the `keep` layers (in place: it is only the reference from here on), export
    its LLM graphs as `probe_<name>.onnx` through `graph_loaders`, and return the draft manifest pointing at
    them. The artifact's own LLM graphs are not run by this build (`vtc-export verify` runs them)."""
    from vtc.export.llm import KVQuant
    from vtc.runtime import manifest as mf

    bp.adapter.keep_lm_layers(bp.model, keep)
    lm = bp.adapter.lm_spec(bp.model)
    q = kv.quant
    sub = dataclasses.replace(kv, quant=KVQuant(tuple(q.dtypes[i] for i in keep), tuple(q.k_scale[i] for i in keep),
                                                tuple(q.v_scale[i] for i in keep)))
    probe = dataclasses.replace(bp, lm=lm)
    graphs = dict(draft.graphs)
    with step(f"exporting the parity probe: LLM layers {', '.join(map(str, keep))} of {bp.lm.num_layers} (the "
              "whole LLM does not fit this host's memory in ONNX Runtime)"):
        probed = {name: loader(tmp / f"probe_{name}.onnx") for name, loader in graph_loaders(probe, sub.quant).items()
                  if name != "vision"}
    from vtc.export import wquant

    wquant.quantize_step(tmp, probe, probed, step)  # --weights int8|int4: as the artifact's LLM graphs
    graphs.update(probed)
    comp = dataclasses.replace(draft.compression,
                               kv_visual_per_layer=bp.method.kv_visual_per_layer(bp.plan, lm.num_layers))
    return dataclasses.replace(draft, lm=mf.LMInfo(**asdict(lm)), graphs=graphs, compression=comp,
                               kv_cache=sub.info(lm, bp.args.max_seq_len))


def _lean_parity(tmp: Path, bp: BuildPlan, kv, draft, step: Callable) -> dict:
    """Parity within about one copy of the weights, in this order:
      1. the LLM is cut to a probe (`probe_layers`) when the whole LLM graph cannot run on this host;
      2. the reference (HF transformers, float32 compute one module at a time on the build-dtype weights:
         vtc.export.reference.float32_compute) is computed and the PyTorch model freed;
      3. the runtime opens the vision graph, encodes, closes it, then opens the LLM graph(s): never two
         copies of the same weights, nor two large sessions, at once.
    The report's `scope` says what was checked; `vtc-export verify` checks the whole artifact on a host
    with the memory for it."""
    from vtc.export import parity
    from vtc.export.reference import float32_compute
    from vtc.runtime.backend import OrtBackend
    from vtc.runtime.pipeline import VLM

    n = bp.args.parity_tokens
    from vtc.export.onnx_reference import OnnxReferenceBackend, needs_reference

    backend = (OnnxReferenceBackend() if needs_reference(DTYPES[bp.dtype]) else
               OrtBackend(memory_arena=False, **_ort_check_options(bp)))
    vlm = VLM(tmp, manifest=draft, backend=backend, open_graphs=False)
    prompt, pixels = parity.parity_inputs(vlm)
    parity.check_tokens_fit(vlm, prompt, n, "--parity-tokens")
    keep = probe_layers(bp)
    manifest = draft if keep is None else _probe_manifest(tmp, bp, kv, draft, keep, step)
    if bp.args.weights != "fp":
        from vtc.export import wquant

        wquant.fake_quantize(bp)  # the reference runs on exactly the weights the graphs store
    with step(f"PyTorch reference, float32 compute on the {bp.dtype} weights ({n} greedy tokens; then freed)"):
        with float32_compute(bp.model):
            ref = parity.reference(bp.adapter, bp.model, bp.method, bp.plan, bp.spec, prompt, pixels, n)
    bp.release_model()
    _release_memory()
    with step(f"checking the artifact against it on {backend.name}, one graph at a time"):
        vlm = VLM(tmp, manifest=manifest, backend=backend, open_graphs=False)
        vlm.open(("vision",))
        encoded = vlm.encode_image(pixels)
        vlm.close()
        _release_memory()
        vlm.open(tuple(g for g in manifest.graphs if g != "vision"))
        report = parity.compare_runtime(vlm, prompt, pixels, ref, KV_DTYPES[bp.kv_cache], DTYPES[bp.dtype],
                                        encoded=encoded)
        report.pop("_runtime_selection")  # the model is freed: no re-run on the artifact's selection here
        vlm.close()
    for f in tmp.glob("probe_*"):  # the probe's graphs are not part of the artifact
        f.unlink()
    report["reference"] = (f"HF transformers, float32 compute on the {DTYPES[bp.dtype]} weights (memory-lean build: "
                           "one module at a time in float32)")
    total = bp.lm.num_layers
    report["scope"] = ({"llm": "full", "vision": "full"} if keep is None else
                       {"vision": "full", "llm": f"probe: layers {keep} of {total}, exported through the same code "
                        "path; the artifact's LLM graph was not run by the build (run `vtc-export verify` on a host "
                        "with the memory for it)", "llm_layers_checked": keep})
    parity.raise_if_failed(report)
    return report


def _check_backend(bp: BuildPlan):
    """The backend the build's checks run the artifact on: ONNX Runtime (CPU), or ONNX's reference
    evaluator for graphs ONNX Runtime's CPU kernels cannot run (bf16; vtc.export.onnx_reference)."""
    from vtc.export.onnx_reference import OnnxReferenceBackend, needs_reference
    from vtc.runtime.backend import OrtBackend

    if needs_reference(DTYPES[bp.dtype]):
        return OnnxReferenceBackend()
    options = _ort_check_options(bp)
    return OrtBackend(**options) if options else None


def _ort_check_options(bp: BuildPlan) -> dict:
    """Quantized weights are checked with ONNX Runtime's MatMulNBits at accuracy level 1 (float32 activations:
    the graph's own math, within 1e-6 of HF on the stored weights); `run` keeps ORT's default, which also
    quantizes activations to int8 on CPUs with VNNI (measured ~1e-4 in logits cosine; weights.accuracy)."""
    return {"matmul_accuracy_level": 1} if bp.args.weights != "fp" else {}


def graph_loaders(bp: BuildPlan, kvq, cache: Path | None = None) -> dict:
    """name -> lazy export loader: vision, then llm, or llm_pre/llm_post (+ the method's extra graphs,
    e.g. FastV's select) for in-LLM methods. Nothing is traced until a loader is called."""
    from vtc.export import methods, onnx_export
    from vtc.export.graph_cache import Cached

    adapter, model, method, plan, spec, lm = bp.adapter, bp.model, bp.method, bp.plan, bp.spec, bp.lm
    w = method.work_layer(plan)
    v_method = methods.get(methods.NONE) if w is not None else method  # in-LLM: the vision side is uncompressed
    v_plan = v_method.plan(spec, 1.0, {}) if w is not None else plan
    loaders = {"vision": onnx_export.ExportVision(onnx_export.VisionGraph(adapter, model, v_method, v_plan, spec),
                                                  adapter.image_size(model))}
    text, kv_heads, hidden = bp.args.text_budget, lm.num_kv_heads, lm.hidden_size
    from vtc.runtime.kv_cache import MIN_BUCKET

    # decode: the runtime feeds the cache at its current capacity bucket (vtc.runtime.kv_cache), so past_seq
    # spans [the smallest bucket, max_seq_len] and a step costs what the context needs
    decode = {"seq": 1, "past_seq": [min(MIN_BUCKET, bp.args.max_seq_len), bp.args.max_seq_len]}

    def prefill(visual: int) -> dict:
        return {"prefill": {"seq": [visual + 1, visual + text], "past_seq": 0}, "decode": decode}

    if w is None:
        loaders["llm"] = onnx_export.ExportLLM(adapter.static_cache_lm(model, None, kvq), kv_heads, hidden,
                                               prefill(plan.k), "exporting language model (prefill + decode, static KV cache)")
    else:
        loaders["llm_pre"] = onnx_export.ExportLLM(adapter.static_cache_lm(model, (0, w), kvq), kv_heads, hidden,
                                                   prefill(plan.n), f"exporting language model layers [0, {w}) for "
                                                   f"{method.name} (all {plan.n} visual tokens)")
        loaders["llm_post"] = onnx_export.ExportLLM(adapter.static_cache_lm(model, (w, lm.num_layers), kvq), kv_heads,
                                                    hidden, prefill(plan.k), f"exporting language model layers [{w}, "
                                                    f"{lm.num_layers}) for {method.name} ({plan.k} of {plan.n} kept)")
        loaders.update(method.extra_graphs(plan, hidden, torch_dtype(bp.dtype)))
    return {n: Cached(ld, cache) for n, ld in loaders.items()} if cache is not None else loaders


def _manifest(bp: BuildPlan, kv, graphs, side: dict, parity: dict, files: dict, engines=None, weights=None):
    import vtc.export as pkg
    from vtc.runtime import manifest as mf

    plan, method, lm = bp.plan, bp.method, bp.lm
    return mf.Manifest(
        schema=mf.SCHEMA, schema_version=mf.SCHEMA_VERSION, vtc_version=pkg.__version__,
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        build_args=json.loads(json.dumps(asdict(bp.args))),
        model=mf.ModelInfo(architecture=bp.adapter.model_type, source=str(Path(bp.src).resolve()), demo=bp.demo,
                           image_token=bp.adapter.image_token, image_token_id=bp.adapter.image_token_id(bp.model)),
        compression=mf.CompressionInfo(method=plan.method, ratio=plan.ratio, options=dict(plan.options), n_visual=plan.n,
                                       k_visual=plan.k, grid=list(bp.spec.grid), has_cls=bp.spec.has_cls,
                                       stage=method.stage, work_layer=method.work_layer(plan),
                                       kv_visual_per_layer=method.kv_visual_per_layer(plan, lm.num_layers),
                                       selector=method.selector),
        lm=mf.LMInfo(**asdict(lm)),
        text=mf.TextInfo(budget=bp.args.text_budget, max_seq_len=bp.args.max_seq_len,
                         eos_token_ids=side["eos_token_ids"], chat_template=side["chat_template"],
                         tokenizer_as_is=bp.adapter.tokenizer_as_is, image_prompt=side.get("image_prompt")),
        kv_cache=kv.info(lm, bp.args.max_seq_len),
        graphs=graphs, embeddings=side["embeddings"], preprocess=side["preprocess"], parity=parity, files=files,
        engines=engines, dtype=DTYPES[bp.dtype], weights=weights.info() if weights is not None else None)
