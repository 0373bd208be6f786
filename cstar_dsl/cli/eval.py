"""Command line, `cstar eval`: a compiled model re-evaluated under any attacks, with the gradient-masking checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ..lang.errors import Diagnostic
from .output import EXIT_OK, EXIT_UNMET, USER_ERRORS, exit_code, percent, print_diagnostics, print_error, wrapped


def run_eval(args: argparse.Namespace, console: Console) -> int:
    from ..eval.robustness import parse_attack, reevaluate

    folder = Path(args.folders[0])
    diagnostics_format = "json" if args.format == "json" else "full"
    try:
        attacks = [parse_attack(text) for text in args.attack]
        result = reevaluate(folder, attacks, samples=args.samples, sanity=args.sanity, device=args.device,
                            allow_import=args.allow_import)
    except USER_ERRORS as error:
        return print_error(console, error, diagnostics_format, failed="eval-failed")
    except KeyboardInterrupt as interrupt:
        print_diagnostics(console, [Diagnostic("eval-interrupted", "interrupted (Ctrl-C): nothing was written")],
                          diagnostics_format)
        return exit_code(interrupt)
    failed = [check for check in result.sanity if not check.passed]
    if args.format == "json":
        console.out(json.dumps(result.to_dict(), indent=2))
        return EXIT_UNMET if failed else EXIT_OK
    table = Table(title=f"{folder}: {result.samples} test images", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("attack", "accuracy", "implementation"):
        table.add_column(column, justify="right" if column == "accuracy" else "left")
    table.add_row("clean", percent(result.clean), "")
    for name, value in result.robust.items():
        table.add_row(name, percent(value), result.implementations.get(name, ""))
    console.print(table)
    for check in result.sanity:
        console.out(wrapped(f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}"),
                    style=None if check.passed else "bold red")
    if failed:
        console.out("a sanity check failed: these robust accuracies may be overestimated (gradient masking?)",
                    style="bold red")
    return EXIT_UNMET if failed else EXIT_OK
