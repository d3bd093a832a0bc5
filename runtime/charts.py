"""PNG charts for `profile --plot` and `sweep` (matplotlib, Agg backend; optional: `pip install 'vtc[profile]'`)."""

from __future__ import annotations

from pathlib import Path

from vtc.runtime.errors import UsageError
from vtc.runtime.manifest import UNCOMPRESSED

STAGES = (("preprocess_ms", "preprocess", "#9e9e9e"), ("vit_time_ms", "vision encoder + compressor", "#4c72b0"),
          ("prefill_time_ms", "prefill", "#dd8452"), ("first_token_ms", "first token", "#8172b3"))


def pyplot():
    """matplotlib.pyplot on the Agg backend; a one-line install hint if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise UsageError("charts need matplotlib, which is not installed.",
                         "Install it: pip install 'vtc[profile]' (or pip install matplotlib).") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: dict) -> str:
    c = report["compression"]
    return (f"{Path(report['artifact']).name}: {c['method']} ratio {c['ratio']:g}, {c['k_visual']} of "
            f"{c['n_visual']} visual tokens, {report['tokens']['new_tokens']} new tokens, {len(report['runs'])} runs")


def stage_breakdown(report: dict, path: Path) -> None:
    """Left: mean TTFT split by stage, and end-to-end with decode (means add up, medians do not);
    right: each stage per run."""
    plt = pyplot()
    m = report["metrics"]
    fig, (ax, ax_runs) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    e2e = m["e2e_ms"]["mean"]
    for row in (1, 0):
        left = 0.0
        parts = [(m[k]["mean"], name, color) for k, name, color in STAGES]
        if row == 0:
            n = report["tokens"]["new_tokens"] - 1
            parts.append((e2e - m["ttft_ms"]["mean"], f"decode ({n} more tokens)", "#55a868"))
        for width, name, color in parts:
            ax.barh(row, width, left=left, color=color, label=name if row == 0 else None, edgecolor="white")
            if width > 0.06 * e2e:
                ax.text(left + width / 2, row, f"{width:.1f}", ha="center", va="center", color="white", fontsize=9)
            left += width
        ax.text(left, row, f"  {left:.1f} ms", va="center", fontsize=9)
    ax.set_yticks([0, 1], ["end-to-end", "TTFT"])
    ax.set_xlabel("milliseconds (mean over runs)")
    ax.set_xlim(0, e2e * 1.2)
    tpot = m.get("tpot_ms")
    ax.set_title(f"stage breakdown (mean); TTFT p50 {m['ttft_ms']['p50']:.1f} ms"
                 + (f", decode TPOT p50 {tpot['p50']:.2f} ms/token" if tpot else ""), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    _per_run(ax_runs, report)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_run(ax, report: dict) -> None:
    runs = report["runs"]
    x = list(range(1, len(runs) + 1))
    for key, name, color in (("ttft_ms", "TTFT", "#c44e52"), *STAGES):
        ax.plot(x, [r[key] for r in runs], marker="o", ms=3, color=color, label=name)
    ax.axhline(report["metrics"]["ttft_ms"]["p50"], color="#c44e52", ls="--", lw=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run")
    ax.set_ylabel("ms")
    ax.set_ylim(0, max(r["ttft_ms"] for r in runs) * 1.45)
    ax.set_title("per run (dashed: TTFT p50)", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center")


def sweep_chart(rows: list[dict], path: Path, title: str) -> None:
    """TTFT p50 and fidelity against kept visual tokens, one line per method (each line includes the
    uncompressed point)."""
    plt = pyplot()
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.6))
    base = [r for r in rows if r["method"] == UNCOMPRESSED and r.get("kv_cache", "fp32") == "fp32"]
    lines = sorted({(r["method"], r.get("kv_cache", "fp32")) for r in rows if r["method"] != UNCOMPRESSED}) or [(UNCOMPRESSED, "fp32")]
    several_kv = len({kv for _m, kv in lines}) > 1
    for method, kv in lines:
        pts = [r for r in rows if r["method"] == method and r.get("kv_cache", "fp32") == kv]
        pts += [r for r in rows if r["method"] == UNCOMPRESSED and r.get("kv_cache", "fp32") == kv and r not in pts]
        pts = sorted(pts or base, key=lambda r: r["k_visual"])
        label = f"{method} (KV {kv})" if several_kv else method
        ks = [r["k_visual"] for r in pts]
        ax_t.plot(ks, [r["ttft_ms_p50"] for r in pts], marker="o", label=label)
        ax_f.plot(ks, [100 * r["greedy_agreement"] for r in pts], marker="o", label=label)
    for r in base:
        ax_t.annotate("uncompressed", (r["k_visual"], r["ttft_ms_p50"]), fontsize=7, xytext=(-60, 6),
                      textcoords="offset points")
    ax_t.set(xlabel="visual tokens kept (K)", ylabel="TTFT p50 (ms)", title="time to first token")
    ax_f.set(xlabel="visual tokens kept (K)", ylabel="greedy-token agreement (%)",
             title="fidelity vs uncompressed (teacher-forced greedy tokens)")
    ax_f.set_ylim(-2, 102)
    for ax in (ax_t, ax_f):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
