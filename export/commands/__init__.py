"""The `vtc-export` subcommands: one module each, with exactly two public functions,

    add_parser(subparsers) -> argparse.ArgumentParser    its flags (shared groups: vtc.export.commands.args)
    run(args) -> int                                     parse -> call the library -> print; the exit code

COMMANDS maps each command name, in `--help` order, to its module; vtc.export.cli builds the parser
from it and dispatches `run`. A command module imports its library (torch, onnx, ...) inside `run`, so
building the parser imports nothing heavy and `run`, `inspect`, `profile` work without the exporter.
"""

from __future__ import annotations

import importlib

# command name -> module in this package (a module named after the stdlib or a builtin gets a suffix)
COMMANDS = {
    "build": "build",
    "run": "run",
    "verify": "verify",
    "inspect": "inspect_cmd",
    "lint": "lint",
    "engine": "engine",
    "compare": "compare",
    "calibrate": "calibrate",
    "eval": "evaluate",
    "profile": "profile",
    "sweep": "sweep",
    "list": "list_cmd",
}


def module(name: str):
    """The module of command `name` (a key of COMMANDS)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")
