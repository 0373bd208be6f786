"""Command line, `cstar diff`: the settings and the plan of two recipes, side by side, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from ..lang.errors import CStarError
from ..lang.render import si
from .output import EXIT_OK, USER_ERRORS, print_error
from .plan import _treatment

if TYPE_CHECKING:
    from ..plan.allocate import LayerPlan, Plan
    from ..plan.diff import Change, LayerChange


def run_diff(args: argparse.Namespace, console: Console) -> int:
    from ..api import build_model, plan_recipe
    from ..lang.validate import check_file
    from ..plan.diff import plan_changes, spec_changes

    diagnostics_format = "json" if args.format == "json" else "full"
    sides = [_diff_side(name, other) for name, other in zip(args.files, reversed(args.files), strict=True)]
    try:
        checked = [check_file(path, allow_import=args.allow_import, text=text) for path, text in sides]
    except CStarError as error:
        return print_error(console, error, diagnostics_format)
    plans = []
    for side in [] if args.settings_only else checked:
        try:
            plans.append(plan_recipe(side.spec, build_model(side.spec, allow_import=args.allow_import))[1])
        except USER_ERRORS as error:
            return print_error(console, error, diagnostics_format, checked=side)
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
        for layer in layers:
            table.add_row(layer.name, _treatment_text(layer.before), _treatment_text(layer.after),
                          _delta(layer, "params_after"), _delta(layer, "macs_after"))
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
    return "(absent)" if layer is None else _treatment(layer, wide=False, arrow=" -> ")


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
