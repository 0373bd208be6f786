"""The torch boundary is a folder boundary: the language and planning packages never import torch.

`cstar check`, `cstar fmt` and planning on a given inventory run where torch is not installed, so
every module of `cstar_dsl.lang` and `cstar_dsl.plan` must import without it (later stages import
torch when they are used). Each check runs in a fresh interpreter, since this one has torch loaded.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ("cstar_dsl.lang", "cstar_dsl.plan")


def modules_of(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return [package, *(info.name for info in pkgutil.walk_packages([str(folder)], prefix=f"{package}."))]


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_never_import_torch(package: str) -> None:
    names = modules_of(package)
    assert len(names) > 2, names
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, f'{name} imports torch'\n"
            "print(len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_package_root_and_the_cli_entry_never_import_torch() -> None:
    code = ("import sys, cstar_dsl, cstar_dsl.cli\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_stage_package_hides_a_public_export() -> None:
    """Importing a subpackage binds its name on `cstar_dsl`, which would hide a lazy export of that name."""
    import cstar_dsl

    packages = {info.name for info in pkgutil.iter_modules([str(ROOT / "cstar_dsl")])}
    assert not packages & set(cstar_dsl.__all__), packages & set(cstar_dsl.__all__)
