"""Report stage: the formats of report values; a value the report lacks (None, such as no latency) is a dash."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..lang.render import si

if TYPE_CHECKING:
    from ..run_report import EpochRow

DASH = "–"  # what every missing value renders as
ARROW = "→"


def _text(value: str | float | None) -> str:
    if value is None or value == "":
        return DASH
    if isinstance(value, float):
        return _general(value)
    return str(value)


def _code(value: str | None) -> str:
    """A name as an inline code span, so Markdown never interprets the underscores or stars in it."""
    text = _text(value)
    if text == DASH:
        return DASH
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _pct(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value * 100:.1f}%" if math.isfinite(value) else str(value)


def _fixed(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _general(value: float | None) -> str:
    return DASH if value is None else f"{value:.4g}"


def _grouped(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:,.0f}" if math.isfinite(value) else str(value)


def _count(value: float | None) -> str:
    """A parameter or MAC count with an SI suffix and one decimal (59.8k, 5.0M); exact below a thousand."""
    return DASH if value is None else si(value, decimals=1)


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _span(before: float | None, after: float | None, fmt: Callable[[float | None], str]) -> str:
    return f"{fmt(before)} {ARROW} {fmt(after)}"


def _quotient(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _total(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    human = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s ({human})"


def _phases(history: Sequence[EpochRow]) -> list[tuple[str, list[EpochRow]]]:
    """Consecutive epochs of one phase grouped, in training order."""
    phases: list[tuple[str, list[EpochRow]]] = []
    for row in history:
        if phases and phases[-1][0] == row.phase:
            phases[-1][1].append(row)
        else:
            phases.append((row.phase, [row]))
    return phases
