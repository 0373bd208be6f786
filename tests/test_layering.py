"""The package's layers: each stage imports only earlier ones, and the language and planning never import torch.

`cstar check`, `cstar fmt` and planning on a given inventory run where torch is not installed, so
every module of `cstar_dsl.lang` and `cstar_dsl.plan` must import without it (later stages import
torch when they are used). Each check runs in a fresh interpreter, since this one has torch loaded.
The order of the stages is read from every module's import statements (``ast``), lazy ones included.
"""

from __future__ import annotations

import ast
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


# The stages in pipeline order (docs/architecture.md); a module may import its own stage and earlier ones.
ORDER = ("lang", "plan", "model", "train", "deploy", "eval", "report", "driver", "api", "cli", "__main__")
# Shared by every stage, below the first: they import no stage.
SHARED = ("files", "errors", "run_report")
# Imports against the order, each with its reason; empty since zoo's load_failure moved to files.py.
KNOWN_BACKWARD: dict[tuple[str, str], str] = {}


def imports_of(path: Path, module: str) -> set[str]:
    """The absolute names ``module`` (at ``path``) imports, at the top or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(str(node.module))
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
            found |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
    return found


def stage(name: str) -> str | None:
    """The stage or shared module of ``cstar_dsl.<x>...``; None for the package root's own names."""
    parts = name.split(".")
    tops = {info.name for info in pkgutil.iter_modules([str(ROOT / "cstar_dsl")])}
    return parts[1] if len(parts) > 1 and parts[1] in tops else None


def own_modules(top: str) -> list[tuple[str, Path]]:
    folder = ROOT / "cstar_dsl" / top
    if not folder.is_dir():
        return [(f"cstar_dsl.{top}", folder.with_suffix(".py"))]
    return [(f"cstar_dsl.{top}" + "".join(f".{p}" for p in path.relative_to(folder).with_suffix("").parts
                                          if p != "__init__"), path) for path in sorted(folder.rglob("*.py"))]


def backward_edges(top: str) -> list[str]:
    allowed = set(SHARED) if top in SHARED else {*SHARED, *ORDER[:ORDER.index(top) + 1]}
    edges = []
    for module, path in own_modules(top):
        for name in sorted(imports_of(path, module)):
            target = stage(name) if name.startswith("cstar_dsl.") else None
            if target is not None and target not in allowed and (top, target) not in KNOWN_BACKWARD:
                edges.append(f"{module} imports {name}")
    return edges


def test_every_top_level_module_has_a_place_in_the_order() -> None:
    tops = {info.name for info in pkgutil.iter_modules([str(ROOT / "cstar_dsl")])}
    assert tops == set(ORDER) | set(SHARED), tops ^ (set(ORDER) | set(SHARED))


@pytest.mark.parametrize("top", [*SHARED, *ORDER])
def test_each_stage_imports_only_earlier_stages_and_the_shared_modules(top: str) -> None:
    assert backward_edges(top) == []


def test_the_model_stage_imports_no_later_stage() -> None:
    later = {"train", "deploy", "eval", "report", "driver", "cli"}
    names = {name for module, path in own_modules("model") for name in imports_of(path, module)}
    assert names, "no imports read from cstar_dsl.model"
    assert not {name for name in names if stage(name) in later}


def test_a_lazy_relative_import_of_a_later_stage_is_seen(tmp_path: Path) -> None:
    fake = tmp_path / "zoo.py"
    fake.write_text("from ..files import kind\n\ndef f():\n    from ..train.checkpoint import load\n"
                    "    from .. import __version__\n")
    found = imports_of(fake, "cstar_dsl.model.zoo")
    assert found == {"cstar_dsl.files", "cstar_dsl.train.checkpoint", "cstar_dsl.__version__"}
    assert [stage(name) for name in sorted(found)] == [None, "files", "train"]
