"""`vtc-export sweep`: build, profile and score methods x ratios against the uncompressed model
(vtc.export.sweep). Needs the exporter (it builds artifacts)."""

from __future__ import annotations

import contextlib

from vtc.export.commands.args import SweepOptionsArgs
from vtc.export.commands.ui import check_output_dir, err, out, progress, quiet_transformers, subcommand
from vtc.runtime.units import format_bytes

OPTIONS = SweepOptionsArgs()


def add_parser(subparsers):
    s = subcommand(subparsers, "sweep", "build, profile and score methods x ratios against the uncompressed model", """
          vtc-export sweep --methods pool,cls-attn --ratios 1.0,0.5,0.25,0.11       # demo model
          vtc-export sweep --methods all --eval 500          # + accuracy on 500 synthetic questions (accuracy.md)
          vtc-export sweep --model ./llava-1.5-7b-hf --methods pool,fastv --ratios 1.0,0.25 --runs 10
          vtc-export sweep --methods pool --ratios 0.5 --image a.jpg --image b.jpg --prompt "Describe it."
          vtc-export sweep --methods pool --ratios 1.0,0.25 --kv-cache fp32,int8   # also with an INT8 KV cache
          vtc-export sweep --methods fastv --ratios 1.0,0.25 --weights int8,int4,int4-awq --group-size 64 --eval 500
          vtc-export sweep --model ./SmolVLM-256M-Instruct --methods pool,divprune --ratios 1.0,0.25 --image-splits 2 2
        """)
    OPTIONS.add_to_parser(s)
    return s


def run(args) -> int:
    from vtc.export import sweep as sw
    from vtc.runtime import charts

    quiet_transformers()
    from vtc.runtime.preprocess import load_image

    sargs = OPTIONS.parse(args)  # --threads: 0 or 1..usable cores
    sw.plan_variants(sargs)  # bad names and ratios fail before anything is built
    check_output_dir(args.output or "artifacts", "--output")
    for image in sargs.images:  # read after the first build otherwise
        load_image(image)
    charts.pyplot()  # the chart needs matplotlib: fail now, not after the builds
    with progress(err) as bar:
        task = bar.add_task("sweep", total=None)

        @contextlib.contextmanager
        def step(label: str):
            bar.update(task, description=label)
            yield

        def on_variant(i: int, n: int, name: str, status: str) -> None:
            bar.update(task, total=n, completed=i + (status != "start"), description=f"{name}: {status}")
            if status != "start":
                err.print(f"[green]✓[/] {name} {'(finished earlier, skipped)' if status == 'skipped' else ''}")

        result = sw.sweep(sargs, step=step, on_variant=on_variant)
    _print_sweep(result.rows)
    for path in sw.write_outputs(result):
        out.print(f"wrote {path}")
    return 0


def _print_sweep(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="sweep", title_justify="left")
    cols = (("variant", "variant", None), ("KV", "kv_cache", None), ("weights", "weights", "weights"),
            ("K", "k_visual", "{}"), ("TTFT p50 ms", "ttft_ms_p50", "{:.1f}"), ("ViT ms", "vit_time_ms_p50", "{:.1f}"),
            ("prefill ms", "prefill_time_ms_p50", "{:.1f}"), ("TPOT ms", "tpot_ms_p50", "{:.2f}"),
            ("KV MiB", "kv_cache_prompt_bytes", "mib"),
            ("greedy agree", "greedy_agreement", "{:.0%}"), ("prefix tok", "greedy_prefix_tokens", "{:.1f}"),
            ("KL 1st tok", "first_token_kl", "{:.3g}"), ("accuracy", "accuracy", "{:.1%}"), ("build s", "build_s", "{:.1f}"))
    for head, _key, fmt in cols:
        table.add_column(head, justify="left" if fmt in (None, "weights") else "right")
    for r in rows:
        table.add_row(*(_cell(r, key, fmt) for _head, key, fmt in cols))
    out.print(table)


def _cell(r: dict, key: str, fmt: str | None) -> str:
    from vtc.export.sweep import weights_label

    v = r.get(key)
    if fmt == "weights":
        return weights_label(r.get("weights", "fp"), r.get("group_size"))  # rows from before --weights are fp
    if v is None:
        return "-"
    return str(v) if fmt is None else format_bytes(v, "MiB", suffix=False) if fmt == "mib" else fmt.format(v)
