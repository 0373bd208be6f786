"""Planning stage, rules: which rule decides each layer, and the rank bounds (or fixed ranks) it sets.

Precedence of what decides a layer, highest first: an entry of ``keep``; a ``layer`` rule by exact
name; by glob (the first written wins among globs); the model's output layer, which the low-rank
methods leave dense; a rule by layer type; the policy's default.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..lang.errors import closest
from ..lang.problems import SpecProblem
from ..lang.registry import normalize_module_name
from ..lang.spec import CompressSpec, LayerRule
from .costs import Cost, cost_function, factorized_params, full_ranks
from .layers import LayerInfo
from .plans import Ranks

DEFAULT_MIN_RANK = 2  # a rank-1 factor rarely trains well
OUTPUT_RULE = "model output"  # what decides the model's output layer, when no name or glob rule does


@dataclass
class Slot:
    """A layer during planning: its bounds and, once chosen, its ranks (None: dense)."""

    layer: LayerInfo
    rule: str
    low: Ranks = ()
    high: Ranks = ()
    ranks: Ranks | None = None
    fixed: bool = False
    reason: str = ""


def natural(name: str) -> tuple[str | int, ...]:
    """Sort key that puts `features.3` before `features.10`."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def check_selectors(compress: CompressSpec, layers: Sequence[LayerInfo]) -> None:
    names = [normalize_module_name(layer.name) for layer in layers]
    for index, rule in enumerate(compress.layers):
        if not any(rule.selector.matches(layer.name, layer.type_name) for layer in layers):
            match = closest(rule.selector.pattern, names) if rule.selector.kind != "type" else None
            raise SpecProblem(
                ("compress", "layers", index, "selector"), "selector-matches-nothing",
                f"layer rule {rule.selector} matches no Linear or Conv2d layer of the model",
                label=f"did you mean \"{match}\"?" if match else "matches nothing",
                help="`cstar plan` lists every layer name; globs use * and ? (fnmatch)")
    for name in compress.keep:
        if not any(fnmatch.fnmatchcase(layer, name) for layer in names):
            match = closest(name, names)
            raise SpecProblem(
                ("compress", "keep"), "selector-matches-nothing", f"`keep` entry \"{name}\" matches no layer",
                label=f"did you mean \"{match}\"?" if match else "matches nothing",
                help="`cstar plan` lists every layer name")


def _matching_rule(name: str, type_name: str, rules: Sequence[LayerRule]) -> LayerRule | None:
    for kind in ("name", "glob", "type"):
        for rule in rules:
            if rule.selector.kind == kind and rule.selector.matches(name, type_name):
                return rule
    return None


def channel_floors(compress: CompressSpec, layers: Sequence[tuple[str, str, int]]) -> dict[str, int]:
    """The outputs each layer (name, type name, outputs) keeps at least under a structure that removes channels: its
    rule's `min_channels` (by name, then glob, then type), else the compress block's, capped at its width; layers
    without a floor are left out."""
    rules = [rule for rule in compress.layers if rule.min_channels is not None]
    floors = {}
    for name, type_name, width in layers:
        rule = _matching_rule(name, type_name, rules)
        floor = rule.min_channels if rule is not None else compress.min_channels
        if floor is not None:
            floors[name] = min(floor, width)
    return floors


def kept_by(compress: CompressSpec, layer_name: str) -> str | None:
    """The `keep` entry (a name or a glob) that leaves this layer whole, if any."""
    name = normalize_module_name(layer_name)
    return next((k for k in compress.keep if fnmatch.fnmatchcase(name, k)), None)


