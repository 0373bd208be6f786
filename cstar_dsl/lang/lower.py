"""Lowering stage: syntax tree -> nested sections (dicts that remember spans), with structural checks.

Blocks become sections, settings become keys, ``layer`` blocks a list under ``layers`` and
``require`` lines a list under ``requirements``. Duplicates are found here; what each key means
is the spec stage's business. Values stay syntax nodes so later errors can point at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import syntax as ast
from .errors import Diagnostic
from .registry import normalize_module_name
from .source import Span

# labelled blocks and the list key they gather under
LABELLED_BLOCKS = {"layer": "layers"}
REQUIREMENTS_KEY = "requirements"
TOP_LEVEL_BLOCKS = ("model", "data", "threat", "compress", "train", "evaluate", "export")


class Section(dict[str, Any]):
    """One block's settings; ``span`` is its header, ``key_info`` where each key was written."""

    def __init__(self, kind: str, span: Span | None) -> None:
        super().__init__()
        self.kind = kind
        self.span = span
        self.key_info: dict[str, KeyInfo] = {}


@dataclass(frozen=True)
class KeyInfo:
    """Where a key was written and the word the user wrote for it (``layer`` for ``layers``)."""

    span: Span
    written: str


class SectionList(list[Any]):
    """The list of ``layer`` sections or ``require`` lines of a block."""


@dataclass
class Lowered:
    """A file's sections, its ``extend`` line (if any) and the structural problems found."""

    root: Section
    extend: ast.Extend | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)


def lower(document: ast.Document) -> Lowered:
    """Gather a document's items into sections; problems are collected, not raised."""
    span = document.source.span(0, 0) if document.source else None
    result = Lowered(Section("file", span))
    for index, item in enumerate(document.items):
        if isinstance(item, ast.Extend):
            _take_extend(result, item, index)
        elif isinstance(item, ast.Block):
            _add(result.root, item, result.diagnostics)
        else:
            result.diagnostics.append(_top_level_item(item))
    return result


def _take_extend(result: Lowered, item: ast.Extend, index: int) -> None:
    if result.extend is not None:
        result.diagnostics.append(Diagnostic(
            "duplicate-extend", "a recipe can extend only one base", item.span, label="second `extend`",
            notes=(f"the first `extend` is on line {result.extend.span.line}",),
            help="make the base itself extend the other recipe"))
    elif index != 0:
        result.diagnostics.append(Diagnostic(
            "misplaced-extend", "`extend` must come before every block", item.span, label="move it to the top",
            help="the base is read first and this file's blocks override it"))
        result.extend = item
    else:
        result.extend = item


def _top_level_item(item: ast.Attribute | ast.Requirement) -> Diagnostic:
    if isinstance(item, ast.Requirement):
        return _misplaced_requirement(item, "at the top level")
    key = item.key.value
    if key in TOP_LEVEL_BLOCKS:
        return Diagnostic(
            "expected-block", f"`{key}` is a block, not a setting", item.span,
            label="expected `{ ... }`", help=f"write `{key} {{ ... }}` with its settings inside")
    return Diagnostic(
        "top-level-setting", f"setting `{key}` is outside any block", item.span,
        label="not inside a block", help="put settings inside a block such as `model { ... }`")


# keys the lowering fills from other syntax; written as settings they would be confused with it
_RESERVED = {
    LABELLED_BLOCKS["layer"]: 'write one `layer "name" { ... }` block per rule',
    REQUIREMENTS_KEY: "write one `require metric >= value` line per requirement",
    "selector": 'the selector is the block\'s label: `layer "name" { ... }` or `layer type Linear { ... }`',
}


def _reserved_key(item: ast.Attribute, kind: str) -> Diagnostic:
    return Diagnostic(
        "unknown-key", f"unknown key `{item.key.value}` in the `{kind}` block", item.key.span,
        label="not a setting", help=_RESERVED[item.key.value])


def _misplaced_requirement(item: ast.Requirement, where: str) -> Diagnostic:
    return Diagnostic(
        "misplaced-require", f"`require` is not allowed {where}", item.span,
        label="only allowed in `evaluate`", help="move it into the `evaluate { ... }` block")


