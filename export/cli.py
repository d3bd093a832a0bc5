"""`vtc-export`: build, run, verify and inspect compressed VLM artifacts.

Subcommands map 1:1 to modules: build -> vtc.export.build, run -> vtc.runtime.pipeline,
verify -> vtc.export.parity, inspect/list -> vtc.export.report. Heavy imports (torch, transformers)
happen inside the subcommands that need them: `run` and `inspect` work on a device without torch.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from vtc.runtime.errors import UsageError, VtcError


def _fmt(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtc-export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deploy vision-language models with visual token compression baked into static ONNX graphs.",
        epilog=_fmt("""
            examples:
              vtc-export build --ratio 0.25                      # demo model, pool, keep 25% of visual tokens
              vtc-export build --model ~/llava-1.5-7b-hf --method cls-attn --ratio 0.25
              vtc-export run artifacts/demo-llava-pool-r0.25 --image cat.jpg --prompt "What is this?"
              vtc-export verify artifacts/demo-llava-pool-r0.25
              vtc-export list
            """))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_build(sub)
    _add_run(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_lint(sub)
    _add_engine(sub)
    _add_compare(sub)
    _add_calibrate(sub)
    _add_eval(sub)
    from vtc.export import profile_cmd

    profile_cmd.add_parsers(sub, _sub)  # profile, sweep
    _sub(sub, "list", "list supported architectures and compression methods", """
          vtc-export list
        """)
    return p


def _sub(sub, name: str, help: str, examples: str):
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + _fmt(examples))


def _add_build(sub) -> None:
    from vtc.export.build import DEFAULT_MAX_SEQ_LEN, DEFAULT_TEXT_BUDGET

    b = _sub(sub, "build", "export a checkpoint with a compression method to a validated ONNX artifact", """
          vtc-export build --ratio 0.25                       # built-in demo model (trained on synthetic shapes)
          vtc-export build --model ./llava-1.5-7b-hf --method cls-attn --ratio 0.25 --output out/llava-cls
          vtc-export build --model ./llava-1.5-7b-hf --ratio 1.0   # uncompressed baseline
          vtc-export build --method pool --method-opt window=3  # explicit 3x3 pooling window
          vtc-export build --ratio 0.25 --kv-cache int8          # INT8 KV cache, calibrated on the bundled photos
          vtc-export build --kv-cache fp8 --kv-scales kv_scales.json
          vtc-export build --ratio 0.25 --backend tensorrt --precision fp16   # + TensorRT engines (GPU host)
        """)
    b.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (default: built-in demo)")
    b.add_argument("--method", default="pool", help="compression method (default: pool; see `vtc-export list`)")
    b.add_argument("--ratio", type=float, help="fraction of visual tokens KEPT, 0 < R <= 1 (default 0.25)")
    b.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable); `vtc-export list` shows each method's options")
    b.add_argument("--output", "-o", metavar="DIR", help="artifact directory (default: artifacts/<model>-<method>-r<ratio>)")
    b.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, metavar="N",
                   help=f"KV cache length: visual + prompt + generated tokens (default {DEFAULT_MAX_SEQ_LEN})")
    b.add_argument("--text-budget", type=int, default=DEFAULT_TEXT_BUDGET, metavar="N",
                   help=f"max prompt text tokens, excluding visual tokens (default {DEFAULT_TEXT_BUDGET})")
    b.add_argument("--parity-tokens", type=int, default=8, metavar="N",
                   help="greedy tokens compared against PyTorch during the build (default 8)")
    b.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_kv_args(b)
    _add_trt_args(b)


def _add_kv_args(p, with_dtype: bool = True) -> None:
    """KV-cache quantization and calibration flags (build; calibrate shares the calibration ones)."""
    g = p.add_argument_group("KV cache")
    if with_dtype:
        g.add_argument("--kv-cache", default="fp32", choices=["fp32", "fp16", "int8", "fp8"],
                       help="KV cache storage (default fp32; int8/fp8 use static calibrated scales)")
        g.add_argument("--kv-scales", metavar="FILE", help="kv_scales.json from `vtc-export calibrate` (default: calibrate now)")
        g.add_argument("--kv-fallback-threshold", type=float, default=0.08, metavar="E",
                       help="relative quantization error above which a layer stays fp16 (default 0.08)")
    g.add_argument("--calib-images", metavar="DIR", help="calibration images (default: the bundled sample photographs)")
    g.add_argument("--calib-prompts", metavar="FILE", help='calibration prompts, JSONL {"prompt": ...} per line')
    g.add_argument("--kv-granularity", default="channel", choices=["channel", "head"], help="one scale per channel or per head")
    g.add_argument("--kv-statistic", default="absmax", metavar="STAT", help="absmax (default) or percentile:P, e.g. percentile:99.99")


def _add_run(sub) -> None:
    r = _sub(sub, "run", "answer a question about an image with a built artifact (no torch needed)", """
          vtc-export run artifacts/demo-llava-pool-r0.25 --image photo.jpg --prompt "What is in the image?"
          vtc-export run ART --image photo.jpg --prompt "USER: <image>\\nDescribe it. ASSISTANT:" --raw
          vtc-export run ART --image photo.jpg --prompt "Describe it." --temperature 0.7 --seed 1 --json
          vtc-export run ART --image photo.jpg --prompt "Describe it." --overlay kept.png
        """)
    r.add_argument("artifact", metavar="DIR")
    r.add_argument("--image", required=True, metavar="IMG")
    r.add_argument("--prompt", required=True, metavar="TEXT")
    r.add_argument("--raw", action="store_true", help="use the prompt verbatim (it must contain <image>)")
    r.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    r.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0, metavar="P")
    r.add_argument("--seed", type=int, default=0, metavar="S")
    r.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads (0 = default)")
    r.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime (default) or tensorrt (the artifact's engines: `vtc-export engine` first)")
    r.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu; falls back to cpu "
                        "with the reason)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--overlay", metavar="PNG", help="save the image with kept patches highlighted, pruned ones dimmed")


def _add_eval(sub) -> None:
    e = _sub(sub, "eval", "measure an artifact's accuracy on a visual-QA set (JSONL or the synthetic task)", """
          vtc-export eval artifacts/demo-llava-pool-r0.25 --dataset synthetic --limit 60
          vtc-export eval ART --dataset my_vqa.jsonl --json report.json   # {image, question, answer[, type]} per line
          vtc-export eval ART --dataset my_vqa.jsonl --on-error stop
        """)
    e.add_argument("artifact", metavar="DIR")
    e.add_argument("--dataset", required=True, metavar="PATH|synthetic",
                   help='JSONL with {"image", "question", "answer" (str or list), "type"?} per line, or "synthetic"')
    e.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate at most N examples (synthetic: default 120)")
    e.add_argument("--seed", type=int, default=1, metavar="S", help="seed of the synthetic set (default 1)")
    e.add_argument("--max-new-tokens", type=int, default=8, metavar="N")
    e.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="bad dataset lines: skip (counted) or stop")
    e.add_argument("--json", metavar="FILE", help="write the full report (every prediction) as JSON")


def _add_calibrate(sub) -> None:
    c = _sub(sub, "calibrate", "measure KV-cache statistics and write kv_scales.json for --kv-cache int8|fp8", """
          vtc-export calibrate --ratio 0.25 --output kv_scales.json          # demo model, pool
          vtc-export calibrate --model ./llava-1.5-7b-hf --method fastv --ratio 0.25 \\
              --calib-images ./my_images --calib-prompts prompts.jsonl --output kv_scales.json
        """)
    c.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (default: built-in demo)")
    c.add_argument("--method", default="pool", help="compression method the cache will be built with (default pool)")
    c.add_argument("--ratio", type=float, help="fraction of visual tokens kept (default 0.25)")
    c.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--output", "-o", default="kv_scales.json", metavar="FILE", help="where to write (default kv_scales.json)")
    _add_kv_args(c, with_dtype=False)


def _add_verify(sub) -> None:
    v = _sub(sub, "verify", "re-check an artifact against its PyTorch source checkpoint", """
          vtc-export verify artifacts/demo-llava-pool-r0.25
          vtc-export verify ART --tokens 32 --json report.json
        """)
    v.add_argument("artifact", metavar="DIR")
    v.add_argument("--tokens", type=int, default=32, metavar="N", help="greedy tokens to compare (default 32)")
    v.add_argument("--model", metavar="DIR", help="source checkpoint (default: the path recorded in the manifest)")
    v.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def _add_inspect(sub) -> None:
    i = _sub(sub, "inspect", "summarise an artifact's manifest", """
          vtc-export inspect artifacts/demo-llava-pool-r0.25
          vtc-export inspect ART --json
        """)
    i.add_argument("artifact", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _add_trt_args(p, with_backend: bool = True) -> None:
    """TensorRT engine flags (build --backend tensorrt, engine): vtc.export.tensorrt.EngineOptions."""
    g = p.add_argument_group("TensorRT engines")
    if with_backend:
        g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                       help="tensorrt: also build a TensorRT engine per graph on this GPU (needs TensorRT)")
    g.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="engine precision (default fp16); int8/fp8 are used where a graph has Q/DQ (KV cache)")
    g.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB (default: TensorRT's)")
    g.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache: read if present, updated after the build")
    g.add_argument("--builder-optimization-level", type=int, metavar="N",
                   help="0 (fastest build) to 5 (default: TensorRT's, 3)")


def _add_lint(sub) -> None:
    lt = _sub(sub, "lint", "check every graph against TensorRT's ONNX parser support (TensorRT not needed)", """
          vtc-export lint artifacts/demo-llava-pool-r0.25
          vtc-export lint ART --target-cc 8.7        # Jetson Orin: an FP8 KV cache is an error there
          vtc-export lint ART --json > lint.json
        """)
    lt.add_argument("artifact", metavar="DIR")
    lt.add_argument("--target-cc", metavar="X.Y", help="compute capability of the target GPU (8.7 Orin, 9.0 H100, ...)")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_engine(sub) -> None:
    e = _sub(sub, "engine", "build TensorRT engines for this GPU into an existing artifact (run it on the device)", """
          vtc-export engine artifacts/demo-llava-pool-r0.25             # fp16 engines, one per graph
          vtc-export engine ART --precision fp32 --workspace 4 --timing-cache ~/.cache/vtc/orin.cache
          vtc-export engine ART --builder-optimization-level 5       # slower build, maybe faster engine
        """)
    e.add_argument("artifact", metavar="DIR")
    _add_trt_args(e, with_backend=False)


def _add_compare(sub) -> None:
    c = _sub(sub, "compare", "compare every graph's outputs on two backends with Polygraphy's comparator", """
          vtc-export compare ART --backends ort,tensorrt     # needs the engines (vtc-export engine ART)
          vtc-export compare ART --backends ort,ort-cuda --image cat.jpg --prompt "What is this?"
        """)
    c.add_argument("artifact", metavar="DIR")
    c.add_argument("--backends", default="ort,tensorrt", metavar="A,B",
                   help="two of ort, ort-cuda, ort-tensorrt, tensorrt (default ort,tensorrt)")
    c.add_argument("--image", metavar="IMG", help="image the feeds are recorded from (default: a synthetic one)")
    c.add_argument("--prompt", default="Describe the image.", metavar="TEXT")
    c.add_argument("--decode-steps", type=int, default=2, metavar="N", help="decode steps recorded (default 2)")
    c.add_argument("--atol", type=float, help="absolute tolerance (default by engine precision: fp32 1e-3, "
                   "fp16 5e-2, bf16 1e-1)")
    c.add_argument("--rtol", type=float, help="relative tolerance (same defaults as --atol)")
    c.add_argument("--json", metavar="FILE", help="also write the per-output table as JSON")


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--method-opt {pair!r} is not KEY=VALUE.", "Example: --method-opt window=2.")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        from vtc.export import commands

        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args, _options)
    except VtcError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return e.exit_code
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        print(f"error: this command needs {e.name}, which is not installed (the device install has only the "
              "runtime). Install the exporter: pip install torch==2.13.0 && pip install 'vtc[export]'.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
