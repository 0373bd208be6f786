"""cstar: a declarative robust low-rank compression language and compiler for PyTorch.

The public API is one function per pipeline stage, so notebooks and tools can run any prefix
of what the CLI does. Nothing here imports torch; later stages import it when they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Bound eagerly (neither imports torch), as before the stage packages: `cstar_dsl.parse` and
# `cstar_dsl.render` are these functions. No stage package may share a name with an export:
# importing a submodule binds it on the package, which would hide a lazily exported function.
from .lang.parse import parse
from .lang.render import render

_EXPORTS = {
    "format_text": "lang.fmt",
    "load_spec": "lang.validate",
    "check_file": "lang.validate",
    "Spec": "lang.spec",
    "CStarError": "lang.errors",
    "Diagnostic": "lang.errors",
    "build_model": "api",
    "make_plan": "api",
    "factorize": "api",
    "measure_latency": "api",
    "Plan": "plan.allocate",
    "datasets": "train.data",
    "compile": "api",
    "evaluate": "api",
    "load": "deploy.artifacts",
    "Compiled": "driver.pipeline",
}

__all__ = ["__version__", "parse", "render", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cstar_dsl' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
