"""Planning stage (pure, no torch): spec + layer inventory -> which layers are factorized, at which ranks.

This module holds the allocators (a budget met by the `uniform`, `global`, `energy` or `fixed` policy);
rules.py decides each layer's rule and bounds, costs.py prices ranks, plans.py holds the Plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from ..lang.problems import SpecProblem
from ..lang.spec import CompressSpec, Spec
from .costs import (
    Cost,
    Loss,
    cost_function,
    energy_kept,
    factorized_macs,
    factorized_params,
    full_ranks,
    weighted_loss,
)
from .layers import LayerInfo
from .plans import LayerPlan, Plan, Ranks
from .rules import DEFAULT_MIN_RANK, OUTPUT_RULE, Slot, check_selectors, make_slot, natural, ratio_ranks

__all__ = ["DEFAULT_MIN_RANK", "OUTPUT_RULE", "LayerPlan", "Plan", "Ranks", "energy_kept", "factorized_macs",
           "factorized_params", "full_ranks", "make_plan"]


def make_plan(spec: Spec, layers: Sequence[LayerInfo], other_params: int = 0, *,
              removes_channels: bool = False) -> Plan:
    """Choose every layer's treatment and ranks under the spec's budget and policy (``removes_channels``: for the
    parameter count a structure that removes channels prunes to, see rules.make_slot).

    Raises:
        SpecProblem: a selector that matches no layer, fixed ranks that do not fit a layer, or an
            infeasible budget (stating the largest reachable ratio).
    """
    compress = spec.compress
    check_selectors(compress, layers)
    slots = [make_slot(layer, compress, removes_channels=removes_channels)
             for layer in sorted(layers, key=lambda x: natural(x.name))]
    metric = compress.budget.metric
    cost = cost_function(metric)
    target = _target(compress, slots, cost, other_params)
    policy = compress.policy.kind
    free = [s for s in slots if s.reason == "" and not s.fixed]
    if policy == "global":
        _global_ranks(free, slots, cost, target, compress)
    elif policy == "uniform":
        _uniform_ranks(free, slots, cost, target, compress)
    else:
        for slot in free:
            slot.reason = "no rank given (policy fixed)" if policy == "fixed" else ""
            if compress.policy.kind == "energy":
                _energy_ranks(slot, compress.policy.threshold)
        _require_met(slots, cost, target, compress)
    return Plan(policy=_policy_text(compress), budget=compress.budget.text(), metric=metric, target=target,
                layers=tuple(_layer_plan(s) for s in slots), other_params=other_params)


def budget_plan(spec: Spec, layers: Sequence[LayerInfo], other_params: int = 0) -> Plan:
    """The plan a structure that removes channels prunes to (``Plan.params_budget``): the low-rank plan, its output
    layer's rank free to fall since pruning never cuts that layer's outputs; or, where ranks cannot reach a
    parameter budget that removing channels may (a rank floor, depthwise convs), every layer dense under the
    budget's target, with a warning that says why."""
    try:
        return make_plan(spec, layers, other_params, removes_channels=True)
    except SpecProblem as problem:
        if problem.code != "infeasible-budget" or spec.compress.budget.metric != "params":
            raise
        plan = target_plan(spec, layers, other_params, "low rank cannot meet the budget")
        return replace(plan, warnings=(f"low rank: {problem.message}",))


def target_plan(spec: Spec, layers: Sequence[LayerInfo], other_params: int, reason: str) -> Plan:
    """Every layer dense (``reason`` why, where no rule of its own says), under the budget's target in its metric:
    the plan of a structure that needs only the target."""
    compress = spec.compress
    slots = [make_slot(layer, compress, removes_channels=True)
             for layer in sorted(layers, key=lambda x: natural(x.name))]
    for slot in slots:  # each layer's rule still says what decides it (a `keep`)
        slot.ranks, slot.fixed, slot.reason = None, False, slot.reason or reason
    target = _target(compress, slots, cost_function(compress.budget.metric), other_params)
    return Plan(policy=_policy_text(compress), budget=compress.budget.text(), metric=compress.budget.metric,
                target=target, layers=tuple(_layer_plan(s) for s in slots), other_params=other_params)


def given_plan(spec: Spec, layers: Sequence[LayerInfo], ranks: Mapping[str, Ranks], target: float,
               other_params: int = 0, *, policy: str, reason: str) -> Plan:
    """The plan of ranks ``policy`` chose (``ranks``: the factorized layers; the others dense, each with its rule's
    reason or ``reason``), under the spec's budget at ``target`` in its metric."""
    compress = spec.compress
    slots = [make_slot(layer, compress) for layer in sorted(layers, key=lambda x: natural(x.name))]
    for slot in slots:
        if not slot.reason and not slot.fixed:
            slot.ranks, slot.reason = ranks.get(slot.layer.name), "" if slot.layer.name in ranks else reason
    return Plan(policy=policy, budget=compress.budget.text(), metric=compress.budget.metric, target=target,
                layers=tuple(_layer_plan(s) for s in slots), other_params=other_params)


