"""`vtc-export`: build, run, verify and inspect compressed VLM artifacts.

One module per subcommand (vtc.export.commands, registry in COMMANDS), each mapping to one library module:
build -> vtc.export.build, run -> vtc.runtime.pipeline, verify -> vtc.export.verify, lint -> vtc.export.lint,
engine -> vtc.export.tensorrt, compare -> vtc.export.compare, profile -> vtc.runtime.profiler, sweep ->
vtc.export.sweep, inspect/list -> vtc.export.report. Heavy imports (torch, transformers) happen inside the
subcommands that need them: `run` and `inspect` work on a device without torch.
"""

from __future__ import annotations

import argparse
import sys

from vtc.runtime.errors import VtcError

EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")
EXAMPLES = """\
examples:
  vtc-export build --ratio 0.25                      # demo model, pool, keep 25% of visual tokens
  vtc-export build --model ~/llava-1.5-7b-hf --method cls-attn --ratio 0.25
  vtc-export run artifacts/demo-llava-pool-r0.25 --image cat.jpg --prompt "What is this?"
  vtc-export verify artifacts/demo-llava-pool-r0.25
  vtc-export list"""


def _parser() -> argparse.ArgumentParser:
    from vtc.export import commands

    p = argparse.ArgumentParser(
        prog="vtc-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Deploy vision-language models with visual token compression baked into static ONNX graphs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands.COMMANDS:
        commands.module(name).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        from vtc.export import commands

        return commands.module(args.command).run(args)
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
