"""docs/api.md stays true: its ```python blocks run, in order, in one namespace (like notebook cells),
from the repository root; and it documents every function of the public API it lists."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a page, with the line each starts on."""
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in FENCE.finditer(text)]


def test_every_python_block_of_api_md_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = python_blocks(API.read_text())
    assert blocks, "docs/api.md has no ```python example"
    namespace: dict[str, object] = {"__name__": "api_md"}
    for line, code in blocks:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            try:
                exec(compile(code, f"docs/api.md:{line}", "exec"), namespace)  # noqa: S102
            except Exception as error:  # report which block failed
                pytest.fail(f"the ```python block at docs/api.md:{line} raised {type(error).__name__}: {error}")
        assert output.getvalue(), f"the block at docs/api.md:{line} prints nothing"


def test_printed_results_match_the_comments(monkeypatch):
    """A `print(...)  # text` line in a block shows what it prints: the comment must be in the output."""
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": "api_md"}
    for line, code in python_blocks(API.read_text()):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(code, f"docs/api.md:{line}", "exec"), namespace)  # noqa: S102
        for claimed in re.findall(r"^\s*print\(.*\)\s+#\s*(.+)$", code, re.M):
            assert claimed.strip() in output.getvalue(), f"docs/api.md:{line}: {claimed!r} not printed"


@pytest.mark.parametrize("name", ["load_spec", "check_file", "build_model", "make_plan", "factorize", "parse",
                                  "format_text"])
def test_api_md_documents_the_public_function(name):
    import cstar_dsl

    assert callable(getattr(cstar_dsl, name))
    assert f"`cstar_dsl.{name}(" in API.read_text()
