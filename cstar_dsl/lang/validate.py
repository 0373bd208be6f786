"""Validation stage: merged sections -> Spec, with every problem of a file as a located diagnostic."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from . import syntax as ast
from .checks import semantic_checks
from .errors import CStarError, Diagnostic, closest, did_you_mean
from .locate import Loc, child, locate, span_of, walk
from .lower import Section, SectionList
from .problems import SpecProblem
from .resolve import load_sections
from .source import Span
from .spec import Spec

_SYNTAX_VALUES = (ast.Number, ast.Quantity, ast.Fraction, ast.String, ast.Name, ast.Measure, ast.Bound, ast.Call,
                  ast.List, ast.Requirement)
# keys whose entries the user writes under another word
_WRITTEN = {"layers": "layer", "requirements": "require"}
_READ = {written: key for key, written in _WRITTEN.items()}


@dataclass(frozen=True)
class Checked:
    """A valid recipe, its warnings, and its sections (to point later stages' problems at lines)."""

    spec: Spec
    warnings: tuple[Diagnostic, ...]
    sections: Section = field(repr=False, compare=False)

    def diagnostic(self, problem: SpecProblem) -> Diagnostic:
        """A later stage's problem as a diagnostic at the recipe line it concerns."""
        return problem.diagnostic(locate(self.sections, problem.loc))


def check_file(path: str | Path, *, allow_import: bool = False, text: bytes | None = None) -> Checked:
    """Load, merge and validate a recipe file (or ``text`` taken to live at ``path``).

    Raises:
        CStarError: with every error found (and the warnings), sorted by position.
    """
    root, structural = load_sections(Path(path), text)
    return check_sections(root, structural, allow_import=allow_import)


def load_spec(path: str | Path, *, allow_import: bool = False) -> Spec:
    """The validated recipe at ``path`` (see ``check_file``)."""
    return check_file(path, allow_import=allow_import).spec


def check_sections(root: Section, found: list[Diagnostic], *, allow_import: bool = False) -> Checked:
    """Validate merged sections; ``found`` holds the problems of the earlier stages."""
    blocks, errors = _validate_blocks(root, {"allow_import": allow_import})
    diagnostics = [*found, *_pydantic_diagnostics(errors, root), *semantic_checks(blocks, root)]
    diagnostics.sort(key=_position)
    if errors or any(d.is_error for d in diagnostics):
        raise CStarError(diagnostics)
    return Checked(Spec.model_validate(blocks), tuple(diagnostics), root)


def _validate_blocks(root: Section, context: dict[str, Any]) -> tuple[dict[str, BaseModel], list[Any]]:
    """Each block on its own, so that a bad block does not hide the cross-block checks of the others."""
    blocks: dict[str, BaseModel] = {}
    errors: list[Any] = [{"type": "extra_forbidden", "loc": (key,), "input": None} for key in root
                         if key not in Spec.model_fields]
    for name, field_info in Spec.model_fields.items():
        if name not in root:
            if field_info.is_required():
                errors.append({"type": "missing", "loc": (name,), "input": None})
            continue
        try:
            blocks[name] = field_info.annotation.model_validate(root[name], context=context)  # type: ignore[union-attr]
        except ValidationError as error:
            errors += [{**e, "loc": (name, *e["loc"])} for e in error.errors(include_url=False)]
    return blocks, errors


def _position(diagnostic: Diagnostic) -> tuple[str, int, int]:
    span = diagnostic.span
    return (span.path, span.line, span.column) if span else ("", 0, 0)


# ------------------------------------------------------ pydantic errors -> diagnostics


def _pydantic_diagnostics(errors: list[Any], root: Section) -> list[Diagnostic]:
    """One diagnostic per error, except a "missing" key that a misspelt key already explains."""
    misspelt = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            loc = tuple(error["loc"])
            match = closest(str(loc[-1]), [_WRITTEN.get(f, f) for f in _fields_at(loc[:-1])])
            if match is not None:
                misspelt.add((*loc[:-1], _READ.get(match, match)))
    kept = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelt)]
    missing_blocks = [str(e["loc"][0]) for e in kept if e["type"] == "missing" and len(e["loc"]) == 1]
    found = [_diagnostic(e, root) for e in kept if not (e["type"] == "missing" and len(e["loc"]) == 1)]
    if missing_blocks:
        found.insert(0, _missing_blocks(missing_blocks, root))
    return found


def _missing_blocks(names: list[str], root: Section) -> Diagnostic:
    listed = ", ".join(f"`{n}`" for n in names[:-1]) + (" or " if len(names) > 1 else "") + f"`{names[-1]}`"
    return Diagnostic(
        "missing-block", f"the recipe has no {listed} block", root.span,
        label=f"{'these blocks are' if len(names) > 1 else 'this block is'} required",
        help="every recipe has model, data, threat, compress and train blocks (or `extend`s a base that has them)")


