"""Validation stage: merged sections -> Spec, with every problem of a file as a located diagnostic."""

from __future__ import annotations

import fnmatch
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ValidationError

from . import limits
from . import syntax as ast
from .errors import CStarError, Diagnostic, closest, did_you_mean
from .lower import Section, SectionList
from .problems import SpecProblem
from .render import plural
from .resolve import is_drop, load_sections
from .source import Span
from .spec import Spec

Loc = tuple[str | int, ...]
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
    return Checked(Spec(**blocks), tuple(diagnostics), root)


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
        node, found = _walk(root, loc)
        for part in ctx["at"]:
            node = _child(node, part) or node
        return _span_of(node) or found
    return _span_of(value) if isinstance(value, _SYNTAX_VALUES) else locate(root, loc)


def _related_note(root: Section, span: Span | None, related: Loc | None) -> tuple[str, ...]:
    """Point at the setting an error depends on when another file (an `extend`ed base) set it."""
    other = locate(root, tuple(related)) if related else None
    if other is None or span is None or other.path == span.path:
        return ()
    return (f"`{related[-1]}` is set at {other.path}:{other.line}:{other.column}",)


def _unknown_key(loc: Loc, root: Section) -> Diagnostic:
    parent, _ = _walk(root, loc[:-1])
    key = str(loc[-1])
    allowed = [_WRITTEN.get(name, name) for name in _fields_at(loc[:-1]) if name not in ("kind", "selector")]
    if isinstance(parent, ast.Call):
        keyword = parent.keyword(key)
        return Diagnostic(
            "unknown-argument", f"`{parent.name.value}` has no argument `{key}`",
            keyword.name.span if keyword else parent.span, label=did_you_mean(key, allowed) or "unknown argument",
            help=f"its arguments are: {', '.join(allowed)}" if allowed else f"`{parent.name.value}` takes no arguments")
    info = parent.keys.get(key) if isinstance(parent, Section) else None
    written = info.written if info else key
    value = parent.get(key) if isinstance(parent, Section) else None
    is_block = isinstance(value, Section) or (isinstance(value, SectionList) and isinstance(value[0], Section))
    where = "the recipe" if not loc[:-1] else f"the `{_block_name(parent)}` block"
    code = "unknown-block" if is_block else "unknown-key"
    noun = "block" if is_block else ("line" if written == "require" else "key")
    return Diagnostic(
        code, f"unknown {noun} `{written}` in {where}", info.span if info else _span_of(parent),
        label=did_you_mean(written, allowed) or f"not a {noun} of {where}",
        help=f"allowed here: {', '.join(allowed)}" if allowed else None)


def _missing_key(loc: Loc, root: Section) -> Diagnostic:
    parent, _ = _walk(root, loc[:-1])
    key = str(loc[-1])
    if isinstance(parent, (ast.Call, ast.Name)):
        name = parent.name.value if isinstance(parent, ast.Call) else parent.value
        return Diagnostic("missing-argument", f"`{name}` needs the argument `{key}`", parent.span,
                          label=f"add `{key} = ...`", help=f"write it as `{name}({key} = ...)`")
    return Diagnostic("missing-key", f"the `{_block_name(parent)}` block needs `{key}`", _span_of(parent),
                      label=f"`{key}` is missing", help=f"add `{key} = ...` inside the block")


def _block_name(node: object) -> str:
    if isinstance(node, Section):
        return node.kind
    return "?"


def _span_of(node: object) -> Span | None:
    return getattr(node, "span", None)


def locate(root: Section, loc: Loc) -> Span | None:
    """The span of the deepest node that ``loc`` reaches in the sections."""
    node, last_span = _walk(root, loc)
    return _span_of(node) or last_span


def _walk(root: Section, loc: Loc) -> tuple[object, Span | None]:
    node: object = root
    last_span = root.span
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue  # a union tag or a name pydantic made up: stay on the node
        node = child
        last_span = _span_of(node) or last_span
    return node, last_span


def _child(node: object, part: str | int) -> object | None:
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


# ------------------------------------------------------------------- semantic checks


def semantic_checks(blocks: dict[str, BaseModel], root: Section) -> list[Diagnostic]:
    """Checks across fields and blocks; each runs once the blocks it reads are valid, and reports
    every instance it finds."""
    view = SimpleNamespace(**blocks)
    return [diagnostic for needed, check in _CHECKS if all(name in blocks for name in needed)
            for diagnostic in check(view, root)]


