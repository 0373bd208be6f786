"""Command line, `cstar eval`: a compiled model re-evaluated under any attacks, with the gradient-masking checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ..lang.errors import CStarError, Diagnostic
from .output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNMET, EXIT_USAGE, percent, print_diagnostics, wrapped


def run_eval(args: argparse.Namespace, console: Console) -> int:
    from ..deploy.artifacts import ArtifactError
    from ..eval.robustness import MissingExtra, parse_attack, reevaluate
    from ..lang.problems import SpecProblem

    folder = Path(args.folders[0])
    diagnostics_format = "json" if args.format == "json" else "full"
    try:
        attacks = [parse_attack(text) for text in args.attack]
        result = reevaluate(folder, attacks, samples=args.samples, sanity=args.sanity, device=args.device,
                            allow_import=args.allow_import)
    except CStarError as error:
        print_diagnostics(console, list(error.diagnostics), diagnostics_format)
        return EXIT_USAGE
    except SpecProblem as problem:  # the run's recorded recipe no longer runs here: its data folder is gone, say
        print_diagnostics(console, [Diagnostic("eval-failed", f"{folder}: {problem.message}", help=problem.help)],
                           diagnostics_format)
        return EXIT_FAILED
    except (ArtifactError, MissingExtra, ValueError) as error:
        print_diagnostics(console, [Diagnostic("eval-failed", str(error))], diagnostics_format)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print_diagnostics(console, [Diagnostic("eval-interrupted", "interrupted (Ctrl-C): nothing was written")],
                           diagnostics_format)
        return EXIT_INTERRUPTED
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
