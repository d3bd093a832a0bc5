"""Argument groups shared by the subcommands (Polygraphy's tools/args pattern, e.g. TrtConfigArgs).

Each class adds its flags to a parser (`add_to_parser`) and builds the typed configuration of one
library module from the parsed arguments (`parse`), so no command maps flags to a config by hand:

    BuildOptionsArgs   --model --method --ratio --method-opt [--output ... --force] -> build.BuildArgs fields
    KvCacheArgs        "KV cache" flags                        -> BuildArgs kv_* / calib_* fields
    WeightsArgs        --weights --group-size --weights-algo --lm-head -> BuildArgs weights / group_size / weights_algo / lm_head
    EngineArgs         "TensorRT engines" flags                -> BuildArgs backend/engine; tensorrt.EngineOptions fields
    RuntimeBackendArgs --threads [--backend --provider]        -> vtc.runtime.get_backend(...)
    SweepOptionsArgs   every `sweep` flag                      -> sweep.SweepArgs

Nothing heavy is imported here: the defaults come from vtc.export.build (no torch at import).
"""

from __future__ import annotations

import os

from vtc.runtime.errors import UsageError

MODEL_HELP = "local Hugging Face checkpoint directory (default: built-in demo)"


def add_model(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help=MODEL_HELP)


def add_image_splits(parser, of: str = "") -> None:
    """--image-splits (build, calibrate, sweep): the static tile grid, the same semantics everywhere."""
    parser.add_argument("--image-splits", type=int, nargs="+", metavar="R C",
                        help=f"static image layout{of} of tiling models (Idefics3/SmolVLM): R C = R x C tiles + the "
                             "global image (e.g. --image-splits 2 2), 0 = the global image only (the default)")


def image_splits(args) -> tuple | None:
    return None if args.image_splits is None else tuple(args.image_splits)


class BuildOptionsArgs:
    """What to build: the model, method and size fields of vtc.export.build.BuildArgs. `calibrate=True`:
    only --model/--method/--ratio/--method-opt/--image-splits, worded for a calibration (its --output is a file)."""

    def __init__(self, calibrate: bool = False):
        self.calibrate = calibrate

    def add_to_parser(self, parser) -> None:
        from vtc.export.build import DEFAULT_MAX_SEQ_LEN, DEFAULT_METHOD, DEFAULT_RATIO, DEFAULT_TEXT_BUDGET

        add_model(parser)
        if self.calibrate:
            parser.add_argument("--method", default=DEFAULT_METHOD,
                                help=f"compression method the cache will be built with (default {DEFAULT_METHOD})")
            parser.add_argument("--ratio", type=float, help=f"fraction of visual tokens kept (default {DEFAULT_RATIO:g})")
            parser.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE")
            add_image_splits(parser, " (the build's, which the scales are for)")
            self.add_dtype(parser)
            return
        parser.add_argument("--method", default=DEFAULT_METHOD,
                            help=f"compression method (default: {DEFAULT_METHOD}; see `vtc-export list`)")
        parser.add_argument("--ratio", type=float,
                            help=f"fraction of visual tokens KEPT, 0 < R <= 1 (default {DEFAULT_RATIO:g})")
        parser.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                            help="a method option (repeatable); `vtc-export list` shows each method's options")
        parser.add_argument("--output", "-o", metavar="DIR",
                            help="artifact directory (default: artifacts/<model>-<method>-r<ratio>)")
        parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, metavar="N",
                            help=f"KV cache length: visual + prompt + generated tokens (default {DEFAULT_MAX_SEQ_LEN})")
        parser.add_argument("--text-budget", type=int, default=DEFAULT_TEXT_BUDGET, metavar="N",
                            help=f"max prompt text tokens, excluding visual tokens (default {DEFAULT_TEXT_BUDGET})")
        parser.add_argument("--parity-tokens", type=int, default=8, metavar="N",
                            help="greedy tokens compared against PyTorch during the build (default 8)")
        parser.add_argument("--force", action="store_true", help="replace an existing output directory")
        add_image_splits(parser)
        parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                            help="static image size of models with a free input size (Qwen2-VL/2.5-VL: multiples of "
                                 "28, default 448 448 = 256 visual tokens); every image is resized to it")
        self.add_dtype(parser)

    @staticmethod
    def add_dtype(parser) -> None:
        parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                            help="graph weights and activations (default: fp32 for ONNX Runtime, whose CPU kernels are "
                                 "float32; fp16 with --backend tensorrt)")

    def parse(self, args) -> dict:
        fields = dict(model=args.model, method=args.method, ratio=args.ratio,
                      method_options=method_options(args.method_opt), dtype=args.dtype, image_splits=image_splits(args))
        if not self.calibrate:
            fields.update(output=args.output, max_seq_len=args.max_seq_len, text_budget=args.text_budget,
                          parity_tokens=args.parity_tokens, force=args.force,
                          image_size=None if args.image_size is None else tuple(args.image_size))
        return fields


