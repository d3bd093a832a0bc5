"""The tegrastats parser on Orin, Xavier and Thor line formats (fixtures/tegrastats, written from NVIDIA's
documented format; see its README), energy integration, the background sampler and the power-mode probes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tests.helpers.jetson import fake_power_tools, fake_tegrastats, fixture_lines
from vtc.runtime import tegrastats as ts


def parse_all(name: str) -> list[ts.TegraSample]:
    samples = [ts.parse_line(ln, t_s=float(i)) for i, ln in enumerate(fixture_lines(name))]
    assert all(s is not None for s in samples)
    return samples


def test_orin_nano_fields_and_missing_rail():
    s0, _s1, s2, _s3 = parse_all("orin_nano")
    assert (s0.ram_used_mb, s0.ram_total_mb, s0.swap_used_mb) == (2617, 7620, 0)
    assert s0.cpu_load_pct == [12, 8, 5, 3] and s0.cpu_offline == 2
    assert (s0.gpu_load_pct, s0.gpu_freq_mhz, s0.emc_load_pct) == (61, 624, 4)
    assert s0.rails_mw == {"VDD_IN": 7342, "VDD_CPU_GPU_CV": 2614, "VDD_SOC": 1802}
    assert s0.rails_avg_mw["VDD_IN"] == 6811
    assert s0.temps_c["tj"] == 52.5 and s0.temps_c["gpu"] == pytest.approx(51.406)
    assert s2.rails_mw == {"VDD_IN": 8760, "VDD_SOC": 1990}  # VDD_CPU_GPU_CV missing on that line
    assert ts.input_rail(parse_all("orin_nano")) == "VDD_IN"


def test_agx_orin_multi_gpc_unconnected_channels_and_no_rails():
    s0, s1, s2 = parse_all("agx_orin")
    assert len(s0.cpu_load_pct) == 12 and s0.cpu_offline == 0
    assert (s1.gpu_load_pct, s1.gpu_freq_mhz) == (92, 1300)
    assert set(s0.rails_mw) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}  # NC dropped
    assert "RAM" not in s0.rails_mw and "SWAP" not in s0.rails_mw
    assert s2.rails_mw == {} and s2.ram_used_mb == 5190 and s2.gpu_load_pct == 90  # every rail missing
    assert s0.temps_c["CV0"] == -256.0
    assert ts.input_rail([s0, s1, s2]) is None  # no whole-module input rail: energy uses the sum


def test_xavier_l4t32_rails_without_units():
    s0, s1, s2 = parse_all("xavier_nx_l4t32")
    assert s0.rails_mw == {"VDD_IN": 3706, "VDD_CPU_GPU_CV": 542, "VDD_SOC": 1125}
    assert s1.rails_avg_mw == {"VDD_IN": 5315, "VDD_CPU_GPU_CV": 1730, "VDD_SOC": 1328}
    assert (s1.gpu_load_pct, s1.gpu_freq_mhz) == (76, 1109)
    assert s0.cpu_load_pct == [6, 4] and s0.cpu_offline == 4
    assert "VDD_SOC" not in s2.rails_mw and s2.rails_mw["VDD_IN"] == 6610
    assert s0.temps_c["thermal"] == 36.4


def test_agx_xavier_short_rail_names():
    s0, s1 = parse_all("agx_xavier")
    assert s0.rails_mw == {"GPU": 2328, "CPU": 1164, "SOC": 1552, "CV": 0, "VDDRQ": 465, "SYS5V": 2474}
    assert len(s0.cpu_load_pct) == 8 and s0.temps_c["GPU"] == 41.0  # GPU@41C is a temperature, GPU 2328mW a rail
    assert s1.gpu_load_pct == 95


def test_thor_rails_input_and_missing_vin():
    s0, s1, s2 = parse_all("thor")
    assert s0.rails_mw == {"VDD_GPU": 9212, "VDD_CPU_SOC_MSS": 6510, "VIN_SYS_5V0": 6520, "VIN": 28410}
    assert len(s1.cpu_load_pct) == 14 and s1.gpu_load_pct == 91 and s1.gpu_freq_mhz == 1575
    assert "VIN" not in s2.rails_mw
    assert ts.input_rail([s0, s1, s2]) == "VIN"


def test_unrelated_lines_are_not_samples():
    assert ts.parse_line("") is None
    assert ts.parse_line("tegrastats: unrecognized option '--foo'") is None


def test_energy_integral():
    t, p = np.array([0.0, 1.0, 2.0]), np.array([5.0, 5.0, 5.0])
    assert ts.energy_j(t, p, 0.5, 1.5) == pytest.approx(5.0)
    ramp = np.array([0.0, 10.0, 20.0])
    assert ts.energy_j(t, ramp, 0.0, 2.0) == pytest.approx(20.0)  # trapezoid of a linear ramp is exact
    assert ts.energy_j(t, ramp, 0.25, 0.75) == pytest.approx(5.0 * 0.5)  # between two samples: interpolated
    assert ts.energy_j(t, p, 3.0, 4.0) == pytest.approx(5.0)  # after the last sample: held
    assert ts.energy_j(t, p, 1.0, 1.0) == 0.0


def test_power_report_averages_peaks_and_energy():
    samples = parse_all("thor")  # t = 0, 1, 2 s; VIN only at 0 and 1
    rep = ts.power_report(samples, [(0.0, 1.0), (0.0, 2.0)], interval_ms=1000)
    assert rep["energy_basis"] == "VIN"
    assert rep["rails"]["VIN"] == {"avg_w": pytest.approx((28.41 + 45.23) / 2), "peak_w": pytest.approx(45.23),
                                   "samples": 2}
    assert rep["rails"]["VDD_GPU"]["samples"] == 3
    e1, e2 = rep["energy_per_query_values_j"]
    assert e1 == pytest.approx((28.41 + 45.23) / 2)  # 1 s under the ramp
    assert e2 == pytest.approx(e1 + 45.23)  # VIN held at its last sample for the second second
    assert rep["gpu_util_pct"] == pytest.approx((38 + 91 + 89) / 3)
    assert rep["unified_memory_used_mb_peak"] == 9210 and rep["unified_memory_total_mb"] == 125772


def test_power_report_sums_rails_without_input_rail():
    samples = parse_all("agx_xavier")
    rep = ts.power_report(samples, [(0.0, 1.0)], interval_ms=1000)
    assert rep["energy_basis"] == "sum of rails"
    s0 = (2328 + 1164 + 1552 + 0 + 465 + 2474) / 1e3
    s1 = (5432 + 1552 + 1940 + 0 + 776 + 2668) / 1e3
    assert rep["energy_per_query_values_j"][0] == pytest.approx((s0 + s1) / 2)


def test_sampler_collects_and_always_stops(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    exe = fake_tegrastats(tmp_path / "bin", "orin_nano", pid_file)
    with ts.TegrastatsSampler(str(exe), interval_ms=20) as sampler:
        assert sampler.wait_for_first(5.0)
        time.sleep(0.15)
    n = len(sampler.samples)
    assert n >= 3 and sampler.samples[0].rails_mw["VDD_IN"] == 7342
    assert all(a.t_s <= b.t_s for a, b in zip(sampler.samples, sampler.samples[1:]))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the fake tegrastats is gone (terminated and reaped)
    time.sleep(0.05)
    assert len(sampler.samples) == n  # nothing is read after stop


def test_sampler_stops_on_error(tmp_path):
    pid_file = tmp_path / "pid"
    exe = fake_tegrastats(tmp_path / "bin", "thor", pid_file)
    with pytest.raises(RuntimeError):
        with ts.TegrastatsSampler(str(exe), interval_ms=20) as sampler:
            sampler.wait_for_first(5.0)
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.parametrize("pinned,state", [(True, "on"), (False, "off")])
def test_power_mode_probes(tmp_path, monkeypatch, pinned, state):
    fake_power_tools(tmp_path / "bin", mode="15W", pinned=pinned)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert ts.nvpmodel_mode() == "15W (0)"
    assert ts.jetson_clocks_state() == state


def test_power_mode_unknown_without_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvpmodel, no jetson_clocks
    assert ts.nvpmodel_mode() == "unknown" and ts.jetson_clocks_state() == "unknown"
    assert ts.find_tegrastats() is None
