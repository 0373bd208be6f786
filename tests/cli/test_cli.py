"""Command line: check and fmt, exit codes, formats, and that neither imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cstar_dsl.cli import main
from tests.helpers import ROOT, SPECS, run_cli

BAD = 'model {\n  arch = "cstar:digits-cnn"\n  clases = 10\n}\n'


def test_check_valid_specs_prints_one_line_each(capsys):
    files = sorted(str(p) for p in SPECS.glob("*.cstar"))
    assert main(["check", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) and all(": ok (" in line for line in lines)


def test_check_invalid_spec_exits_1_with_located_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.cstar").write_text(BAD)
    assert main(["check", "bad.cstar"]) == 1
    out = capsys.readouterr().out
    assert "error[unknown-key]: unknown key `clases` in the `model` block" in out
    assert " --> bad.cstar:3:3" in out and "^^^^^^ did you mean `classes`?" in out
    assert "error[missing-block]" in out and "Found 3 errors in 1 of 1 file." in out


def test_check_json_format(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.cstar").write_text(BAD)
    assert main(["check", "--format", "json", "bad.cstar"]) == 1
    diagnostics = json.loads(capsys.readouterr().out)
    unknown = next(d for d in diagnostics if d["code"] == "unknown-key")
    assert (unknown["file"], unknown["line"], unknown["column"], unknown["end_column"]) == ("bad.cstar", 3, 3, 9)
    assert unknown["severity"] == "error" and unknown["label"] == "did you mean `classes`?"


def test_check_concise_format(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.cstar").write_text(BAD)
    main(["check", "--format", "concise", "bad.cstar"])
    assert "bad.cstar:3:3: error[unknown-key] unknown key `clases` in the `model` block" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["check"], ["check", "missing.cstar"], ["frobnicate"], ["fmt", "--bogus", "x"], []])
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff\xfe garbage \x80", b"model {\n  arch = \"unterminated\n", b"[" * 50_000, b"}" * 3],
    ids=["empty", "binary", "unterminated", "deep", "braces"],
)
def test_bad_input_never_gives_a_traceback(tmp_path, content):
    path = tmp_path / "x.cstar"
    path.write_bytes(content)
    for command in (["check"], ["fmt", "--check"]):
        result = run_cli(*command, path)
        assert "Traceback" not in result.stderr + result.stdout
        if content or command == ["check"]:  # an empty file is already formatted
            assert result.returncode == 1, result
            assert "error[" in result.stdout


def test_check_and_fmt_never_import_torch():
    code = (
        "import sys; from cstar_dsl.cli import main; "
        "main(['check', 'specs/digits.cstar', 'specs/resnet18-8x.cstar']); "
        "main(['fmt', '--check', 'specs/mnist.cstar']); "
        "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules); "
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in result.stdout, result


UGLY = "# keep me\nmodel   {   # the net\n    classes=10\n\n\n\n    input = [1,\n 8, 8]\n}\n# tail\n"
PRETTY = "# keep me\nmodel {  # the net\n  classes = 10\n\n  input = [1, 8, 8]\n}\n# tail\n"


def test_fmt_rewrites_in_place_and_keeps_comments(tmp_path, capsys):
    path = tmp_path / "r.cstar"
    path.write_text(UGLY)
    assert main(["fmt", str(path)]) == 0
    assert path.read_text() == PRETTY
    assert main(["fmt", "--check", str(path)]) == 0
    assert "0 files would be reformatted, 1 left unchanged" in capsys.readouterr().out


def test_fmt_check_and_diff_change_nothing(tmp_path, capsys):
    path = tmp_path / "r.cstar"
    path.write_text(UGLY)
    assert main(["fmt", "--check", str(path)]) == 1
    assert main(["fmt", "--diff", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"would reformat {path}" in out and "+  classes = 10" in out
    assert path.read_text() == UGLY


def test_fmt_leaves_a_file_with_syntax_errors_untouched(tmp_path):
    path = tmp_path / "r.cstar"
    path.write_text("model {\n  classes = \n}\n")
    assert main(["fmt", str(path)]) == 1
    assert path.read_text() == "model {\n  classes = \n}\n"
    assert not [p for p in os.listdir(tmp_path) if p != "r.cstar"]  # no temp file left behind


def test_example_specs_are_formatted():
    assert main(["fmt", "--check", *map(str, sorted(SPECS.glob("*.cstar")))]) == 0


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "cstar"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("cstar ")
