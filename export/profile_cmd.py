"""`vtc-export profile` and `vtc-export sweep`: the command bodies and their terminal output (rich).

`profile` needs only the runtime (no torch); `sweep` builds artifacts and so needs the exporter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from vtc.runtime.errors import UsageError


# -- argument parsers (called from vtc.export.cli) ---------------------------------------------------
def add_parsers(sub, make) -> None:
    """`make(sub, name, help, examples)` is vtc.export.cli._sub."""
    p = make(sub, "profile", "measure an artifact's latency by stage, memory and (on Jetson) power", """
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
    p.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads (0 = default)")
    p.add_argument("--json", metavar="FILE", help="write the full report (every run, host facts) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one row per metric: mean, std, p50, p90, p99, min, max")
    p.add_argument("--plot", metavar="FILE.png", help="save a PNG chart of the stage breakdown (needs matplotlib)")
    _add_sweep(sub, make)


def _add_sweep(sub, make) -> None:
    s = make(sub, "sweep", "build, profile and score methods x ratios against the uncompressed model", """
          vtc-export sweep --methods pool,cls-attn --ratios 1.0,0.5,0.25,0.11       # demo model
          vtc-export sweep --methods all --eval 500          # + accuracy on 500 synthetic questions (accuracy.md)
          vtc-export sweep --model ./llava-1.5-7b-hf --methods pool,fastv --ratios 1.0,0.25 --runs 10
          vtc-export sweep --methods pool --ratios 0.5 --image a.jpg --image b.jpg --prompt "Describe it."
          vtc-export sweep --methods pool --ratios 1.0,0.25 --kv-cache fp32,int8   # also with an INT8 KV cache
        """)
    s.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (default: built-in demo)")
    s.add_argument("--methods", required=True, metavar="A,B,...",
                   help="compression methods (see `vtc-export list`), or `all`")
    s.add_argument("--ratios", default="1.0,0.5,0.25,0.11", metavar="R,R,...",
                   help="fractions of visual tokens kept (default 1.0,0.5,0.25,0.11; 1.0 = the uncompressed reference)")
    s.add_argument("--output", "-o", metavar="DIR", help="sweep directory (default: artifacts/sweep-<model>)")
    s.add_argument("--runs", type=int, default=5, metavar="N", help="measured profile runs per variant (default 5)")
    s.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured runs first (default 1)")
    s.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens per profiled run (default 32)")
    s.add_argument("--fidelity-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens compared with the uncompressed model (default 32)")
    s.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="fidelity image (repeatable; default: three synthetic images); the first is profiled")
    s.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="fidelity prompt (repeatable; default: two); the first is profiled")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads (0 = default)")
    s.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="KV cache length of every variant")
    s.add_argument("--text-budget", type=int, default=None, metavar="N", help="max prompt text tokens of every variant")
    s.add_argument("--kv-cache", default="fp32", metavar="T,T,...",
                   help="KV cache storage per variant: fp32, fp16, int8, fp8 (comma list sweeps each; default fp32)")
    s.add_argument("--eval", type=int, default=0, metavar="N",
                   help="also score task accuracy on N questions per variant (default 0 = off); writes accuracy.md")
    s.add_argument("--eval-dataset", default="synthetic", metavar="PATH|synthetic",
                   help="JSONL {image, question, answer[, type]} per line, or the synthetic task (default)")
    s.add_argument("--eval-seed", type=int, default=1, metavar="S", help="seed of the synthetic set (default 1)")
    s.add_argument("--force", action="store_true", help="start over: rebuild and re-measure every variant")


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _check_outputs(*paths: str | None) -> None:
    for p in paths:
        if p and not Path(p).expanduser().resolve().parent.is_dir():
            raise UsageError(f"cannot write {p}: its directory does not exist.", "Create it, or choose another path.")


