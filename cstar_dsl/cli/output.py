"""Command line: the exit codes and what every command prints the same way (diagnostics, long lines, shares)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from ..errors import RunError
from ..lang.errors import ArgumentError, CStarError, Diagnostic
from ..lang.problems import SpecProblem
from ..lang.render import render

if TYPE_CHECKING:
    from ..lang.validate import Checked

# 0 done; 1 an invalid recipe; 2 a usage error; 3 compiled, but a `require` line is not met (or an eval
# sanity check failed); 4 the run could not go on (out folder, checkpoint, lock, diverged training).
EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNMET, EXIT_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C

# What a command catches: the user errors. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CStarError, RunError)
# The exit code of each failure, by class; the most derived class listed decides (a SpecProblem is a RunError).
_EXIT_CODES: dict[type[BaseException], int] = {
    ArgumentError: EXIT_USAGE,
    CStarError: EXIT_INVALID,
    SpecProblem: EXIT_INVALID,
    RunError: EXIT_FAILED,
    KeyboardInterrupt: EXIT_INTERRUPTED,
}


def exit_code(error: CStarError | RunError | KeyboardInterrupt) -> int:
    """The exit code of a command that stopped on ``error``."""
    return next(_EXIT_CODES[kind] for kind in type(error).__mro__ if kind in _EXIT_CODES)


def error_diagnostics(error: CStarError | RunError, failed: str, checked: Checked | None = None) -> list[Diagnostic]:
    """``error`` as diagnostics: a recipe's own, a spec problem at its recipe line (with ``checked``),
    or a run-time failure under the command's code ``failed`` (`run-failed`, `export-failed`, ...)."""
    if isinstance(error, CStarError):
        return list(error.diagnostics)
    if isinstance(error, SpecProblem):
        return [checked.diagnostic(error) if checked is not None else error.diagnostic(None)]
    return [Diagnostic(failed, error.message, help=error.help)]


def print_error(console: Console, error: CStarError | RunError, fmt: str, *, failed: str = "run-failed",
                checked: Checked | None = None) -> int:
    """Print ``error`` the way every command does and return the exit code it means."""
    print_diagnostics(console, error_diagnostics(error, failed, checked), fmt)
    return exit_code(error)


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
