"""`vtc-export profile`: the report, its JSON/CSV/PNG files, power from a fake `tegrastats` on PATH, and
the TTFT it reports against an independent wall clock around `vtc-export run`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import pytest

from tests.helpers.jetson import fake_power_tools, fake_tegrastats
from vtc.export.cli import main
from vtc.runtime import profiler

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"
PROMPT = "What shapes are in the picture?"


@pytest.fixture(scope="module")
def art(artifact_factory) -> Path:
    return artifact_factory("mha-default", "none")  # the artifact test_runtime_isolation builds too


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_profile_library_report(art):
    calls = []
    cfg = profiler.ProfileConfig(image=str(SHAPES), prompt=PROMPT, runs=4, warmup=2, max_new_tokens=5, tegrastats=False)
    rep = profiler.profile(art, cfg, on_run=lambda i, _r: calls.append(i))
    assert calls == [-2, -1, 0, 1, 2, 3]
    m = rep["metrics"]
    for key in ("preprocess_ms", "vit_time_ms", "prefill_time_ms", "ttft_ms", "tpot_ms", "e2e_ms",
                "generation_throughput_tok_s", "prefill_throughput_tok_s", "vit_throughput_tok_s"):
        s = m[key]
        assert s["n"] == 4 and s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], key
    for r in rep["runs"]:  # TTFT is the sum of its stages; the outer wall clock covers the whole query
        assert r["ttft_ms"] == pytest.approx(r["preprocess_ms"] + r["vit_time_ms"] + r["prefill_time_ms"] + r["first_token_ms"])
        assert r["e2e_ms"] >= r["ttft_ms"] + 4 * r["tpot_ms"] * 0.99
    assert rep["tokens"]["new_tokens"] == 5 and "select_ms" not in m
    mem = rep["memory"]
    assert mem["kv_cache_allocated_bytes"] >= mem["kv_cache_used_bytes"] > mem["kv_cache_prompt_bytes"] > 0
    assert mem["peak_rss_bytes"] >= mem["rss_before_runs_bytes"] > 0
    assert rep["power"] is None
    h = rep["host"]
    assert h["backend"] == "onnxruntime" and h["execution_provider"] == "cpu" and "onnxruntime" in h["libraries"]
    assert h["nvpmodel"] == "unknown" and h["jetson_clocks"] == "unknown"


def test_profile_cli_writes_json_csv_png(capsys, tmp_path, art):
    j, c, png = tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "p.png"
    rc, out, err = cli(capsys, "profile", art, "--runs", 3, "--warmup", 1, "--max-new-tokens", 4, "--json", j,
                       "--csv", c, "--plot", png)
    assert rc == 0, err
    for text in ("TTFT", "vision encoder + compressor", "first token (sampling)", "decode TPOT", "p99",
                 "KV cache", "peak RSS", "backend: onnxruntime"):
        assert text in out, text
    rep = json.loads(j.read_text())
    assert rep["schema"] == "vtc.profile" and len(rep["runs"]) == 3 and rep["config"]["image"] == "synthetic test pattern"
    rows = list(csv.reader(c.open()))
    assert rows[0] == ["metric", "unit", "mean", "std", "p50", "p90", "p99", "min", "max"]
    assert {r[0] for r in rows} >= {"ttft_ms", "tpot_ms", "e2e_ms", "kv_cache_prompt_bytes", "peak_rss_bytes"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_profile_cli_bad_arguments(capsys, tmp_path, art):
    rc, _out, err = cli(capsys, "profile", art, "--runs", 0)
    assert rc == 2 and "--runs must be at least 1" in err and err.count("\n") == 1
    rc, _out, err = cli(capsys, "profile", tmp_path / "nope")
    assert rc != 0 and err.startswith("error:") and "does not exist" in err
    rc, _out, err = cli(capsys, "profile", art, "--json", tmp_path / "missing-dir" / "p.json")
    assert rc == 2 and "directory does not exist" in err


def test_profile_reports_power_from_fake_tegrastats(capsys, tmp_path, monkeypatch, art):
    pid_file = tmp_path / "tegrastats.pid"
    fake_tegrastats(tmp_path / "bin", "orin_nano", pid_file)
    fake_power_tools(tmp_path / "bin", mode="MAXN_SUPER", pinned=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    j = tmp_path / "p.json"
    rc, out, err = cli(capsys, "profile", art, "--runs", 3, "--warmup", 0, "--max-new-tokens", 16, "--json", j)
    assert rc == 0, err
    p = json.loads(j.read_text())["power"]
    assert p["energy_basis"] == "VDD_IN" and p["samples"] >= 1
    assert set(p["rails"]) >= {"VDD_IN", "VDD_SOC"}
    assert 6.0 <= p["rails"]["VDD_IN"]["avg_w"] <= p["rails"]["VDD_IN"]["peak_w"] <= 9.2
    e = p["energy_per_query_j"]
    walls = [r["end_s"] - r["start_s"] for r in json.loads(j.read_text())["runs"]]
    assert 6.0 * min(walls) * 0.99 <= e["p50"] <= 9.12 * max(walls) * 1.01  # between min and max VDD_IN x time
    assert p["gpu_util_pct"] is not None and p["unified_memory_used_mb_peak"] >= 2617
    for text in ("tegrastats every", "VDD_IN", "energy per query (VDD_IN)", "J", "utilisation",
                 "nvpmodel MAXN_SUPER (0)", "jetson_clocks on", "unified memory"):
        assert text in out, text
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # tegrastats was stopped


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ttft_agrees_with_wall_clock_of_run(capsys, art, monkeypatch):
    """Acceptance 4 on a tiny artifact (milliseconds: the machine's noise dominates, so the tolerance is
    loose here; tools/ttft_check.py makes the 10% comparison on the demo/bench artifacts).

    Paired and robust: within one `vtc-export run --max-new-tokens 1` call, the TTFT the pipeline reports
    (which the profiler aggregates) matches a stopwatch around `VLM.generate`."""
    from vtc.runtime import pipeline

    walls, generate = [], pipeline.VLM.generate

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(self, *a, **kw)
        finally:
            walls.append((time.perf_counter() - t0) * 1e3)

    monkeypatch.setattr(pipeline.VLM, "generate", timed)
    reported = []
    for _ in range(5):
        rc, out, err = cli(capsys, "run", art, "--image", SHAPES, "--prompt", PROMPT, "--max-new-tokens", 1, "--json")
        assert rc == 0, err
        reported.append(json.loads(out)["timings_ms"]["ttft"])
    diffs = [w - t for w, t in zip(walls, reported)]
    assert all(d >= -0.01 for d in diffs)  # the stopwatch encloses the reported TTFT
    assert statistics.median(diffs) <= 0.1 * statistics.median(walls) + 1.0
    monkeypatch.undo()
    # The 10% comparison itself (tools/ttft_check.py: real commands in their own processes, a one-shot
    # `run` being a cold first query) depends on the machine's load; here only that the tool works.
    r = _load_tool("ttft_check").measure(art, blocks=1, per_block=2, image=SHAPES, prompt=PROMPT)
    assert len(r["run_walls_ms"]) == len(r["profile_ttfts_ms"]) == 2
    assert min(r["run_walls_ms"] + r["profile_ttfts_ms"]) > 0 and r["profile_cold_ttft_median_ms"] > 0
    assert r["paired_wall_minus_reported_ms"] >= 0  # the stopwatch encloses what `run` reports


def test_plot_without_matplotlib_fails_first_with_install_hint(capsys, monkeypatch, tmp_path, art):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    rc, out, err = cli(capsys, "profile", art, "--plot", tmp_path / "p.png")
    assert rc == 2 and err.count("\n") == 1 and "pip install 'vtc[profile]'" in err
    assert out == "" and not (tmp_path / "p.png").exists()  # failed before any run


def test_nvml_gpu_memory_through_pynvml_when_importable(monkeypatch):
    """No GPU here: a stand-in `pynvml` module exercises the NVML path (device-wide and this process)."""
    import sys
    import types

    from vtc.runtime import hostinfo

    proc = types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=512 * 2**20)
    other = types.SimpleNamespace(pid=1, usedGpuMemory=2**30)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}", nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30, used=3 * 2**30),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc, other])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hostinfo.gpus() == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * 2**30,
                                "memory_used_bytes": 3 * 2**30, "process_memory_bytes": 512 * 2**20}]
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert hostinfo.gpus() == []
