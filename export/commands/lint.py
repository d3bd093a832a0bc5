"""`vtc-export lint`: every graph against TensorRT's ONNX parser support (vtc.export.lint; no TensorRT).

Exit 1 when a graph has an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtc.export.commands.ui import out, subcommand


def add_parser(subparsers):
    lt = subcommand(subparsers, "lint", "check every graph against TensorRT's ONNX parser support (TensorRT not needed)", """
          vtc-export lint artifacts/demo-llava-pool-r0.25
          vtc-export lint ART --target-cc 8.7        # Jetson Orin: an FP8 KV cache is an error there
          vtc-export lint ART --json > lint.json
        """)
    lt.add_argument("artifact", metavar="DIR")
    lt.add_argument("--target-cc", metavar="X.Y", help="compute capability of the target GPU (8.7 Orin, 9.0 H100, ...)")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    return lt


def run(args) -> int:
    from vtc.export.lint import lint_artifact
    from vtc.export.report import print_lint

    report = lint_artifact(Path(args.artifact), target_cc=args.target_cc)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_lint(out, report, verbose=True)
    return 0 if report.ok else 1
