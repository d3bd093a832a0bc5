"""The subcommands behind `vtc-export` (argument parsing lives in vtc.export.cli)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from rich.console import Console

err = Console(stderr=True, highlight=False)
# Piped output would be cut at 80 columns (rich's default off a terminal); tables stay whole instead.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def step(label: str):
    """Progress for one long step: a spinner while it runs, then a check mark and its duration."""
    t0 = time.perf_counter()
    with err.status(f"{label}..."):
        yield
    err.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - t0:.1f} s)[/]")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would interleave with ours; errors still surface."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_build(args, parse_options) -> int:
    from vtc.export import trt_cmd
    from vtc.export.build import BuildArgs, build

    engine = trt_cmd.build_engine_options(args)  # --backend tensorrt: TensorRT must import, checked first
    quiet_transformers()
    from vtc.export.demo import DEMO_NOTICE

    bargs = BuildArgs(model=args.model, method=args.method, ratio=args.ratio, method_options=parse_options(args.method_opt),
                      output=args.output, max_seq_len=args.max_seq_len, text_budget=args.text_budget,
                      force=args.force, parity_tokens=args.parity_tokens, kv_cache=args.kv_cache,
                      kv_scales=args.kv_scales, calib_images=args.calib_images, calib_prompts=args.calib_prompts,
                      kv_granularity=args.kv_granularity, kv_statistic=args.kv_statistic,
                      kv_fallback=args.kv_fallback_threshold, backend=args.backend, engine=engine)
    if args.model is None:
        err.print(f"[yellow]note:[/] no --model given: using the built-in {DEMO_NOTICE}.")
    built = build(bargs, step)
    m = built.manifest
    c = m.compression
    out.print(f"\nartifact: [bold]{built.path}[/]")
    out.print(f"visual tokens kept: [bold]{c.k_visual} of {c.n_visual}[/] ({c.method}, ratio {c.ratio:g})")
    for name, meta in m.files.items():
        out.print(f"  {name:<28} {_size(meta['bytes']):>10}")
    out.print(f"  total {_size(sum(f['bytes'] for f in m.files.values())):>32}")
    p = m.parity
    out.print(f"parity vs PyTorch: {'[green]ok[/]' if p['ok'] else '[red]FAILED[/]'} "
              f"(prefill logits max-abs {p['graphs']['llm_prefill']['max_abs']:.2e}, "
              f"{p['new_tokens']} greedy tokens {'equal' if p['greedy_tokens']['equal'] else 'differ'})")
    if built.lint is not None:
        trt_cmd.print_lint(out, built.lint)
    if built.demo:
        from vtc.export.demo import DEMO_QUESTION

        out.print(f"[yellow]{DEMO_NOTICE}.[/]")
        out.print(f"next: vtc-export run {built.path} --image examples/shapes.png --prompt \"{DEMO_QUESTION}\"")
    else:
        out.print(f"next: vtc-export run {built.path} --image IMG --prompt \"...\"")
    return 0


def cmd_run(args, _parse_options) -> int:
    from vtc.runtime.pipeline import VLM
    from vtc.runtime.sampling import SamplingConfig

    from vtc.runtime.preprocess import load_image

    from vtc.export.trt_cmd import runtime_backend

    backend = runtime_backend(args.backend, args.provider, args.threads or None)
    vlm = VLM(Path(args.artifact), backend=backend)
    if getattr(backend, "fallback", None):
        err.print(f"[yellow]note:[/] {backend.fallback}")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    on_text = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    image = load_image(args.image)
    res = vlm.generate(image, args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                       sampling=sampling, on_text=on_text)
    c = vlm.manifest.compression
    if args.overlay:
        from vtc.runtime import overlay

        overlay.save(Path(args.overlay), vlm.preprocessor.view(image), c.grid, res.token_map, res.kept_indices, c.has_cls)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "stop_reason": res.stop_reason,
                          "visual_tokens": visual_tokens(c, res), "prompt_tokens": res.prompt_tokens,
                          "timings_ms": {k: round(v, 3) for k, v in res.timings_ms.items()}}))
        return 0
    t = res.timings_ms
    print()
    err.print(f"[dim]{len(res.token_ids)} tokens ({res.stop_reason}); visual tokens {c.k_visual}/{c.n_visual} "
              f"({c.method}); TTFT {t['ttft']:.1f} ms (vision {t['vision']:.1f}, prefill {t['prefill']:.1f}); "
              f"decode {t['decode_per_token']:.2f} ms/token[/]")
    if vlm.manifest.model.demo:
        err.print("[dim]demo model: it knows only synthetic coloured shapes (colour, shape, presence, position, count, "
                  "left/above questions).[/]")
    return 0


def visual_tokens(c, res) -> dict:
    """The kept visual tokens for `run --json`: indices, grid positions, and merges."""
    cols = c.grid[1]

    def where(i: int):
        j = i - 1 if c.has_cls else i
        return "cls" if j < 0 else [j // cols, j % cols]

    groups: dict[int, list[int]] = {}
    for src, dst in enumerate(res.token_map):
        if dst >= 0:
            groups.setdefault(dst, []).append(src)
    return {"total": c.n_visual, "kept": c.k_visual, "method": c.method, "grid": c.grid, "has_cls": c.has_cls,
            "kept_indices": res.kept_indices, "kept_positions": [where(i) for i in res.kept_indices],
            "merged": {str(k): v for k, v in sorted(groups.items()) if len(v) > 1},
            "dropped": sum(1 for d in res.token_map if d < 0)}


def cmd_eval(args, _parse_options) -> int:
    from vtc.runtime import evaluate as ev
    from vtc.runtime.errors import UsageError
    from vtc.runtime.pipeline import VLM

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit}).", "Pass a positive number.")
    vlm = VLM(Path(args.artifact))
    if args.dataset == "synthetic":
        items, problems = ev.synthetic(args.seed, args.limit or 120), ev.Problems()
    else:
        items, problems = ev.load_jsonl(Path(args.dataset), args.on_error, args.limit)
    with err.status(f"evaluating {len(items)} examples...") as status:
        report = ev.evaluate(vlm, items, problems, args.on_error, args.max_new_tokens,
                             progress=lambda k: status.update(f"evaluating: {k}/{len(items)}"))
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


def cmd_calibrate(args, parse_options) -> int:
    from vtc.export.build import BuildArgs
    from vtc.export.kvquant import write_scales

    quiet_transformers()
    bargs = BuildArgs(model=args.model, method=args.method, ratio=args.ratio, method_options=parse_options(args.method_opt),
                      kv_cache="int8", calib_images=args.calib_images, calib_prompts=args.calib_prompts,
                      kv_granularity=args.kv_granularity, kv_statistic=args.kv_statistic)
    path = write_scales(Path(args.output), bargs, step)
    out.print(f"kv_scales: [bold]{path}[/] (use: vtc-export build --kv-cache int8|fp8 --kv-scales {path} "
              f"--method {args.method} --ratio ...)")
    return 0


def cmd_verify(args, _parse_options) -> int:
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


def cmd_lint(args, _parse_options) -> int:
    from vtc.export import trt_cmd

    return trt_cmd.lint(args, out)


def cmd_engine(args, _parse_options) -> int:
    from vtc.export import trt_cmd

    return trt_cmd.engine(args, out, step)


def cmd_compare(args, _parse_options) -> int:
    from vtc.export import trt_cmd

    return trt_cmd.compare(args, out, step)


def cmd_inspect(args, _parse_options) -> int:
    from vtc.export.report import print_manifest
    from vtc.runtime import manifest as mf

    m = mf.load(Path(args.artifact), check_files=True)
    if args.json:
        print(m.to_json(), end="")
    else:
        print_manifest(out, m)
    return 0


def cmd_list(args, _parse_options) -> int:
    from vtc.export.report import print_list

    print_list(out)
    return 0


def cmd_profile(args, _parse_options) -> int:
    from vtc.export.profile_cmd import cmd_profile as run_profile

    return run_profile(args, out, err)


def cmd_sweep(args, _parse_options) -> int:
    from vtc.export.profile_cmd import cmd_sweep as run_sweep

    quiet_transformers()
    return run_sweep(args, out, err)
