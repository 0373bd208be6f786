"""Command line: check, fmt, plan, diff, compile; the only module that prints.

Exit codes: 0 done; 1 an invalid recipe; 2 a usage error; 3 compiled, but a `require` line is not
met; 4 the run could not go on (out folder, checkpoint, lock, diverged training).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__, files
from ..lang.errors import CStarError, Diagnostic
from ..lang.render import FORMATS, plural, render, render_concise, si, to_dict

if TYPE_CHECKING:
    from ..deploy.latency import LatencyComparison
    from ..lang.spec import Spec
    from ..plan.allocate import LayerPlan, Plan
    from ..plan.diff import Change, LayerChange

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNMET, EXIT_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C


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
    check.set_defaults(run=_check)

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
    plan.set_defaults(run=_plan)

    diff = commands.add_parser("diff", help="what changes between two recipes: settings, ranks, params and MACs")
    diff.add_argument("files", nargs=2, metavar="FILE", help="two recipes; `-` reads one from standard input "
                      "(e.g. `git show HEAD:specs/x.cstar`), taken to live next to the other")
    diff.add_argument("--settings-only", action="store_true", help="compare settings only; build no model")
    diff.add_argument("--format", choices=("text", "json"), default="text")
    diff.add_argument("--allow-import", action="store_true",
                      help="allow `package.module:function` models (imports and runs that code)")
    diff.set_defaults(run=_diff)

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
    compile_.set_defaults(run=_compile)

    export = commands.add_parser("export", help="write a compiled model as ONNX, TorchScript or torch.export, checked")
    export.add_argument("folders", nargs=1, metavar="DIR", help="a folder `cstar compile` wrote")
    export.add_argument("--format", choices=("onnx", "torchscript", "torch.export", "safetensors"), default="onnx",
                        help="onnx (default; for inference servers), torchscript, torch.export (a PyTorch program) "
                             "or safetensors (the weights alone, loaded with cstar_dsl.load)")
    export.add_argument("--out", type=Path, help="the file to write (default: DIR/model.onnx and the like)")
    export.add_argument("--opset", type=int, default=18, help="the ONNX opset (at least 17; default 18)")
    export.set_defaults(run=_export, files=[])

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
    evaluate.set_defaults(run=_eval, files=[])

    fmt = commands.add_parser("fmt", help="rewrite recipes in the canonical format, comments kept")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    fmt.add_argument("--diff", action="store_true", help="change nothing; show what would change")
    fmt.add_argument("--format", choices=FORMATS, default="full", help="how syntax errors are shown")
    fmt.set_defaults(run=_fmt)
    return parser


# ------------------------------------------------------------------- check


def _check(args: argparse.Namespace, console: Console) -> int:
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
    _print_diagnostics(console, diagnostics, args.format)
    for line in summaries:
        console.out(line)
    if invalid:
        errors = sum(d.is_error for d in diagnostics)
        console.out(f"Found {plural(errors, 'error')} in {invalid} of {plural(len(args.files), 'file')}.",
                    style="bold red")
    return EXIT_INVALID if invalid else EXIT_OK


def _summary(spec: Spec) -> str:
    budget = spec.compress.budget
    if budget.kind == "ratio":
        amount = f"{budget.ratio:g}x {budget.metric}"
    else:
        amount = f"{budget.metric} <= {si(budget.limit)}"
    c, h, w = spec.model.input
    return (f"{spec.model.arch} {c}x{h}x{w} on {spec.data.dataset}; {spec.compress.method} {amount}, "
            f"{spec.compress.policy.kind} ranks; {spec.threat.norm} eps {_pixels(spec.threat.eps)}")


def _pixels(eps: float) -> str:
    """eps as the k/255 people write, when it is one."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 and steps >= 1 else f"{eps:g}"


# -------------------------------------------------------------------- plan


