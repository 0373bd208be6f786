"""Command line, `cstar check`: every problem of each recipe, or a one-line summary of it (no torch)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.console import Console

from ..lang.errors import CStarError, Diagnostic
from ..lang.render import plural, to_dict
from .output import EXIT_INVALID, EXIT_OK, print_diagnostics

if TYPE_CHECKING:
    from ..lang.spec import Spec


def run_check(args: argparse.Namespace, console: Console) -> int:
    from ..lang.validate import check_file

    diagnostics: list[Diagnostic] = []
    summaries: list[str] = []
    invalid = 0
    for name in args.files:
        try:
            checked = check_file(name, allow_import=args.allow_import)
        except CStarError as error:
            invalid += 1
            diagnostics += error.diagnostics
            continue
        diagnostics += checked.warnings
        summaries.append(f"{name}: ok ({_summary(checked.spec)})")
    if args.format == "json":
        console.out(json.dumps([to_dict(d) for d in diagnostics], indent=2))
        return EXIT_INVALID if invalid else EXIT_OK
    print_diagnostics(console, diagnostics, args.format)
    for line in summaries:
        console.out(line)
    if invalid:
        errors = sum(d.is_error for d in diagnostics)
        console.out(f"Found {plural(errors, 'error')} in {invalid} of {plural(len(args.files), 'file')}.",
                    style="bold red")
    return EXIT_INVALID if invalid else EXIT_OK


def _summary(spec: Spec) -> str:
    c, h, w = spec.model.input
    compress = spec.compress
    return (f"{spec.model.arch} {c}x{h}x{w} on {spec.data.dataset}; {compress.method} {compress.budget.text()}, "
            f"{compress.policy.kind} ranks; {spec.threat.norm} eps {_pixels(spec.threat.eps)}")


def _pixels(eps: float) -> str:
    """eps as the k/255 people write, when it is one."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 and steps >= 1 else f"{eps:g}"
