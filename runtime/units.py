"""Byte counts as text, one way everywhere (tables, summaries, reports)."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB")


def format_bytes(n: float | None, unit: str | None = None, suffix: bool = True) -> str:
    """`n` bytes in `unit` (one of UNITS) with one decimal, "12.3 MiB" (B: no decimals); with unit None,
    in the largest unit that keeps the number below 1024 (GiB at most): "512 B", "1.5 KiB", "3.2 GiB".
    None is "n/a". suffix=False leaves the unit out (a table column that names it)."""
    if n is None:
        return "n/a"
    if unit is None:
        i = 0
        while n / 1024**i >= 1024 and i < len(UNITS) - 1:
            i += 1
    else:
        i = UNITS.index(unit)
    value = n / 1024**i
    text = f"{value:.0f}" if i == 0 else f"{value:.1f}"
    return f"{text} {UNITS[i]}" if suffix else text
