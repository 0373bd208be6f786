"""Value coercion for the spec stage: syntax values (or plain Python values) -> typed settings.

Each function raises ``PydanticCustomError`` whose type is a stable cstar error code, so that
pydantic collects every error of a file and the validate stage can point at each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NoReturn

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from . import syntax as ast
from .errors import closest


def fail(code: str, message: str, **context: object) -> NoReturn:
    """Raise a validation error with a cstar code; ``label`` and ``help`` go to the diagnostic."""
    raise PydanticCustomError(code, "{message}", {"message": message, **context})


@contextmanager
def inside(*path: str | int) -> Iterator[None]:
    """Errors raised within concern a part of the value (a list item, a call's name, ...):
    record the path to it, so the diagnostic's caret lands on that part."""
    try:
        yield
    except PydanticCustomError as error:
        context = dict(error.context or {})
        context["at"] = (*path, *context.get("at", ()))
        raise PydanticCustomError(error.type, error.message_template, context) from None


def clip(text: str, limit: int = 60) -> str:
    """Long user text shortened for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object) -> str:
    """A value as written in the recipe (``8/255``), else as a number."""
    if isinstance(value, (ast.Number, ast.Quantity, ast.Fraction)):
        return value.text
    return _fmt(value) if isinstance(value, (int, float)) else str(value)


def describe(value: object) -> str:
    """How a value is named in messages: its source text, or its Python repr."""
    if isinstance(value, (ast.Number, ast.Quantity, ast.Fraction, ast.String, ast.Name,
                          ast.Measure, ast.Bound, ast.Call, ast.List)):
        return f"`{clip(ast.render_value(value))}`"
    if isinstance(value, dict):
        return "a block"
    if isinstance(value, ast.Requirement):
        return f"`require {ast.render_value(value.bound)}`"
    return repr(value)


def _wrong_type(value: object, expected: str, example: str | None = None) -> NoReturn:
    fail("wrong-type", f"expected {expected}, found {describe(value)}",
         label=f"not {expected}", help=f"for example: {example}" if example else None)


def number(value: object, *, example: str = "0.1") -> float:
    """A plain number or a fraction such as ``8/255``; a unit is an error."""
    if isinstance(value, ast.Number):
        if not math.isfinite(value.value):
            fail("out-of-range", f"`{clip(value.text)}` is too large", label="not a finite number")
        return float(value.value)
    if isinstance(value, ast.Fraction):
        if value.denominator.value == 0:
            fail("out-of-range", f"division by zero in {describe(value)}", label="denominator is 0")
        return value.numerator.value / value.denominator.value
    if isinstance(value, ast.Quantity):
        fail("wrong-unit", f"{describe(value)} has a unit, but this setting takes a plain number",
             label="no unit here", help=f"write a plain number, for example: {example}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    _wrong_type(value, "a number", example)


def integer(value: object, *, example: str = "10") -> int:
    """A whole number; ``k``/``M``/``G`` suffixes are allowed when the result is whole."""
    if isinstance(value, ast.Quantity) and value.unit in ast.SCALE and float(value.scaled).is_integer():
        return int(value.scaled)
    if isinstance(value, ast.Number) and isinstance(value.value, int):
        return value.value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    _wrong_type(value, "a whole number", example)


def at_least(value: float, low: float, what: str, *, code: str = "out-of-range", written: str = "") -> float:
    if value < low:
        fail(code, f"{what} must be at least {_fmt(low)}, got {written or _fmt(value)}",
             label=f"must be >= {_fmt(low)}")
    return value


def at_most(value: float, high: float, what: str, *, written: str = "") -> float:
    """``value`` if it is at most ``high``: bounds that catch a typo before it allocates terabytes."""
    if value > high:
        fail("out-of-range", f"{what} must be at most {_fmt(high)}, got {clip(written, 24) or _fmt(value)}",
             label=f"must be <= {_fmt(high)}", help="a bound against typos: no real run needs more")
    return value


def positive(value: float, what: str, *, code: str = "out-of-range", written: str = "") -> float:
    if value <= 0:
        fail(code, f"{what} must be greater than 0, got {written or _fmt(value)}", label="must be > 0")
    return value


def boolean(value: object) -> bool:
    if isinstance(value, ast.Name) and value.value in ("true", "false"):
        return value.value == "true"
    if isinstance(value, bool):
        return value
    _wrong_type(value, "`true` or `false`", "true")


def text(value: object, *, example: str = '"name"') -> str:
    """A double-quoted string."""
    if isinstance(value, ast.String):
        return value.value
    if isinstance(value, str):
        return value
    _wrong_type(value, "a string in double quotes", example)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def choice(value: object, options: Iterable[str], *, what: str, code: str = "unknown-option") -> str:
    """One of a fixed set of bare words, with "did you mean" on a typo."""
    options = tuple(options)
    if isinstance(value, ast.Name):
        word = value.value
    elif isinstance(value, ast.String):
        word = value.value
    elif isinstance(value, str):
        word = value
    else:
        _wrong_type(value, _article(what), options[0])
    if word not in options:
        unknown(word, options, what=what, code=code)
    return word


def unknown(word: str, options: Iterable[str], *, what: str, code: str, match: str | None = None) -> NoReturn:
    options = tuple(options)
    match = match or closest(word, options)
    fail(code, f"unknown {what} `{clip(word)}`",
         label=f"did you mean `{match}`?" if match else f"not a known {what}",
         help=f"choose one of: {', '.join(options)}" if len(options) <= 12 else None)


def percent(value: object, what: str, *, code: str = "requirement-out-of-range") -> float:
    """A percentage such as ``60%``, as a fraction in [0, 1]."""
    if isinstance(value, ast.Quantity) and value.unit == "%":
        share = value.scaled
    elif isinstance(value, (ast.Number, ast.Fraction)):
        fail("missing-unit", f"{what} needs a unit: {describe(value)} could mean a fraction or a percentage",
             label="add `%`", help=f"write it as a percentage, for example `{_percent_example(value)}`")
    elif isinstance(value, float) and not isinstance(value, bool):
        share = value
    else:
        _wrong_type(value, "a percentage", "60%")
    if not 0 <= share <= 1:
        fail(code, f"{what} must lie between 0% and 100%, got {_fmt(share * 100)}%",
             label="outside 0%..100%")
    return share


def ratio(value: object, what: str) -> float:
    """A compression ratio such as ``16x`` (at least 1)."""
    if isinstance(value, ast.Quantity) and value.unit == "x":
        amount = float(value.amount)
        if not math.isfinite(amount):
            fail("out-of-range", f"`{clip(value.text)}` is too large", label="not a finite ratio")
    elif isinstance(value, ast.Number):
        fail("missing-unit", f"{what} needs a unit: write `{value.text}x`", label="add `x`",
             help="ratios are written with `x`: 4x keeps a quarter of the parameters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        _wrong_type(value, "a ratio such as `4x`", "4x")
    if amount < 1:
        fail("ratio-below-one", f"{what} must be at least 1x, got {_fmt(amount)}x",
             label="must be at least 1x",
             help="a ratio is dense size / compressed size: 4x keeps a quarter")
    return amount


def items(value: object, *, what: str) -> list[object]:
    """The elements of a list value (a single value counts as a list of one)."""
    if isinstance(value, ast.List):
        return list(value.items)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, ast.Call | ast.Name | ast.String | ast.Number | ast.Quantity):
        return [value]
    _wrong_type(value, f"a list of {what}", "[...]")


def variant(value: object, family: Mapping[str, type[BaseModel]], *, what: str, code: str = "unknown-option") -> object:
    """A bare option name or a call -> the dict for one member of a discriminated union.

    ``pgd(steps = 20)`` becomes ``{"kind": "pgd", "steps": <20>}``; positional arguments take the
    member's ``positional`` field names in order.
    """
    if isinstance(value, (BaseModel, Mapping)):
        return value
    if isinstance(value, (ast.Name, str)):
        return {"kind": choice(value, family, what=what, code=code)}
    if not isinstance(value, ast.Call):
        _wrong_type(value, _article(what), next(iter(family)))
    with inside("@name"):
        kind = choice(value.name, family, what=what, code=code)
    return {"kind": kind, **_arguments(value, family[kind])}


def _arguments(call: ast.Call, member: type[BaseModel]) -> dict[str, object]:
    names: tuple[str, ...] = getattr(member, "positional", ())
    found: dict[str, object] = {}
    positional = [a for a in call.args if not isinstance(a, ast.Keyword)]
    if len(positional) > len(names):
        fields = [name for name in member.model_fields if name != "kind"]
        context = {"at": (call.args.index(positional[len(names)]),)}
        fail("invalid-argument",
             f"`{call.name.value}` takes {len(names) or 'no'} positional argument{'s' * (len(names) != 1)}, "
             f"got {len(positional)}",
             label="too many arguments",
             help=f"name the arguments: {', '.join(f'{n} = ...' for n in fields)}" if fields else None, **context)
    for name, positional_value in zip(names, positional, strict=False):
        found[name] = positional_value
    for index, arg in enumerate(call.args):
        if isinstance(arg, ast.Keyword):
            if arg.name.value == "kind":
                fail("unknown-argument", f"`{call.name.value}` has no argument `kind`", label="not an argument",
                     at=(index,), help=f"`{call.name.value}` itself is the kind")
            if arg.name.value in found:
                fail("duplicate-key", f"argument `{arg.name.value}` of `{call.name.value}` is given twice",
                     label="given twice", at=(index,), help="keep one of the two")
            found[arg.name.value] = arg.value
    return found


def sequence(value: object, convert: Callable[[object], Any], *, what: str) -> tuple[Any, ...]:
    """Each element of a list converted by ``convert``."""
    converted = []
    for index, item in enumerate(items(value, what=what)):
        with inside(index) if isinstance(value, ast.List) else nullcontext():
            converted.append(convert(item))
    return tuple(converted)


def _percent_example(value: ast.Value) -> str:
    amount = ast.render_value(value)
    try:
        share = float(eval_number(value))
    except ValueError:
        return "60%"
    return f"{_fmt(share * 100)}%" if share <= 1 else f"{amount}%"


def eval_number(value: ast.Value) -> float:
    if isinstance(value, ast.Number):
        return float(value.value)
    if isinstance(value, ast.Fraction) and value.denominator.value:
        return value.numerator.value / value.denominator.value
    raise ValueError("not a number")


def _fmt(amount: float) -> str:
    if isinstance(amount, int):
        return clip(str(amount), 24)  # a huge whole number does not fit a float
    return f"{amount:g}"
