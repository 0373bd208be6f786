"""Shared by every stage: the base of the run-time errors a user can act on (never a bug)."""

from __future__ import annotations


class RunError(Exception):
    """A failure the user can act on, never a bug: what went wrong, and what to do about it.

    Each stage raises its own subclass (a checkpoint, the compile, an export, the evaluation, the
    artifacts, a file, a later stage's complaint about a recipe setting). The CLI renders ``message``
    and ``help`` and picks the exit code by class, in one table (``cstar_dsl/cli/output.py``); any
    other exception is a bug and keeps its traceback.
    """

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.help = help
