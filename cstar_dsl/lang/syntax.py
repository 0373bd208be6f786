"""Syntax tree of a recipe: what the parser produces, with spans; equality ignores positions."""

from __future__ import annotations

from dataclasses import dataclass, field

from .source import SourceFile, Span

UNITS = {"x": "ratio", "%": "percent", "k": "thousand", "M": "million", "G": "billion"}
SCALE = {"k": 1e3, "M": 1e6, "G": 1e9}


def _position() -> Span:
    # Positions never take part in equality: a reformatted recipe equals its original.
    # The default (None) serves trees built by hand, in tests and tools.
    return field(compare=False, repr=False, default=None)  # type: ignore[return-value]


@dataclass(frozen=True)
class Number:
    """A plain number such as ``128``, ``0.3`` or ``1e-3``."""

    value: int | float
    text: str = field(compare=False)
    span: Span = _position()


@dataclass(frozen=True)
class Quantity:
    """A number with a unit suffix: ``16x``, ``45%``, ``700k``, ``1.2M``, ``0.5G``."""

    amount: int | float
    unit: str
    text: str = field(compare=False)
    span: Span = _position()

    @property
    def scaled(self) -> float:
        """The number the suffix stands for (``700k`` is 700000, ``45%`` is 0.45, ``16x`` is 16)."""
        if self.unit == "%":
            return self.amount / 100
        return self.amount * SCALE.get(self.unit, 1)


@dataclass(frozen=True)
class Fraction:
    """A ratio of two numbers such as ``8/255``, the usual way to write a pixel budget."""

    numerator: Number
    denominator: Number
    span: Span = _position()

    @property
    def text(self) -> str:
        return f"{self.numerator.text}/{self.denominator.text}"


@dataclass(frozen=True)
class String:
    """A double-quoted string; ``\\"`` and ``\\\\`` are its only escapes."""

    value: str
    text: str = field(compare=False)
    span: Span = _position()


@dataclass(frozen=True)
class Name:
    """A bare word: an option such as ``linf``, ``global``, ``true`` or ``svd-finetune``."""

    value: str
    span: Span = _position()


@dataclass(frozen=True)
class Measure:
    """An amount of something: ``16x params``, ``1 epoch``, ``200 steps``."""

    amount: Number | Quantity
    unit: Name
    span: Span = _position()


@dataclass(frozen=True)
class Bound:
    """A comparison: ``params <= 700k``, ``robust >= 60%``."""

    subject: Name
    op: str
    limit: Number | Quantity | Fraction
    span: Span = _position()


@dataclass(frozen=True)
class Keyword:
    """A named argument of a call: ``steps = 20``."""

    name: Name
    value: Value
    span: Span = _position()


@dataclass(frozen=True)
class Call:
    """An option with arguments: ``energy(0.95)``, ``pgd(steps = 20, restarts = 2)``."""

    name: Name
    args: tuple[Value | Keyword, ...]
    span: Span = _position()

    def keyword(self, key: str) -> Keyword | None:
        return next((a for a in self.args if isinstance(a, Keyword) and a.name.value == key), None)


@dataclass(frozen=True)
class List:
    """A bracketed list of values: ``["conv1", "fc"]``."""

    items: tuple[Value, ...]
    span: Span = _position()


Value = Number | Quantity | Fraction | String | Name | Measure | Bound | Call | List


@dataclass(frozen=True)
class Attribute:
    """``key = value``."""

    key: Name
    value: Value
    span: Span = _position()


@dataclass(frozen=True)
class Requirement:
    """``require robust >= 60%``: a condition the compiled model must meet."""

    bound: Bound
    span: Span = _position()


@dataclass(frozen=True)
class Extend:
    """``extend "base.cstar"``: start from another recipe and override it."""

    path: String
    span: Span = _position()


@dataclass(frozen=True)
class Block:
    """``kind labels... { items }``, such as ``model { ... }`` or ``layer "fc" { ... }``."""

    kind: Name
    labels: tuple[String | Name, ...]
    items: tuple[Item, ...]
    span: Span = _position()
    close: Span = _position()


Item = Attribute | Block | Requirement | Extend


@dataclass(frozen=True)
class Comment:
    """A ``#`` comment, kept so that ``cstar fmt`` can put it back."""

    text: str
    span: Span = _position()


@dataclass(frozen=True)
class Document:
    """A parsed recipe file: its items, its comments and the source they came from."""

    items: tuple[Item, ...]
    comments: tuple[Comment, ...] = field(compare=False, default=())
    source: SourceFile | None = field(compare=False, repr=False, default=None)


def render_value(value: Value | Keyword) -> str:
    """Canonical text of a value on one line (the formatter and messages use it)."""
    if isinstance(value, (Number, Quantity, Fraction, String)):
        return value.text
    if isinstance(value, Name):
        return value.value
    if isinstance(value, Measure):
        return f"{render_value(value.amount)} {value.unit.value}"
    if isinstance(value, Bound):
        return f"{value.subject.value} {value.op} {render_value(value.limit)}"
    if isinstance(value, Keyword):
        return f"{value.name.value} = {render_value(value.value)}"
    if isinstance(value, Call):
        return f"{value.name.value}({', '.join(render_value(a) for a in value.args)})"
    return f"[{', '.join(render_value(item) for item in value.items)}]"
