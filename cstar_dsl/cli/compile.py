"""Command line, `cstar compile`: the compile driver under a progress display, its results; --nproc runs torchrun."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from ..lang.errors import CStarError
from ..lang.render import render_concise, si
from .output import EXIT_OK, EXIT_UNMET, USER_ERRORS, exit_code, percent, print_diagnostics, print_error
from .progress import LogProgress, RichProgress

if TYPE_CHECKING:
    from ..run_report import RunReport


def run_compile(args: argparse.Namespace, console: Console) -> int:
    from ..driver.runfolder import folder_problem
    from ..lang.validate import check_file

    # The recipe and the out folder are checked, and the first line said, before torch is imported
    # and the data loaded: a mistake there is reported in a second, not after a minute.
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launching = args.nproc > 1 and not under_torchrun
    if under_torchrun and os.environ.get("RANK") != "0":  # rank 0 speaks for the run
        console = Console(quiet=True)
    path = Path(args.files[0])
    out = args.out or Path("runs") / path.stem
    try:
        checked = check_file(path, allow_import=args.allow_import)
    except CStarError as error:
        return print_error(console, error, "full")
    taken = folder_problem(out, resume=args.resume, force=args.force, locked=args.locked)
    if taken:
        return print_error(console, taken, "full")
    if not launching:  # the processes torchrun starts say it themselves
        print_diagnostics(console, list(checked.warnings), "full")
        console.out(f"-- {'resuming' if args.resume else 'compiling'} {path} into {out}/")

    from ..deploy.artifacts import DESCRIPTION
    from ..driver.pipeline import OUTPUTS, CompileOptions, Progress, compile_spec
    from ..train import distributed

    world = distributed.from_environment()
    if launching:
        return distributed.launch(_without_nproc(args.argv), args.nproc)
    options = CompileOptions(out=out, resume=args.resume, locked=args.locked,
                             force=args.force, allow_import=args.allow_import, device=args.device,
                             spec_name=str(path), spec_text=path.read_text(encoding="utf-8"),
                             warnings=tuple(render_concise(d) for d in checked.warnings))
    bars = console.is_terminal and not args.quiet
    progress = RichProgress(console) if bars else LogProgress(console)
    try:
        with progress:
            # The displays have Progress's methods but cannot subclass it: that would import torch
            # with the CLI, before the recipe is checked.
            sink = progress if world.is_main else Progress()
            compiled = compile_spec(checked.spec, options, sink)  # type: ignore[arg-type]
    except USER_ERRORS as error:
        return print_error(console, error, "full", checked=checked)
    except KeyboardInterrupt as interrupt:
        console.out(f"interrupted: the last finished epoch is checkpointed in {options.out}; "
                    f"`cstar compile {path} --out {options.out} --resume` continues from it")
        return exit_code(interrupt)
    console.print(_report_table(compiled.report))
    exported = [e.file for e in compiled.report.exports if e.format != "safetensors"]
    after_model = OUTPUTS.index(DESCRIPTION) + 1  # the exported models follow the model's own two files
    written = [*OUTPUTS[:after_model], *exported, *OUTPUTS[after_model:]]
    console.out(f"wrote {options.out}/: {', '.join(written)}")
    for requirement in compiled.report.requirements:
        verdict = "met" if requirement.met else "NOT MET"
        console.out(f"require {requirement.metric} {requirement.op} {requirement.value:.1%}: "
                    f"{percent(requirement.measured)} ({verdict})",
                    style=None if requirement.met else "bold red")
    return EXIT_UNMET if compiled.unmet else EXIT_OK


def _without_nproc(arguments: list[str]) -> list[str]:
    """The command line again, without ``--nproc N``, for each rank to run."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def _report_table(report: RunReport) -> Table:
    compression = report.compression
    choice = report.structure_choice
    method = report.method + (f" (chose {choice.winner} by its probe)" if choice else "")
    table = Table(title=f"{report.spec}: {method}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("params (conv + linear)", f"{si(compression.params_dense)} -> "
                  f"{si(compression.params_compressed)} ({compression.ratio:.2f}x)")
    table.add_row("MACs", f"{si(compression.macs_dense)} -> {si(compression.macs_compressed)} "
                  f"({compression.macs_ratio:.2f}x)")
    latency = report.latency
    if latency:
        table.add_row("latency (batch 1, CPU)", f"{latency.dense_ms.median:.3g} ms -> "
                      f"{latency.compressed_ms.median:.3g} ms ({latency.speedup:.2f}x)")
    table.add_row("clean accuracy", percent(report.accuracy.clean))
    for name, value in report.accuracy.robust.items():
        table.add_row(f"robust: {name}", percent(value))
    table.add_row("test images", str(report.data.test_size))
    table.add_row("time", f"{report.timings.total_seconds:.0f} s on {report.machine.device}")
    return table
