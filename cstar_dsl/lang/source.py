"""Source text and spans: where in which file a piece of a recipe came from (no torch, no rich)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class SourceFile:
    """The text of one recipe file and the path it is shown under."""

    path: str
    text: str

    @cached_property
    def _line_starts(self) -> tuple[int, ...]:
        starts = [0]
        starts.extend(i + 1 for i, char in enumerate(self.text) if char == "\n")
        return tuple(starts)

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its line ending."""
        if not 1 <= line <= len(self._line_starts):
            return ""
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start : len(self.text) if end < 0 else end].rstrip("\r")

    def span(self, start: int, end: int) -> Span:
        """The span of the characters ``start:end``."""
        line, column = self.position(start)
        end_line, end_column = self.position(max(start, end))
        return Span(self, start, max(start, end), line, column, end_line, end_column)


@dataclass(frozen=True)
class Span:
    """A range of characters in a source file; lines and columns are 1-based, the end exclusive."""

    source: SourceFile = field(compare=False, repr=False)
    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def path(self) -> str:
        return self.source.path

    def to(self, other: Span) -> Span:
        """The span from the start of this one to the end of ``other``."""
        return self.source.span(self.start, max(self.end, other.end))
