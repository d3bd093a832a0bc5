"""`vtc-export build`: checkpoint -> compressed, validated artifact directory.

Every check that can fail fast runs before any export work (ratio, method, options, model, output).
The artifact is written into a temporary sibling directory and renamed into place only after parity
passed and the manifest (written last) is complete; any failure or Ctrl-C removes the temporary dir.
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


@dataclass
class Built:
    path: Path
    manifest: object
    demo: bool
    lint: object = None  # the TensorRT lint report (vtc.export.lint) of the exported graphs


def effective_ratio(args: BuildArgs) -> tuple[str, float]:
    """(method, ratio) after defaults: ratio 1.0 means no compression whatever the method."""
    if args.ratio is not None and not (0.0 < args.ratio <= 1.0):
        raise UsageError(f"--ratio {args.ratio} is out of range: it is the fraction of visual tokens KEPT.",
                         "Pass 0 < ratio <= 1 (e.g. --ratio 0.25 keeps 25%; 1.0 keeps all).")
    if args.method == "none":
        if args.ratio not in (None, 1.0):
            raise UsageError(f"--method none keeps every visual token, but --ratio {args.ratio} was given.",
                             "Drop --ratio, or choose a compression method (`vtc-export list`).")
        return "none", 1.0
    ratio = DEFAULT_RATIO if args.ratio is None else args.ratio
    return ("none" if ratio == 1.0 else args.method), ratio


def default_output(model_name: str, method: str, ratio: float) -> Path:
    return Path("artifacts") / f"{model_name}-{method}-r{ratio:g}"


KV_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "fp8": "float8_e4m3fn"}


def _check_kv(args: BuildArgs) -> None:
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


def _check_sizes(args: BuildArgs) -> None:
    for name, v in (("--max-seq-len", args.max_seq_len), ("--text-budget", args.text_budget)):
        if v < 1:
            raise UsageError(f"{name} must be a positive number of tokens (got {v}).", "Pass a positive integer.")


def prepare(args: BuildArgs, step: Callable, check_output: bool = True) -> dict:
    """All validation, model loading and planning; no file is written."""
    from vtc.export import methods, models
    from vtc.export.demo import ensure_demo_checkpoint, is_demo

    _check_sizes(args)
    _check_kv(args)
    from vtc.export.tensorrt import check_backend

    check_backend(args.backend, args.engine)  # --backend tensorrt: TensorRT must import, before any export
    method_name, ratio = effective_ratio(args)
    method = methods.get(args.method)  # unknown names fail here, before anything else
    if method_name == "none":
        method = methods.get("none")
    method.parse_options(args.method_options)
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
    spec = adapter.visual_spec(model)
    plan = method.plan(spec, ratio, dict(args.method_options))
    method.check_lm(adapter.lm_spec(model).num_layers, plan)
    widest = plan.n if method.stage == "llm" else plan.k  # in-LLM methods prefill all N first
    if args.max_seq_len < widest + args.text_budget + 1:
        raise UsageError(f"--max-seq-len {args.max_seq_len} cannot hold {widest} visual + {args.text_budget} text "
                         "tokens and one generated token.",
                         f"Pass --max-seq-len {widest + args.text_budget + 256} or lower --text-budget.")
    return dict(src=src, adapter=adapter, model=model, method=method, plan=plan, spec=spec, out=out, demo=demo)


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


def build(args: BuildArgs, step: Callable) -> Built:
    """Run the whole build. `step(label)` is a context manager the caller uses to show progress."""
    ctx = prepare(args, step)
    out: Path = ctx["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:  # includes KeyboardInterrupt: never leave a partial artifact behind
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
        manifest = _write_artifact(tmp, args, ctx, step)
        _move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(path=out, manifest=manifest, demo=ctx["demo"], lint=ctx.get("lint"))


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


def _write_artifact(tmp: Path, args: BuildArgs, ctx: dict, step: Callable):
    from vtc.export import assets, parity
    from vtc.runtime import manifest as mf

    adapter, model, method, plan, spec = (ctx[k] for k in ("adapter", "model", "method", "plan", "spec"))
    lm_spec = adapter.lm_spec(model)
    from vtc.export import kvquant

    ctx["kv"] = kvquant.plan(tmp, args, ctx, lm_spec, step)
    graphs = _export_graphs(tmp, args, ctx, lm_spec, step)
    from vtc.export import tensorrt as trt_build

    ctx["lint"] = trt_build.lint_step(tmp, graphs, args.backend, step)  # fatal only for --backend tensorrt
    with step("writing tokenizer, preprocessing and embeddings"):
        side = assets.write(tmp, ctx["src"], adapter, model)
    draft = _manifest(args, ctx, lm_spec, graphs, side, parity={}, files={})
    (tmp / mf.MANIFEST).write_text(draft.to_json())
    with step(f"checking parity against PyTorch ({args.parity_tokens} greedy tokens)"):
        report = parity.check(tmp, adapter, model, method, plan, spec, max_new_tokens=args.parity_tokens,
                              kv_dtype=KV_DTYPES[args.kv_cache])
        parity.raise_if_failed(report)
    if ctx["kv"].quantized:
        with step(f"measuring {args.kv_cache} KV accuracy vs float32 KV on held-out pairs"):
            ctx["kv"].accuracy = kvquant.accuracy(tmp, ctx)
    ctx["engines"] = trt_build.engine_step(tmp, graphs, args.backend, args.engine, step)  # None for onnxruntime
    (tmp / mf.MANIFEST).unlink()
    final = _manifest(args, ctx, lm_spec, graphs, side, report, mf.file_table(tmp))
    (tmp / mf.MANIFEST).write_text(final.to_json())  # last: its presence marks a complete artifact
    return final


def _export_graphs(tmp: Path, args: BuildArgs, ctx: dict, lm_spec, step: Callable) -> dict:
    """vision.onnx, then llm.onnx, or llm_pre/llm_post (+ select.onnx for FastV) for in-LLM methods."""
    from vtc.export import methods, onnx_export

    adapter, model, method, plan, spec = (ctx[k] for k in ("adapter", "model", "method", "plan", "spec"))
    in_llm = method.stage == "llm"
    v_method = methods.get("none") if in_llm else method
    v_plan = v_method.plan(spec, 1.0, {}) if in_llm else plan
    graphs = {}
    with step(f"exporting vision encoder + projector + {v_method.name} ({v_plan.k} of {plan.n} tokens)"):
        vision = onnx_export.VisionGraph(adapter, model, v_method, v_plan, spec)
        graphs["vision"] = onnx_export.export_vision(vision, adapter.image_size(model), tmp / "vision.onnx")
    n_layers, text, kv = lm_spec.num_layers, args.text_budget, lm_spec.num_kv_heads
    kvq = ctx["kv"].quant
    decode = {"seq": 1, "past_seq": args.max_seq_len}
    if not in_llm:
        with step("exporting language model (prefill + decode, static KV cache)"):
            profiles = {"prefill": {"seq": [plan.k + 1, plan.k + text], "past_seq": 0}, "decode": decode}
            graphs["llm"] = onnx_export.export_llm(adapter.static_cache_lm(model, None, kvq), kv, lm_spec.hidden_size,
                                                   tmp / "llm.onnx", profiles)
        return graphs
    w = plan.options["layer"]
    with step(f"exporting language model split at layer {w} for {method.name} ({plan.k} of {plan.n} kept)"):
        pre = {"prefill": {"seq": [plan.n + 1, plan.n + text], "past_seq": 0}, "decode": decode}
        post = {"prefill": {"seq": [plan.k + 1, plan.k + text], "past_seq": 0}, "decode": decode}
        graphs["llm_pre"] = onnx_export.export_llm(adapter.static_cache_lm(model, (0, w), kvq), kv, lm_spec.hidden_size,
                                                   tmp / "llm_pre.onnx", pre)
        graphs["llm_post"] = onnx_export.export_llm(adapter.static_cache_lm(model, (w, n_layers), kvq), kv,
                                                    lm_spec.hidden_size, tmp / "llm_post.onnx", post)
        if method.name == "fastv":
            graphs["select"] = onnx_export.export_select(onnx_export.SelectGraph(method, plan.n, plan.k),
                                                         lm_spec.hidden_size, tmp / "select.onnx")
    return graphs


def kv_visual_per_layer(method, plan, num_layers: int) -> list[int]:
    """Visual tokens each layer's cache holds after prefill (FastV: all N before its layer K)."""
    if method.stage == "llm" and not method.trims_pre_kv:
        w = plan.options["layer"]
        return [plan.n] * w + [plan.k] * (num_layers - w)
    return [plan.k] * num_layers


