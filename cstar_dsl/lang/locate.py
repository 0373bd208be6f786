"""Spec locations -> recipe spans: the node a pydantic or stage location reaches in the lowered sections."""

from __future__ import annotations

from . import syntax as ast
from .lower import Section, SectionList
from .source import Span

Loc = tuple[str | int, ...]


def span_of(node: object) -> Span | None:
    """Where ``node`` was written, when it is a syntax node or a section."""
    return getattr(node, "span", None)


def locate(root: Section, loc: Loc) -> Span | None:
    """The span of the deepest node that ``loc`` reaches in the sections."""
    node, last_span = walk(root, loc)
    return span_of(node) or last_span


def walk(root: Section, loc: Loc) -> tuple[object, Span | None]:
    """The deepest node ``loc`` reaches, and the last span seen on the way."""
    node: object = root
    last_span = root.span
    for part in loc:
        found = child(node, part)
        if found is None:
            continue  # a union tag or a name pydantic made up: stay on the node
        node = found
        last_span = span_of(node) or last_span
    return node, last_span


def child(node: object, part: str | int) -> object | None:
    """One step of a location: a key of a section, an entry of a list, an argument of a call, or ``@part``."""
    if isinstance(part, str) and part.startswith("@"):
        return _part(node, part[1:])
    if isinstance(node, ast.Call) and isinstance(part, int):
        return node.args[part] if 0 <= part < len(node.args) else None
    if isinstance(node, Section):
        return node.get(part) if isinstance(part, str) else None
    if isinstance(node, (SectionList, ast.List)) and isinstance(part, int):
        entries = node.items if isinstance(node, ast.List) else node
        return entries[part] if 0 <= part < len(entries) else None
    if isinstance(node, ast.Call) and isinstance(part, str):
        keyword = node.keyword(part)
        return keyword.value if keyword else None
    return None


def _part(node: object, name: str) -> object | None:
    """A named part of a syntax node: a call's `name`, a measure's `amount`/`unit`, a bound's
    `subject`/`limit` (a requirement's through its bound)."""
    if isinstance(node, ast.Requirement):
        node = node.bound
    return getattr(node, name, None)
