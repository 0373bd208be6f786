"""Parse stage, tree -> syntax: Lark's parse tree shaped into the frozen syntax nodes, each with its span."""

from __future__ import annotations

import math
import re

from lark import Token, Transformer, v_args

from . import syntax as ast
from .source import SourceFile, Span


def token_span(source: SourceFile, token: Token) -> Span:
    """Where ``token`` stands in ``source``."""
    start = token.start_pos or 0
    return source.span(start, start + len(token.value))


@v_args(inline=True)
class ToSyntax(Transformer):
    """Shapes the Lark tree into syntax nodes with spans; validates nothing."""

    def __init__(self, source: SourceFile) -> None:
        super().__init__()
        self.source = source

    def _span(self, first: Token | object, last: Token | object) -> Span:
        start = _start(first)
        return self.source.span(start, _end(last))

    def start(self, *items: ast.Item) -> tuple[ast.Item, ...]:
        return items

    def number(self, token: Token) -> ast.Number:
        return ast.Number(_to_number(token.value), token.value, token_span(self.source, token))

    def quantity(self, token: Token) -> ast.Quantity:
        text = token.value
        return ast.Quantity(_to_number(text[:-1]), text[-1], text, token_span(self.source, token))

    def fraction(self, top: Token, _slash: Token, bottom: Token) -> ast.Fraction:
        return ast.Fraction(self.number(top), self.number(bottom), self._span(top, bottom))

    def string(self, token: Token) -> ast.String:
        value = re.sub(r'\\(["\\])', r"\1", token.value[1:-1])
        return ast.String(value, token.value, token_span(self.source, token))

    def name(self, token: Token) -> ast.Name:
        return ast.Name(token.value, token_span(self.source, token))

    def measure(self, amount: Token, unit: Token) -> ast.Measure:
        number = self.quantity(amount) if amount.type == "QUANTITY" else self.number(amount)
        return ast.Measure(number, self.name(unit), self._span(amount, unit))

    def bound(self, subject: Token, op: Token, limit: ast.Value) -> ast.Bound:
        return ast.Bound(self.name(subject), op.value, limit, self._span(subject, limit))  # type: ignore[arg-type]

    def keyword(self, key: Token, _eq: Token, value: ast.Value) -> ast.Keyword:
        return ast.Keyword(self.name(key), value, self._span(key, value))

    def call(self, name: Token, *rest: object) -> ast.Call:
        args = tuple(a for a in rest if not isinstance(a, Token))
        return ast.Call(self.name(name), args, self._span(name, rest[-1]))  # type: ignore[arg-type]

    def list(self, *rest: object) -> ast.List:
        items = tuple(a for a in rest if not isinstance(a, Token))
        return ast.List(items, self._span(rest[0], rest[-1]))  # type: ignore[arg-type]

    def attribute(self, key: Token, _eq: Token, value: ast.Value) -> ast.Attribute:
        return ast.Attribute(self.name(key), value, self._span(key, value))

    def requirement(self, keyword: Token, bound: ast.Bound) -> ast.Requirement:
        return ast.Requirement(bound, self._span(keyword, bound))

    def extend(self, keyword: Token, path: Token) -> ast.Extend:
        return ast.Extend(self.string(path), self._span(keyword, path))

    def block(self, kind: Token, *rest: object) -> ast.Block:
        opening = next(i for i, part in enumerate(rest) if isinstance(part, Token) and part.type == "LBRACE")
        # Every part before the brace is a label token; the isinstance only tells the type checker so.
        labels = tuple(self.string(t) if t.type == "STRING" else self.name(t)
                       for t in rest[:opening] if isinstance(t, Token))
        close = rest[-1]
        items = tuple(part for part in rest[opening + 1 : -1] if not isinstance(part, Token))
        header_end = rest[opening]
        return ast.Block(
            self.name(kind),
            labels,
            items,  # type: ignore[arg-type]
            self._span(kind, header_end),
            token_span(self.source, close),  # type: ignore[arg-type]
        )


def _start(node: object) -> int:
    if isinstance(node, Token):
        return node.start_pos or 0
    return node.span.start  # type: ignore[attr-defined]


def _end(node: object) -> int:
    if isinstance(node, Token):
        return node.end_pos if node.end_pos is not None else (node.start_pos or 0) + len(node.value)
    return node.span.end  # type: ignore[attr-defined]


def _to_number(text: str) -> int | float:
    if re.fullmatch(r"-?[0-9]+", text):
        # Far beyond any setting: keep it out of int->float overflow (and int()'s digit limit).
        if len(text.lstrip("-")) > 300:
            return -math.inf if text.startswith("-") else math.inf
        return int(text)
    return float(text)