# ------------------------------------------------------------------- budgets


def _target(compress: CompressSpec, slots: Sequence[Slot], cost: Cost, other_params: int) -> float:
    budget = compress.budget
    dense = sum(cost(s.layer, None) for s in slots)
    if budget.kind == "ratio":
        return dense / budget.ratio
    if budget.metric == "params":
        return budget.limit - other_params  # an absolute parameter limit counts the whole model
    return budget.limit


def _total(slots: Sequence[Slot], cost: Cost) -> int:
    return sum(cost(s.layer, s.ranks) for s in slots)


def _infeasible(slots: Sequence[Slot], cost: Cost, compress: CompressSpec) -> SpecProblem:
    smallest = sum(min(cost(s.layer, None), cost(s.layer, s.low)) if s.low and not s.fixed and not s.reason
                   else cost(s.layer, s.ranks) for s in slots)
    reachable = math.floor(sum(cost(s.layer, None) for s in slots) / max(1, smallest) * 100) / 100
    outputs = [s.layer.name for s in slots if s.rule == OUTPUT_RULE]
    return SpecProblem(
        ("compress", "budget"), "infeasible-budget",
        f"the budget {compress.budget.text()} cannot be met: the largest reachable ratio is {reachable:.2f}x",
        label=f"at most {reachable:.2f}x here",
        help="lower the budget, lower `min_rank`, or leave fewer layers dense (`keep`, `dense`, fixed ranks)",
        notes=tuple(f'the output layer `{name}` stays dense; a rule `layer "{name}" {{ min_rank = 1 }}` lets the '
                    "budget cut it" for name in outputs))


def _require_met(slots: Sequence[Slot], cost: Cost, target: float, compress: CompressSpec) -> None:
    total = _total(slots, cost)
    if total > target:
        dense = sum(cost(s.layer, None) for s in slots)
        raise SpecProblem(
            ("compress", "policy"), "budget-not-met",
            f"policy {_policy_text(compress)} reaches {dense / max(1, total):.2f}x, short of the budget "
            f"{compress.budget.text()}", label="ranks too large for the budget",
            help="use `policy = global` to choose ranks under the budget, or lower the budget")


# -------------------------------------------------------------------- policies


def _energy_ranks(slot: Slot, threshold: float) -> None:
    ranks = []
    for energies, low, high in zip(slot.layer.energies, slot.low, slot.high, strict=True):
        kept, rank = 0.0, 0
        while rank < len(energies) and kept < threshold - 1e-12:
            kept += energies[rank]
            rank += 1
        ranks.append(max(low, min(high, rank)))
    slot.ranks = tuple(ranks)
    if factorized_params(slot.layer, slot.ranks) >= slot.layer.params:
        slot.ranks, slot.reason = None, "factorizing saves nothing at this energy"


def _uniform_ranks(free: Sequence[Slot], slots: Sequence[Slot], cost: Cost, target: float,
                   compress: CompressSpec) -> None:
    """The same compression ratio for every free layer (in the budget's metric): the smallest
    ratio that meets the budget, found by bisection; a layer that cannot reach it goes to its
    floor. The rounding slack is then given back one rank at a time, as for `global`."""

    def apply(ratio: float) -> int:
        for slot in free:
            slot.ranks = ratio_ranks(slot, ratio, cost) or slot.low
            if cost(slot.layer, slot.ranks) >= cost(slot.layer, None):
                slot.ranks = None
        return _total(slots, cost)

    ratio = _lowest_meeting(apply, target, start=(1.0, 2.0), growth=2, limit=1e9, halvings=60)
    if ratio is None:
        raise _infeasible(slots, cost, compress)
    give_back(free, cost, target - apply(ratio), weighted_loss)
    for slot in free:
        if slot.ranks is None:
            slot.reason = "factorizing saves nothing at the uniform ratio"