# -- profile -----------------------------------------------------------------------------------------
def cmd_profile(args, out, err) -> int:
    from vtc.runtime import charts, profiler

    cfg = profiler.ProfileConfig(image=args.image, prompt=args.prompt or profiler.DEFAULT_PROMPT, raw=args.raw, runs=args.runs,
                                 warmup=args.warmup, max_new_tokens=args.max_new_tokens, threads=args.threads or None)
    cfg.check()
    _check_outputs(args.json, args.csv, args.plot)
    if args.plot:
        charts.pyplot()  # fail now, not after the runs, if matplotlib is missing
    opened = profiler.open_artifact(Path(args.artifact), cfg)  # bad artifact, image or prompt: fail here
    with _progress(err) as bar:
        task = bar.add_task("warm-up", total=cfg.warmup + cfg.runs)

        def on_run(i: int, _run: dict) -> None:
            bar.update(task, advance=1, description="warm-up" if i < 0 else "measured runs")

        report = profiler.profile(Path(args.artifact), cfg, on_run=on_run, opened=opened)
    print_profile(out, report)
    for path, write in ((args.json, profiler.write_json), (args.csv, profiler.write_csv),
                        (args.plot, charts.stage_breakdown)):
        if path:
            write(report, Path(path))
            out.print(f"wrote {path}")
    return 0


