"""Fake Jetson tools for tests: `tegrastats` (prints fixture lines every --interval ms until killed),
`nvpmodel -q` and `jetson_clocks --show`, written as small executables into a directory for PATH."""

from __future__ import annotations

import stat
import sys
import textwrap
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tegrastats"


def fixture_lines(name: str) -> list[str]:
    """The sample lines of fixtures/tegrastats/<name>.txt (comments skipped)."""
    text = (FIXTURES / f"{name}.txt").read_text()
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _write_exe(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_tegrastats(bin_dir: Path, fixture: str, pid_file: Path | None = None) -> Path:
    """A `tegrastats` that cycles through a fixture's lines, one per --interval, until terminated.
    With `pid_file`, it records its pid there (tests check it is gone afterwards)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    return _write_exe(bin_dir / "tegrastats", f"""
        import itertools, os, sys, time
        lines = {fixture_lines(fixture)!r}
        interval = int(sys.argv[sys.argv.index("--interval") + 1]) if "--interval" in sys.argv else 1000
        pid_file = {str(pid_file) if pid_file else None!r}
        if pid_file:
            open(pid_file, "w").write(str(os.getpid()))
        for line in itertools.cycle(lines):
            time.sleep(interval / 1000)
            print(line, flush=True)
    """)


def fake_power_tools(bin_dir: Path, mode: str = "MAXN", pinned: bool = True) -> None:
    """`nvpmodel -q` printing `mode`, and `jetson_clocks --show` with clocks pinned (or not)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    _write_exe(bin_dir / "nvpmodel", f"""
        print("NV Power Mode: {mode}")
        print("0")
    """)
    lo = 2201600 if pinned else 729600
    _write_exe(bin_dir / "jetson_clocks", f"""
        print("SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit")
        print("Online CPUs: 0-11")
        for i in range(12):
            print(f"cpu{{i}}: Online=1 Governor=schedutil MinFreq={lo} MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0")
        print("GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000")
        print("EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1")
    """)
