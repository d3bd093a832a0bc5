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
          vtc-export build --ratio 0.25                       # built-in demo model (random weights)
          vtc-export build --model ./llava-1.5-7b-hf --method cls-attn --ratio 0.25 --output out/llava-cls
          vtc-export build --model ./llava-1.5-7b-hf --ratio 1.0   # uncompressed baseline
          vtc-export build --method pool --method-opt window=3  # explicit 3x3 pooling window
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
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--overlay", metavar="PNG", help="save the image with kept patches highlighted, pruned ones dimmed")


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