def _rules_against_keep(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    found = []
    for index, rule in enumerate(spec.compress.layers):
        if rule.dense or rule.selector.kind == "type":
            continue
        kept = next((k for k in spec.compress.keep
                     if k == rule.selector.pattern or fnmatch.fnmatchcase(rule.selector.pattern, k)), None)
        if kept is not None:
            found.append(Diagnostic(
                "rule-contradicts-keep", f"layer rule {rule.selector} compresses a layer that `keep` leaves dense",
                locate(root, ("compress", "layers", index, "selector")), label=f"kept dense by `keep` entry \"{kept}\"",
                help="remove the layer from `keep`, or drop this rule"))
    return found


def _phases_for_method(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    method, train = spec.compress.method, spec.train
    found = []
    if method == "cstar" and train.admm is None:
        found.append(Diagnostic(
            "missing-phase", "method `cstar` needs an `admm` phase", locate(root, ("train",)),
            label="no `admm { ... }` here", help="add `admm { epochs = ..., lr = ... }` to the train block"))
    if method != "cstar" and train.admm is not None:
        found.append(Diagnostic(
            "phase-ignored", f"method `{method}` has no ADMM phase; the `admm` block is not used",
            locate(root, ("train", "admm")), severity="warning", label="ignored",
            help="drop it with `admm = none` in the train block; move its epochs to `finetune` to give "
                 "the method the same total epochs"))
    if train.finetune is None:
        found.append(Diagnostic(
            "missing-phase", f"method `{method}` needs a `finetune` phase", locate(root, ("train",)),
            label="no `finetune { ... }` here", help="add `finetune { epochs = ..., lr = ... }` to the train block"))
    return found


_PRUNING_SETTINGS = {"allocation": ("uniform", "spreads the removed channels"),
                     "importance": ("l1", "scores the channels")}


def _pruning_settings_for_method(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    compress = spec.compress
    if compress.method == "channel-prune":
        return []
    return [Diagnostic(
        "setting-ignored", f"method `{compress.method}` removes no channels; `{key}` is not used",
        locate(root, ("compress", key)), severity="warning", label="ignored",
        help=f"`{key}` chooses how `channel-prune` {what}; drop it for this method")
        for key, (default, what) in _PRUNING_SETTINGS.items() if getattr(compress, key) != default]


def _fixed_policy_ranks(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    if spec.compress.policy.kind != "fixed" or any(r.rank is not None for r in spec.compress.layers):
        return []
    return [Diagnostic(
        "fixed-needs-rank", "policy `fixed` takes its ranks from `layer` rules, but none sets `rank`",
        locate(root, ("compress", "policy")), label="no ranks to use",
        help='add rules such as `layer type Conv2d { rank = 16 }`, or choose `policy = global`')]


def _data_root(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    if spec.data.dataset == "digits" or spec.data.root is not None:
        return []
    return [Diagnostic(
        "missing-key", f"data set `{spec.data.dataset}` needs `root`, the folder that holds it",
        locate(root, ("data",)), label="`root` is missing",
        help='add `root = "path/to/data"` (relative to this recipe), or `download = true` with a root to fill')]


def _split_for_dataset(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    dataset, split = spec.data.dataset, spec.data.split
    if dataset == "digits" and split == "official":
        return [Diagnostic(
            "invalid-split", "`digits` has no official train/test split", locate(root, ("data", "split")),
            label="no official split", help="give the training share, for example `split = 80%` (the default)")]
    if dataset != "digits" and isinstance(split, float):
        return [Diagnostic(
            "invalid-split", f"`{dataset}` has an official train/test split; a share cannot replace it",
            locate(root, ("data", "split")), label="not for this data set",
            help="remove `split` (or write `split = official`)")]
    return []


def _normalization_channels(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    channels = spec.model.input[0]
    found = []
    for key in ("mean", "std"):
        values = getattr(spec.data, key)
        if values is not None and len(values) != channels:
            found.append(Diagnostic(
                "shape-mismatch",
                f"`{key}` has {plural(len(values), 'value')} but the input has {plural(channels, 'channel')}",
                locate(root, ("data", key)), label=f"expected {plural(channels, 'value')}",
                help="give one value per input channel (model.input is [C, H, W])"))
    return found


def _input_against_dataset(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    """The model's input and classes must be what the data set delivers, or the run crashes (or,
    worse, plans and reports the MACs of images it never sees)."""
    dataset, (channels, height, width) = spec.data.dataset, spec.model.input
    fixed = limits.FIXED_SHAPES.get(dataset)
    found = []
    if fixed is not None and fixed[0] != spec.model.input:
        expected = "x".join(map(str, fixed[0]))
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` is {_shape(spec.model.input)}, but `{dataset}` images are {expected}",
            locate(root, ("model", "input")), label=f"expected {_shape(fixed[0])}",
            help=f"write `input = {_shape(fixed[0])}`, or choose the data set this model is for"))
    if fixed is None and channels != limits.FOLDER_CHANNELS:
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` has {plural(channels, 'channel')}, but `{dataset}` images are RGB",
            locate(root, ("model", "input")), label=f"expected {limits.FOLDER_CHANNELS} channels",
            help=f"write `input = [3, {height}, {width}]`"))
    if fixed is None and min(height, width) < limits.MIN_FOLDER_SIDE:
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` is {height}x{width} pixels, too small for `{dataset}` crops",
            locate(root, ("model", "input")), label=f"at least {limits.MIN_FOLDER_SIDE}x{limits.MIN_FOLDER_SIDE}",
            help="the usual ImageNet input is `input = [3, 224, 224]`"))
    if fixed is not None and fixed[1] != spec.model.classes:
        found.append(Diagnostic(
            "dataset-mismatch", f"`classes` is {spec.model.classes}, but `{dataset}` has {fixed[1]} classes",
            locate(root, ("model", "classes")), label=f"expected {fixed[1]}",
            help=f"write `classes = {fixed[1]}`: the model needs one output per class of the data set"))
    return found


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _drops_without_a_block(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    """`PHASE = none` that found no block to drop: the recipe says something that changes nothing."""
    train = root.get("train")
    return [Diagnostic(
        "nothing-to-drop", f"`{key} = none` drops nothing: there is no `{key}` block here or in a base",
        locate(root, ("train", key)), severity="warning", label="nothing to drop",
        help=f"remove this line: `{key} = none` removes the `{key}` block of an `extend`ed recipe")
        for key, value in (train.items() if isinstance(train, Section) else ()) if is_drop(value)]


_CHECKS = (
    (("compress",), _rules_against_keep),
    (("compress", "train"), _phases_for_method),
    (("compress",), _fixed_policy_ranks),
    (("compress",), _pruning_settings_for_method),
    (("data",), _data_root),
    (("data",), _split_for_dataset),
    (("model", "data"), _normalization_channels),
    (("model", "data"), _input_against_dataset),
    (("train",), _drops_without_a_block),
)


