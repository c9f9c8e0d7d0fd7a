"""Terminal output whose tables stay whole, in a narrow terminal and in logs alike.

Rich sizes its output to the terminal, and to 80 columns when stdout is a file or a pipe (CI
logs, `| tee`); a table wider than that has its cells cut with an ellipsis ("3.9e…"), which
loses numbers. `print_whole` prints a table at the width it needs: a narrow terminal wraps the
long lines, but nothing is dropped.
"""

from __future__ import annotations

from typing import Any


def make_console(**kwargs: Any):
    from rich.console import Console

    kwargs.setdefault("soft_wrap", True)  # long lines (paths) are not broken at the console width
    return Console(highlight=False, **kwargs)


def natural_width(console: Any, renderable: Any) -> int:
    """The width a renderable takes when nothing limits it."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(max_width=100_000), renderable).maximum


def print_whole(console: Any, renderable: Any) -> None:
    """Print `renderable` at least as wide as it needs (never cut to the console's width)."""
    needed = natural_width(console, renderable)
    if needed <= console.width:
        console.print(renderable)
        return
    saved = console._width  # None: follow the terminal (rich re-reads it on every print)
    console.width = needed
    try:
        console.print(renderable)
    finally:
        console._width = saved