def _plan(args: argparse.Namespace, console: Console) -> int:
    import time

    from ..api import build_model, make_plan, measure_latency
    from ..lang.problems import SpecProblem
    from ..lang.validate import check_file

    started = time.perf_counter()
    diagnostic_format = {"table": "full", "concise": "concise", "json": "json"}[args.format]
    try:
        checked = check_file(args.files[0], allow_import=args.allow_import)
        model = build_model(checked.spec, allow_import=args.allow_import)
        plan = make_plan(checked.spec, model)
        seconds = time.perf_counter() - started
        latency = measure_latency(checked.spec, model, plan, threads=args.threads) if args.latency else None
    except CStarError as error:
        _print_diagnostics(console, list(error.diagnostics), diagnostic_format)
        return EXIT_INVALID
    except SpecProblem as problem:
        _print_diagnostics(console, [checked.diagnostic(problem)], diagnostic_format)
        return EXIT_INVALID
    if args.format == "json":
        extra = {} if latency is None else {"latency": latency.to_dict()}
        console.out(json.dumps({"spec": args.files[0], "model": checked.spec.model.arch, "seconds": seconds,
                                **plan.to_dict(), **extra}, indent=2))
        return EXIT_OK
    _print_diagnostics(console, list(checked.warnings), diagnostic_format)
    pruning = checked.spec.compress.method == "channel-prune"
    console.print(_plan_table(plan, f"{args.files[0]}: {checked.spec.model.arch}", console.width, pruning=pruning))
    summary = [] if pruning else [_plan_summary(plan, seconds)]
    notes = _plan_notes(plan, console.width, pruning=pruning, allocation=checked.spec.compress.allocation)
    for line in [*notes, *summary]:
        console.out(_wrapped(line, console.width))
    if latency is not None:
        console.out(_latency_line(latency, plan, time.perf_counter() - started - seconds))
    for warning in [] if pruning else plan.warnings:  # they speak of ranks
        console.out(_wrapped(f"note: {warning}.", console.width))
    return EXIT_OK


# The columns a plan table has at a console width of at least this many columns: at 80, one line
# a layer (the rule and each dense layer's reason follow the table); wider, more of the story.
_PLAN_LAYOUTS = (
    (130, ("layer", "kind", "shape", "rule", "ranks", "params", "MACs", "energy")),
    (110, ("layer", "shape", "rule", "ranks", "params", "MACs", "energy")),
    (90, ("layer", "shape", "ranks", "params", "MACs", "energy")),
    (0, ("layer", "shape", "ranks", "params", "MACs")),
)
_NUMERIC = ("params", "MACs", "energy")


def _plan_columns(width: int) -> tuple[str, ...]:
    return next(columns for least, columns in _PLAN_LAYOUTS if width >= least)


def _plan_table(plan: Plan, title: str, width: int = 200, *, pruning: bool = False) -> Table:
    """The plan, one row a layer, in the columns that fit ``width``. A channel-prune plan has no
    ranks: its channels are chosen when compiling, so it shows what stays dense and the target."""
    columns = tuple(c for c in _plan_columns(width) if not (pruning and c == "energy"))
    wide = "kind" in columns
    arrow = " -> " if wide else "→"
    padding = (0, 1) if wide else (0, 1, 0, 0)
    table = Table(title=title, title_justify="left", show_footer=True, box=box.SIMPLE_HEAD, padding=padding,
                  pad_edge=wide, show_edge=wide)
    footer = {"layer": "total", "params": f"{si(plan.params_before)}{arrow}{si(plan.params_after)}",
              "MACs": "" if pruning else f"{si(plan.macs_before)}{arrow}{si(plan.macs_after)}"}
    for column in columns:
        table.add_column("channels" if pruning and column == "ranks" else column, footer=footer.get(column, ""),
                         justify="right" if column in _NUMERIC else "left",
                         no_wrap=column in ("layer", "shape", "params", "MACs"), overflow="fold")
    for layer in plan.layers:
        cells = {"layer": layer.name, "kind": layer.type_name, "shape": "x".join(map(str, layer.shape)),
                 "rule": layer.rule, "ranks": _treatment(layer, wide, pruning),
                 "params": si(layer.params_before) if pruning else (
                     f"{si(layer.params_before)}{arrow}{si(layer.params_after)}"),
                 "MACs": si(layer.macs_before) if pruning else f"{si(layer.macs_before)}{arrow}{si(layer.macs_after)}",
                 "energy": "" if layer.energy_kept is None or pruning else f"{layer.energy_kept:.1%}"}
        table.add_row(*(cells[column] for column in columns))
    return table


