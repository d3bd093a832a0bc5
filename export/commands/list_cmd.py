"""`vtc-export list`: the supported architectures and compression methods (vtc.export.models, .methods)."""

from __future__ import annotations

from vtc.export.commands.ui import out, subcommand


def add_parser(subparsers):
    return subcommand(subparsers, "list", "list supported architectures and compression methods", """
          vtc-export list
        """)


def run(args) -> int:
    from vtc.export.report import print_list

    print_list(out)
    return 0
