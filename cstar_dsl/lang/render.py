"""Rendering of diagnostics as text, the way ruff and rustc show them, or as JSON (pure strings)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from .errors import Diagnostic

MAX_LINE = 120
FORMATS = ("full", "concise", "json")


SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(amount: float, decimals: int | None = None) -> str:
    """A count with an SI suffix. By default as recipes write it, four significant digits: 80M, 697.7k, 512.
    With ``decimals``, as the report shows it: that many digits after the point (59.8k, 5.0M), whole
    numbers below a thousand exact, the suffix chosen after rounding (999,960 reads 1.0M, not 1000.0k).

    >>> si(697_700), si(80e6), si(512), si(59_760, 1), si(999_960, 1), si(12, 1)
    ('697.7k', '80M', '512', '59.8k', '1.0M', '12')
    """
    if decimals is None:
        for scale, suffix in SI_PREFIXES[1:]:
            if abs(amount) >= scale:
                return f"{amount / scale:.4g}{suffix}"
        return f"{amount:.4g}"
    if not math.isfinite(amount):
        return str(amount)
    if abs(amount) < 1000:
        return f"{amount:.0f}" if amount == int(amount) else f"{amount:.{decimals}f}"
    for scale, suffix in SI_PREFIXES:
        if round(abs(amount) / scale, decimals) >= 1:
            return f"{amount / scale:.{decimals}f}{suffix}"
    return f"{amount:.0f}"  # unreachable: |amount| >= 1000 matches "k"


def plural(amount: float, noun: str) -> str:
    """``amount`` and ``noun``, the noun plural unless the amount is exactly one: 1 epoch, 2 epochs,
    0.5 points. Amounts print as ``%g`` does (``1``, not ``1.0``).

    >>> plural(1, "epoch"), plural(1.0, "point"), plural(0.5, "point"), plural(3, "file")
    ('1 epoch', '1 point', '0.5 points', '3 files')
    """
    shown = str(int(amount)) if float(amount).is_integer() else f"{amount:g}"
    return f"{shown} {noun}{'' if amount == 1 else 's'}"


def render(diagnostics: Sequence[Diagnostic], fmt: str = "full") -> str:
    """All diagnostics in one of ``FORMATS``, ending with a newline when there are any."""
    if fmt == "json":
        return json.dumps([to_dict(d) for d in diagnostics], indent=2) + "\n"
    if fmt == "concise":
        return "".join(render_concise(d) + "\n" for d in diagnostics)
    return "".join(render_full(d) + "\n\n" for d in diagnostics)


def to_dict(diagnostic: Diagnostic) -> dict[str, object]:
    """The machine-readable form of a diagnostic (the ``--format json`` schema)."""
    span = diagnostic.span
    return {
        "code": diagnostic.code,
        "severity": diagnostic.severity,
        "message": diagnostic.message,
        "file": span.path if span else None,
        "line": span.line if span else None,
        "column": span.column if span else None,
        "end_line": span.end_line if span else None,
        "end_column": span.end_column if span else None,
        "label": diagnostic.label,
        "help": diagnostic.help,
        "notes": list(diagnostic.notes),
    }


def render_concise(diagnostic: Diagnostic) -> str:
    """``file:line:col: error[code] message`` on one line."""
    span = diagnostic.span
    where = f"{span.path}:{span.line}:{span.column}: " if span else ""
    return f"{where}{diagnostic.severity}[{diagnostic.code}] {diagnostic.message}"


def render_full(diagnostic: Diagnostic) -> str:
    """The header, the source line with a caret under the span, then help and notes."""
    lines = [f"{diagnostic.severity}[{diagnostic.code}]: {diagnostic.message}"]
    span = diagnostic.span
    gutter = " " * len(str(span.line)) if span else ""
    if span:
        lines.append(f"{gutter}--> {span.path}:{span.line}:{span.column}")
        text = span.source.line_text(span.line)
        last = span.end_column if span.end_line == span.line else len(text) + 1
        shown, start, width = _window(text, span.column - 1, max(1, last - span.column))
        label = f" {diagnostic.label}" if diagnostic.label else ""
        lines += [
            f"{gutter} |",
            f"{span.line} | {shown}".rstrip(),
            f"{gutter} | {' ' * start}{'^' * width}{label}",
            f"{gutter} |",
        ]
    for prefix, remark in [("help", diagnostic.help), *(("note", n) for n in diagnostic.notes)]:
        if remark:
            lines.append(f"{gutter} = {prefix}: {remark}")
    return "\n".join(lines)


def _window(text: str, column: int, width: int) -> tuple[str, int, int]:
    """The part of a long line around ``column``: (shown text, caret offset, caret width)."""
    text = "".join(c if c.isprintable() else ("\ufffd" if c != "\t" else " ") for c in text)
    if len(text) <= MAX_LINE:
        return text, column, min(width, max(1, len(text) - column))
    left = max(0, column - MAX_LINE // 3)
    shown = text[left : left + MAX_LINE]
    prefix = "..." if left else ""
    suffix = "..." if left + MAX_LINE < len(text) else ""
    caret = len(prefix) + column - left
    return prefix + shown + suffix, caret, max(1, min(width, len(shown) - (column - left)))
