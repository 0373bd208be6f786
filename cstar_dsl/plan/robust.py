"""Planning stage, robustness-aware allocation (pure, no torch): removed channels and cut ranks chosen together, by
Fisher scores on the adversarial loss per unit of the budget they save, to meet one budget.

A channel's score and a rank component's score are the same quantity, the squared first-order change of the
adversarial loss when that unit is removed, summed over a few batches of adversarial examples, so a removed channel
and a cut rank compare on one scale. What removing several units of a layer loses is their summed score on a barrier
(barrier_loss). For a price (loss per unit of budget), every channel whose loss per unit saved is below it goes, then
every layer takes the ranks that minimize its loss + the price x its cost (a Lagrangian relaxation, as the `global`
rank policy); the lowest price that meets the budget wins, then removed channels and cut ranks are given back while
the budget holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..lang.problems import SpecProblem
from ..lang.spec import CompressSpec
from .allocate import give_back, rank_path
from .costs import Cost, cost_function
from .layers import LayerInfo
from .plans import Ranks
from .rules import Slot, make_slot


@dataclass(frozen=True)
class Reach:
    """What removing a group's channels deletes from one Conv2d / Linear weight."""

    layer: str
    removes_outputs: bool  # rows (the layer's outputs) or columns (its inputs)
    channels: tuple[int, ...]  # for each row or column deleted, the group's channel it belongs to


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together (Torch-Pruning's dependency group): a layer's outputs and all that follows them, a
    residual sum's members included. ``root`` is the layer whose count of outputs a prune sets."""

    root: str
    width: int
    reach: tuple[Reach, ...]


@dataclass(frozen=True)
class Fisher:
    """Scores on the adversarial loss: each group's channels, and each layer's rank components per mode (output then
    input channels for a conv, one mode for a Linear), in the order of the dense weight's singular values."""

    channels: Mapping[str, tuple[float, ...]]
    modes: Mapping[str, tuple[tuple[float, ...], ...]]

    def rank_loss(self, layer: LayerInfo, ranks: Ranks | None) -> float:
        """What the ranks cut from ``layer`` (a layer of the pruned model: components past its pruned width went
        with the channels) loses, each mode's share of scores on the barrier of ``barrier_loss``."""
        if ranks is None:
            return 0.0
        widths = (layer.out_features, layer.in_features // layer.groups) if layer.is_conv else (
            min(layer.out_features, layer.in_features),)
        return sum(barrier_loss(sum(scores[:width]), sum(scores[rank:width]))
                   for scores, rank, width in zip(self.modes[layer.name], ranks, widths, strict=True))


def barrier_loss(total: float, removed: float) -> float:
    """The loss of removing units of summed score ``removed`` out of ``total``: -total x log(1 - removed / total).

    About the summed score for small removals (Fisher's estimate), and dearer for each further unit as a layer
    empties, as the `global` rank policy's -log(energy kept): first-order scores add up, but the loss of a layer cut
    to a sliver does not, and a price on their plain sum would starve whole layers to spare others."""
    if total <= 0:
        return 0.0
    return -total * math.log(max(1 - removed / total, 1e-12))


@dataclass(frozen=True)
class Allocation:
    """The channels each group's root keeps, and the ranks of each factorized layer of the pruned model."""

    kept_counts: Mapping[str, int]
    ranks: Mapping[str, Ranks]
    layers: tuple[LayerInfo, ...]  # the pruned model's inventory


@dataclass(frozen=True)
class _Point:
    """One trial of the allocation: the counts kept, every layer's slot, and their cost (infinite where the
    recipe's fixed ranks do not fit what pruning left)."""

    counts: dict[str, int]
    slots: list[Slot]
    total: float


def _point(counts: dict[str, int], ranked: Callable[[Mapping[str, int]], list[Slot] | None], cost: Cost) -> _Point:
    slots = ranked(counts)
    if slots is None:
        return _Point(counts, [], math.inf)
    return _Point(counts, slots, sum(cost(s.layer, s.ranks) for s in slots))


# Measures the pruned model's inventory for a count of kept outputs per group root.
Measure = Callable[[Mapping[str, int]], Sequence[LayerInfo]]

_HALVINGS = 40  # on a log scale of the price: far finer than one channel or one rank of any layer
_CEILING = 1e30


def channel_savings(groups: Sequence[ChannelGroup], layers: Sequence[LayerInfo], metric: str) -> dict[str, tuple[
        float, ...]]:
    """What removing each channel of each group saves of the dense model, in the budget's metric: the weights it
    deletes from every layer it reaches (times the output positions, for MACs)."""
    by_name = {layer.name: layer for layer in layers}
    savings: dict[str, tuple[float, ...]] = {}
    for group in groups:
        saved = [0.0] * group.width
        for reach in group.reach:
            layer = by_name.get(reach.layer)
            if layer is None:
                continue
            shape = layer.shape
            size = math.prod(shape) / shape[0 if reach.removes_outputs else 1]
            size *= layer.out_positions if metric == "macs" else 1
            for channel in reach.channels:
                saved[channel] += size
        savings[group.root] = tuple(saved)
    return savings


def allocate(groups: Sequence[ChannelGroup], fisher: Fisher, dense: Sequence[LayerInfo], measure: Measure,
             compress: CompressSpec, target: float, floors: Mapping[str, int] | None = None) -> Allocation:
    """The channels and ranks of least Fisher score per unit saved that meet ``target`` (in the metric of
    ``compress.budget``), as close to it as single channels and ranks allow; ``dense`` is the dense inventory, and
    no layer goes below its entry of ``floors`` (the recipe's `min_channels`; a group keeps its members' highest).

    Raises:
        SpecProblem: even the highest price (every removable channel and rank gone) misses the budget.
    """
    cost = cost_function(compress.budget.metric)
    prices = _prices(groups, fisher, channel_savings(groups, dense, compress.budget.metric))
    group_floors = _group_floors(groups, {**(floors or {})}, _rank_floors(dense, compress))
    cache: dict[tuple[tuple[str, int], ...], tuple[LayerInfo, ...]] = {}

    def inventory(counts: Mapping[str, int]) -> tuple[LayerInfo, ...]:
        key = tuple(sorted(counts.items()))
        if key not in cache:
            cache[key] = tuple(measure(dict(key)))
        return cache[key]

    ranked = _Ranked(fisher, cost, compress)

    def at(price: float) -> _Point:
        counts = _kept_counts(groups, prices, price, group_floors)
        return _point(counts, lambda trial: ranked(inventory(trial), price), cost)

    low, high = 0.0, 1e-12
    while (highest := at(high)).total > target and high < _CEILING:
        low, high = high, high * 16
    if highest.total > target:
        raise _infeasible(highest.total, sum(cost(layer, None) for layer in dense), compress)
    for _ in range(_HALVINGS):
        middle = math.sqrt(low * high) if low > 0 else high / 16
        low, high = (low, middle) if at(middle).total <= target else (middle, high)
    best = _restore_channels(groups, prices, at(high), target, lambda counts: ranked(inventory(counts), high), cost)
    slots = best.slots
    free = [s for s in slots if not s.reason and not s.fixed]
    give_back(free, cost, target - best.total, fisher.rank_loss)
    return Allocation(best.counts, {s.layer.name: s.ranks for s in slots if s.ranks is not None},
                      tuple(s.layer for s in slots))


def _rank_floors(dense: Sequence[LayerInfo], compress: CompressSpec) -> dict[tuple[str, bool], int]:
    """The widths a layer rule's fixed ranks (`rank`, or the ranks of its `ratio`) need: (layer, outputs or
    inputs) -> the rank of that side, so that no prune takes a layer below the ranks its rule gives it."""
    needed: dict[tuple[str, bool], int] = {}
    for layer in dense:
        slot = make_slot(layer, compress)
        if slot.fixed and slot.ranks is not None:
            needed[(layer.name, True)] = slot.ranks[0]
            needed[(layer.name, False)] = slot.ranks[-1]
    return needed


def _group_floors(groups: Sequence[ChannelGroup], floors: Mapping[str, int],
                  ranks: Mapping[tuple[str, bool], int]) -> dict[str, int]:
    """Each group's floor: the highest of its members' `min_channels` (a residual sum's members lose channels
    together), and of the ranks fixed on any layer it reaches."""
    return {group.root: max([1, *(floors.get(r.layer, 1) for r in group.reach if r.removes_outputs),
                             *(ranks.get((r.layer, r.removes_outputs), 1) for r in group.reach)])
            for group in groups}


def _prices(groups: Sequence[ChannelGroup], fisher: Fisher,
            savings: Mapping[str, tuple[float, ...]]) -> dict[str, list[float]]:
    """For each group, the price at which each further channel goes, in the order they go (least score per unit
    saved first): the barrier loss it adds per unit it saves, never falling; a channel that saves nothing never
    goes."""
    prices = {}
    for group in groups:
        scores = fisher.channels[group.root]
        order = sorted(zip(scores, savings[group.root], strict=True),
                       key=lambda unit: unit[0] / unit[1] if unit[1] > 0 else math.inf)
        total, removed, highest, marginal = sum(scores), 0.0, 0.0, []
        for score, saved in order:
            added = barrier_loss(total, removed + score) - barrier_loss(total, removed)
            highest = max(highest, added / saved if saved > 0 else math.inf)
            marginal.append(highest)
            removed += score
        prices[group.root] = marginal
    return prices


def _kept_counts(groups: Sequence[ChannelGroup], prices: Mapping[str, list[float]], price: float,
                 floors: Mapping[str, int]) -> dict[str, int]:
    """The outputs each group's root keeps at ``price`` (only roots that lose some): the channels whose price is
    below it go, down to the root's floor, and at least one stays."""
    counts = {}
    for group in groups:
        removed = sum(1 for going in prices[group.root] if going < price)
        kept = max(1, floors.get(group.root, 1), group.width - removed)
        if kept < group.width:
            counts[group.root] = kept
    return counts


class _Ranked:
    """Every layer of a pruned model at the ranks that minimize its Fisher loss + a price x its cost (dense where
    that is cheapest; the recipe's rules and bounds respected, the output layer at full rank). A layer's path of
    ranks does not depend on the price, so each width's is walked once."""

    def __init__(self, fisher: Fisher, cost: Cost, compress: CompressSpec) -> None:
        self.fisher, self.cost, self.compress = fisher, cost, compress
        self.paths: dict[tuple[str, int, int], list[tuple[Ranks | None, int, float]]] = {}

    def __call__(self, layers: Sequence[LayerInfo], price: float) -> list[Slot] | None:
        """None where a layer rule's fixed ranks (or ratio) do not fit what pruning left: too much pruned."""
        try:
            # The output layer keeps full rank, as every low-rank plan's: here the ranks are built.
            slots = [make_slot(layer, self.compress) for layer in layers]
        except SpecProblem:
            return None
        for slot in slots:
            if slot.reason or slot.fixed:
                continue
            key = (slot.layer.name, slot.layer.out_features, slot.layer.in_features)
            if key not in self.paths:
                self.paths[key] = rank_path(slot, self.cost, self.fisher.rank_loss)
            slot.ranks = min(self.paths[key], key=lambda p: (p[2] + price * p[1], p[1]))[0]
        return slots


def _restore_channels(groups: Sequence[ChannelGroup], prices: Mapping[str, list[float]], start: _Point,
                      target: float, ranked: Callable[[Mapping[str, int]], list[Slot] | None], cost: Cost) -> _Point:
    """Removed channels given back while the budget holds with the ranks re-chosen: the most valuable per unit
    first, one per group a pass, until a pass gives none back. What the last step of the price left unused goes back
    to channels first (a channel is a coarser unit than a rank; the ranks take what is left)."""
    widths = {group.root: group.width for group in groups}
    best, changed = start, True
    while changed:
        changed = False
        removed = {root: widths[root] - kept for root, kept in best.counts.items()}
        # The next channel back in each group is the last one removed, the dearest.
        for root in sorted(removed, key=lambda root: (-prices[root][removed[root] - 1], root)):
            counts = {**best.counts, root: best.counts[root] + 1}
            if counts[root] == widths[root]:
                del counts[root]
            tried = _point(counts, ranked, cost)
            if best.total < tried.total <= target:
                best, changed = tried, True
    return best


def _infeasible(smallest: float, dense: int, compress: CompressSpec) -> SpecProblem:
    reachable = math.floor(dense / max(1, smallest) * 100) / 100
    return SpecProblem(
        ("compress", "budget"), "infeasible-budget",
        f"the budget {compress.budget.text()} cannot be met by removing channels and cutting ranks: the largest "
        f"reachable ratio is {reachable:.2f}x", label=f"at most {reachable:.2f}x here",
        help="lower the budget, or leave fewer layers whole (`keep`, `dense`, fixed ranks)")
