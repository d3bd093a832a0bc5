"""`vtc-export inspect`: summarise an artifact's manifest (runtime only: no torch)."""

from __future__ import annotations

from pathlib import Path

from vtc.export.commands.ui import out, subcommand


def add_parser(subparsers):
    i = subcommand(subparsers, "inspect", "summarise an artifact's manifest", """
          vtc-export inspect artifacts/demo-llava-pool-r0.25
          vtc-export inspect ART --verify-hashes
          vtc-export inspect ART --json
        """)
    i.add_argument("artifact", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--verify-hashes", action="store_true",
                   help="check the sha256 of every file the manifest lists (default: presence, confinement and "
                        "exact sizes, as `run` checks at load; `verify` also checks every sha256)")
    return i


def run(args) -> int:
    from vtc.export.report import print_manifest
    from vtc.runtime import manifest as mf

    m, digest = mf.load_with_digest(Path(args.artifact), check_files="hashes" if args.verify_hashes else "sizes")
    if args.json:
        print(m.to_json(), end="")
    else:
        print_manifest(out, m, digest=digest, hashes_checked=args.verify_hashes)
    return 0