def method_options(pairs: list[str]) -> dict:
    """--method-opt KEY=VALUE (repeatable) -> {KEY: VALUE}; the method parses the values."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--method-opt {pair!r} is not KEY=VALUE.", "Example: --method-opt window=2.")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


class KvCacheArgs:
    """KV-cache quantization and calibration -> the kv_* and calib_* fields of BuildArgs.
    `with_dtype=False` (calibrate): only the calibration flags."""

    def __init__(self, with_dtype: bool = True):
        self.with_dtype = with_dtype

    def add_to_parser(self, parser) -> None:
        g = parser.add_argument_group("KV cache")
        if self.with_dtype:
            g.add_argument("--kv-cache", default=None, choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                           help="KV cache storage (default: the graph dtype, --dtype; int8/fp8 use static calibrated "
                                "scales)")
            g.add_argument("--kv-scales", metavar="FILE",
                           help="kv_scales.json from `vtc-export calibrate` (default: calibrate now)")
            g.add_argument("--kv-fallback-threshold", type=float, default=0.08, metavar="E",
                           help="relative quantization error above which a layer stays fp16 (default 0.08)")
        g.add_argument("--calib-images", metavar="DIR", help="calibration images (default: the bundled sample photographs)")
        g.add_argument("--calib-prompts", metavar="FILE", help='calibration prompts, JSONL {"prompt": ...} per line')
        g.add_argument("--kv-granularity", default="channel", choices=["channel", "head"],
                       help="one scale per channel or per head")
        g.add_argument("--kv-statistic", default="absmax", metavar="STAT",
                       help="absmax (default) or percentile:P, e.g. percentile:99.99")

    def parse(self, args) -> dict:
        fields = dict(calib_images=args.calib_images, calib_prompts=args.calib_prompts,
                      kv_granularity=args.kv_granularity, kv_statistic=args.kv_statistic)
        if self.with_dtype:
            fields.update(kv_cache=args.kv_cache, kv_scales=args.kv_scales, kv_fallback=args.kv_fallback_threshold)
        return fields


class WeightsArgs:
    """Weight-only quantization of the LLM -> BuildArgs weights, group_size, weights_algo (vtc.export.wquant)."""

    def add_to_parser(self, parser) -> None:
        g = parser.add_argument_group("weights", "the LLM's linear layers as int8/int4 + DequantizeLinear (plugin-free "
                                      "ONNX; ONNX Runtime fuses them into MatMulNBits). Examples: --weights int8; "
                                      "--weights int4 --weights-algo awq; --weights int4 --group-size 64")
        g.add_argument("--weights", default="fp", choices=["fp", "int8", "int4"],
                       help="fp: the graph dtype (default); int8: one scale per output channel; int4: one scale per "
                            "--group-size inputs (opset 21; TensorRT needs a newer version, see `vtc-export lint`)")
        g.add_argument("--group-size", type=int, default=128, metavar="G",
                       help="int4 block size along each layer's input dim: a power of two >= 16 dividing it (default 128)")
        g.add_argument("--weights-algo", default="rtn", choices=["rtn", "awq"],
                       help="rtn: round to nearest (default); awq: activation-aware scales searched on the calibration "
                            "set (--calib-images/--calib-prompts, else the default set) and folded in before export")
        g.add_argument("--lm-head", default=None, choices=["int8", "fp"],
                       help="the LM head (the largest single MatMul of a decode step) with --weights int8|int4: int8 "
                            "per output channel (default) or fp (the graph dtype)")

    def parse(self, args) -> dict:
        return dict(weights=args.weights, group_size=args.group_size, weights_algo=args.weights_algo,
                    lm_head=args.lm_head)


class EngineArgs:
    """TensorRT engine flags -> vtc.export.tensorrt.EngineOptions fields. `with_backend` (build) adds
    --backend and leaves --precision unset unless given, so the library tells "given" from "default";
    without it (engine) --precision defaults to fp16."""

    FIELDS = {"precision": "precision", "workspace_gb": "workspace", "timing_cache": "timing_cache",
              "builder_optimization_level": "builder_optimization_level"}  # EngineOptions field -> args attribute

    def __init__(self, with_backend: bool = True):
        self.with_backend = with_backend

    def add_to_parser(self, parser) -> None:
        g = parser.add_argument_group("TensorRT engines")
        if self.with_backend:
            g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                           help="tensorrt: also build a TensorRT engine per graph on this GPU (needs TensorRT)")
        g.add_argument("--precision", default=None if self.with_backend else "fp16", choices=["fp16", "bf16", "fp32"],
                       help="engine precision (default fp16); int8/fp8 are used where a graph has Q/DQ (KV cache)")
        g.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB (default: TensorRT's)")
        g.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache: read if present, updated after the build")
        g.add_argument("--builder-optimization-level", type=int, metavar="N",
                       help="0 (fastest build) to 5 (default: TensorRT's, 3)")

    def given(self, args) -> dict:
        """The EngineOptions fields whose flags were given (engine: precision always, fp16 by default)."""
        return {field: getattr(args, attr) for field, attr in self.FIELDS.items() if getattr(args, attr) is not None}

    def parse(self, args) -> dict:
        """BuildArgs fields: backend, and engine = the given EngineOptions fields."""
        return dict(backend=args.backend, engine=self.given(args))


def command_thread_pool(threads: int | None) -> None:
    """A command that owns its process runs every ONNX Runtime session on one shared pool of `threads`
    (vtc.runtime.backend.shared_thread_pool), unless VTC_SHARED_POOL=0 (per-session pools: the test suite, which
    runs many commands in one process, or a comparison)."""
    if os.environ.get("VTC_SHARED_POOL", "1") != "0":
        from vtc.runtime.backend import shared_thread_pool

        shared_thread_pool(threads)


class RuntimeBackendArgs:
    """--threads, and with `with_backend` (run) --backend/--provider -> vtc.runtime.get_backend(...)."""

    def __init__(self, with_backend: bool = True):
        self.with_backend = with_backend

    def add_to_parser(self, parser) -> None:
        parser.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads (0 = default)")
        if not self.with_backend:
            return
        parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                            help="onnxruntime (default) or tensorrt (the artifact's engines: `vtc-export engine` first)")
        parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                            help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu; falls back to "
                                 "cpu with the reason)")

    @staticmethod
    def threads(args) -> int | None:
        """--threads checked against the usable cores (and VTC_THREADS too), before any work: None = default.
        The command owns its process, so its ONNX Runtime sessions share one pool of that size
        (command_thread_pool)."""
        from vtc.runtime.backend import check_threads, env_threads

        threads = check_threads(args.threads) or env_threads()  # 0 = VTC_THREADS, else ONNX Runtime's default
        if getattr(args, "backend", "onnxruntime") == "onnxruntime":
            command_thread_pool(threads)
        return threads

    def parse(self, args):
        """The backend object; an ONNX Runtime backend's `fallback` says why it left the asked provider."""
        from vtc.runtime.backend import get_backend

        return get_backend(args.backend, threads=self.threads(args), provider=args.provider)


