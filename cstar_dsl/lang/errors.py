"""Diagnostics: the one data model for every user-facing error and warning of every stage."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .source import Span

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """A problem with a recipe: a stable code, where it is, what is wrong and how to fix it."""

    code: str
    message: str
    span: Span | None = None
    severity: Severity = "error"
    label: str | None = None
    help: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class CStarError(Exception):
    """A user error; carries every diagnostic found, the CLI renders them."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        first = self.diagnostics[0] if self.diagnostics else None
        super().__init__(f"[{first.code}] {first.message}" if first else "cstar error")


class ArgumentError(CStarError):
    """The diagnostics of a command-line argument written in the recipe language (``cstar eval --attack``):
    a usage error, not an invalid recipe."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, if one is close enough to be a likely typo."""
    options = list(choices)
    by_lower = {option.lower(): option for option in options}
    matches = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[matches[0]] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A label such as "did you mean `rank`?" for a misspelt ``word``, or None."""
    match = closest(word, choices)
    return f"did you mean `{match}`?" if match else None
