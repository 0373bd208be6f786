"""The reference documentation stays true: every example in docs/ is checked against the code.

- docs/language.md: every ```cstar block is a whole recipe that passes `cstar check`, or a
  fragment (``<!-- fragment: BLOCK -->`` on the line before the fence) that passes once it replaces
  the block of that name in specs/digits.cstar (or is appended when digits.cstar has none). Every
  example is already in the canonical `cstar fmt` format.
- docs/errors.md: every ``<!-- error: CODE -->`` example fails with a diagnostic of that code (and
  every ``<!-- warning: CODE -->`` example passes with that warning); the plain ``` block after it
  is exactly what `cstar check` prints for it. Every code that cstar_dsl can emit (every
  hyphenated string literal in its source that is not a registry option name) has a ``## CODE``
  section, and every such section names a real code. Each section has an example, except the codes
  about the file itself (API_ONLY_CODES, tested here directly) and the codes of later stages,
  emitted only by modules that `cstar check` never loads (planning, model building).

Examples are written into a temporary folder holding a copy of specs/*.cstar, as ``example.cstar``
(or the name given with ``file: NAME``), and checked from that folder, so ``extend "digits.cstar"``
works and paths print as users see them.

Marker keys: ``fragment: BLOCK``, ``base: NAME`` (the spec in specs/ whose block a fragment
replaces, instead of digits.cstar: a model block for CIFAR images needs CIFAR data), ``error: CODE``,
``warning: CODE``, ``file: NAME`` (also makes the example available to other examples of the same
page), ``encoding: CODEC`` (how the example is written to disk), ``format: full|concise|json`` (the
`--format` of the rendered output).

After a deliberate change to a message, regenerate the rendered outputs of docs/errors.md with
``.venv/bin/python -m tests.test_docs --update`` (from the repository root) and review the diff.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from cstar_dsl import cli
from cstar_dsl.cli.output import EXIT_INVALID, EXIT_OK
from cstar_dsl.lang import registry
from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.fmt import format_text
from cstar_dsl.lang.validate import check_file
from tests.helpers import DOCS, PACKAGE, ROOT, SPECS

LANGUAGE = DOCS / "language.md"
ERRORS = DOCS / "errors.md"
ARCHITECTURE = DOCS / "architecture.md"
BASE = "digits.cstar"

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--(?P<text>.*?)-->\s*\Z", re.DOTALL)
MARKER_ITEM = re.compile(r"(?P<key>[a-z]+):\s*(?P<value>[^\s:]+)(?=\s|$)")
MARKER_KEYS = {"fragment", "base", "error", "warning", "file", "encoding", "format"}
SECTION = re.compile(r"^## (?P<code>[a-z]+(?:-[a-z]+)+)[ \t]*$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Codes that no recipe text can produce: they are about the file itself, and the CLI answers a
# missing FILE argument with a usage error before reading it. Tested here through the API.
API_ONLY_CODES = {"file-not-found", "unreadable-file", "unwritable-file"}
# The commands' own failures (compile's out folder, lock, checkpoint, divergence; export; eval): the CLI module
# that `cstar check` loads emits them, but only those commands reach them; tests/cli/test_cli_run.py shows each.
RUN_CODES = {"run-failed", "export-failed", "eval-failed", "eval-interrupted"}


# --------------------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Example:
    """One fenced block of a page, with the marker on the line before it."""

    page: str
    line: int
    info: str
    body: str
    marker: dict[str, str]
    body_span: tuple[int, int]  # character offsets of the body in the page
    output: Fence | None = None  # the next plain ``` block (the rendered diagnostics)

    @property
    def id(self) -> str:
        what = self.marker.get("error") or self.marker.get("warning") or self.marker.get("fragment") or "recipe"
        return f"{self.page}:{self.line}:{what}"

    @property
    def expected_code(self) -> str | None:
        return self.marker.get("error") or self.marker.get("warning")

    @property
    def filename(self) -> str:
        return self.marker.get("file", "example.cstar")


@dataclass(frozen=True)
class Fence:
    info: str
    body: str
    line: int
    body_span: tuple[int, int]


def fences(text: str) -> list[tuple[Fence, dict[str, str]]]:
    """Every fenced block of a page and the marker (if any) on the line before it."""
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n")
        last_line = before.rsplit("\n", 1)[-1]
        marker = MARKER.search(last_line) if last_line.lstrip().startswith("<!--") else None
        items = {m["key"]: m["value"] for m in MARKER_ITEM.finditer(marker["text"])} if marker else {}
        line = text.count("\n", 0, match.start()) + 1
        fence = Fence(match["info"].strip(), match["body"], line, (match.start("body"), match.end("body")))
        found.append((fence, items))
    return found


def examples(path: Path) -> list[Example]:
    """The ```cstar blocks of a page; for error examples, with the rendered output after them."""
    text = path.read_text("utf-8")
    blocks = fences(text)
    found = []
    for index, (fence, marker) in enumerate(blocks):
        if fence.info != "cstar":
            continue
        output = None
        if "error" in marker or "warning" in marker:
            output = next((f for f, _ in blocks[index + 1:] if f.info == ""), None)
        found.append(Example(path.name, fence.line, fence.info, fence.body, marker, fence.body_span, output))
    return found


def code_sections(text: str) -> dict[str, str]:
    """``## code`` heading -> the text of its section."""
    matches = list(SECTION.finditer(text))
    sections = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        rest = text[match.end():end]
        stop = re.search(r"^#{1,2} ", rest, re.MULTILINE)
        sections[match["code"]] = rest[: stop.start()] if stop else rest
    return sections


# ------------------------------------------------------------------------ materialize


def splice(base: str, fragment: str, block: str) -> str:
    """``base`` with its top-level ``block`` replaced by ``fragment`` (appended if absent)."""
    lines = base.splitlines(keepends=True)
    header = re.compile(rf"{re.escape(block)}\s*\{{")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return base.rstrip("\n") + "\n\n" + fragment
    if lines[start].rstrip().endswith("{}"):
        end = start
    else:
        end = next(i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "}")
    return "".join(lines[:start]) + fragment + "".join(lines[end + 1:])


def recipe_text(example: Example) -> str:
    """The whole recipe an example stands for."""
    if "fragment" in example.marker:
        base = SPECS / example.marker.get("base", BASE)
        return splice(base.read_text("utf-8"), example.body, example.marker["fragment"])
    return example.body


def materialize(example: Example, folder: Path, page: list[Example]) -> Path:
    """Write the specs, the page's named examples and this example into ``folder``."""
    for spec in SPECS.glob("*.cstar"):
        shutil.copy(spec, folder / spec.name)
    for other in page:
        if "file" in other.marker and other is not example:
            (folder / other.filename).write_text(recipe_text(other), "utf-8")
    path = folder / example.filename
    path.write_bytes(recipe_text(example).encode(example.marker.get("encoding", "utf-8")))
    return path


@contextlib.contextmanager
def working_folder(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def run_cli(example: Example, folder: Path, page: list[Example]) -> tuple[int, str]:
    """What `cstar check` prints for the example, run from ``folder``, and its exit code."""
    path = materialize(example, folder, page)
    args = ["check", path.name]
    if "format" in example.marker:
        args[1:1] = ["--format", example.marker["format"]]
    stdout = io.StringIO()
    with working_folder(folder), contextlib.redirect_stdout(stdout):
        code = cli.main(args)
    return code, ANSI.sub("", stdout.getvalue())


def check(example: Example, folder: Path, page: list[Example]):
    path = materialize(example, folder, page)
    with working_folder(folder):
        return check_file(path.name)


# ------------------------------------------------------------------- codes in source

# A code is a lower-case hyphenated string literal, such as "missing-unit". Every such literal in
# cstar_dsl is read as a code, except the option names of the registry ("svd-finetune", ...).
CODE = re.compile(r"[a-z]+(?:-[a-z]+)+")
NOT_CODES: set[str] = set()
# Codes built at run time (f-strings), each template with every code it can produce.
TEMPLATE_CODES = {
    'f"duplicate-{what}"': {"duplicate-block", "duplicate-key"},
    "f\"duplicate-{'rule' if isinstance(value, Section) else 'requirement'}\"": {
        "duplicate-rule", "duplicate-requirement"},
}
TEMPLATE = re.compile(r'\b(?:Diagnostic|fail|SpecProblem)\((?:\s*\([^()]*\)\s*,)?\s*(?P<template>f"[^"\n]*")')


def _string_literals(path: Path) -> list[str]:
    values = []
    with path.open("rb") as stream:
        for token in tokenize.tokenize(stream.readline):
            if token.type == tokenize.STRING and not token.string.lstrip("rRbBuU").startswith(("f", "F")):
                value = ast.literal_eval(token.string)
                if isinstance(value, str):
                    values.append(value)
    return values


def codes_by_module() -> dict[str, set[Path]]:
    """Every diagnostic code that cstar_dsl can emit, with the modules that emit it."""
    options = {name for names in vars(registry).values() if isinstance(names, tuple) for name in names}
    found: dict[str, set[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        codes = {v for v in _string_literals(path) if CODE.fullmatch(v) and v not in options | NOT_CODES}
        for match in TEMPLATE.finditer(path.read_text("utf-8")):
            assert match["template"] in TEMPLATE_CODES, (
                f"{path.name}: a code built at run time, {match['template']}: add it to TEMPLATE_CODES")
            codes |= TEMPLATE_CODES[match["template"]]
        for code in codes:
            found.setdefault(code, set()).add(path)
    return found


def emitted_codes() -> set[str]:
    return set(codes_by_module())


@functools.cache
def check_modules() -> frozenset[Path]:
    """The cstar_dsl modules that `cstar check` loads (in a fresh interpreter)."""
    script = (
        "import contextlib, io, sys\n"
        "from cstar_dsl import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['check', 'specs/digits.cstar'])\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.startswith('cstar_dsl') and getattr(module, '__file__', None):\n"
        "        print(module.__file__)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return frozenset(Path(line).resolve() for line in result.stdout.splitlines())


def later_stage_codes() -> set[str]:
    """Codes that only modules `cstar check` never loads emit (planning, model building)."""
    loaded = check_modules()
    return {code for code, paths in codes_by_module().items() if not {p.resolve() for p in paths} & loaded}


# ------------------------------------------------------------------------------ tests


LANGUAGE_EXAMPLES = examples(LANGUAGE)
ERROR_EXAMPLES = examples(ERRORS)


def test_pages_exist() -> None:
    for page in (LANGUAGE, ERRORS, ARCHITECTURE):
        assert page.is_file(), page
    assert len(LANGUAGE_EXAMPLES) >= 20
    assert len(ERROR_EXAMPLES) >= 40


@pytest.mark.parametrize("example", LANGUAGE_EXAMPLES + ERROR_EXAMPLES, ids=lambda e: e.id)
def test_markers_are_known(example: Example) -> None:
    assert set(example.marker) <= MARKER_KEYS, f"unknown marker key in {example.id}: {example.marker}"
    if example.page == LANGUAGE.name:
        assert not {"error", "warning"} & set(example.marker), "language.md examples must be valid"
    else:
        assert example.expected_code, f"{example.id}: errors.md examples need `error:` or `warning:`"


@pytest.mark.parametrize("example", LANGUAGE_EXAMPLES, ids=lambda e: e.id)
def test_language_example_checks_clean(example: Example, tmp_path: Path) -> None:
    try:
        checked = check(example, tmp_path, LANGUAGE_EXAMPLES)
    except CStarError as error:
        pytest.fail(f"{example.id} does not check:\n" + "\n".join(
            f"[{d.code}] {d.message} (line {d.span.line if d.span else '?'})" for d in error.diagnostics))
    assert not checked.warnings, f"{example.id} has warnings: {[d.code for d in checked.warnings]}"


@pytest.mark.parametrize("example", LANGUAGE_EXAMPLES, ids=lambda e: e.id)
def test_language_example_is_canonical(example: Example) -> None:
    assert format_text(example.body) == example.body, f"{example.id} is not in `cstar fmt` format"


def test_extend_example_merges_as_documented(tmp_path: Path) -> None:
    example = next(e for e in LANGUAGE_EXAMPLES if e.marker.get("file") == "digits-8x.cstar")
    spec = check(example, tmp_path, LANGUAGE_EXAMPLES).spec
    compress = spec.compress
    assert (compress.budget.kind, compress.budget.ratio) == ("ratio", 8)
    assert (compress.method, compress.policy.kind, compress.keep) == ("cstar", "global", ("fc",))
    assert [(r.selector.pattern, r.min_rank) for r in compress.layers] == [("features.*", 2)]
    finetune = spec.train.finetune
    assert (finetune.epochs, finetune.lr) == (8, 0.005)
    assert spec.train.admm is not None and spec.train.pretrain is not None
    assert [(r.metric, r.value) for r in spec.evaluate.requirements] == [("clean", 0.8), ("robust", 0.3)]


@pytest.mark.parametrize("example", ERROR_EXAMPLES, ids=lambda e: e.id)
def test_error_example_gives_its_code(example: Example, tmp_path: Path) -> None:
    code = example.expected_code
    if "error" in example.marker:
        with pytest.raises(CStarError) as raised:
            check(example, tmp_path, ERROR_EXAMPLES)
        found = [d.code for d in raised.value.diagnostics]
    else:
        found = [d.code for d in check(example, tmp_path, ERROR_EXAMPLES).warnings]
    assert code in found, f"{example.id} gives {found}, not {code}"


@pytest.mark.parametrize("example", ERROR_EXAMPLES, ids=lambda e: e.id)
def test_error_example_output_is_what_cstar_check_prints(example: Example, tmp_path: Path) -> None:
    assert example.output is not None, f"{example.id}: add the rendered output in a plain ``` block"
    exit_code, printed = run_cli(example, tmp_path, ERROR_EXAMPLES)
    assert exit_code == (EXIT_INVALID if "error" in example.marker else EXIT_OK)
    assert printed == example.output.body, (
        f"{example.id}: the rendered output is out of date; run `.venv/bin/python -m tests.test_docs --update`")


