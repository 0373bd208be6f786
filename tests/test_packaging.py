"""Packaging: the built wheel carries the grammar and parses recipes without the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_wheel_ships_and_loads_the_grammar(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("cstar_dsl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = archive.read("cstar_dsl/grammar/cstar.lark").decode()
        archive.extractall(tmp_path / "site")
    assert packaged == (ROOT / "grammar" / "cstar.lark").read_text()

    # Run from the unpacked wheel alone: the repository's grammar/ folder is out of reach.
    code = (
        "import importlib, pathlib; p = importlib.import_module('cstar_dsl.lang.parse'); "
        "assert 'site' in p.__file__, p.__file__; "
        "assert not (pathlib.Path(p.__file__).parents[2] / 'grammar').exists(); "
        "print(p.parse('threat {\\n  eps = 8/255\\n}\\n').items[0].kind.value)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "threat"
