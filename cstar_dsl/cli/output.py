"""Command line: the exit codes and what every command prints the same way (diagnostics, long lines, shares)."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.text import Text

from ..lang.errors import Diagnostic
from ..lang.render import render

# 0 done; 1 an invalid recipe; 2 a usage error; 3 compiled, but a `require` line is not met (or an eval
# sanity check failed); 4 the run could not go on (out folder, checkpoint, lock, diverged training).
EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNMET, EXIT_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C


def print_diagnostics(console: Console, diagnostics: list[Diagnostic], fmt: str) -> None:
    text = render(diagnostics, fmt)
    if fmt == "json" or not console.is_terminal:
        console.out(text, end="")
        return
    styled = Text(text)
    styled.highlight_regex(r"(?m)^error\[[a-z-]+\]", "bold red")
    styled.highlight_regex(r"(?m)^warning\[[a-z-]+\]", "bold yellow")
    styled.highlight_regex(r"(?m)^\s*\^+", "bold red")
    console.print(styled, end="")


def wrapped(line: str, width: int = 100) -> str:
    """A long result line on several lines of at most ``width``, continuations indented, so it reads
    the same in a terminal, a log or a CI page."""
    return textwrap.fill(line, width, subsequent_indent="     ", break_on_hyphens=False, break_long_words=False)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