def _treatment(layer: LayerPlan, wide: bool, pruning: bool) -> str:
    if pruning:  # Torch-Pruning leaves only `keep` and the output layer whole
        return "dense" if _prune_keeps(layer) else "pruned"
    if layer.ranks is None:
        return f"dense: {layer.reason}" if wide else "dense"
    return f"{layer.method} {'x'.join(map(str, layer.ranks))}"


def _plan_notes(plan: Plan, width: int, *, pruning: bool = False, allocation: str = "uniform") -> list[str]:
    """What a narrow table leaves out, said once under it: why each dense layer is dense, and which
    rule chose the ranks of the others."""
    if pruning:
        pruned = sum(not _prune_keeps(layer) for layer in plan.layers)
        layers = plural(pruned, "pruned layer")
        how = (f"removes one share of the output channels of each of the {layers} (smallest L1 norm first)"
               if allocation == "uniform" else f"ranks the output channels of the {layers} together by L1 norm "
               "(each layer's divided by its mean) and removes the smallest")
        return [f"channel-prune: `cstar compile` {how}, until the conv and linear weights are "
                f"at most {si(plan.params_after)} ({plan.params_before / max(1, plan.params_after):.2f}x fewer); "
                "no ranks apply, and the MACs are known after compiling"]
    lines = []
    columns = _plan_columns(width)
    if "kind" in columns:
        return lines
    dense: dict[str, list[str]] = {}
    for layer in plan.layers:
        if layer.ranks is None:
            dense.setdefault(layer.reason, []).append(layer.name)
    lines += [f"dense ({reason}): {', '.join(names)}" for reason, names in dense.items()]
    if "rule" not in columns:
        rules: dict[str, int] = {}
        for layer in plan.layers:
            if layer.ranks is not None:
                rules[layer.rule] = rules.get(layer.rule, 0) + 1
        lines += [f"ranks by {rule}: {plural(count, 'layer')}" for rule, count in rules.items()]
    return lines


def _prune_keeps(layer: LayerPlan) -> bool:
    from ..plan.allocate import OUTPUT_RULE

    return layer.rule.startswith("keep") or layer.rule == OUTPUT_RULE


def _plan_summary(plan: Plan, seconds: float) -> str:
    params = plan.params_before / max(1, plan.params_after)
    macs = plan.macs_before / max(1, plan.macs_after)
    factorized = sum(layer.ranks is not None for layer in plan.layers)
    return (f"budget {plan.budget}, policy {plan.policy}: {factorized} of {len(plan.layers)} layers factorized; "
            f"params {params:.2f}x, MACs {macs:.2f}x (conv + linear weights; "
            f"{si(plan.other_params)} other parameters unchanged); planned in {seconds:.1f} s")


def _latency_line(latency: LatencyComparison, plan: Plan, seconds: float) -> str:
    dense, compressed = latency.dense, latency.compressed
    threads = plural(latency.threads, "thread")
    return (f"latency: {dense.median:.2f} ms -> {compressed.median:.2f} ms, {latency.speedup:.2f}x faster "
            f"(MACs {plan.macs_before / max(1, plan.macs_after):.2f}x); batch 1, {threads}, {latency.cpu}; "
            f"medians of {compressed.repeats} calls after optimize_for_inference; measured in {seconds:.1f} s")


