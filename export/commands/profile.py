"""`vtc-export profile`: an artifact's latency by stage, memory and (on Jetson) power (vtc.runtime.profiler).

Runtime only: works on a device without torch.
"""

from __future__ import annotations

from pathlib import Path

from vtc.export.commands.args import RuntimeBackendArgs
from vtc.export.commands.ui import check_outputs, err, out, progress, subcommand
from vtc.runtime.units import format_bytes

THREADS = RuntimeBackendArgs(with_backend=False)


def add_parser(subparsers):
    p = subcommand(subparsers, "profile", "measure an artifact's latency by stage, memory and (on Jetson) power", """
          vtc-export profile artifacts/demo-llava-pool-r0.25
          vtc-export profile ART --image cat.jpg --prompt "What is the cat doing?" --runs 20 --warmup 3
          vtc-export profile ART --json prof.json --csv prof.csv --plot stages.png
        """)
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--image", metavar="IMG", help="image to ask about (default: a synthetic test pattern)")
    p.add_argument("--prompt", metavar="TEXT", default=None, help="question (default: a fixed one about shapes)")
    p.add_argument("--raw", action="store_true", help="use the prompt verbatim (it must contain <image>)")
    p.add_argument("--runs", type=int, default=10, metavar="N", help="measured runs (default 10)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured runs first (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens per run, EOS ignored so every run decodes as many (default 32)")
    THREADS.add_to_parser(p)
    p.add_argument("--json", metavar="FILE", help="write the full report (every run, host facts) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one row per metric: mean, std, p50, p90, p99, min, max")
    p.add_argument("--plot", metavar="FILE.png", help="save a PNG chart of the stage breakdown (needs matplotlib)")
    return p


def run(args) -> int:
    from vtc.runtime import charts, profiler

    cfg = profiler.ProfileConfig(image=args.image, prompt=args.prompt or profiler.DEFAULT_PROMPT, raw=args.raw,
                                 runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                                 threads=THREADS.threads(args))
    cfg.check()
    check_outputs(args.json, args.csv, args.plot)
    if args.plot:
        charts.pyplot()  # fail now, not after the runs, if matplotlib is missing
    opened = profiler.open_artifact(Path(args.artifact), cfg)  # bad artifact, image or prompt: fail here
    with progress(err) as bar:
        task = bar.add_task("warm-up", total=cfg.warmup + cfg.runs)

        def on_run(i: int, _run: dict) -> None:
            bar.update(task, advance=1, description="warm-up" if i < 0 else "measured runs")

        report = profiler.profile(Path(args.artifact), cfg, on_run=on_run, opened=opened)
    _print_profile(report)
    for path, write in ((args.json, profiler.write_json), (args.csv, profiler.write_csv),
                        (args.plot, charts.stage_breakdown)):
        if path:
            write(report, Path(path))
            out.print(f"wrote {path}")
    return 0