def _global_ranks(free: Sequence[Slot], slots: Sequence[Slot], cost: Cost, target: float,
                  compress: CompressSpec) -> None:
    """Minimize the summed weighted loss under the budget (Lagrangian relaxation).

    Each layer's candidates are dense and the points of its own greedy path from full rank down to
    its floor. For a price ``lam`` on cost, every layer independently takes the candidate that
    minimizes loss + lam * cost; bisection finds the lowest price that meets the budget, and the
    slack left is then given back one rank at a time. Deterministic: no randomness, fixed order.
    """
    paths = {id(slot): rank_path(slot, cost, weighted_loss) for slot in free}
    fixed_cost = _total([s for s in slots if s not in free], cost)

    def choose(lam: float) -> float:
        total = fixed_cost
        for slot in free:
            ranks, slot_cost, _ = min(paths[id(slot)], key=lambda p: (p[2] + lam * p[1], p[1]))
            slot.ranks = ranks
            total += slot_cost
        return total

    price = _lowest_meeting(choose, target, start=(0.0, 1.0), growth=16, limit=1e30, halvings=100)
    if price is None:
        raise _infeasible(slots, cost, compress)
    give_back(free, cost, target - choose(price), weighted_loss)
    for slot in free:
        if slot.ranks is None:
            slot.reason = "not worth factorizing under this budget"


def _lowest_meeting(total: Callable[[float], float], target: float, *, start: tuple[float, float], growth: float,
                    limit: float, halvings: int) -> float | None:
    """The lowest setting whose ``total`` meets ``target`` (None: none up to ``limit`` does), for a total that falls
    as the setting rises: grow the upper end from ``start`` by ``growth``, then bisect ``halvings`` times."""
    low, high = start
    while total(high) > target and high < limit:
        low, high = high, high * growth
    if total(high) > target:
        return None
    for _ in range(halvings):
        middle = (low + high) / 2
        low, high = (low, middle) if total(middle) <= target else (middle, high)
    return high


def rank_path(slot: Slot, cost: Cost, loss: Loss) -> list[tuple[Ranks | None, int, float]]:
    """Dense, then the layer's ranks from its ceiling down to its floor, always cutting the mode
    that loses the least per unit of cost saved: (ranks, cost, loss) per point."""
    layer, ranks = slot.layer, slot.high
    points: list[tuple[Ranks | None, int, float]] = [(None, cost(layer, None), 0.0)]
    while True:
        points.append((ranks, cost(layer, ranks), loss(layer, ranks)))
        cuts = [ranks[:m] + (ranks[m] - 1,) + ranks[m + 1:] for m in range(len(ranks)) if ranks[m] > slot.low[m]]
        cuts = [c for c in cuts if cost(layer, c) < cost(layer, ranks)]
        if not cuts:
            return points
        ranks = min(cuts, key=lambda c: ((loss(layer, c) - points[-1][2]) / (points[-1][1] - cost(layer, c)), c))


def give_back(free: Sequence[Slot], cost: Cost, slack: float, loss: Loss) -> None:
    """Raise ranks again, most loss regained per unit first, while the budget still holds."""
    while True:
        best = None
        for slot in free:
            if slot.ranks is None:
                continue
            for mode in range(len(slot.ranks)):
                if slot.ranks[mode] >= slot.high[mode]:
                    continue
                ranks = slot.ranks[:mode] + (slot.ranks[mode] + 1,) + slot.ranks[mode + 1:]
                extra = cost(slot.layer, ranks) - cost(slot.layer, slot.ranks)
                if extra > slack or cost(slot.layer, ranks) >= cost(slot.layer, None):
                    continue
                gain = (loss(slot.layer, slot.ranks) - loss(slot.layer, ranks)) / max(1, extra)
                candidate = (-gain, slot.layer.name, mode, ranks, extra)
                best = candidate if best is None or candidate < best else best
        if best is None:
            return
        slot = next(s for s in free if s.layer.name == best[1])
        slot.ranks, slack = best[3], slack - best[4]


# ---------------------------------------------------------------------- output


def _layer_plan(slot: Slot) -> LayerPlan:
    layer, ranks = slot.layer, slot.ranks
    method = "dense" if ranks is None else ("tucker2" if layer.is_conv else "svd")
    reason = slot.reason or ("fixed by rule" if slot.fixed else "chosen by policy")
    energy = None if ranks is None else energy_kept(layer, ranks)
    return LayerPlan(
        name=layer.name, type_name=layer.type_name, shape=layer.shape, rule=slot.rule, method=method,
        ranks=ranks, reason=reason if ranks is None or slot.fixed else "chosen by policy",
        params_before=layer.params,
        params_after=layer.params if ranks is None else factorized_params(layer, ranks),
        macs_before=layer.macs, macs_after=layer.macs if ranks is None else factorized_macs(layer, ranks),
        energy_kept=energy)


def _policy_text(compress: CompressSpec) -> str:
    policy = compress.policy
    return f"energy({policy.threshold:g})" if policy.kind == "energy" else policy.kind
