"""`vtc-export eval`: an artifact's accuracy on a visual-QA set (vtc.runtime.evaluate; no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from vtc.export.commands.ui import check_outputs, err, out, subcommand


def add_parser(subparsers):
    e = subcommand(subparsers, "eval", "measure an artifact's accuracy on a visual-QA set (JSONL or the synthetic task)", """
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
    return e


def _nothing_scored(dataset: str, problems: list) -> None:
    """An accuracy of nothing is no result: say why, exit 1, write nothing."""
    from vtc.runtime.errors import InputError

    first = f"; the first, line {problems[0]['line']}: {problems[0]['message']}" if problems else ""
    raise InputError(f"no example of {dataset} could be scored ({len(problems)} line(s) skipped{first}).",
                     "Fix the dataset: one JSON object {image, question, answer} per line, images relative to the file.")


def run(args) -> int:
    from vtc.runtime import evaluate as ev
    from vtc.runtime.errors import UsageError
    from vtc.runtime.pipeline import VLM

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit}).", "Pass a positive number.")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}).", "Pass a positive number.")
    check_outputs(args.json)  # before the work, not after it
    if args.dataset == "synthetic":
        items, problems = ev.synthetic(args.seed, args.limit or 120), ev.Problems()
    else:  # read (and, with --on-error stop, checked) before the artifact loads
        items, problems = ev.load_jsonl(Path(args.dataset), args.on_error, args.limit)
    if not items:
        _nothing_scored(args.dataset, [{"line": n, "message": m} for n, m in problems.lines])
    from vtc.export.commands.args import command_thread_pool
    from vtc.runtime.backend import env_threads

    command_thread_pool(env_threads())  # this command owns its process (VTC_THREADS or ONNX Runtime's default)
    vlm = VLM(Path(args.artifact))
    with err.status(f"evaluating {len(items)} examples...") as status:
        report = ev.evaluate(vlm, items, problems, args.on_error, args.max_new_tokens,
                             progress=lambda k: status.update(f"evaluating: {k}/{len(items)}"))
    if not report["examples"]:
        _nothing_scored(args.dataset, report["problems"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    c = vlm.manifest.compression
    acc = report["accuracy"]
    out.print(f"{Path(args.artifact).name}: {c.method} ratio {c.ratio:g} ({c.k_visual} of {c.n_visual} visual tokens), "
              f"{report['examples']} examples: accuracy {'-' if acc is None else f'{100 * acc:.1f}%'}, "
              f"TTFT p50 {report['ttft_ms_p50'] or 0:.1f} ms")
    for t, r in report["per_type"].items():
        out.print(f"  {t:<10} {r['n']:>5}  {100 * r['accuracy']:.1f}%")
    for p in report["problems"]:
        err.print(f"[yellow]skipped line {p['line']}:[/] {p['message']}")
    if report["skipped"]:
        err.print(f"{report['skipped']} line(s) skipped")
    return 0
