"""Latency, memory and (on Jetson) power profile of one artifact: `vtc-export profile DIR`.

Each measured run is one query, generated exactly as `vtc-export run` does (the same VLM, prompt
template and image preprocessing; greedy), but always `max_new_tokens` tokens long (EOS ignored) so
that every run decodes the same number of tokens. Per run (milliseconds unless noted):

    preprocess_ms            prompt tokenization + image preprocessing (the image is decoded once, as `run` does)
    vit_time_ms              vision graph: encoder + projector + compressor ("ViT time")
    prefill_time_ms          LLM prefill incl. sampling the first token (and an in-LLM selection, `select_ms`)
    ttft_ms                  preprocess + vision + prefill: time to first token
    tpot_ms                  mean decode step after the first token (time per output token)
    decode_backend_ms        of which inside the backend's own inference calls (GraphSession.seconds)
    runtime_overhead_pct     100 * (tpot - decode_backend) / tpot
    generation_throughput_tok_s   1000 / tpot                         ("Generation throughput")
    prefill_throughput_tok_s      prompt tokens (text + K visual) / prefill seconds ("Prefill throughput")
    vit_throughput_tok_s          N visual tokens the encoder sees / vision seconds ("ViT throughput")
    e2e_ms                   wall clock of the whole query, measured outside the pipeline

`cold_start.ttft_ms`: the first query after opening the artifact (the first warm-up run, stopped at
its first token), by the outer wall clock: what a one-shot `vtc-export run` sees. Not in the stats.

and over the runs: mean, std (sample), p50, p90, p99 (linear interpolation), min, max. Names follow
TensorRT Edge-LLM's benchmark terms where it has one ("Prefill time", "Prefill throughput",
"Generation throughput", "ViT time", "ViT throughput", "GPU memory"; NVIDIA/TensorRT-Edge-LLM
user_guide/performance/performance-benchmarks).

Memory: the KV cache (allocated at max_seq_len; holding the prompt; at the end of a run), the
process's peak RSS (getrusage: since the process started), the RSS before the runs and its peak during
them (/proc/self/status VmHWM after resetting it), GPU memory per NVML device when `pynvml` is
installed, and on Jetson the unified memory in use (tegrastats RAM). Power: see vtc.runtime.tegrastats.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from vtc.runtime import hostinfo, tegrastats
from vtc.runtime.errors import UsageError

SCHEMA = "vtc.profile"
SCHEMA_VERSION = 1
DEFAULT_PROMPT = "What shapes do you see in the picture?"

# key -> (label, unit); the order is the table's
METRICS = {
    "preprocess_ms": ("preprocess", "ms"),
    "vit_time_ms": ("vision encoder + compressor (ViT time)", "ms"),
    "prefill_time_ms": ("prefill", "ms"),
    "select_ms": ("  of which in-LLM selection", "ms"),
    "first_token_ms": ("first token (sampling)", "ms"),
    "ttft_ms": ("TTFT", "ms"),
    "tpot_ms": ("decode TPOT", "ms/token"),
    "decode_backend_ms": ("  of which in the backend", "ms/token"),
    "runtime_overhead_pct": ("runtime overhead (decode)", "%"),
    "generation_throughput_tok_s": ("generation throughput", "tok/s"),
    "prefill_throughput_tok_s": ("prefill throughput", "tok/s"),
    "vit_throughput_tok_s": ("ViT throughput", "tok/s"),
    "e2e_ms": ("end-to-end", "ms"),
}
STATS = ("mean", "std", "p50", "p90", "p99", "min", "max")


@dataclass(frozen=True)
class ProfileConfig:
    image: str | None = None  # None = a synthetic test pattern (the same every time)
    prompt: str = DEFAULT_PROMPT
    raw: bool = False
    runs: int = 10
    warmup: int = 1
    max_new_tokens: int = 32
    threads: int | None = None  # ONNX Runtime intra-op threads; None = its default
    tegrastats: bool = True  # sample tegrastats during the runs when it is on PATH
    tegrastats_interval_ms: int = 100

    def check(self) -> None:
        for name, v, low in (("--runs", self.runs, 1), ("--warmup", self.warmup, 0),
                             ("--max-new-tokens", self.max_new_tokens, 1)):
            if v < low:
                raise UsageError(f"{name} must be at least {low} (got {v}).", f"Pass {name} {max(low, 1)} or more.")


def open_artifact(artifact_dir: Path, cfg: ProfileConfig) -> tuple:
    """(VLM, image): loads and checks everything a profile needs (artifact, image, prompt, room)."""
    from vtc.runtime.backend import get_backend
    from vtc.runtime.images import shapes_image
    from vtc.runtime.pipeline import VLM
    from vtc.runtime.preprocess import load_image

    vlm = VLM(Path(artifact_dir), backend=get_backend(threads=cfg.threads))
    image = load_image(cfg.image) if cfg.image else shapes_image()  # the PATTERN test image
    prompt = vlm.prepare_prompt(cfg.prompt, cfg.raw)  # fails here, once, on a bad prompt
    vlm.check_room(prompt, cfg.max_new_tokens)
    return vlm, image


def run_query(vlm, image, cfg: ProfileConfig) -> dict:
    """One query; its timings (ms) and token counts, plus its wall-clock window (perf_counter seconds)."""
    t0 = time.perf_counter()
    prompt = vlm.prepare_prompt(cfg.prompt, cfg.raw)
    pixels = vlm.prepare_image(image)
    t1 = time.perf_counter()
    res = vlm.generate_from(pixels, prompt, cfg.max_new_tokens, preprocess_ms=(t1 - t0) * 1e3, ignore_eos=True)
    t2 = time.perf_counter()
    return {"start_s": t0, "end_s": t2, "timings_ms": dict(res.timings_ms), "e2e_ms": (t2 - t0) * 1e3,
            "prompt_tokens": res.prompt_tokens, "new_tokens": len(res.token_ids),
            "kv_used_bytes": int(vlm.cache.bytes_used())}


def run_metrics(run: dict, n_visual: int, stage: str) -> dict:
    """One run's metrics (see the module docstring); decode metrics only when it decoded."""
    t = run["timings_ms"]
    out = {"preprocess_ms": t["preprocess"], "vit_time_ms": t["vision"], "prefill_time_ms": t["prefill"],
           "first_token_ms": t["first_token"], "ttft_ms": t["ttft"], "e2e_ms": run["e2e_ms"],
           "prefill_throughput_tok_s": run["prompt_tokens"] / (t["prefill"] / 1e3) if t["prefill"] > 0 else None,
           "vit_throughput_tok_s": n_visual / (t["vision"] / 1e3) if t["vision"] > 0 else None}
    if stage == "llm":
        out["select_ms"] = t["select"]
    if run["new_tokens"] > 1 and t["decode_per_token"] > 0:
        tpot = t["decode_per_token"]
        out.update(tpot_ms=tpot, decode_backend_ms=t["decode_backend_per_token"],
                   runtime_overhead_pct=100 * (tpot - t["decode_backend_per_token"]) / tpot,
                   generation_throughput_tok_s=1e3 / tpot)
    return out