def _block_section(block: ast.Block, diagnostics: list[Diagnostic]) -> Section:
    section = Section(block.kind.value, block.span)
    for item in block.items:
        if isinstance(item, ast.Attribute) and item.key.value in _RESERVED:
            diagnostics.append(_reserved_key(item, block.kind.value))
        elif isinstance(item, ast.Attribute):
            _set(section, item.key.value, item.value, KeyInfo(item.key.span, item.key.value), diagnostics)
        elif isinstance(item, ast.Block):
            _add(section, item, diagnostics)
        elif isinstance(item, ast.Requirement):
            if block.kind.value != "evaluate":
                diagnostics.append(_misplaced_requirement(item, f"in the `{block.kind.value}` block"))
            else:
                _append_unique(section, REQUIREMENTS_KEY, item, KeyInfo(item.span, "require"), diagnostics)
        else:
            diagnostics.append(Diagnostic(
                "misplaced-extend", "`extend` must come first in the file, outside every block", item.span,
                label="not allowed inside a block", help="move it to the first line of the file"))
    return section


def _add(parent: Section, block: ast.Block, diagnostics: list[Diagnostic]) -> None:
    kind = block.kind.value
    section = _block_section(block, diagnostics)
    if kind in LABELLED_BLOCKS:
        selector = _selector(block, diagnostics)
        if selector is not None:
            _set(section, "selector", selector, KeyInfo(block.kind.span, kind), diagnostics)
            _append_unique(parent, LABELLED_BLOCKS[kind], section, KeyInfo(block.kind.span, kind), diagnostics)
        return
    if kind in _RESERVED:
        diagnostics.append(Diagnostic(
            "unknown-block", f"unknown block `{kind}`", block.kind.span, label="not a block", help=_RESERVED[kind]))
        return
    if block.labels:
        diagnostics.append(Diagnostic(
            "unexpected-label", f"`{kind}` blocks take no label", block.labels[0].span.to(block.labels[-1].span),
            label="remove this", help="only `layer` blocks are labelled, with the layers they select"))
    _set(parent, kind, section, KeyInfo(block.kind.span, kind), diagnostics)


def _selector(block: ast.Block, diagnostics: list[Diagnostic]) -> ast.String | ast.Call | None:
    """``layer "name-or-glob"`` -> the string; ``layer type Conv2d`` -> a call ``type(Conv2d)``."""
    labels = block.labels
    if len(labels) == 1 and isinstance(labels[0], ast.String):
        return labels[0]
    if len(labels) == 2 and all(isinstance(x, ast.Name) for x in labels) and labels[0].value == "type":
        return ast.Call(labels[0], (labels[1],), labels[0].span.to(labels[1].span))  # type: ignore[arg-type]
    span = labels[0].span.to(labels[-1].span) if labels else block.kind.span
    diagnostics.append(Diagnostic(
        "invalid-selector", "a `layer` block needs one selector", span,
        label="expected a quoted name or glob, or `type` and a layer type",
        help='write `layer "features.0" { ... }`, `layer "layer4.*" { ... }` or `layer type Linear { ... }`'))
    return None


def _set(section: Section, key: str, value: Any, info: KeyInfo, diagnostics: list[Diagnostic]) -> None:
    if key in section:
        first = section.key_info[key]
        what = "block" if isinstance(value, Section) else "key"
        diagnostics.append(Diagnostic(
            f"duplicate-{what}", f"`{info.written}` is given twice in {_where(section)}", info.span,
            label=f"second `{info.written}`", notes=(f"first given on line {first.span.line}",),
            help=f"keep one `{info.written}`" + (" and merge their settings" if what == "block" else "")))
        return
    section[key] = value
    section.key_info[key] = info


def identity(entry: Any) -> object:
    """What makes two ``layer`` rules or two requirements the same one (for duplicates and `extend`)."""
    if isinstance(entry, Section):
        selector = entry.get("selector")
        return normalize_module_name(selector.value) if isinstance(selector, ast.String) else selector
    return entry.bound.subject.value


def _append_unique(section: Section, key: str, value: Any, info: KeyInfo, diagnostics: list[Diagnostic]) -> None:
    entries = section.setdefault(key, SectionList())
    section.key_info.setdefault(key, info)
    first = next((e for e in entries if identity(e) == identity(value)), None)
    if first is None:
        entries.append(value)
        return
    first_span = first.span
    what = "layer rule" if isinstance(value, Section) else "requirement"
    diagnostics.append(Diagnostic(
        f"duplicate-{'rule' if isinstance(value, Section) else 'requirement'}",
        f"this {what} repeats an earlier one", value.span,
        label=f"second {what} for the same {'selector' if isinstance(value, Section) else 'metric'}",
        notes=(f"first given on line {first_span.line}",), help=f"merge the two into one {what}"))


def _where(section: Section) -> str:
    return "the file" if section.kind == "file" else f"the `{section.kind}` block"
