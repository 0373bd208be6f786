"""Diff stage (pure): two validated recipes, and optionally their plans -> what changes between them.

Settings are compared after ``extend`` is resolved and defaults are filled, so a diff shows what a
change really does, not how the text moved. ``layer`` rules are matched by selector and
requirements by metric, as ``extend`` merges them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lang.spec import Spec
from .plans import LayerPlan, Plan


@dataclass(frozen=True)
class Change:
    """One setting whose value differs (None: absent on that side)."""

    path: str
    before: object
    after: object


@dataclass(frozen=True)
class LayerChange:
    """One layer whose treatment differs between two plans (None: absent on that side)."""

    name: str
    before: LayerPlan | None
    after: LayerPlan | None


def spec_changes(before: Spec, after: Spec) -> list[Change]:
    """Every setting that differs, as dotted paths in the order of the spec's blocks."""
    old, new = _flatten(_keyed(before)), _flatten(_keyed(after))
    keys = list(old) + [key for key in new if key not in old]
    return [Change(key, old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)]


def plan_changes(before: Plan, after: Plan) -> list[LayerChange]:
    """Every layer whose method, ranks or costs differ."""
    old = {layer.name: layer for layer in before.layers}
    new = {layer.name: layer for layer in after.layers}
    names = list(old) + [name for name in new if name not in old]
    return [LayerChange(name, old.get(name), new.get(name)) for name in names
            if _treatment(old.get(name)) != _treatment(new.get(name))]


def _treatment(layer: LayerPlan | None) -> object:
    if layer is None:
        return None
    return (layer.method, layer.ranks, layer.shape_after, layer.params_after, layer.macs_after)


def _keyed(spec: Spec) -> dict[str, object]:
    """The spec as plain data, its rule and requirement lists keyed like `extend` merges them."""
    data = spec.model_dump(mode="json")
    compress, evaluate = data["compress"], data["evaluate"]
    compress["budget"] = spec.compress.budget.text()
    compress["layers"] = {_selector(rule.pop("selector")): _settings(rule) for rule in compress["layers"]}
    evaluate["requirements"] = {req["metric"]: f"{req['op']} {req['value']:.0%}" for req in evaluate["requirements"]}
    return data


def _settings(rule: dict[str, object]) -> str:
    """A rule's settings on one line, as written: ``ratio = 4x, min_rank = 2``."""
    shown = {key: value for key, value in rule.items() if value not in (None, False)}
    return ", ".join(f"{key} = {value:g}x" if key == "ratio" else f"{key} = {value}"
                     for key, value in shown.items()) or "(no settings)"


def _selector(selector: dict[str, str]) -> str:
    return f"type {selector['pattern']}" if selector["kind"] == "type" else f'"{selector["pattern"]}"'


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and not _is_option(value):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: _display(value)}


def _is_option(value: dict[str, object]) -> bool:
    """A union member such as ``pgd(steps = 20)`` is one value, shown whole."""
    return "kind" in value


def _display(value: object) -> object:
    if isinstance(value, dict) and "kind" in value:
        arguments = ", ".join(f"{k} = {_display(v)}" for k, v in value.items() if k != "kind" and v is not None)
        return f"{value['kind']}({arguments})" if arguments else str(value["kind"])
    if isinstance(value, list):
        return [_display(item) for item in value]
    return value
