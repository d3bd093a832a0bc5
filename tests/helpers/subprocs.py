"""Running `vtc-export` as a child process in tests (signals, races) and waiting on what it does."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest


def vtc_export_cmd() -> list[str]:
    """The installed `vtc-export` next to this interpreter, or the module."""
    script = Path(sys.executable).with_name("vtc-export")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vtc.export.cli"]


def wait_for(cond, proc, what: str, log: Path, timeout: float = 300):
    """Poll `cond()` until it returns something truthy (returned); fail with the child's log if the child
    exits first or `timeout` seconds pass (the child is then killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cond()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"vtc-export exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()}")