def summarize(values: list[float]) -> dict:
    """mean, std (sample; 0 for one run), p50, p90, p99, min, max."""
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def profile(artifact_dir: Path, cfg: ProfileConfig = ProfileConfig(),
            on_run: Callable[[int, dict], None] | None = None, opened: tuple | None = None) -> dict:
    """Warm up, run cfg.runs measured queries (sampling tegrastats around them on Jetson), report.

    `on_run(i, run)` is called after every query (warm-up runs have i < 0), e.g. for progress display;
    `opened` is `open_artifact`'s result when the caller opened the artifact first.
    """
    cfg.check()
    vlm, image = opened or open_artifact(artifact_dir, cfg)
    cold = None
    for i in range(cfg.warmup):  # the first warm-up query stops at the first token: the cold TTFT
        run = run_query(vlm, image, replace(cfg, max_new_tokens=1) if i == 0 else cfg)
        if i == 0:
            cold = {"ttft_ms": run["e2e_ms"], "ttft_pipeline_ms": run["timings_ms"]["ttft"]}
        if on_run:
            on_run(i - cfg.warmup, run)
    runs, power, mem = _measured_runs(vlm, image, cfg, on_run)
    report = build_report(Path(artifact_dir), vlm, cfg, runs, power, mem)
    report["cold_start"] = cold
    report["load_ms"] = vlm.load_ms  # opening the artifact (file size checks, sessions), before any query
    return report


def _measured_runs(vlm, image, cfg: ProfileConfig, on_run) -> tuple[list[dict], dict | None, dict]:
    """(runs, power report or None, process memory facts around the runs)."""
    exe = tegrastats.find_tegrastats() if cfg.tegrastats else None
    sampler = tegrastats.TegrastatsSampler(exe, cfg.tegrastats_interval_ms) if exe else None
    mem = {"hwm_reset": hostinfo.reset_hwm(), "rss_before_runs_bytes": hostinfo.rss_bytes()}
    runs: list[dict] = []
    with sampler if sampler is not None else contextlib.nullcontext():  # always stops tegrastats
        if sampler is not None:
            sampler.wait_for_first()
        for i in range(cfg.runs):
            runs.append(run_query(vlm, image, cfg))
            if on_run:
                on_run(i, runs[-1])
        if sampler is not None:
            time.sleep(cfg.tegrastats_interval_ms / 1e3)  # one more sample after the last query ends
    mem["hwm_after_bytes"] = hostinfo.hwm_bytes()
    return runs, _power(sampler, runs, cfg), mem