# -------------------------------------------------------------------- diff


def _diff(args: argparse.Namespace, console: Console) -> int:
    from ..api import build_model, make_plan
    from ..lang.problems import SpecProblem
    from ..lang.validate import check_file
    from ..plan.diff import plan_changes, spec_changes

    diagnostics_format = "json" if args.format == "json" else "full"
    sides = [_diff_side(name, other) for name, other in zip(args.files, reversed(args.files), strict=True)]
    try:
        checked = [check_file(path, allow_import=args.allow_import, text=text) for path, text in sides]
    except CStarError as error:
        _print_diagnostics(console, list(error.diagnostics), diagnostics_format)
        return EXIT_INVALID
    plans = []
    for side in [] if args.settings_only else checked:
        try:
            plans.append(make_plan(side.spec, build_model(side.spec, allow_import=args.allow_import)))
        except SpecProblem as problem:
            _print_diagnostics(console, [side.diagnostic(problem)], diagnostics_format)
            return EXIT_INVALID
    settings = spec_changes(checked[0].spec, checked[1].spec)
    layers = plan_changes(*plans) if plans else []
    if args.format == "json":
        console.out(json.dumps(_diff_json(settings, layers, plans or None), indent=2, default=str))
    else:
        _print_diff(console, args.files, settings, layers, plans or None)
    return EXIT_OK


def _diff_side(name: str, other: str) -> tuple[Path, bytes | None]:
    """A recipe to compare: a path, or `-`, read from standard input and taken to live next to the other."""
    if name != "-":
        return Path(name), None
    return Path(other).parent / "<stdin>", sys.stdin.buffer.read()


def _print_diff(console: Console, files: list[str], settings: list[Change], layers: list[LayerChange],
                plans: list[Plan] | None) -> None:
    console.out(f"--- {files[0]}\n+++ {files[1]}")
    console.out("settings:" if settings else "settings: no change")
    width = max((len(change.path) for change in settings), default=0)
    for change in settings:
        console.out(f"  {change.path:<{width}}  {_shown(change.before)} -> {_shown(change.after)}")
    if plans is None:
        return
    before, after = plans
    if layers:
        table = Table(box=box.SIMPLE_HEAD, title="plan: layers that change", title_justify="left")
        for column in ("layer", "before", "after", "params", "MACs"):
            table.add_column(column, justify="right" if column in ("params", "MACs") else "left", no_wrap=True)
        for change in layers:
            table.add_row(change.name, _treatment_text(change.before), _treatment_text(change.after),
                          _delta(change, "params_after"), _delta(change, "macs_after"))
        console.print(table)
    else:
        console.out("plan: no layer changes")
    console.out(f"totals: params {si(before.params_after)} -> {si(after.params_after)} "
                f"({_signed(after.params_after - before.params_after)}), "
                f"MACs {si(before.macs_after)} -> {si(after.macs_after)} "
                f"({_signed(after.macs_after - before.macs_after)}); "
                f"ratio {before.ratio:.2f}x -> {after.ratio:.2f}x ({after.budget})")


