"""`vtc-export verify`: re-check an artifact against its PyTorch source checkpoint (vtc.export.verify)."""

from __future__ import annotations

import json
from pathlib import Path

from vtc.export.commands.ui import check_outputs, out, quiet_transformers, step, subcommand


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
    from vtc.runtime.errors import UsageError

    from vtc.runtime import manifest as mf

    if args.tokens < 1:
        raise UsageError(f"--tokens must be at least 1 (got {args.tokens}): it is the number of greedy tokens compared.",
                         "Pass e.g. --tokens 32 (the default).")
    check_outputs(args.json)  # before the work, not after it
    m = mf.load(Path(args.artifact), check_files=False)  # the cache size, before PyTorch generates the reference
    visual = max(m.compression.kv_visual_per_layer)
    if args.tokens >= m.text.max_seq_len - visual:  # the prompt needs at least one text token too
        raise UsageError(f"--tokens {args.tokens} cannot fit: the artifact's cache holds {m.text.max_seq_len} positions, "
                         f"{visual} of them visual; the prompt and the compared tokens share the other "
                         f"{m.text.max_seq_len - visual}.", "Pass fewer, e.g. --tokens 32 (the default).")
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
