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

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vtc.runtime.errors import UsageError

DEFAULT_METHOD = "pool"
DEFAULT_RATIO = 0.25
DEFAULT_TEXT_BUDGET = 128
DEFAULT_MAX_SEQ_LEN = 1024
KV_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "fp8": "float8_e4m3fn"}


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
    kv_cache: str = "fp32"  # fp32 | fp16 | int8 | fp8
    kv_scales: str | None = None  # kv_scales.json from `vtc-export calibrate`; None = calibrate now
    calib_images: str | None = None
    calib_prompts: str | None = None
    kv_granularity: str = "channel"  # channel | head
    kv_statistic: str = "absmax"  # absmax | percentile:P
    kv_fallback: float = 0.08  # relative error above which a layer stays float16
    backend: str = "onnxruntime"  # onnxruntime | tensorrt (also builds engines: vtc.export.tensorrt)
    engine: dict = field(default_factory=dict)  # --backend tensorrt: EngineOptions (precision, workspace_gb, ...)


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
    if args.kv_cache not in KV_DTYPES:
        raise UsageError(f"--kv-cache {args.kv_cache!r} is not one of {', '.join(KV_DTYPES)}.", "Pass e.g. --kv-cache int8.")
    if (args.calib_images is None) != (args.calib_prompts is None):
        raise UsageError("--calib-images and --calib-prompts go together.", "Pass both, or neither for the default set.")
    quantized = args.kv_cache in ("int8", "fp8")
    if not quantized and (args.kv_scales or args.calib_images):
        raise UsageError(f"--kv-scales/--calib-* apply to --kv-cache int8|fp8, not {args.kv_cache}.", "Drop them or pick int8/fp8.")
    if args.kv_scales and not Path(args.kv_scales).is_file():
        raise UsageError(f"--kv-scales {args.kv_scales} does not exist.", "Create it with `vtc-export calibrate`.")
    if not 0 < args.kv_fallback:
        raise UsageError(f"--kv-fallback-threshold must be positive (got {args.kv_fallback}).", "Pass e.g. 0.08.")


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
        adapter = models.resolve(src)
    demo = is_demo(src)
    name = "demo-llava" if demo else src.resolve().name
    out = Path(args.output) if args.output else default_output(name, method.name, ratio)
    if check_output:
        _check_output(out, src, args.force)
    with step(f"loading {adapter.model_type} checkpoint"):
        model = adapter.load(src)
    spec, lm = adapter.visual_spec(model), adapter.lm_spec(model)
    plan = method.plan(spec, ratio, dict(args.method_options))
    method.check_lm(lm.num_layers, plan)
    widest = max(method.kv_visual_per_layer(plan, lm.num_layers))  # in-LLM methods prefill all N first
    if args.max_seq_len < widest + args.text_budget + 1:
        raise UsageError(f"--max-seq-len {args.max_seq_len} cannot hold {widest} visual + {args.text_budget} text "
                         "tokens and one generated token.",
                         f"Pass --max-seq-len {widest + args.text_budget + 256} or lower --text-budget.")
    return BuildPlan(args=args, src=src, demo=demo, out=out, adapter=adapter, model=model, method=method, plan=plan,
                     spec=spec, lm=lm, engine=engine)


def _check_output(out: Path, src: Path, force: bool) -> None:
    """The output may be new, or (with --force) an existing vtc artifact or empty directory; never
    a file, the source checkpoint, or a directory that holds something else."""
    if not out.exists():
        return
    if not force:
        raise UsageError(f"output directory {out} already exists.", "Pass --force to replace it, or choose --output.")
    if not out.is_dir():
        raise UsageError(f"--output {out} is an existing file, not an artifact directory.", "Choose another --output.")
    resolved = out.resolve()
    if resolved == src.resolve() or resolved in src.resolve().parents:
        raise UsageError(f"--output {out} is (or contains) the source checkpoint {src}; --force would delete it.",
                         "Choose another --output.")
    if any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise UsageError(f"--output {out} is not a vtc artifact (no manifest.json); --force only replaces artifacts.",
                         "Choose another --output, or empty that directory yourself.")


def build(args: BuildArgs, step: Callable, cache: Path | None = None) -> Built:
    """Run the whole build. `step(label)` is a context manager the caller uses to show progress;
    `cache`: a graph-cache directory shared by related builds (vtc.export.graph_cache)."""
    bp = prepare(args, step)
    out = bp.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:  # includes KeyboardInterrupt: never leave a partial artifact behind
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
        manifest, lint = _write_artifact(tmp, bp, step, cache)
        _move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(path=out, manifest=manifest, demo=bp.demo, lint=lint)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out. An existing out is moved aside first and restored if the swap is interrupted."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{dt.datetime.now().strftime('%H%M%S%f')}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_artifact(tmp: Path, bp: BuildPlan, step: Callable, cache: Path | None):
    from vtc.export import assets, kvquant, parity
    from vtc.export import tensorrt as trt_build
    from vtc.runtime import manifest as mf
    from vtc.runtime.pipeline import VLM

    args = bp.args
    kv = kvquant.plan(tmp, bp, step)
    graphs = {}
    for name, loader in graph_loaders(bp, kv.quant, cache).items():
        with step(loader.label):
            graphs[name] = loader(tmp / f"{name}.onnx")
    lint = trt_build.lint_step(tmp, graphs, args.backend, step)  # fatal only for --backend tensorrt
    with step("writing tokenizer, preprocessing and embeddings"):
        side = assets.write(tmp, bp.src, bp.adapter, bp.model)
    draft = _manifest(bp, kv, graphs, side, parity={}, files={})
    with step(f"checking parity against PyTorch ({args.parity_tokens} greedy tokens)"):
        vlm = VLM(tmp, manifest=draft)
        report = parity.check(tmp, bp.adapter, bp.model, bp.method, bp.plan, bp.spec, max_new_tokens=args.parity_tokens,
                              vlm=vlm, kv_dtype=KV_DTYPES[args.kv_cache])
        parity.raise_if_failed(report)
    if kv.quantized:
        with step(f"measuring {args.kv_cache} KV accuracy vs float32 KV on held-out pairs"):
            kv.accuracy = kvquant.accuracy(vlm, bp)
    engines = trt_build.engine_step(tmp, graphs, bp.engine, step)  # None for onnxruntime
    final = _manifest(bp, kv, graphs, side, report, mf.file_table(tmp), engines)
    (tmp / mf.MANIFEST).write_text(final.to_json())  # last: its presence marks a complete artifact
    return final, lint


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
    decode = {"seq": 1, "past_seq": bp.args.max_seq_len}

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
        loaders.update(method.extra_graphs(plan, hidden))
    return {n: Cached(ld, cache) for n, ld in loaders.items()} if cache is not None else loaders


def _manifest(bp: BuildPlan, kv, graphs, side: dict, parity: dict, files: dict, engines=None):
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
                         tokenizer_as_is=bp.adapter.tokenizer_as_is),
        kv_cache=kv.info(lm, bp.args.max_seq_len),
        graphs=graphs, embeddings=side["embeddings"], preprocess=side["preprocess"], parity=parity, files=files,
        engines=engines)
