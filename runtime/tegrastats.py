"""NVIDIA Jetson `tegrastats`: parse its lines, sample it in the background, summarise power and energy.

One line per interval (NVIDIA Jetson Linux Developer Guide, "tegrastats Utility"; L4T 32.5 appendix
"AppendixTegraStats"; DRIVE OS 6.0 "Reported Statistics" for the Orin-family GR3D format):

    [MM-DD-YYYY HH:MM:SS] RAM X/YMB (lfb NxZMB) SWAP X/YMB (cached ZMB) CPU [L%@F,L%@F,off,...]
    EMC_FREQ L%@F GR3D_FREQ L%@F | L%@[F,F,...] ... NAME@T.TC ... RAIL XmW/YmW RAIL XmW/YmW ...

RAM/SWAP in MB; CPU per core load % at frequency F MHz ("off" = powered down; the old form is
`CPU [L%,L%]@F`); GR3D is the integrated GPU (load %); rails: X = instantaneous power, Y = average
since tegrastats started, in mW (L4T 32 prints `RAIL X/Y` without the unit). Rails differ per module
(Orin Nano/NX: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC; AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, ...;
AGX Xavier: GPU, CPU, SOC, CV, VDDRQ, SYS5V; Thor: VDD_GPU, VDD_CPU_SOC_MSS, VIN_SYS_5V0, VIN) and a
rail can be missing from a line (sensor not readable); the parser keeps whatever each line has.

Energy per query (joules) integrates the module's input power over the query's wall time:

    E_q = integral from t_start to t_end of P_in(t) dt

where P_in(t) is the piecewise-linear interpolation of the input rail's instantaneous samples
(held constant before the first and after the last sample), so queries shorter than the sampling
interval still get an estimate. The input rail is VDD_IN, else VIN (Thor), else POM_5V_IN (Nano,
TX2); boards without one (AGX Orin, AGX Xavier) use the sum of all rails, and the report says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

import numpy as np

INPUT_RAILS = ("VDD_IN", "VIN", "POM_5V_IN")  # whole-module input, in order of preference
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}  # "X/Y" fields that are memory, or unconnected channels

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")


@dataclass
class TegraSample:
    """One tegrastats line. Fields the line lacks stay None (or empty)."""

    t_s: float = 0.0  # time.perf_counter() when the line was read
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu_load_pct: list = field(default_factory=list)  # per online core
    cpu_offline: int = 0
    gpu_load_pct: int | None = None
    gpu_freq_mhz: int | None = None
    emc_load_pct: int | None = None
    temps_c: dict = field(default_factory=dict)
    rails_mw: dict = field(default_factory=dict)  # instantaneous
    rails_avg_mw: dict = field(default_factory=dict)  # tegrastats' own running average


def parse_line(line: str, t_s: float = 0.0) -> TegraSample | None:
    """A tegrastats line -> TegraSample; None for a line with none of the known fields."""
    s = TegraSample(t_s=t_s)
    if m := _RAM.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m[1]), int(m[2])
    if m := _SWAP.search(line):
        s.swap_used_mb = int(m[1])
    if m := _CPU.search(line):
        _parse_cpu(m[1], s)
    if m := _GPU.search(line):
        s.gpu_load_pct, s.gpu_freq_mhz = int(m[1]), (int(m[2]) if m[2] else None)
    if m := _EMC.search(line):
        s.emc_load_pct = int(m[1])
    s.temps_c = {name: float(v) for name, v in _TEMP.findall(line)}
    for name, now, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            s.rails_mw[name], s.rails_avg_mw[name] = int(now), int(avg)
    known = (s.ram_used_mb, s.gpu_load_pct, s.emc_load_pct)
    if all(v is None for v in known) and not (s.rails_mw or s.cpu_load_pct or s.cpu_offline):
        return None
    return s


def _parse_cpu(body: str, s: TegraSample) -> None:
    for core in body.split(","):
        core = core.strip()
        if core == "off":
            s.cpu_offline += 1
        elif m := _CORE.fullmatch(core):
            s.cpu_load_pct.append(int(m[1]))


# -- background sampling ---------------------------------------------------------------------------
class TegrastatsSampler:
    """Runs `tegrastats --interval MS` while in the `with` block, parsing its lines in a thread.

    The process is always stopped on exit (terminate, then kill after a timeout), also on errors.
    """

    def __init__(self, executable: str, interval_ms: int = 100):
        self.executable, self.interval_ms = executable, interval_ms
        self.samples: list[TegraSample] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "TegrastatsSampler":
        # stdbuf -oL: a piped C program may block-buffer its lines; stdbuf execs it (same pid) line-buffered
        prefix = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        argv = [*prefix, self.executable, "--interval", str(self.interval_ms)]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                      text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            sample = parse_line(line, time.perf_counter())
            if sample is not None:
                self.samples.append(sample)

    def wait_for_first(self, timeout_s: float = 3.0) -> bool:
        """Block until the first line arrived (tegrastats prints its first line after one interval)."""
        deadline = time.perf_counter() + timeout_s
        while not self.samples and time.perf_counter() < deadline and self._proc and self._proc.poll() is None:
            time.sleep(0.01)
        return bool(self.samples)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if proc.stdout is not None:
            proc.stdout.close()


def find_tegrastats() -> str | None:
    return shutil.which("tegrastats")


# -- summaries --------------------------------------------------------------------------------------
def input_rail(samples: list[TegraSample]) -> str | None:
    """The whole-module input rail present in the samples, or None (then the rails are summed)."""
    seen = {name for s in samples for name in s.rails_mw}
    return next((r for r in INPUT_RAILS if r in seen), None)


def _input_power_w(samples: list[TegraSample]) -> tuple[np.ndarray, np.ndarray, str]:
    """(times [S] s, input power [S] W, basis) over the samples that carry it."""
    rail = input_rail(samples)
    if rail is not None:
        pts = [(s.t_s, s.rails_mw[rail] / 1e3) for s in samples if rail in s.rails_mw]
        basis = rail
    else:
        pts = [(s.t_s, sum(s.rails_mw.values()) / 1e3) for s in samples if s.rails_mw]
        basis = "sum of rails"
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1], basis


def energy_j(times_s: np.ndarray, power_w: np.ndarray, start_s: float, end_s: float) -> float:
    """Integral of the piecewise-linear power over [start, end] (constant beyond the samples)."""
    if times_s.size == 0 or end_s <= start_s:
        return 0.0
    inner = times_s[(times_s > start_s) & (times_s < end_s)]
    grid = np.concatenate([[start_s], inner, [end_s]])
    values = np.interp(grid, times_s, power_w)
    return float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2)


def power_report(samples: list[TegraSample], windows_s: list[tuple[float, float]], interval_ms: int) -> dict:
    """Average/peak power per rail, energy per query, utilisation and unified memory over the runs."""
    first, last = windows_s[0][0], windows_s[-1][1]
    inside = [s for s in samples if first <= s.t_s <= last] or samples
    rails: dict[str, dict] = {}
    for name in dict.fromkeys(n for s in inside for n in s.rails_mw):
        w = np.array([s.rails_mw[name] for s in inside if name in s.rails_mw], dtype=np.float64) / 1e3
        rails[name] = {"avg_w": float(w.mean()), "peak_w": float(w.max()), "samples": int(w.size)}
    times, power, basis = _input_power_w(samples)
    per_query = [energy_j(times, power, a, b) for a, b in windows_s]
    return {"source": "tegrastats", "interval_ms": interval_ms, "samples": len(inside), "rails": rails,
            "energy_basis": basis, "energy_per_query_j": _stats_or_none(per_query),
            "energy_per_query_values_j": per_query,
            "gpu_util_pct": _mean_or_none([s.gpu_load_pct for s in inside if s.gpu_load_pct is not None]),
            "cpu_util_pct": _mean_or_none([float(np.mean(s.cpu_load_pct)) for s in inside if s.cpu_load_pct]),
            "emc_util_pct": _mean_or_none([s.emc_load_pct for s in inside if s.emc_load_pct is not None]),
            "unified_memory_used_mb_peak": max((s.ram_used_mb for s in inside if s.ram_used_mb is not None), default=None),
            "unified_memory_total_mb": next((s.ram_total_mb for s in inside if s.ram_total_mb), None)}


def _mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def _stats_or_none(values: list[float]) -> dict | None:
    if not values:
        return None
    arr = np.array(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "max": float(arr.max())}


# -- power mode ------------------------------------------------------------------------------------
def _run_quiet(argv: list[str]) -> str | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def nvpmodel_mode() -> str:
    """`nvpmodel -q` -> e.g. "MAXN (0)"; "unknown" where nvpmodel is absent or fails."""
    out = _run_quiet(["nvpmodel", "-q"])
    if not out:
        return "unknown"
    m = re.search(r"NV Power Mode:\s*(.+)", out)
    ids = [ln.strip() for ln in out.splitlines() if ln.strip().isdigit()]
    if m is None:
        return "unknown"
    return m[1].strip() + (f" ({ids[0]})" if ids else "")


def jetson_clocks_state() -> str:
    """`jetson_clocks --show`: "on" when every CPU core and the GPU run with MinFreq == MaxFreq (what
    jetson_clocks pins; EMC is pinned through FreqOverride instead and is not compared), "off" when
    one does not, "unknown" where the tool is absent, fails (it needs root) or lists no clocks."""
    out = _run_quiet(["jetson_clocks", "--show"])
    if not out:
        return "unknown"
    pairs = [re.search(r"MinFreq=(\d+)\s+MaxFreq=(\d+)", ln) for ln in out.splitlines()
             if re.match(r"\s*(cpu\d+|GPU)\b", ln)]
    pairs = [m.groups() for m in pairs if m]
    if not pairs:
        return "unknown"
    return "on" if all(lo == hi for lo, hi in pairs) else "off"