def _diagnostic(error: Any, root: Section) -> Diagnostic:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(loc, root)
    if kind == "missing":
        return _missing_key(loc, root)
    ctx = error.get("ctx") or {}
    span = _error_span(root, loc, ctx, error.get("input"))
    if "message" in ctx:
        return Diagnostic(kind, ctx["message"], span, label=ctx.get("label"), help=ctx.get("help"),
                          notes=_related_note(root, span, ctx.get("related")))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        name = loc[-1] if loc else "?"
        return Diagnostic("expected-block", f"`{name}` is a block, not a setting", span, label="expected `{ ... }`",
                          help=f"write `{name} {{ ... }}` with its settings inside")
    return Diagnostic("wrong-type", error["msg"], span, label="invalid value")


def _error_span(root: Section, loc: Loc, ctx: dict[str, Any], value: object) -> Span | None:
    """Where an error points: the part named by ``at``, else the offending value, else the key."""
    if "at" in ctx:
        node, found = walk(root, loc)
        for part in ctx["at"]:
            node = child(node, part) or node
        return span_of(node) or found
    return span_of(value) if isinstance(value, _SYNTAX_VALUES) else locate(root, loc)


def _related_note(root: Section, span: Span | None, related: Loc | None) -> tuple[str, ...]:
    """Point at the setting an error depends on when another file (an `extend`ed base) set it."""
    if not related:
        return ()
    other = locate(root, tuple(related))
    if other is None or span is None or other.path == span.path:
        return ()
    return (f"`{related[-1]}` is set at {other.path}:{other.line}:{other.column}",)


def _unknown_key(loc: Loc, root: Section) -> Diagnostic:
    parent, _ = walk(root, loc[:-1])
    key = str(loc[-1])
    allowed = [_WRITTEN.get(name, name) for name in _fields_at(loc[:-1]) if name not in ("kind", "selector")]
    if isinstance(parent, ast.Call):
        keyword = parent.keyword(key)
        return Diagnostic(
            "unknown-argument", f"`{parent.name.value}` has no argument `{key}`",
            keyword.name.span if keyword else parent.span, label=did_you_mean(key, allowed) or "unknown argument",
            help=f"its arguments are: {', '.join(allowed)}" if allowed else f"`{parent.name.value}` takes no arguments")
    info = parent.key_info.get(key) if isinstance(parent, Section) else None
    written = info.written if info else key
    value = parent.get(key) if isinstance(parent, Section) else None
    is_block = isinstance(value, Section) or (isinstance(value, SectionList) and isinstance(value[0], Section))
    where = "the recipe" if not loc[:-1] else f"the `{_block_name(parent)}` block"
    code = "unknown-block" if is_block else "unknown-key"
    noun = "block" if is_block else ("line" if written == "require" else "key")
    return Diagnostic(
        code, f"unknown {noun} `{written}` in {where}", info.span if info else span_of(parent),
        label=did_you_mean(written, allowed) or f"not a {noun} of {where}",
        help=f"allowed here: {', '.join(allowed)}" if allowed else None)


def _missing_key(loc: Loc, root: Section) -> Diagnostic:
    parent, _ = walk(root, loc[:-1])
    key = str(loc[-1])
    if isinstance(parent, (ast.Call, ast.Name)):
        name = parent.name.value if isinstance(parent, ast.Call) else parent.value
        return Diagnostic("missing-argument", f"`{name}` needs the argument `{key}`", parent.span,
                          label=f"add `{key} = ...`", help=f"write it as `{name}({key} = ...)`")
    return Diagnostic("missing-key", f"the `{_block_name(parent)}` block needs `{key}`", span_of(parent),
                      label=f"`{key}` is missing", help=f"add `{key} = ...` inside the block")


def _block_name(node: object) -> str:
    if isinstance(node, Section):
        return node.kind
    return "?"


def _fields_at(loc: Loc) -> list[str]:
    """The field names of the model that ``loc`` leads to (for "did you mean")."""
    current: Any = Spec
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) is tuple and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) in (typing.Union, type(int | None)):
            current = next((m for m in typing.get_args(current) if _tag(m) == part), current)
    current = _unwrap(current)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    if typing.get_origin(tp) in (typing.Union, type(int | None)) and len(members) == 1:
        return _unwrap(members[0])
    return tp


def _tag(model: Any) -> object:
    fields = getattr(model, "model_fields", {})
    return fields["kind"].default if "kind" in fields else None
