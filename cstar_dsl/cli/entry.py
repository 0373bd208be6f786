"""Command line: the `cstar` argument parser, its checks of the arguments, the dispatch (exit codes: output.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from .. import __version__, files
from ..lang import registry
from ..lang.render import FORMATS
from .check import run_check
from .compile import run_compile
from .diff import run_diff
from .eval import run_eval
from .export import run_export
from .fmt import run_fmt
from .output import EXIT_USAGE
from .plan import run_plan


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "resume", False) and getattr(args, "force", False):
        parser.error("--resume continues the run in --out and --force starts it over: choose one")
    # Logs and pipes get wide lines rather than tables wrapped at 80 columns.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    for name in args.files:
        found = "a file" if name == "-" else files.kind(name)
        if found != "a file":  # a FIFO or a device would block the read: refused before it is opened
            parser.error(f"no such file: {name}" if found == "missing" else f"{name} is {found}, not a file")
    if args.files.count("-") > (args.command == "diff"):
        parser.error("only `cstar diff` reads a recipe from standard input, and only one")
    return int(args.run(args, console))


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse turns the error into a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cstar", description="Robust low-rank compression recipes for PyTorch.")
    parser.add_argument("--version", action="version", version=f"cstar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="validate recipes and report every problem")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--format", choices=FORMATS, default="full", help="diagnostics as text or JSON")
    check.add_argument("--allow-import", action="store_true",
                       help="allow `package.module:function` models (imports and runs that code)")
    check.set_defaults(run=run_check)

    plan = commands.add_parser("plan", help="show which layers a recipe factorizes, at which ranks, and what it buys")
    plan.add_argument("files", nargs=1, metavar="FILE")
    plan.add_argument("--format", choices=("table", "concise", "json"), default="table",
                      help="the plan as a table (with full or concise diagnostics) or as JSON")
    plan.add_argument("--allow-import", action="store_true",
                      help="allow `package.module:function` models (imports and runs that code)")
    plan.add_argument("--latency", action="store_true",
                      help="also time the dense and the compressed model at batch size 1 on this CPU")
    plan.add_argument("--threads", type=_positive, default=1, metavar="N",
                      help="CPU threads for --latency (default 1)")
    plan.add_argument("--structure", choices=(*registry.STRUCTURES, *registry.JOINT_STRUCTURES), metavar="NAME",
                      help="plan this structure at the recipe's budget instead of the one `cstar compile` builds: "
                           "low-rank, prune-uniform, prune-global, or joint-5 ... joint-95 (channels take that "
                           "percentage of the compression, ranks the rest; joint is joint-50)")
    plan.set_defaults(run=run_plan)

    diff = commands.add_parser("diff", help="what changes between two recipes: settings, ranks, params and MACs")
    diff.add_argument("files", nargs=2, metavar="FILE", help="two recipes; `-` reads one from standard input "
                      "(e.g. `git show HEAD:specs/x.cstar`), taken to live next to the other")
    diff.add_argument("--settings-only", action="store_true", help="compare settings only; build no model")
    diff.add_argument("--format", choices=("text", "json"), default="text")
    diff.add_argument("--allow-import", action="store_true",
                      help="allow `package.module:function` models (imports and runs that code)")
    diff.set_defaults(run=run_diff)

    compile_ = commands.add_parser(
        "compile", help="train, compress and evaluate: the recipe's robust compact model",
        description="Train, compress and evaluate the model a recipe describes, and write it with its report, "
                    "plots and lock into the run folder. Every epoch is checkpointed: --resume continues an "
                    "interrupted run.")
    compile_.add_argument("files", nargs=1, metavar="FILE")
    compile_.add_argument("--out", type=Path, help="the run folder (default: runs/<recipe name>)")
    compile_.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    compile_.add_argument("--force", action="store_true", help="start over, replacing what --out holds")
    compile_.add_argument("--locked", action="store_true",
                          help="refuse to run unless recipe, model, seed and versions match --out's lock.json")
    compile_.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the recipe's `train.device`")
    compile_.add_argument("--quiet", action="store_true", help="no progress bars: one log line per epoch")
    compile_.add_argument("--nproc", type=_positive, default=1, metavar="N",
                          help="train with N processes on this machine (runs itself under torchrun)")
    compile_.add_argument("--allow-import", action="store_true",
                          help="allow `package.module:function` models (imports and runs that code)")
    compile_.set_defaults(run=run_compile)

    export = commands.add_parser("export", help="write a compiled model as ONNX, TorchScript or torch.export, checked")
    export.add_argument("folders", nargs=1, metavar="DIR", help="a folder `cstar compile` wrote")
    export.add_argument("--format", choices=("onnx", "torchscript", "torch.export", "safetensors"), default="onnx",
                        help="onnx (default; for inference servers), torchscript, torch.export (a PyTorch program) "
                             "or safetensors (the weights alone, loaded with cstar_dsl.load)")
    export.add_argument("--out", type=Path, help="the file to write (default: DIR/model.onnx and the like)")
    export.add_argument("--opset", type=int, default=18, help="the ONNX opset (at least 17; default 18)")
    export.set_defaults(run=run_export, files=[])

    evaluate = commands.add_parser("eval", help="re-evaluate a compiled model under any attacks, with sanity checks")
    evaluate.add_argument("folders", nargs=1, metavar="DIR", help="a folder `cstar compile` wrote")
    evaluate.add_argument("--attack", action="append", default=[], metavar="ATTACK",
                          help="e.g. 'pgd(steps = 50, restarts = 5)', fgsm or autoattack; repeatable "
                               "(default: the recipe's `evaluate.attacks`)")
    evaluate.add_argument("--sanity", action="store_true",
                          help="the gradient-masking checks: more steps must not help, an unbounded attack must win")
    evaluate.add_argument("--samples", type=_positive, help="evaluate on the first N test images")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    evaluate.add_argument("--format", choices=("table", "json"), default="table")
    evaluate.add_argument("--allow-import", action="store_true",
                          help="allow `package.module:function` models (imports and runs that code)")
    evaluate.set_defaults(run=run_eval, files=[])

    fmt = commands.add_parser("fmt", help="rewrite recipes in the canonical format, comments kept")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    fmt.add_argument("--diff", action="store_true", help="change nothing; show what would change")
    fmt.add_argument("--format", choices=FORMATS, default="full", help="how syntax errors are shown")
    fmt.set_defaults(run=run_fmt)
    return parser


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
