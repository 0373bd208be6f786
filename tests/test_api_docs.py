"""docs/api.md stays true: its ```python blocks run, in order, in one namespace (like notebook cells),
from the repository root; and it documents every function of the public API it lists."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from tests.helpers import DOCS, ROOT

API = DOCS / "api.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a page, with the line each starts on."""
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in FENCE.finditer(text)]


def test_every_python_block_of_api_md_runs(monkeypatch):
    """Each block runs and prints something; a `print(...)  # text` line shows what it prints, so the
    text of its comment must appear in the block's output."""
    monkeypatch.chdir(ROOT)
    blocks = python_blocks(API.read_text())
    assert blocks, "docs/api.md has no ```python example"
    namespace: dict[str, object] = {"__name__": "api_md"}
    for line, code in blocks:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            try:
                exec(compile(code, f"docs/api.md:{line}", "exec"), namespace)
            except Exception as error:  # report which block failed
                pytest.fail(f"the ```python block at docs/api.md:{line} raised {type(error).__name__}: {error}")
        printed = output.getvalue()
        assert printed, f"the block at docs/api.md:{line} prints nothing"
        for claimed in re.findall(r"^[ \t]*print\(.*\)[ \t]+#[ \t]*(.+)$", code, re.M):
            assert claimed.strip() in printed, f"docs/api.md:{line}: {claimed!r} is not what the block prints"


FUNCTIONS = ["load_spec", "check_file", "build_model", "make_plan", "factorize", "parse", "format_text", "compile",
             "load", "datasets", "evaluate"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_api_md_documents_the_public_function(name):
    import cstar_dsl

    assert name in cstar_dsl.__all__
    assert f"`cstar_dsl.{name}(" in API.read_text()


def test_public_functions_stay_callable_after_first_use():
    import subprocess
    import sys

    code = ("import cstar_dsl\n"
            "for _ in range(2):\n"
            "    for name in cstar_dsl.__all__[1:]:\n"
            "        value = getattr(cstar_dsl, name)\n"
            "        assert callable(value), (name, value)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
