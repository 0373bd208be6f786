"""Loading stage: a recipe file and its ``extend`` chain -> one merged set of sections."""

from __future__ import annotations

import os
from pathlib import Path

from .. import files
from . import syntax as ast
from .errors import CStarError, Diagnostic
from .lower import Section, SectionList, identity, lower
from .parse import parse
from .source import Span

MAX_FILE_BYTES = 16 * 1024 * 1024
RECIPE_SUFFIX = ".cstar"


def display_path(path: Path) -> str:
    """The path as the user should see it: relative to the working folder when inside it."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def read_document(path: Path) -> ast.Document:
    """Read and parse one recipe file.

    Raises:
        CStarError: ``file-not-found``/``unreadable-file``/``not-a-recipe`` without a span, or a syntax
            diagnostic.
    """
    found = files.kind(path)  # stat, not open: a FIFO or a device would block the read
    if found not in ("a file", "missing"):
        raise CStarError([Diagnostic("unreadable-file", f"cannot read {display_path(path)}: it is {found}, "
                                     "not a regular file", help="a recipe is a small text file; check the path")])
    if found == "a file":
        _require_recipe(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CStarError([Diagnostic(
                "unreadable-file", f"{display_path(path)} is larger than {MAX_FILE_BYTES // 2**20} MiB",
                help="a recipe is a small text file; check the path")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise CStarError([Diagnostic("file-not-found", f"no such file: {display_path(path)}")]) from None
    except OSError as error:
        raise CStarError([Diagnostic(
            "unreadable-file", f"cannot read {display_path(path)}: {error.strerror or error}")]) from None
    return parse(data, display_path(path))


def is_recipe_name(path: Path) -> bool:
    """Whether ``path``, with every symlink followed, names a recipe: its file name ends in ``.cstar``.

    cstar opens nothing else as a recipe, so no recipe, however hostile, can make it read and quote
    another file (``extend "/etc/passwd"``, or a ``.cstar`` symlink that leads there).
    """
    return Path(os.path.realpath(path)).suffix == RECIPE_SUFFIX


def _require_recipe(path: Path, span: Span | None = None) -> None:
    if is_recipe_name(path):
        return
    real = os.path.realpath(path)
    through = f" (a symlink to {_clip(display_path(Path(real)))})" if real != os.path.abspath(path) else ""
    raise CStarError([Diagnostic(
        "not-a-recipe", f"{_clip(display_path(path))}{through} is not a recipe: its name does not end in "
        f"`{RECIPE_SUFFIX}`", span, label="not a `.cstar` file",
        help=f"cstar reads only `{RECIPE_SUFFIX}` files as recipes; rename the file")])


def load_sections(path: Path, text: bytes | None = None) -> tuple[Section, list[Diagnostic]]:
    """The merged sections of a recipe and its bases, and the structural problems of every file.

    ``text``, when given, is the recipe's content (read from standard input, say) and ``path`` only
    says where it is taken to live: its ``extend`` and relative paths resolve from that folder.

    Raises:
        CStarError: when a file cannot be read or parsed, or an ``extend`` is missing or cyclic.
    """
    # realpath, not Path.resolve: the latter raises on a symlink loop, which read_document reports.
    return _load(Path(os.path.realpath(path)), (), text)


def _load(path: Path, chain: tuple[tuple[Path, ast.Extend], ...],
          text: bytes | None = None) -> tuple[Section, list[Diagnostic]]:
    lowered = lower(parse(text, display_path(path)) if text is not None else read_document(path))
    if lowered.extend is None:
        return lowered.root, lowered.diagnostics
    base_path = _base_path(path, lowered.extend, chain)
    base, base_diagnostics = _load(base_path, (*chain, (path, lowered.extend)))
    return merge(base, lowered.root), base_diagnostics + lowered.diagnostics


def _base_path(path: Path, extend: ast.Extend, chain: tuple[tuple[Path, ast.Extend], ...]) -> Path:
    target = Path(os.path.realpath(path.parent / extend.path.value))  # the grammar refuses NUL in strings
    visited = [p for p, _ in chain] + [path]
    if target in visited:
        cycle = " -> ".join(display_path(p) for p in visited[visited.index(target):] + [target])
        raise CStarError([Diagnostic(
            "extend-cycle", "this `extend` makes a cycle", extend.path.span, label="leads back here",
            notes=(f"cycle: {cycle}",), help="a recipe cannot extend itself, directly or through its bases")])
    found = files.kind(target)
    if found != "a file":
        what = {"missing": "no such file", "a folder": "a folder, not a recipe"}.get(found, f"{found}, not a recipe")
        raise CStarError([Diagnostic(
            "extend-not-found", f"base recipe not found: {_clip(display_path(target))}", extend.path.span,
            label=what, help="paths in a recipe are relative to the recipe's own folder")])
    _require_recipe(target, extend.path.span)
    return target


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merge(base: Section, override: Section) -> Section:
    """``override`` on top of ``base``: blocks merge key by key, layer rules and requirements by
    selector and metric, every other value is replaced."""
    merged = Section(override.kind, override.span or base.span)
    merged.update(base)
    merged.key_info.update(base.key_info)
    for key, value in override.items():
        previous = base.get(key)
        if is_drop(value) and isinstance(previous, Section):  # `admm = none`: the base's block goes
            del merged[key]
            merged.key_info.pop(key, None)
            continue
        if isinstance(value, Section) and isinstance(previous, Section):
            value = merge(previous, value)
        elif isinstance(value, SectionList) and isinstance(previous, SectionList):
            value = _merge_entries(previous, value)
        merged[key] = value
        merged.key_info[key] = override.key_info[key]
    return merged


def is_drop(value: object) -> bool:
    """Whether a value is the bare word ``none``, which removes a block an ``extend``ed base has."""
    return isinstance(value, ast.Name) and value.value == "none"


def _merge_entries(base: SectionList, override: SectionList) -> SectionList:
    merged = SectionList(base)
    for entry in override:
        index = next((i for i, e in enumerate(merged) if identity(e) == identity(entry)), None)
        if index is None:
            merged.append(entry)
        elif isinstance(entry, Section):
            merged[index] = merge(merged[index], entry)
        else:
            merged[index] = entry
    return merged
