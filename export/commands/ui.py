"""What the command modules share: the two consoles, progress display, and subparser construction."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
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
    """Progress for one long step: a spinner while it runs, then a check mark and its duration."""
    t0 = time.perf_counter()
    with err.status(f"{label}..."):
        yield
    err.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - t0:.1f} s)[/]")


def progress(console):
    """A transient rich progress bar: description, bar, done/total, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def check_outputs(*paths: str | None) -> None:
    """Output files whose directory is missing fail before any work, not after it."""
    for p in paths:
        if p and not Path(p).expanduser().resolve().parent.is_dir():
            raise UsageError(f"cannot write {p}: its directory does not exist.", "Create it, or choose another path.")


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