class SweepOptionsArgs:
    """Every `vtc-export sweep` flag -> vtc.export.sweep.SweepArgs."""

    def add_to_parser(self, parser) -> None:
        add_model(parser)
        parser.add_argument("--methods", required=True, metavar="A,B,...",
                            help="compression methods (see `vtc-export list`), or `all`")
        parser.add_argument("--ratios", default="1.0,0.5,0.25,0.11", metavar="R,R,...",
                            help="fractions of visual tokens kept (default 1.0,0.5,0.25,0.11; 1.0 = the uncompressed "
                                 "reference)")
        parser.add_argument("--output", "-o", metavar="DIR", help="sweep directory (default: artifacts/sweep-<model>)")
        parser.add_argument("--runs", type=int, default=5, metavar="N", help="measured profile runs per variant (default 5)")
        parser.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured runs first (default 1)")
        parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens per profiled run (default 32)")
        parser.add_argument("--fidelity-tokens", type=int, default=32, metavar="N",
                            help="greedy tokens compared with the uncompressed model (default 32)")
        parser.add_argument("--image", action="append", default=[], metavar="IMG",
                            help="fidelity image (repeatable; default: three synthetic images); the first is profiled")
        parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                            help="fidelity prompt (repeatable; default: two); the first is profiled")
        RuntimeBackendArgs(with_backend=False).add_to_parser(parser)
        parser.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="KV cache length of every variant")
        parser.add_argument("--text-budget", type=int, default=None, metavar="N",
                            help="max prompt text tokens of every variant")
        parser.add_argument("--kv-cache", default="fp32", metavar="T,T,...",
                            help="KV cache storage per variant: fp32, fp16, int8, fp8 (comma list sweeps each; "
                                 "default fp32)")
        parser.add_argument("--eval", type=int, default=0, metavar="N",
                            help="also score task accuracy on N questions per variant (default 0 = off); writes "
                                 "accuracy.md")
        parser.add_argument("--eval-dataset", default="synthetic", metavar="PATH|synthetic",
                            help="JSONL {image, question, answer[, type]} per line, or the synthetic task (default)")
        parser.add_argument("--eval-seed", type=int, default=1, metavar="S", help="seed of the synthetic set (default 1)")
        add_image_splits(parser, " of every variant")
        parser.add_argument("--weights", default="fp", metavar="W,W,...",
                            help="LLM weights per variant: fp (the graph dtype), int8 (per channel), int4 (blocked, round "
                                 "to nearest), int4-awq (blocked, AWQ scales on the calibration set); comma list sweeps "
                                 "each (default fp)")
        parser.add_argument("--group-size", type=int, default=128, metavar="G",
                            help="int4 block size of every int4 variant: a power of two >= 16 dividing the layers' input "
                                 "dims (default 128; the demo model needs 64)")
        parser.add_argument("--force", action="store_true", help="start over: rebuild and re-measure every variant")

    def parse(self, args):
        from vtc.export import methods
        from vtc.export.build import DEFAULT_MAX_SEQ_LEN, DEFAULT_TEXT_BUDGET
        from vtc.export.sweep import SweepArgs

        names = _names(args.methods)
        if names == ("all",):
            names = tuple(methods.compressing_names())
        if args.eval < 0:
            raise UsageError(f"--eval {args.eval}: the number of questions cannot be negative.",
                             "Pass --eval 500, or 0 for none.")
        return SweepArgs(model=args.model, methods=names, ratios=_floats(args.ratios, "--ratios"), output=args.output,
                         runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                         fidelity_tokens=args.fidelity_tokens, images=tuple(args.image), prompts=tuple(args.prompt),
                         threads=RuntimeBackendArgs.threads(args), max_seq_len=args.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                         text_budget=args.text_budget or DEFAULT_TEXT_BUDGET, force=args.force,
                         kv_caches=_names(args.kv_cache), eval_n=args.eval, eval_dataset=args.eval_dataset,
                         eval_seed=args.eval_seed, image_splits=image_splits(args), weights=_names(args.weights),
                         group_size=args.group_size)


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str, flag: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of numbers.",
                         f"Example: {flag} 1.0,0.5,0.25.") from e
