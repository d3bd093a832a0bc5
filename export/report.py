"""Terminal output for `inspect`, `list`, `verify` and `lint` (rich tables)."""

from __future__ import annotations

from rich.table import Table

from vtc.runtime.units import format_bytes


def print_manifest(console, m) -> None:
    c, t, kv = m.compression, m.text, m.kv_cache
    console.print(f"[bold]{m.model.architecture}[/] from {m.model.source}" + ("  [yellow](built-in demo model)[/]" if m.model.demo else ""))
    console.print(f"compression: {c.method} ratio {c.ratio:g} -> {c.k_visual} of {c.n_visual} visual tokens "
                  f"(grid {c.grid[0]}x{c.grid[1]}) options {c.options}")
    console.print(f"text budget {t.budget} tokens, max sequence {t.max_seq_len}; KV cache {kv.dtype}: "
                  f"{kv.bytes_per_token} B/token, {format_bytes(kv.bytes_total, 'MiB')} at max length")
    if kv.scales:
        console.print(f"KV scales: {kv.scales} ({kv.scale_source}); layers kept fp16: {kv.fallback_layers or 'none'}")
    if kv.accuracy:
        a = kv.accuracy
        console.print(f"KV accuracy vs float32 KV ({a['pairs']} held-out pairs, {a['new_tokens']} tokens): logits cosine "
                      f"median {a['logits_cosine_median']:.6f} (min {a['logits_cosine_min']:.6f}); greedy agreement "
                      f"{100 * a['greedy_agreement_mean']:.1f}%, identical sequences {a['greedy_sequences_identical']}")
    text = m.parity.get("text_tokens", t.budget) if m.parity else t.budget
    used, full = prompt_kv_bytes(m, text)
    console.print(f"KV after prefill of a {text}-token prompt (the build's parity prompt): {format_bytes(used, 'KiB')}; "
                  f"the same prompt uncompressed with an fp16 cache: {format_bytes(full, 'KiB')} ({100 * used / full:.1f}%)")
    table = Table(title="graphs", show_lines=False)
    for col in ("graph", "file", "inputs", "outputs"):
        table.add_column(col)
    for name, g in m.graphs.items():
        fmt = lambda ts: "\n".join(f"{x.name} {x.dtype}{x.shape}" for x in ts[:6]) + ("\n..." if len(ts) > 6 else "")
        table.add_row(name, g.file, fmt(g.inputs), fmt(g.outputs))
    console.print(table)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, meta in m.files.items():
        files.add_row(name, format_bytes(meta["bytes"], "MiB"), meta["sha256"][:16])
    console.print(files)
    if m.parity:
        print_parity(console, m.parity)
    console.print(f"built {m.created_utc} by vtc {m.vtc_version}; build args {m.build_args}")


def prompt_kv_bytes(m, text_tokens: int) -> tuple[int, int]:
    """(bytes this artifact's cache holds after prefilling `text_tokens` + its visual tokens,
    bytes of an uncompressed fp16 cache for the same prompt)."""
    itemsize = {"float32": 4, "float16": 2, "int8": 1, "float8_e4m3fn": 1}
    per_pos = 2 * m.lm.num_kv_heads * m.lm.head_dim  # K and V elements per layer per position
    used = sum(per_pos * itemsize[d] * (text_tokens + v)
               for d, v in zip(m.kv_cache.layer_dtypes, m.compression.kv_visual_per_layer))
    full = per_pos * 2 * m.lm.num_layers * (text_tokens + m.compression.n_visual)
    return used, full


def print_parity(console, report: dict) -> None:
    table = Table(title=f"parity vs PyTorch ({report['new_tokens']} greedy tokens)")
    for col in ("graph", "max-abs", "tolerance", "cosine", "ok"):
        table.add_column(col)
    for name, r in report["graphs"].items():
        table.add_row(name, f"{r['max_abs']:.2e}", f"{r['tolerance_max_abs']:.1e}", f"{r['cosine']:.7f}",
                      "[green]yes[/]" if r["ok"] else "[red]NO[/]")
    console.print(table)
    tok = report["greedy_tokens"]
    status = "equal" if tok["equal"] else (f"differ from step {tok['first_mismatch']}"
                                            + (" (near-tie in the reference)" if tok.get("near_tie") else ""))
    console.print(f"greedy tokens: {status}")


def print_list(console) -> None:
    from vtc.export import methods, models

    arch = Table(title="architectures")
    arch.add_column("model_type")
    arch.add_column("name")
    for mt, name in models.supported().items():
        arch.add_row(mt, name)
    for mt, name in models.PLANNED.items():
        arch.add_row(f"[dim]{mt}[/]", f"[dim]{name} (planned)[/]")
    console.print(arch)
    tab = Table(title="compression methods (--method)")
    for col in ("name", "where", "reads prompt", "options (default)", "paper / reference", "what it does"):
        tab.add_column(col)
    for m in methods.all_methods():
        opts = ", ".join(f"{o.name}={o.default}" for o in m.options) or "-"
        tab.add_row(m.name, m.where, "yes" if m.reads_prompt else "no", opts,
                    "\n".join(x for x in (m.paper, m.reference) if x and x != "-") or "-", m.summary)
    console.print(tab)


def print_lint(console, report, verbose: bool = False) -> None:
    """A vtc.export.lint report: the verdict line, then the errors (verbose: every finding and its source)."""
    src = report.source
    status = "[green]ok[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    console.print(f"TensorRT {report.tensorrt_version} lint of {', '.join(report.graphs)}: {status}, "
                  f"{len(report.warnings)} warning(s) [dim](rules: {src['repository']} {src['path']} @ "
                  f"{src['commit'][:12]})[/]")
    for f in report.findings if verbose else report.errors:
        color = "red" if f.level == "error" else "yellow"
        console.print(f"  [{color}]{f.level}[/] {f.line()}", highlight=False)
        if verbose and f.source:
            console.print(f"      [dim]source: {f.source}[/]", highlight=False)
