"""`vtc-export inspect`: summarise an artifact's manifest (runtime only: no torch)."""

from __future__ import annotations

from pathlib import Path

from vtc.export.commands.ui import out, subcommand


def add_parser(subparsers):
    i = subcommand(subparsers, "inspect", "summarise an artifact's manifest", """
          vtc-export inspect artifacts/demo-llava-pool-r0.25
          vtc-export inspect ART --json
        """)
    i.add_argument("artifact", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return i


def run(args) -> int:
    from vtc.export.report import print_manifest
    from vtc.runtime import manifest as mf

    m = mf.load(Path(args.artifact), check_files=True)
    if args.json:
        print(m.to_json(), end="")
    else:
        print_manifest(out, m)
    return 0
