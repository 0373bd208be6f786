"""cstar: a declarative robust low-rank compression language and compiler for PyTorch.

The public API is one function per pipeline stage, so notebooks and tools can run any prefix
of what the CLI does. Nothing here imports torch; later stages import it when they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Bound eagerly: these functions share their names with their modules, and importing a
# submodule binds the module on the package, which would hide a lazily exported function.
from .parse import parse
from .render import render

_EXPORTS = {
    "format_text": "fmt",
    "load_spec": "validate",
    "check_file": "validate",
    "Spec": "spec",
    "CStarError": "errors",
    "Diagnostic": "errors",
    "build_model": "api",
    "make_plan": "api",
    "factorize": "api",
    "measure_latency": "api",
    "Plan": "plan",
    "datasets": "data",
    "compile": "api",
    "evaluate": "api",
    "load": "artifacts",
    "Compiled": "pipeline",
}

__all__ = ["__version__", "parse", "render", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cstar_dsl' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