def _number(v: float, unit: str) -> str:
    if unit == "tok/s":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def _print_profile(report: dict) -> None:
    from rich.table import Table

    from vtc.runtime.profiler import METRICS

    c, t = report["compression"], report["tokens"]
    out.print(f"[bold]{report['artifact']}[/]: {c['method']} ratio {c['ratio']:g}, {c['k_visual']} of "
              f"{c['n_visual']} visual tokens; prompt {t['prompt_tokens']} tokens, {t['new_tokens']} new tokens; "
              f"{len(report['runs'])} runs after {report['config']['warmup']} warm-up")
    table = Table(title="latency", title_justify="left")
    table.add_column("stage / metric")
    for col in ("mean", "std", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    table.add_column("unit")
    for key, s in report["metrics"].items():
        style = "bold" if key in ("ttft_ms", "tpot_ms", "e2e_ms") else None
        table.add_row(METRICS.get(key, (s["label"],))[0], *(_number(s[k], s["unit"]) for k in ("mean", "std", "p50", "p90", "p99")),
                      s["unit"], style=style)
    out.print(table)
    if report.get("load_ms") is not None:
        out.print(f"load: {report['load_ms']:.1f} ms to open the artifact (manifest, file size checks, graph sessions)")
    cold = report.get("cold_start")
    if cold:
        out.print(f"first query after loading the artifact (cold, as a one-shot `vtc-export run`): TTFT "
                  f"{cold['ttft_ms']:.1f} ms by wall clock ({cold['ttft_pipeline_ms']:.1f} ms in the pipeline's stages)")
    _print_memory(report["memory"])
    if report.get("power"):
        _print_power(report["power"])
    _print_host(report["host"])


def _print_memory(m: dict) -> None:
    from rich.table import Table

    mib = lambda n: format_bytes(n, "MiB")  # noqa: E731
    table = Table(title="memory", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("KV cache allocated (capacity bucket)", mib(m["kv_cache_allocated_bytes"]))
    table.add_row("KV cache holding the prompt", mib(m["kv_cache_prompt_bytes"]))
    table.add_row("KV cache at the end of a run", mib(m["kv_cache_used_bytes"]))
    table.add_row("peak RSS (process, since start)", mib(m["peak_rss_bytes"]))
    table.add_row("RSS before the runs -> peak during them",
                  f"{mib(m['rss_before_runs_bytes'])} -> {mib(m['peak_rss_during_runs_bytes'])}")
    for g in m["gpus"]:
        own = f", this process {mib(g['process_memory_bytes'])}" if g.get("process_memory_bytes") else ""
        table.add_row(f"GPU {g['index']} {g['name']} (NVML, device-wide)",
                      f"{mib(g['memory_used_bytes'])} of {mib(g['memory_total_bytes'])}{own}")
    if m.get("unified_memory_used_mb_peak") is not None:
        table.add_row("unified memory in use, peak (tegrastats RAM)",
                      f"{m['unified_memory_used_mb_peak']} of {m['unified_memory_total_mb']} MB")
    out.print(table)


def _print_power(p: dict) -> None:
    from rich.table import Table

    if p.get("error"):
        out.print(f"[yellow]power: {p['error']}[/]")
        return
    table = Table(title="power", title_justify="left",
                  caption=f"tegrastats every {p['interval_ms']} ms, {p['samples']} samples during the runs",
                  caption_justify="left")
    for col, j in (("rail", "left"), ("average W", "right"), ("peak W", "right")):
        table.add_column(col, justify=j)
    for rail, s in p["rails"].items():
        table.add_row(rail, f"{s['avg_w']:.2f}", f"{s['peak_w']:.2f}")
    out.print(table)
    e = p["energy_per_query_j"]
    if e:
        out.print(f"energy per query ({p['energy_basis']}): mean {e['mean']:.3f} J, p50 {e['p50']:.3f} J, "
                  f"max {e['max']:.3f} J")
    util = [f"{name} {p[key]:.0f}%" for name, key in (("GPU", "gpu_util_pct"), ("CPU", "cpu_util_pct"),
                                                      ("EMC", "emc_util_pct")) if p.get(key) is not None]
    if util:
        out.print("utilisation during the runs: " + ", ".join(util))


def _print_host(h: dict) -> None:
    gpus = ", ".join(g["name"] for g in h["gpus"]) or "none visible (NVML)"
    libs = ", ".join(f"{k} {v}" for k, v in h["libraries"].items())
    out.print(f"host: {h['board'] + ' / ' if h['board'] else ''}{h['cpu']} ({h['cpu_count']['usable']} usable "
              f"cores), GPU: {gpus}")
    pool = f" ({h['thread_pool']} pool)" if h.get("thread_pool") else ""
    out.print(f"backend: {h['backend']} {h['backend_version']}, provider {h['execution_provider']}, threads "
              f"{h['threads']}{pool}; nvpmodel {h['nvpmodel']}, jetson_clocks {h['jetson_clocks']}")
    out.print(f"[dim]{libs}[/]")