def _shown(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _treatment_text(layer: LayerPlan | None) -> str:
    if layer is None:
        return "(absent)"
    return "dense" if layer.ranks is None else f"{layer.method} {'x'.join(map(str, layer.ranks))}"


def _delta(change: LayerChange, field: str) -> str:
    before = getattr(change.before, field, 0) if change.before else 0
    after = getattr(change.after, field, 0) if change.after else 0
    return f"{si(before)} -> {si(after)}"


def _signed(amount: float) -> str:
    return ("+" if amount >= 0 else "-") + si(abs(amount))


def _diff_json(settings: list[Change], layers: list[LayerChange], plans: list[Plan] | None) -> dict[str, object]:
    from dataclasses import asdict

    result: dict[str, object] = {"settings": [asdict(change) for change in settings]}
    if plans is not None:
        result["layers"] = [{"name": c.name, "before": c.before and asdict(c.before),
                             "after": c.after and asdict(c.after)} for c in layers]
        result["totals"] = {f"{side}_{key}": getattr(plan, key) for side, plan in zip(("before", "after"), plans,
                                                                                     strict=True)
                            for key in ("params_after", "macs_after", "ratio")}
    return result


# ----------------------------------------------------------------- compile


def _compile(args: argparse.Namespace, console: Console) -> int:
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
        _print_diagnostics(console, list(error.diagnostics), "full")
        return EXIT_INVALID
    taken = folder_problem(out, resume=args.resume, force=args.force, locked=args.locked)
    if taken:
        _print_diagnostics(console, [Diagnostic("run-failed", taken[0], help=taken[1])], "full")
        return EXIT_FAILED
    if not launching:  # the processes torchrun starts say it themselves
        _print_diagnostics(console, list(checked.warnings), "full")
        console.out(f"-- {'resuming' if args.resume else 'compiling'} {path} into {out}/")

    from ..driver.pipeline import CompileError, CompileOptions, Progress, compile_spec
    from ..files import FileProblem
    from ..lang.problems import SpecProblem
    from ..train import distributed
    from ..train.checkpoint import CheckpointError

    world = distributed.from_environment()
    if launching:
        return distributed.launch(_without_nproc(args.argv), args.nproc)
    options = CompileOptions(out=out, resume=args.resume, locked=args.locked,
                             force=args.force, allow_import=args.allow_import, device=args.device,
                             spec_name=str(path), spec_text=path.read_text(encoding="utf-8"),
                             warnings=tuple(render_concise(d) for d in checked.warnings))
    bars = console.is_terminal and not args.quiet
    progress = _RichProgress(console) if bars else _LogProgress(console)
    try:
        with progress:
            compiled = compile_spec(checked.spec, options, progress if world.is_main else Progress())
    except SpecProblem as problem:
        _print_diagnostics(console, [checked.diagnostic(problem)], "full")
        return EXIT_INVALID
    except (CheckpointError, CompileError, FileProblem) as error:
        _print_diagnostics(console, [Diagnostic("run-failed", str(error), help=error.help)], "full")
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.out(f"interrupted: the last finished epoch is checkpointed in {options.out}; "
                    f"`cstar compile {path} --out {options.out} --resume` continues from it")
        return EXIT_INTERRUPTED
    console.print(_report_table(compiled.report))
    exported = [e["file"] for e in compiled.report.get("exports", []) if e["format"] != "safetensors"]
    files = ["model.safetensors", "model.json", *exported, "report.json", "report.md", "curves.png", "ranks.png",
             "spec.cstar", "lock.json"]
    console.out(f"wrote {options.out}/: {', '.join(files)}")
    for requirement in compiled.report["requirements"]:
        verdict = "met" if requirement["met"] else "NOT MET"
        console.out(f"require {requirement['metric']} {requirement['op']} {requirement['value']:.1%}: "
                    f"{_percent(requirement['measured'])} ({verdict})",
                    style=None if requirement["met"] else "bold red")
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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _report_table(report: dict[str, Any]) -> Table:
    compression = report["compression"]
    table = Table(title=f"{report['spec']}: {report['method']}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("params (conv + linear)", f"{si(compression['params_dense'])} -> "
                  f"{si(compression['params_compressed'])} ({compression['ratio']:.2f}x)")
    table.add_row("MACs", f"{si(compression['macs_dense'])} -> {si(compression['macs_compressed'])} "
                  f"({compression['macs_dense'] / max(1, compression['macs_compressed']):.2f}x)")
    latency = report.get("latency")
    if latency:
        table.add_row("latency (batch 1, CPU)", f"{latency['dense_ms']['median']:.3g} ms -> "
                      f"{latency['compressed_ms']['median']:.3g} ms ({latency['speedup']:.2f}x)")
    table.add_row("clean accuracy", _percent(report["accuracy"]["clean"]))
    for name, value in report["accuracy"]["robust"].items():
        table.add_row(f"robust: {name}", _percent(value))
    table.add_row("test images", str(report["data"]["test_size"]))
    table.add_row("time", f"{report['timings']['total_seconds']:.0f} s on {report['machine']['device']}")
    return table


def _epoch_line(row: dict[str, Any]) -> str:
    line = (f"{row['phase']} epoch {row['epoch'] + 1}: loss {row['loss']:.3f}, train clean {row['clean']:.1%}, "
            f"robust {row['robust']:.1%}, {row['seconds']:.1f} s")
    if "residual" in row:
        line += f", rho {row['rho']:.3g}, ||W-Z||/||W|| {row['residual']:.3f}"
    return line


class _LogProgress:
    """One line per stage and per epoch: for logs, pipes and --quiet."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def stage(self, text: str) -> None:
        self.console.out(f"-- {text}")

    def phase_started(self, phase: str, epochs: int, first_epoch: int, steps: int) -> None:
        resumed = f", resuming at epoch {first_epoch + 1}" if first_epoch else ""
        self.console.out(f"-- {phase}: {plural(epochs, 'epoch')} of {plural(steps, 'step')}{resumed}")

    def step(self, phase: str, step: int, loss: float) -> None:
        return None

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.console.out(_epoch_line(row))

    def phase_done(self, phase: str) -> None:
        return None


class _RichProgress(_LogProgress):
    """A bar per phase (epochs) and one for the current epoch (steps, live loss)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        super().__init__(console)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
        self.phase_task: Any = None
        self.epoch_task: Any = None

    def __enter__(self) -> _RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def stage(self, text: str) -> None:
        self.bars.console.print(f"[bold]--[/] {text}")

    def phase_started(self, phase: str, epochs: int, first_epoch: int, steps: int) -> None:
        self.phase_task = self.bars.add_task(phase, total=epochs, completed=first_epoch, status="")
        self.epoch_task = self.bars.add_task("  epoch", total=steps, status="")

    def step(self, phase: str, step: int, loss: float) -> None:
        self.bars.update(self.epoch_task, completed=step + 1, status=f"loss {loss:.3f}")

    def epoch_done(self, row: dict[str, Any]) -> None:
        status = f"train clean {row['clean']:.1%}  robust {row['robust']:.1%}  loss {row['loss']:.3f}"
        self.bars.update(self.phase_task, advance=1, status=status)
        self.bars.reset(self.epoch_task)
        self.bars.console.print(_epoch_line(row), highlight=False)

    def phase_done(self, phase: str) -> None:
        self.bars.remove_task(self.epoch_task)


# ------------------------------------------------------------ export, eval


def _export(args: argparse.Namespace, console: Console) -> int:
    from ..deploy.artifacts import ArtifactError
    from ..deploy.export import ExportError, export

    try:
        exported = export(Path(args.folders[0]), args.format, out=args.out, opset=args.opset)
    except (ArtifactError, ExportError) as error:
        _print_diagnostics(console, [Diagnostic("export-failed", str(error))], "full")
        return EXIT_FAILED
    check = "" if exported.max_abs_diff is None else (
        f"; checked with {exported.checked_with}: max abs difference {exported.max_abs_diff:.2e} against PyTorch")
    opset = f", opset {exported.opset}" if exported.opset else ""
    console.out(f"wrote {exported.path} ({si(exported.bytes)}B, {exported.format}{opset}){check}")
    return EXIT_OK


def _eval(args: argparse.Namespace, console: Console) -> int:
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
        _print_diagnostics(console, list(error.diagnostics), diagnostics_format)
        return EXIT_USAGE
    except SpecProblem as problem:  # the run's recorded recipe no longer runs here: its data folder is gone, say
        _print_diagnostics(console, [Diagnostic("eval-failed", f"{folder}: {problem.message}", help=problem.help)],
                           diagnostics_format)
        return EXIT_FAILED
    except (ArtifactError, MissingExtra, ValueError) as error:
        _print_diagnostics(console, [Diagnostic("eval-failed", str(error))], diagnostics_format)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _print_diagnostics(console, [Diagnostic("eval-interrupted", "interrupted (Ctrl-C): nothing was written")],
                           diagnostics_format)
        return EXIT_INTERRUPTED
    failed = [check for check in result.sanity if not check.passed]
    if args.format == "json":
        console.out(json.dumps(result.to_dict(), indent=2))
        return EXIT_UNMET if failed else EXIT_OK
    table = Table(title=f"{folder}: {result.samples} test images", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("attack", "accuracy", "implementation"):
        table.add_column(column, justify="right" if column == "accuracy" else "left")
    table.add_row("clean", _percent(result.clean), "")
    for name, value in result.robust.items():
        table.add_row(name, _percent(value), result.implementations.get(name, ""))
    console.print(table)
    for check in result.sanity:
        console.out(_wrapped(f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}"),
                    style=None if check.passed else "bold red")
    if failed:
        console.out("a sanity check failed: these robust accuracies may be overestimated (gradient masking?)",
                    style="bold red")
    return EXIT_UNMET if failed else EXIT_OK


def _wrapped(line: str, width: int = 100) -> str:
    """A long result line on several lines of at most ``width``, continuations indented, so it reads
    the same in a terminal, a log or a CI page."""
    import textwrap

    return textwrap.fill(line, width, subsequent_indent="     ", break_on_hyphens=False, break_long_words=False)


# --------------------------------------------------------------------- fmt


def _fmt(args: argparse.Namespace, console: Console) -> int:
    from ..lang.fmt import format_text

    changed, failed = [], []
    diagnostics: list[Diagnostic] = []
    for name in args.files:
        path = Path(name)
        try:
            original = path.read_bytes()
            formatted = format_text(original, name)
        except OSError as error:
            failed.append(name)
            diagnostics.append(Diagnostic("unreadable-file", f"cannot read {name}: {error.strerror or error}"))
            continue
        except CStarError as error:
            failed.append(name)
            diagnostics += error.diagnostics
            continue
        if formatted.encode("utf-8") == original:
            continue
        changed.append(name)
        if args.diff:
            console.out("".join(difflib.unified_diff(
                original.decode("utf-8").splitlines(keepends=True), formatted.splitlines(keepends=True),
                fromfile=name, tofile=name)), end="")
        elif not args.check:
            try:
                files.write_text(path, formatted)
            except files.FileProblem as problem:
                changed.remove(name)
                failed.append(name)
                diagnostics.append(Diagnostic("unwritable-file", str(problem), help=problem.help))
    _print_diagnostics(console, diagnostics, args.format)
    dry = args.check or args.diff
    for name in changed:
        console.out(f"{'would reformat' if dry else 'reformatted'} {name}")
    unchanged = len(args.files) - len(changed) - len(failed)
    verb = "would be reformatted" if dry else "reformatted"
    console.out(f"{plural(len(changed), 'file')} {verb}, {unchanged} left unchanged"
                + (f", {len(failed)} with errors" if failed else ""))
    if failed or ((args.check or args.diff) and changed):
        return EXIT_INVALID
    return EXIT_OK


def _print_diagnostics(console: Console, diagnostics: list[Diagnostic], fmt: str) -> None:
    text = render(diagnostics, fmt)
    if fmt == "json" or not console.is_terminal:
        console.out(text, end="")
        return
    styled = Text(text)
    styled.highlight_regex(r"(?m)^error\[[a-z-]+\]", "bold red")
    styled.highlight_regex(r"(?m)^warning\[[a-z-]+\]", "bold yellow")
    styled.highlight_regex(r"(?m)^\s*\^+", "bold red")
    console.print(styled, end="")


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
