"""Problems found after validation (model building, tracing, planning) that concern a spec setting."""

from __future__ import annotations

from ..errors import RunError
from .errors import Diagnostic
from .source import Span


class SpecProblem(RunError):
    """A later stage's complaint about a spec setting, named by its location in the spec.

    ``validate.locate`` turns the location into a span, so the error points at the recipe line.
    """

    def __init__(self, loc: tuple[str | int, ...], code: str, message: str, *, help: str | None = None,
                 label: str | None = None, notes: tuple[str, ...] = ()) -> None:
        super().__init__(message, help)
        self.loc, self.code, self.label, self.notes = loc, code, label, notes

    def diagnostic(self, span: Span | None) -> Diagnostic:
        return Diagnostic(self.code, self.message, span, label=self.label, help=self.help, notes=self.notes)
