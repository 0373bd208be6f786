"""Report stage: lenient readers and formats of report values (a missing or malformed one reads as a dash)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..lang.render import plural, si

DASH = "–"  # what every missing or null value renders as
ARROW = "→"


def _num(value: Any) -> float | None:
    """The value as a float, or None when it is missing or not a number (a bool is a flag, not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return _general(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{_text(key)}={_text(item)}" for key, item in value.items()) or DASH
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_text(item) for item in value) or DASH
    return str(value)


def _code(value: Any) -> str:
    """A name as an inline code span, so Markdown never interprets the underscores or stars in it."""
    text = _text(value)
    if text == DASH:
        return DASH
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _pct(value: Any) -> str:
    number = _num(value)
    if number is None:
        return DASH
    return f"{number * 100:.1f}%" if math.isfinite(number) else str(number)


def _fixed(value: Any, digits: int) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.{digits}f}"


def _general(value: Any) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.4g}"


def _grouped(value: Any) -> str:
    number = _num(value)
    if number is None:
        return DASH
    return f"{number:,.0f}" if math.isfinite(number) else str(number)


def _count(value: Any) -> str:
    """A parameter or MAC count with an SI suffix and one decimal (59.8k, 5.0M); exact below a thousand."""
    number = _num(value)
    return DASH if number is None else si(number, decimals=1)


def _ratio(value: Any) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.2f}×"


def _span(before: Any, after: Any, fmt: Any) -> str:
    return f"{fmt(before)} {ARROW} {fmt(after)}"


def _quotient(numerator: Any, denominator: Any) -> float | None:
    top, bottom = _num(numerator), _num(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _total(values: Iterable[Any]) -> float | None:
    numbers_ = [number for number in map(_num, values) if number is not None]
    return sum(numbers_) if numbers_ else None


def _duration(value: Any) -> str:
    seconds = _num(value)
    if seconds is None:
        return DASH
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    human = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s ({human})"


def _plural(value: Any, noun: str) -> str:
    number = _num(value)
    return plural(number, noun) if number is not None else f"{_text(value)} {noun}s"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _records(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _phases(history: Sequence[Mapping[str, Any]]) -> list[tuple[Any, list[Mapping[str, Any]]]]:
    """Consecutive epochs of one phase grouped, in training order."""
    phases: list[tuple[Any, list[Mapping[str, Any]]]] = []
    for row in history:
        if phases and phases[-1][0] == row.get("phase"):
            phases[-1][1].append(row)
        else:
            phases.append((row.get("phase"), [row]))
    return phases

