"""`vtc-export verify`: re-check an artifact against its PyTorch source checkpoint (vtc.export.verify)."""

from __future__ import annotations

import json
from pathlib import Path

from vtc.export.commands.ui import out, quiet_transformers, step, subcommand


def add_parser(subparsers):
    v = subcommand(subparsers, "verify", "re-check an artifact against its PyTorch source checkpoint", """
          vtc-export verify artifacts/demo-llava-pool-r0.25
          vtc-export verify ART --tokens 32 --json report.json
        """)
    v.add_argument("artifact", metavar="DIR")
    v.add_argument("--tokens", type=int, default=32, metavar="N", help="greedy tokens to compare (default 32)")
    v.add_argument("--model", metavar="DIR", help="source checkpoint (default: the path recorded in the manifest)")
    v.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return v


def run(args) -> int:
    from vtc.export.verify import verify

    quiet_transformers()
    report = verify(Path(args.artifact), tokens=args.tokens, model_dir=args.model, step=step)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    from vtc.export.report import print_parity

    print_parity(out, report)
    from vtc.export.parity import raise_if_failed

    raise_if_failed(report, fix="Rebuild the artifact from its checkpoint (its graphs were modified after the build, "
                    "or --model is a different checkpoint); if a fresh build fails too, report it as a vtc bug.")
    out.print("[green]verify: ok[/]")
    return 0
