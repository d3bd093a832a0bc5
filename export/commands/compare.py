"""`vtc-export compare`: every graph's outputs on two backends, Polygraphy's comparator (vtc.export.compare).

Exit 1 when an output is outside the tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtc.export.commands.ui import check_outputs, out, step, subcommand


def add_parser(subparsers):
    c = subcommand(subparsers, "compare", "compare every graph's outputs on two backends with Polygraphy's comparator", """
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
    return c


def run(args) -> int:
    from vtc.export.compare import backend_names, compare_artifact

    names = backend_names(args.backends)
    check_outputs(args.json)  # before the work, not after it
    result = compare_artifact(Path(args.artifact), names, image=args.image, prompt=args.prompt,
                              decode_steps=args.decode_steps, atol=args.atol, rtol=args.rtol, step=step)
    rows = result["rows"]
    _print_rows(rows, names, result["atol"], result["rtol"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] and r["polygraphy_ok"] for r in rows) else 1


def _print_rows(rows: list, names: list, atol: float, rtol: float) -> None:
    from rich.table import Table

    table = Table(title=f"{names[0]} vs {names[1]} (Polygraphy comparator: |a-b| <= {atol:g} + {rtol:g}*|b|; "
                  "integer outputs exact)")
    for col in ("graph", "output", "feeds", "max-abs", "cosine", "ok", "graph verdict (Polygraphy)"):
        table.add_column(col)
    yes_no = {True: "[green]yes[/]", False: "[red]NO[/]"}
    for r in rows:
        table.add_row(r["graph"], r["output"], str(r["feeds"]), f"{r['max_abs']:.2e}", f"{r['cosine']:.7f}",
                      yes_no[r["ok"]], yes_no[r["polygraphy_ok"]])
    out.print(table)