def make_slot(layer: LayerInfo, compress: CompressSpec, *, removes_channels: bool = False) -> Slot:
    """The layer's rule, bounds and (fixed) ranks; ``removes_channels``: the plan only sets the parameter count a
    structure that removes channels prunes to."""
    kept = kept_by(compress, layer.name)
    if kept is not None:
        return Slot(layer, f'keep "{kept}"', reason="kept dense by `keep`")
    rule = _matching_rule(layer.name, layer.type_name, [rule for rule in compress.layers if rule.sets_ranks])
    if layer.produces_output and not removes_channels and not (
            rule and rule.selector.kind in ("name", "glob")):
        # A rank below the number of outputs confines the logits to a subspace: the margins shrink,
        # and with them robustness. The layer is a sliver of a conv net (0.4% of cstar:mnist-cnn).
        # (Pruning protects the classifier's outputs itself; its plan only sets the parameter count.)
        return Slot(layer, OUTPUT_RULE, reason=f"its {layer.out_features} outputs keep full rank")
    slot = Slot(layer, f"layer {rule.selector}" if rule else "default")
    slot.reason = _ineligible(layer) or ("dense by rule" if rule and rule.dense else "")
    if slot.reason:
        return slot
    full = full_ranks(layer)
    floor = rule.min_rank if rule and rule.min_rank else compress.min_rank or DEFAULT_MIN_RANK
    ceiling = rule.max_rank if rule and rule.max_rank else max(full)
    slot.low = tuple(min(floor, f) for f in full)
    slot.high = tuple(max(low, min(ceiling, f)) for low, f in zip(slot.low, full, strict=True))
    if rule and rule.rank is not None:
        _fix_rank(slot, rule, rule.rank, compress)
    elif rule and rule.ratio is not None:
        _fix_ratio(slot, rule.ratio, ("compress", "layers", compress.layers.index(rule), "ratio"))
    return slot


def _ineligible(layer: LayerInfo) -> str:
    if layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if layer.calls != 1:
        return f"module called {layer.calls} times"
    if min(full_ranks(layer)) <= 1:
        return "rank 1 already"
    return ""


def _fix_rank(slot: Slot, rule: LayerRule, rank: int | tuple[int, int], compress: CompressSpec) -> None:
    layer = slot.layer
    ranks: Ranks = (rank, rank) if isinstance(rank, int) and layer.is_conv else (
        (rank,) if isinstance(rank, int) else tuple(rank))
    index = compress.layers.index(rule)
    if len(ranks) != len(full_ranks(layer)):
        raise SpecProblem(("compress", "layers", index, "rank"), "rank-shape",
                          f"`{layer.name}` is a Linear layer: it takes one rank, not a pair",
                          help="give a single number; pairs [r_out, r_in] are for Conv2d layers")
    too_big = [(r, f) for r, f in zip(ranks, full_ranks(layer), strict=True) if r > f]
    if too_big:
        raise SpecProblem(("compress", "layers", index, "rank"), "rank-too-large",
                          f"rank {too_big[0][0]} exceeds what `{layer.name}` has ({too_big[0][1]})",
                          help=f"the full ranks of `{layer.name}` are {list(full_ranks(layer))}")
    slot.ranks, slot.fixed = ranks, True
    if factorized_params(layer, ranks) >= layer.params:
        slot.ranks, slot.reason = None, "fixed rank saves nothing"


def _fix_ratio(slot: Slot, ratio: float, loc: tuple[str | int, ...]) -> None:
    slot.ranks, slot.fixed = ratio_ranks(slot, ratio, cost_function("params")), True
    if slot.ranks is None:
        floor = factorized_params(slot.layer, slot.low)
        raise SpecProblem(
            loc, "infeasible-ratio",
            f"`{slot.layer.name}` cannot be compressed {ratio:g}x: at its rank floor {list(slot.low)} it "
            f"reaches {slot.layer.params / floor:.2f}x", label="out of reach",
            help="lower the ratio, or lower `min_rank` for this layer")


def ratio_ranks(slot: Slot, ratio: float, cost: Cost) -> Ranks | None:
    """The largest ranks, all modes scaled alike, that cost at most 1/ratio of the dense layer."""
    limit = cost(slot.layer, None) / ratio
    ranks = _scaled(slot, _bisect(lambda scale: cost(slot.layer, _scaled(slot, scale)) <= limit))
    return ranks if cost(slot.layer, ranks) <= limit else None


def _scaled(slot: Slot, scale: float) -> Ranks:
    return tuple(max(low, min(high, math.floor(scale * f)))
                 for low, high, f in zip(slot.low, slot.high, full_ranks(slot.layer), strict=True))


def _bisect(fits: Callable[[float], bool]) -> float:
    """The largest scale in (0, 1] that fits (0 when none does)."""
    low, high = 0.0, 1.0
    if fits(high):
        return high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
