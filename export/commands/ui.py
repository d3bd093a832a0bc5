"""What the command modules share: the two consoles, progress display, and subparser construction."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from rich.console import Console

from vtc.runtime.errors import UsageError

err = Console(stderr=True, highlight=False)
# Piped output would be cut at 80 columns (rich's default off a terminal); tables stay whole instead.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def subcommand(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subparser whose description is `help` as a sentence and whose epilog lists `examples`."""
    return subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + _dedent(examples))


def _dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


@contextlib.contextmanager
def step(label: str):
    """Progress for one long step: a spinner while it runs, then a check mark, its duration and the process's
    peak memory so far (the step that raises it is the one to look at on a small host)."""
    t0 = time.perf_counter()
    with err.status(f"{label}..."):
        yield
    peak = _peak_rss()
    mem = f", peak RSS {peak / 2**30:.2f} GiB" if peak else ""
    err.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - t0:.1f} s{mem})[/]")


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def progress(console):
    """A transient rich progress bar: description, bar, done/total, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def check_outputs(*paths: str | None) -> None:
    """Output files (--json FILE, --csv, -o FILE, ...), checked before any work, not after it: not a
    directory, their directory exists, and this process can create a file there (a real probe: an
    unnamed temporary file, so permission bits, read-only mounts and root are all judged alike)."""
    for p in paths:
        if not p:
            continue
        path = Path(p).expanduser()
        if path.is_dir():
            raise UsageError(f"cannot write {p}: it is a directory, not a file.",
                             "Pass a file name (e.g. DIR/report.json), or choose another path.")
        parent = path.resolve().parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"cannot write {p}: {parent} is a file, not a directory.", "Choose another path.")
        if not parent.is_dir():
            raise UsageError(f"cannot write {p}: its directory does not exist.", "Create it, or choose another path.")
        _probe_writable(parent, p)
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {p}: the file is read-only.", "Choose another path, or make it writable.")


def check_output_dir(path: str | Path, flag: str) -> None:
    """A directory an output goes into (created with its parents when missing): not a file, and its
    nearest existing ancestor a directory this process can create files in."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory.", f"Choose another {flag}.")
    existing = p.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot create {flag} {path}: {existing} is a file, not a directory.", f"Choose another {flag}.")
    _probe_writable(existing, path)


def _probe_writable(directory: Path, what) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):  # unnamed where the OS can (O_TMPFILE): nothing is left behind
            pass
    except OSError as e:
        raise UsageError(f"cannot write {what}: {directory} does not let this process create files "
                         f"({e.strerror or e}).", "Choose another path, or fix that directory's permissions.") from e


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would interleave with ours; errors still surface.
    Imports nothing: the environment is read when transformers is imported, and a library that is already
    imported is told directly (so a command can fail on a missing TensorRT before torch is loaded)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
