"""Command line, `cstar plan`: the plan table in the columns that fit, its notes and summary, the latency line."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from ..lang import registry
from ..lang.errors import CStarError
from ..lang.render import plural, si
from .output import EXIT_OK, USER_ERRORS, print_diagnostics, print_error, wrapped

if TYPE_CHECKING:
    from ..deploy.latency import LatencyComparison
    from ..plan.allocate import LayerPlan, Plan


def run_plan(args: argparse.Namespace, console: Console) -> int:
    import time

    from ..api import build_model, candidate_costs, measure_latency, plan_recipe
    from ..lang.validate import check_file

    started = time.perf_counter()
    diagnostic_format = {"table": "full", "concise": "concise", "json": "json"}[args.format]
    try:
        checked = check_file(args.files[0], allow_import=args.allow_import)
    except CStarError as error:
        return print_error(console, error, diagnostic_format)
    try:
        model = build_model(checked.spec, allow_import=args.allow_import)
        structure, plan = plan_recipe(checked.spec, model, args.structure)
        compress = checked.spec.compress
        costs = candidate_costs(checked.spec, model) if compress.method == "auto" and len(compress.candidates) > 1 \
            and not args.structure else []
        seconds = time.perf_counter() - started
        latency = measure_latency(checked.spec, model, plan, threads=args.threads, structure=structure) \
            if args.latency and structure != registry.JOINT_FISHER else None
    except USER_ERRORS as error:
        return print_error(console, error, diagnostic_format, checked=checked)
    if args.format == "json":
        extra: dict[str, object] = {} if latency is None else {"latency": latency.to_dict()}
        if costs:
            extra["candidates"] = [cost.to_dict() for cost in costs]
        console.out(json.dumps({"spec": args.files[0], "model": checked.spec.model.arch, "structure": structure,
                                "seconds": seconds, **plan.to_dict(), **extra}, indent=2))
        return EXIT_OK
    print_diagnostics(console, list(checked.warnings), diagnostic_format)
    pruning = any(layer.shape_after is not None for layer in plan.layers)
    console.print(_plan_table(plan, f"{args.files[0]}: {checked.spec.model.arch}", console.width, pruning=pruning))
    summary = [_plan_summary(plan, seconds, pruning=pruning)]
    notes = _plan_notes(plan, console.width, pruning=pruning, allocation=registry.channel_allocation(structure),
                        admm=compress.removes_channels and compress.method == "cstar" and not args.structure,
                        importance="L1" if compress.importance == "l1" else "Taylor",
                        name="channel-prune" if compress.method == "channel-prune" else structure)
    if compress.method == "auto" and len(compress.candidates) > 1:
        notes.append(f"auto: `cstar compile` probes {', '.join(compress.candidates)} at this budget "
                     f"({si(plan.params_after)} conv and linear weights; the plan above is {structure}'s), each "
                     f"fine-tuned {plural(compress.probe_epochs, 'epoch')} and scored on "
                     f"{compress.probe_holdout:.0%} of the training set held out, and compiles the most robust"
                     + (" after its ADMM phase has projected onto it" if checked.spec.train.admm else ""))
    if costs:
        notes.append("candidates at this budget (conv and linear weights, MACs): " + "; ".join(
            f"{cost.name} {si(cost.params)}, {si(cost.macs)}" if cost.params is not None and cost.macs is not None
            else f"{cost.name} chosen at compile time" if cost.measured
            else f"{cost.name} cannot meet it ({cost.problem})" for cost in costs))
    for line in [*notes, *summary]:
        console.out(wrapped(line, console.width))
    if latency is not None:
        console.out(_latency_line(latency, plan, time.perf_counter() - started - seconds))
    elif args.latency:
        console.out(wrapped(f"latency: {structure}'s layers are chosen at compile time; the compile's report times "
                            "them", console.width))
    for warning in plan.warnings:
        console.out(wrapped(f"note: {warning}.", console.width))
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
    """The plan, one row a layer, in the columns that fit ``width``. A pruned plan shows each layer's
    output channels before and after instead of ranks; a joint plan shows both."""
    joint = pruning and any(layer.ranks is not None for layer in plan.layers)
    columns = tuple(c for c in _plan_columns(width) if not (pruning and c == "energy"))
    if joint:
        at = columns.index("ranks")
        columns = (*columns[:at], "channels", *columns[at:])
    wide = "kind" in columns
    arrow = " -> " if wide else "→"
    padding = (0, 1) if wide else (0, 1, 0, 0)
    table = Table(title=title, title_justify="left", show_footer=True, box=box.SIMPLE_HEAD, padding=padding,
                  pad_edge=wide, show_edge=wide)
    footer = {"layer": "total", "params": f"{si(plan.params_before)}{arrow}{si(plan.params_after)}",
              "MACs": f"{si(plan.macs_before)}{arrow}{si(plan.macs_after)}"}
    for column in columns:
        table.add_column("channels" if pruning and not joint and column == "ranks" else column,
                         footer=footer.get(column, ""),
                         justify="right" if column in _NUMERIC else "left",
                         no_wrap=column in ("layer", "shape", "params", "MACs"), overflow="fold")
    for layer in plan.layers:
        cells = {"layer": layer.name, "kind": layer.type_name, "shape": "x".join(map(str, layer.shape)),
                 "rule": layer.rule, "ranks": _treatment(layer, wide, arrow, joint=joint),
                 "channels": _channels(layer, arrow),
                 "params": f"{si(layer.params_before)}{arrow}{si(layer.params_after)}",
                 "MACs": f"{si(layer.macs_before)}{arrow}{si(layer.macs_after)}",
                 "energy": "" if layer.energy_kept is None or pruning else f"{layer.energy_kept:.1%}"}
        table.add_row(*(cells[column] for column in columns))
    return table


def _treatment(layer: LayerPlan, wide: bool, arrow: str, *, joint: bool = False) -> str:
    if layer.shape_after is not None and not joint:  # the output channels pruning keeps (an output layer all)
        if layer.ranks is not None:  # a joint layer in one column (`cstar diff`): its channels, then its ranks
            return f"{_channels(layer, arrow)}, {layer.method} {'x'.join(map(str, layer.ranks))}"
        whole = layer.shape_after == layer.shape
        return "dense" if whole else f"{layer.shape[0]}{arrow}{layer.shape_after[0]}"
    if layer.ranks is None:
        return f"dense: {layer.reason}" if wide else "dense"
    return f"{layer.method} {'x'.join(map(str, layer.ranks))}"


def _channels(layer: LayerPlan, arrow: str) -> str:
    """A joint plan's output channels: before and after, or the one count a layer keeps whole."""
    after = layer.shape[0] if layer.shape_after is None else layer.shape_after[0]
    return str(after) if after == layer.shape[0] else f"{layer.shape[0]}{arrow}{after}"