def test_every_emitted_code_has_a_section() -> None:
    sections = code_sections(ERRORS.read_text("utf-8"))
    codes = emitted_codes()
    assert len(codes) >= 40, codes
    assert not codes - set(sections), f"codes without a `## code` section in errors.md: {sorted(codes - set(sections))}"
    assert not set(sections) - codes, f"sections for codes cstar_dsl never emits: {sorted(set(sections) - codes)}"


def test_every_section_has_an_example_of_its_code() -> None:
    sections = code_sections(ERRORS.read_text("utf-8"))
    shown = {e.expected_code for e in ERROR_EXAMPLES}
    missing = set(sections) - shown - API_ONLY_CODES - RUN_CODES - later_stage_codes()
    assert not missing, f"sections without an `<!-- error: CODE -->` example: {sorted(missing)}"



def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(CStarError) as raised:
        check_file(tmp_path / "missing.cstar")
    assert [d.code for d in raised.value.diagnostics] == ["file-not-found"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CStarError) as raised:
        check_file(tmp_path)  # a folder, not a file
    assert [d.code for d in raised.value.diagnostics] == ["unreadable-file"]


def test_architecture_names_existing_modules() -> None:
    text = ARCHITECTURE.read_text("utf-8")
    for name in re.findall(r"`cstar_dsl/([a-z_/]+\.py)`", text):
        assert (PACKAGE / name).is_file(), f"architecture.md names a missing module: {name}"


# ---------------------------------------------------------------------------- update


def update_outputs() -> int:
    """Rewrite the rendered-output blocks of docs/errors.md from what `cstar check` prints now."""
    text = ERRORS.read_text("utf-8")
    page = examples(ERRORS)
    changed = 0
    for example in sorted(page, key=lambda e: e.body_span[0], reverse=True):
        if example.output is None:
            print(f"{example.id}: no output block after the example", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as folder:
            _, printed = run_cli(example, Path(folder).resolve(), page)
        start, end = example.output.body_span
        if text[start:end] != printed:
            text = text[:start] + printed + text[end:]
            changed += 1
    ERRORS.write_text(text, "utf-8")
    print(f"{changed} output block{'s' * (changed != 1)} updated in {ERRORS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_docs --update")
    sys.exit(update_outputs())