def _manifest(args, ctx, lm_spec, graphs, side: dict, parity: dict, files: dict):
    import vtc.export as pkg
    from vtc.runtime import manifest as mf

    plan, spec, adapter, model = ctx["plan"], ctx["spec"], ctx["adapter"], ctx["model"]
    kv = ctx["kv"]
    return mf.Manifest(
        schema=mf.SCHEMA, schema_version=mf.SCHEMA_VERSION, vtc_version=pkg.__version__,
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        build_args=json.loads(json.dumps(asdict(args))),
        model=mf.ModelInfo(architecture=adapter.model_type, source=str(Path(ctx["src"]).resolve()), demo=ctx["demo"],
                           image_token=adapter.image_token, image_token_id=adapter.image_token_id(model)),
        compression=mf.CompressionInfo(method=plan.method, ratio=plan.ratio, options=dict(plan.options), n_visual=plan.n,
                                       k_visual=plan.k, grid=list(spec.grid), has_cls=spec.has_cls,
                                       stage=ctx["method"].stage,
                                       work_layer=plan.options.get("layer") if ctx["method"].stage == "llm" else None,
                                       kv_visual_per_layer=kv_visual_per_layer(ctx["method"], plan, lm_spec.num_layers)),
        lm=mf.LMInfo(**asdict(lm_spec)),
        text=mf.TextInfo(budget=args.text_budget, max_seq_len=args.max_seq_len, eos_token_ids=side["eos_token_ids"],
                         chat_template=side["chat_template"]),
        kv_cache=kv.info(lm_spec, args.max_seq_len),
        graphs=graphs, embeddings=side["embeddings"], preprocess=side["preprocess"], parity=parity, files=files,
        engines=ctx.get("engines"))