def _plan_notes(plan: Plan, width: int, *, pruning: bool = False, allocation: str = "uniform",
                admm: bool = False, importance: str = "L1", name: str = "channel-prune") -> list[str]:
    """What a narrow table leaves out, said once under it: why each dense layer is dense, and which
    rule chose the ranks of the others."""
    if pruning:
        pruned = sum(not _prune_keeps(layer) for layer in plan.layers)
        layers = plural(pruned, "pruned layer")
        order = "least weight across its dependency group" if admm else f"lowest {importance} score first"
        how = (f"removes one share of the output channels of each of the {layers} ({order}), some layers rounded "
               "up" if allocation == "uniform" else f"ranks the output channels of the {layers} together by "
               f"{importance} score (each layer's divided by its mean) to set each layer's count, and removes "
               f"the {'channels of ' + order if admm else 'smallest'}")
        who = "cstar onto channels: the ADMM phase, then the compile," if admm else f"{name}: `cstar compile`"
        if any(layer.ranks is not None for layer in plan.layers):
            return [f"joint: `cstar compile` {how}, the largest such model within its share of the budget, then "
                    f"factorizes what they keep to the rest (policy {plan.policy}): the channels and ranks above"]
        return [f"{who} {how}, the largest such model within the budget: the channels above"]
    lines: list[str] = []
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
    """Whether pruning leaves the layer's outputs whole: a `keep` layer, or the model's output layer."""
    return layer.shape_after is not None and layer.shape_after[0] == layer.shape[0]


def _plan_summary(plan: Plan, seconds: float, *, pruning: bool = False) -> str:
    params = plan.params_before / max(1, plan.params_after)
    macs = plan.macs_before / max(1, plan.macs_after)
    if pruning:  # the batch norms of removed channels go too
        pruned = sum(not _prune_keeps(layer) for layer in plan.layers)
        factorized = sum(layer.ranks is not None for layer in plan.layers)
        how, others = f"{pruned} of {len(plan.layers)} layers pruned", "batch norms shrink with their channels"
        how += f", {factorized} factorized (policy {plan.policy})" if factorized else ""
    else:
        how = f"policy {plan.policy}: {sum(layer.ranks is not None for layer in plan.layers)} of " \
              f"{len(plan.layers)} layers factorized"
        others = f"{si(plan.other_params)} other parameters unchanged"
    return (f"budget {plan.budget}, {how}; params {params:.2f}x, MACs {macs:.2f}x (conv + linear weights; "
            f"{others}); planned in {seconds:.1f} s")


def _latency_line(latency: LatencyComparison, plan: Plan, seconds: float) -> str:
    dense, compressed = latency.dense, latency.compressed
    threads = plural(latency.threads, "thread")
    return (f"latency: {dense.median:.2f} ms -> {compressed.median:.2f} ms, {latency.speedup:.2f}x faster "
            f"(MACs {plan.macs_before / max(1, plan.macs_after):.2f}x); batch 1, {threads}, {latency.cpu}; "
            f"medians of {compressed.repeats} calls after optimize_for_inference; measured in {seconds:.1f} s")