def _power(sampler, runs: list[dict], cfg: ProfileConfig) -> dict | None:
    if sampler is None:
        return None
    if not sampler.samples:
        return {"source": "tegrastats", "samples": 0, "error": "tegrastats printed no parsable line"}
    windows = [(r["start_s"], r["end_s"]) for r in runs]
    return tegrastats.power_report(sampler.samples, windows, cfg.tegrastats_interval_ms)


def memory_report(vlm, runs: list[dict], power: dict | None, mem: dict) -> dict:
    m = vlm.manifest
    per_layer_token = m.kv_cache.bytes_per_token // m.lm.num_layers
    text = runs[0]["prompt_tokens"] - m.compression.k_visual
    prompt_kv = sum(per_layer_token * (text + v) for v in m.compression.kv_visual_per_layer)
    before, hwm = mem["rss_before_runs_bytes"], mem["hwm_after_bytes"]
    during = hwm if mem["hwm_reset"] else None
    return {"kv_cache_allocated_bytes": int(vlm.cache.nbytes), "kv_cache_prompt_bytes": int(prompt_kv),
            "kv_cache_used_bytes": int(max(r["kv_used_bytes"] for r in runs)),
            # getrusage's maximum can trail the current RSS by a few pages: take the larger
            "peak_rss_bytes": max(hostinfo.peak_rss_bytes(), hwm or 0, before or 0), "rss_before_runs_bytes": before,
            "peak_rss_during_runs_bytes": during,
            "rss_increase_during_runs_bytes": (during - before) if during is not None and before is not None else None,
            "gpus": hostinfo.gpus(),
            "unified_memory_used_mb_peak": (power or {}).get("unified_memory_used_mb_peak"),
            "unified_memory_total_mb": (power or {}).get("unified_memory_total_mb")}


def build_report(artifact_dir: Path, vlm, cfg: ProfileConfig, runs: list[dict], power: dict | None,
                 mem: dict) -> dict:
    m, c = vlm.manifest, vlm.manifest.compression
    per_run = [run_metrics(r, c.n_visual, c.stage) for r in runs]
    metrics = {}
    for key in METRICS:
        values = [pr[key] for pr in per_run if pr.get(key) is not None]
        if values:
            metrics[key] = {"label": METRICS[key][0].strip(), "unit": METRICS[key][1], **summarize(values)}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created_utc": _now(),
            "artifact": str(artifact_dir), "demo": m.model.demo,
            "model": {"architecture": m.model.architecture, "source": m.model.source},
            "compression": {"method": c.method, "ratio": c.ratio, "n_visual": c.n_visual, "k_visual": c.k_visual,
                            "stage": c.stage},
            "config": {**asdict(cfg), "image": cfg.image or "synthetic test pattern"},
            "tokens": {"prompt_tokens": runs[0]["prompt_tokens"], "new_tokens": runs[0]["new_tokens"]},
            "metrics": metrics, "memory": memory_report(vlm, runs, power, mem), "power": power,
            "host": hostinfo.host_facts(vlm.backend),
            "runs": [{**pr, "start_s": r["start_s"], "end_s": r["end_s"]} for pr, r in zip(per_run, runs)]}


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- files -------------------------------------------------------------------------------------------
def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def csv_rows(report: dict) -> list[list]:
    """metric, unit, mean, std, p50, p90, p99, min, max; single values (memory, power) fill `mean`."""
    rows = [["metric", "unit", *STATS]]
    for key, s in report["metrics"].items():
        rows.append([key, s["unit"], *(round(s[k], 4) for k in STATS)])
    for key, v in report["memory"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append([key, "MB" if key.endswith("_mb") or "_mb_" in key else "bytes", v] + [""] * 6)
    power = report.get("power") or {}
    for rail, s in power.get("rails", {}).items():
        rows.append([f"power_{rail}_avg_w", "W", round(s["avg_w"], 4)] + [""] * 3 + ["", "", round(s["peak_w"], 4)])
    if power.get("energy_per_query_j"):
        e = power["energy_per_query_j"]
        rows.append(["energy_per_query_j", "J", round(e["mean"], 6), "", round(e["p50"], 6), "", "", "", round(e["max"], 6)])
    return rows


def write_csv(report: dict, path: Path) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(report))
    Path(path).write_text(buf.getvalue())
