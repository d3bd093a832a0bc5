"""Terminal output for `inspect`, `list`, `verify` and `lint` (rich tables)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vtc.runtime.units import format_bytes


def print_manifest(console, m, digest: str | None = None, hashes_checked: bool = False) -> None:
    """`inspect`: the manifest (already validated by vtc.runtime.manifest.load) and, when given, the artifact
    digest (sha256 of manifest.json: pin it to pin the whole artifact). Every value taken from the manifest
    is printed as text, never as rich markup; informational fields of any shape print without failing."""
    c, t, kv = m.compression, m.text, m.kv_cache
    e = _esc
    console.print(f"[bold]{e(m.model.architecture)}[/] from {e(m.model.source)}"
                  + ("  [yellow](built-in demo model)[/]" if m.model.demo else ""))
    if digest is not None:
        console.print(f"artifact digest: sha256:{digest} [dim](of manifest.json; "
                      f"{'every file sha256-checked' if hashes_checked else 'file sizes checked, --verify-hashes for sha256'})[/]")
    console.print(f"compression: {e(c.method)} ratio {c.ratio:g} -> {c.k_visual} of {c.n_visual} visual tokens "
                  f"(grid {c.grid[0]}x{c.grid[1]}) options {e(_short(c.options))}")
    console.print(f"text budget {t.budget} tokens, max sequence {t.max_seq_len}; KV cache {e(kv.dtype)}: "
                  f"{kv.bytes_per_token} B/token, {format_bytes(kv.bytes_total, 'MiB')} at max length")
    if kv.scales:
        console.print(f"KV scales: {e(kv.scales)} ({e(kv.scale_source)}); layers kept fp16: {kv.fallback_layers or 'none'}")
    if kv.accuracy:
        a = kv.accuracy
        console.print(f"KV accuracy vs float32 KV ({e(_fmt(a.get('pairs')))} held-out pairs, {e(_fmt(a.get('new_tokens')))} "
                      f"tokens): logits cosine median {_fmt(a.get('logits_cosine_median'), '.6f')} (min "
                      f"{_fmt(a.get('logits_cosine_min'), '.6f')}); greedy agreement "
                      f"{_fmt(_scaled(a.get('greedy_agreement_mean'), 100), '.1f')}%, identical sequences "
                      f"{e(_fmt(a.get('greedy_sequences_identical')))}")
    text = m.parity.get("text_tokens") if isinstance(m.parity, dict) else None
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text <= t.budget:
        text = t.budget  # the parity report is informational: a bad entry falls back to the budget
    used, full = prompt_kv_bytes(m, text)
    console.print(f"KV after prefill of a {text}-token prompt (the build's parity prompt): {format_bytes(used, 'KiB')}; "
                  f"the same prompt uncompressed with an fp16 cache: {format_bytes(full, 'KiB')} ({100 * used / full:.1f}%)")
    table = Table(title="graphs", show_lines=False)
    for col in ("graph", "file", "inputs", "outputs"):
        table.add_column(col)
    for name, g in m.graphs.items():
        fmt = lambda ts: "\n".join(f"{x.name} {x.dtype}{x.shape}" for x in ts[:6]) + ("\n..." if len(ts) > 6 else "")
        table.add_row(Text(name), Text(g.file), Text(fmt(g.inputs)), Text(fmt(g.outputs)))
    console.print(table)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, meta in m.files.items():
        files.add_row(Text(name), format_bytes(meta["bytes"], "MiB"), meta["sha256"][:16])
    console.print(files)
    if m.parity:
        print_parity(console, m.parity)
    console.print(Text(f"built {_short(m.created_utc, 80)} by vtc {_short(m.vtc_version, 40)}; build args "
                       f"{_short(m.build_args, 2000)}"))


def prompt_kv_bytes(m, text_tokens: int) -> tuple[int, int]:
    """(bytes this artifact's cache holds after prefilling `text_tokens` + its visual tokens,
    bytes of an uncompressed fp16 cache for the same prompt)."""
    from vtc.runtime.kv_cache import storage_dtype

    per_pos = 2 * m.lm.num_kv_heads * m.lm.head_dim  # K and V elements per layer per position
    used = sum(per_pos * storage_dtype(d).itemsize * (text_tokens + v)
               for d, v in zip(m.kv_cache.layer_dtypes, m.compression.kv_visual_per_layer))
    full = per_pos * 2 * m.lm.num_layers * (text_tokens + m.compression.n_visual)
    return used, full


def print_parity(console, report: dict) -> None:
    """A parity report (the build's, in the manifest, or `verify`'s); malformed entries print as '?'."""
    report = report if isinstance(report, dict) else {}
    table = Table(title=f"parity vs PyTorch ({_fmt(report.get('new_tokens'))} greedy tokens)")
    for col in ("graph", "max-abs", "tolerance", "cosine", "ok"):
        table.add_column(col)
    graphs = report.get("graphs")
    for name, r in (graphs.items() if isinstance(graphs, dict) else ()):
        r = r if isinstance(r, dict) else {}
        table.add_row(Text(str(name)), _fmt(r.get("max_abs"), ".2e"), _fmt(r.get("tolerance_max_abs"), ".1e"),
                      _fmt(r.get("cosine"), ".7f"), "[green]yes[/]" if r.get("ok") is True else "[red]NO[/]")
    console.print(table)
    tok = report.get("greedy_tokens")
    tok = tok if isinstance(tok, dict) else {}
    status = "equal" if tok.get("equal") is True else (f"differ from step {_fmt(tok.get('first_mismatch'))}"
                                                        + (" (near-tie in the reference)" if tok.get("near_tie") else ""))
    console.print(Text(f"greedy tokens: {status}"))
    scope = report.get("scope")
    if isinstance(scope, dict) and scope.get("llm") not in (None, "full"):
        console.print(Text(f"checked: vision {_short(scope.get('vision'), 40)}; LLM {_short(scope.get('llm'), 300)}"))
    if report.get("reference"):
        console.print(Text(f"reference: {_short(report.get('reference'), 200)}"))


def _esc(value) -> str:
    """Manifest text inside a rich markup string: shown as is, never interpreted."""
    return escape(_short(value, 400))


def _short(value, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fmt(value, spec: str = "") -> str:
    """A number formatted with `spec`; anything else (informational fields of any shape) as short text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
        try:
            return format(value, spec)
        except (ValueError, OverflowError):
            pass
    return "?" if value is None else _short(value, 40)


def _scaled(value, factor: float):
    return value * factor if isinstance(value, (int, float)) and not isinstance(value, bool) else value


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
    if verbose:
        for f in report.findings:
            color = "red" if f.level == "error" else "yellow"
            console.print(f"  [{color}]{f.level}[/] {f.line()}", highlight=False)
            if f.source:
                console.print(f"      [dim]source: {f.source}[/]", highlight=False)
        return
    # one line per distinct error (an int4 graph has the same finding on every quantized MatMul)
    groups: dict[tuple, list] = {}
    for f in report.errors:
        groups.setdefault((f.graph, f.op, f.message), []).append(f.node)
    for (graph, op, message), nodes in groups.items():
        if len(nodes) == 1:
            where = f"node {nodes[0]!r} ({op})"
        else:
            shown = ", ".join(repr(n) for n in nodes[:2])
            where = f"{len(nodes)} {op} nodes ({shown}{', ...' if len(nodes) > 2 else ''})"
        console.print(f"  [red]error[/] {graph}: {where}: {message}", highlight=False)
    if any(len(n) > 1 for n in groups.values()):
        console.print("  [dim]`vtc-export lint DIR` lists every node and the rule's source.[/]", highlight=False)
