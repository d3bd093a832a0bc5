"""Facts about the machine a profile ran on, and its memory: CPU, GPU, backend, library versions,
threads, process RSS, NVML GPU memory (optional `pynvml`) and the Jetson power mode.

Torch-free (part of vtc.runtime). Everything optional degrades to None / "unknown", never an error.
"""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path

from vtc.runtime import tegrastats

LIBRARIES = ("vtc", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "pillow", "jinja2", "rich")


def cpu_model() -> str:
    """/proc/cpuinfo's model name (x86) or the device-tree model (ARM boards such as Jetson)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def board_model() -> str | None:
    """/proc/device-tree/model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"; None off ARM boards."""
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    except OSError:
        return None


def cpu_count() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"logical": os.cpu_count(), "usable": usable}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _nvml():
    """The pynvml module, initialised, or None (not installed, no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml raises NVMLError subclasses, or OSError when the library is missing
        return None
    return pynvml


def gpus() -> list[dict]:
    """One entry per NVML device: name, total/used memory (device-wide) and this process's memory."""
    nv = _nvml()
    if nv is None:
        return []
    out = []
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total_bytes": int(mem.total), "memory_used_bytes": int(mem.used),
                        "process_memory_bytes": _process_gpu_bytes(nv, h)})
    except Exception:  # NVMLError: a device disappeared or the query is unsupported; report what we have
        pass
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:  # NVMLError on shutdown is harmless here
            pass
    return out


def _process_gpu_bytes(nv, handle) -> int | None:
    try:
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # NVMLError_NotSupported on some devices
        return None
    used = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory is not None]
    return int(sum(used)) if used else None


def host_facts(backend) -> dict:
    """CPU, GPU, backend, execution provider, library versions, threads, and the Jetson power mode."""
    desc = backend.describe() if hasattr(backend, "describe") else {"backend": type(backend).__name__}
    board = board_model()
    jetson = tegrastats.find_tegrastats() is not None or (board is not None and "jetson" in board.lower())
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_count": cpu_count(), "board": board,
            "gpus": [{"index": g["index"], "name": g["name"], "memory_total_bytes": g["memory_total_bytes"]}
                     for g in gpus()],
            "backend": desc.get("backend"), "backend_version": desc.get("version"),
            "execution_provider": desc.get("provider"), "threads": desc.get("threads"),
            "thread_pool": desc.get("thread_pool"),
            "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VTC_THREADS", "VTC_SHARED_POOL")
                            if k in os.environ},
            "libraries": library_versions(),
            "nvpmodel": tegrastats.nvpmodel_mode() if jetson else "unknown",
            "jetson_clocks": tegrastats.jetson_clocks_state() if jetson else "unknown"}


# -- process memory ----------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """The process's peak resident set since it started (getrusage; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> int | None:
    """VmHWM: the peak RSS since start, or since the last `reset_hwm()`."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
