"""Golden diagnostics: every malformed recipe in tests/fixtures/invalid renders exactly as recorded.

Each case is ``<case>.cstar`` with its expected "full" render in ``<case>.txt``: what
``cstar check <case>.cstar`` prints from inside that folder, less the "Found N errors" summary.
Files that are not cases (the bases that ``extend`` cases use) live in ``fixtures/invalid/extend/``.

To (re)write the expectations after a deliberate change of wording, run

    CSTAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/lang/test_golden_diagnostics.py

and read every changed ``.txt`` in the diff before committing it: a golden file is only as good
as the review it got. In that mode a new ``<case>.cstar`` without a ``.txt`` gets one too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cstar_dsl.lang.errors import CStarError, Diagnostic
from cstar_dsl.lang.render import render
from cstar_dsl.lang.validate import check_file
from tests.helpers import FIXTURES, PACKAGE

INVALID = FIXTURES / "invalid"
UPDATE = os.environ.get("CSTAR_UPDATE_GOLDEN") == "1"

# Every code a recipe file can produce. The corpus must keep at least one case for each, so that
# removing (or renaming) a case or a code is noticed.
EXPECTED_CODES = frozenset({
    "invalid-split",
    # parse
    "invalid-encoding", "unexpected-character", "unterminated-string", "invalid-number",
    "unexpected-token", "unexpected-end", "missing-equals", "missing-line-break", "too-deeply-nested",
    # lower and load
    "duplicate-key", "duplicate-block", "duplicate-rule", "duplicate-requirement", "duplicate-extend",
    "misplaced-extend", "misplaced-require", "top-level-setting", "unexpected-label", "invalid-selector",
    "extend-cycle", "extend-not-found", "not-a-recipe",
    # spec: keys, blocks and arguments
    "unknown-key", "unknown-block", "unknown-argument", "missing-key", "missing-block", "missing-argument",
    "expected-block",
    # spec: values
    "wrong-type", "wrong-unit", "missing-unit", "out-of-range", "eps-not-positive", "step-exceeds-eps",
    "ratio-below-one", "energy-out-of-range", "requirement-out-of-range", "unknown-model", "unknown-dataset",
    "unknown-method", "unknown-policy", "unknown-attack", "unknown-option", "unknown-layer-type",
    "invalid-argument", "invalid-budget", "invalid-requirement", "conflicting-keys", "rank-bounds",
    "import-not-allowed",
    # semantic checks
    "rule-contradicts-keep", "missing-phase", "fixed-needs-rank", "shape-mismatch", "phase-ignored",
    "dataset-mismatch", "nothing-to-drop", "setting-ignored",
})
# Codes about the file itself, with no position; a fixture cannot produce them (test_file_level_errors).
FILE_LEVEL_CODES = frozenset({"file-not-found", "unreadable-file", "unwritable-file"})
# Failures of a run, not of a recipe: no recipe file produces them (tests/driver/test_compile.py and
# tests/cli/test_cli_run.py do).
RUN_CODES = frozenset({"run-failed", "export-failed", "eval-failed", "eval-interrupted"})

# Cases whose current behaviour is a known bug: a traceback instead of a diagnostic, or an invalid
# recipe accepted. Their .txt holds the output they should have (written by hand). strict: once the
# bug is fixed the case fails loudly, so that it is taken off this list and its .txt reviewed.
KNOWN_BUGS: dict[str, tuple[type[BaseException], str]] = {}


def _cases() -> list[str]:
    recipes = sorted(p for p in INVALID.glob("*.cstar") if not p.name.startswith("_"))
    return [p.stem for p in recipes if UPDATE or p.with_suffix(".txt").is_file()]


CASES = _cases()


def _params() -> list[object]:
    params = []
    for case in CASES:
        marks = []
        if case in KNOWN_BUGS:
            raises, reason = KNOWN_BUGS[case]
            marks.append(pytest.mark.xfail(raises=raises, reason=reason, strict=True))
        params.append(pytest.param(case, marks=marks, id=case))
    return params


_found: dict[str, tuple[Diagnostic, ...]] = {}


def diagnostics_of(case: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Diagnostic, ...]:
    """What checking ``<case>.cstar`` from inside the fixture folder reports (errors, else warnings)."""
    if case not in _found:
        monkeypatch.chdir(INVALID)
        try:
            checked = check_file(f"{case}.cstar")
        except CStarError as error:
            found = error.diagnostics
        else:
            if not checked.warnings:
                pytest.fail(f"{case}.cstar checks clean: a golden case must produce diagnostics")
            found = checked.warnings
        assert found, f"{case}.cstar raised CStarError without diagnostics"
        _found[case] = found
    return _found[case]


@pytest.mark.parametrize("case", _params())
def test_golden_full_render(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(diagnostics_of(case, monkeypatch), "full")
    expected_path = INVALID / f"{case}.txt"
    if UPDATE:
        expected_path.write_text(rendered, encoding="utf-8", newline="")
        return
    with expected_path.open(encoding="utf-8", newline="") as stream:
        expected = stream.read()
    assert rendered == expected, f"{case}: rendered diagnostics differ from {case}.txt (CSTAR_UPDATE_GOLDEN=1 rewrites)"


@pytest.mark.parametrize("case", _params())
def test_every_format_renders(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    diagnostics = diagnostics_of(case, monkeypatch)

    concise = render(diagnostics, "concise")
    lines = concise.splitlines()
    assert len(lines) == len(diagnostics)
    for line, diagnostic in zip(lines, diagnostics, strict=True):
        assert f"{diagnostic.severity}[{diagnostic.code}] " in line

    records = json.loads(render(diagnostics, "json"))
    assert len(records) == len(diagnostics)
    for record in records:
        for key in ("line", "column", "end_line", "end_column"):
            assert isinstance(record[key], int) and not isinstance(record[key], bool), (case, key, record[key])
        assert record["line"] >= 1 and record["column"] >= 1
        assert (record["end_line"], record["end_column"]) >= (record["line"], record["column"])
        assert isinstance(record["file"], str) and record["file"].endswith(".cstar")
        assert record["code"] and record["message"] and record["severity"] in ("error", "warning")


def _codes_in(text: str) -> set[str]:
    return set(re.findall(r"(?m)^(?:error|warning)\[([a-z-]+)\]:", text))


def test_corpus_covers_every_code() -> None:
    assert len(CASES) >= 30, f"only {len(CASES)} golden cases"
    covered: set[str] = set()
    for case in CASES:
        if case not in KNOWN_BUGS:
            covered |= _codes_in((INVALID / f"{case}.txt").read_text(encoding="utf-8"))
    missing = EXPECTED_CODES - covered
    assert not missing, f"no golden case produces: {', '.join(sorted(missing))}"
    unlisted = covered - EXPECTED_CODES
    assert not unlisted, f"codes missing from EXPECTED_CODES: {', '.join(sorted(unlisted))}"


def test_every_code_in_the_source_is_expected() -> None:
    """A code added to cstar_dsl needs a golden case (and a place in EXPECTED_CODES)."""
    patterns = (r'Diagnostic\(\s*"([a-z][a-z-]*)"', r'\bfail\(\s*"([a-z][a-z-]*)"', r'\bcode\s*=\s*"([a-z][a-z-]*)"')
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in patterns:
            found.update(re.findall(pattern, text))
    assert found, "no diagnostic codes found in cstar_dsl: has the code moved?"
    unexpected = found - EXPECTED_CODES - FILE_LEVEL_CODES - RUN_CODES
    assert not unexpected, f"codes without a golden case: {', '.join(sorted(unexpected))}"


def test_file_level_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two span-less codes: a missing file and a path that cannot be read as a file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CStarError) as missing:
        check_file("missing.cstar")
    assert [d.code for d in missing.value.diagnostics] == ["file-not-found"]
    assert render(missing.value.diagnostics, "full") == "error[file-not-found]: no such file: missing.cstar\n\n"

    (tmp_path / "folder.cstar").mkdir()
    with pytest.raises(CStarError) as unreadable:
        check_file("folder.cstar")
    assert [d.code for d in unreadable.value.diagnostics] == ["unreadable-file"]
    assert unreadable.value.diagnostics[0].message.startswith("cannot read folder.cstar: ")
    for fmt in ("full", "concise", "json"):
        render(unreadable.value.diagnostics, fmt)