def _fmt(v: float, unit: str) -> str:
    if unit == "tok/s":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def print_profile(console, report: dict) -> None:
    from rich.table import Table

    c, t = report["compression"], report["tokens"]
    console.print(f"[bold]{report['artifact']}[/]: {c['method']} ratio {c['ratio']:g}, {c['k_visual']} of "
                  f"{c['n_visual']} visual tokens; prompt {t['prompt_tokens']} tokens, {t['new_tokens']} new tokens; "
                  f"{len(report['runs'])} runs after {report['config']['warmup']} warm-up")
    table = Table(title="latency", title_justify="left")
    table.add_column("stage / metric")
    for col in ("mean", "std", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    table.add_column("unit")
    from vtc.runtime.profiler import METRICS

    for key, s in report["metrics"].items():
        style = "bold" if key in ("ttft_ms", "tpot_ms", "e2e_ms") else None
        table.add_row(METRICS.get(key, (s["label"],))[0], *(_fmt(s[k], s["unit"]) for k in ("mean", "std", "p50", "p90", "p99")), s["unit"],
                      style=style)
    console.print(table)
    cold = report.get("cold_start")
    if cold:
        console.print(f"first query after loading the artifact (cold, as a one-shot `vtc-export run`): TTFT "
                      f"{cold['ttft_ms']:.1f} ms by wall clock ({cold['ttft_pipeline_ms']:.1f} ms in the pipeline's stages)")
    _print_memory(console, report["memory"])
    if report.get("power"):
        _print_power(console, report["power"])
    _print_host(console, report["host"])


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _print_memory(console, m: dict) -> None:
    from rich.table import Table

    table = Table(title="memory", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("KV cache allocated (max_seq_len)", _mib(m["kv_cache_allocated_bytes"]))
    table.add_row("KV cache holding the prompt", _mib(m["kv_cache_prompt_bytes"]))
    table.add_row("KV cache at the end of a run", _mib(m["kv_cache_used_bytes"]))
    table.add_row("peak RSS (process, since start)", _mib(m["peak_rss_bytes"]))
    table.add_row("RSS before the runs -> peak during them",
                  f"{_mib(m['rss_before_runs_bytes'])} -> {_mib(m['peak_rss_during_runs_bytes'])}")
    for g in m["gpus"]:
        own = f", this process {_mib(g['process_memory_bytes'])}" if g.get("process_memory_bytes") else ""
        table.add_row(f"GPU {g['index']} {g['name']} (NVML, device-wide)",
                      f"{_mib(g['memory_used_bytes'])} of {_mib(g['memory_total_bytes'])}{own}")
    if m.get("unified_memory_used_mb_peak") is not None:
        table.add_row("unified memory in use, peak (tegrastats RAM)",
                      f"{m['unified_memory_used_mb_peak']} of {m['unified_memory_total_mb']} MB")
    console.print(table)


def _print_power(console, p: dict) -> None:
    from rich.table import Table

    if p.get("error"):
        console.print(f"[yellow]power: {p['error']}[/]")
        return
    table = Table(title="power", title_justify="left",
                  caption=f"tegrastats every {p['interval_ms']} ms, {p['samples']} samples during the runs",
                  caption_justify="left")
    for col, j in (("rail", "left"), ("average W", "right"), ("peak W", "right")):
        table.add_column(col, justify=j)
    for rail, s in p["rails"].items():
        table.add_row(rail, f"{s['avg_w']:.2f}", f"{s['peak_w']:.2f}")
    console.print(table)
    e = p["energy_per_query_j"]
    if e:
        console.print(f"energy per query ({p['energy_basis']}): mean {e['mean']:.3f} J, p50 {e['p50']:.3f} J, "
                      f"max {e['max']:.3f} J")
    util = [f"{name} {p[key]:.0f}%" for name, key in (("GPU", "gpu_util_pct"), ("CPU", "cpu_util_pct"),
                                                      ("EMC", "emc_util_pct")) if p.get(key) is not None]
    if util:
        console.print("utilisation during the runs: " + ", ".join(util))


def _print_host(console, h: dict) -> None:
    gpus = ", ".join(g["name"] for g in h["gpus"]) or "none visible (NVML)"
    libs = ", ".join(f"{k} {v}" for k, v in h["libraries"].items())
    console.print(f"host: {h['board'] + ' / ' if h['board'] else ''}{h['cpu']} ({h['cpu_count']['usable']} usable "
                  f"cores), GPU: {gpus}")
    console.print(f"backend: {h['backend']} {h['backend_version']}, provider {h['execution_provider']}, threads "
                  f"{h['threads']}; nvpmodel {h['nvpmodel']}, jetson_clocks {h['jetson_clocks']}")
    console.print(f"[dim]{libs}[/]")


# -- sweep -------------------------------------------------------------------------------------------
def _floats(text: str, flag: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of numbers.", f"Example: {flag} 1.0,0.5,0.25.") from e


def sweep_args(args):
    from vtc.export.build import DEFAULT_MAX_SEQ_LEN, DEFAULT_TEXT_BUDGET
    from vtc.export.sweep import SweepArgs

    from vtc.export import methods

    names = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if names == ("all",):
        names = tuple(m for m in methods.names() if m != "none")
    if args.eval < 0:
        raise UsageError(f"--eval {args.eval}: the number of questions cannot be negative.", "Pass --eval 500, or 0 for none.")
    return SweepArgs(model=args.model, methods=names,
                     ratios=_floats(args.ratios, "--ratios"), output=args.output, runs=args.runs, warmup=args.warmup,
                     max_new_tokens=args.max_new_tokens, fidelity_tokens=args.fidelity_tokens,
                     images=tuple(args.image), prompts=tuple(args.prompt), threads=args.threads or None,
                     max_seq_len=args.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                     text_budget=args.text_budget or DEFAULT_TEXT_BUDGET, force=args.force,
                     kv_caches=tuple(k.strip() for k in args.kv_cache.split(",") if k.strip()),
                     eval_n=args.eval, eval_dataset=args.eval_dataset, eval_seed=args.eval_seed)


def cmd_sweep(args, out, err) -> int:
    from vtc.export import sweep as sw
    from vtc.runtime import charts

    sargs = sweep_args(args)
    sw.plan_variants(sargs)  # bad names and ratios fail before anything is built
    charts.pyplot()  # the chart needs matplotlib: fail now, not after the builds
    with _progress(err) as bar:
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
    print_sweep(out, result.rows)
    for path in sw.write_outputs(result):
        out.print(f"wrote {path}")
    return 0


def print_sweep(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="sweep", title_justify="left")
    cols = (("variant", "variant", None), ("K", "k_visual", "{}"), ("TTFT p50 ms", "ttft_ms_p50", "{:.1f}"),
            ("ViT ms", "vit_time_ms_p50", "{:.1f}"), ("prefill ms", "prefill_time_ms_p50", "{:.1f}"),
            ("TPOT ms", "tpot_ms_p50", "{:.2f}"), ("KV MiB", "kv_cache_prompt_bytes", "mib"),
            ("greedy agree", "greedy_agreement", "{:.0%}"), ("prefix tok", "greedy_prefix_tokens", "{:.1f}"),
            ("KL 1st tok", "first_token_kl", "{:.3g}"), ("accuracy", "accuracy", "{:.1%}"), ("build s", "build_s", "{:.1f}"))
    for head, _key, fmt in cols:
        table.add_column(head, justify="left" if fmt is None else "right")
    for r in rows:
        cells = []
        for _head, key, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else str(v) if fmt is None else f"{v / 2**20:.1f}" if fmt == "mib"
                         else fmt.format(v))
        table.add_row(*cells)
    console.print(table)
