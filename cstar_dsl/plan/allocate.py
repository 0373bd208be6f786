"""Planning stage (pure, no torch): spec + layer inventory -> which layers are factorized, at which ranks.

Precedence of what decides a layer, highest first: an entry of ``keep``; a ``layer`` rule by exact
name; by glob (the first written wins among globs); the model's output layer, which the low-rank
methods leave dense; a rule by layer type; the policy's default.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..lang.errors import closest
from ..lang.problems import SpecProblem
from ..lang.registry import normalize_module_name
from ..lang.render import si
from ..lang.spec import CompressSpec, LayerRule, Spec
from .layers import LayerInfo

DEFAULT_MIN_RANK = 2  # a rank-1 factor rarely trains well
OUTPUT_RULE = "model output"  # what decides the model's output layer, when no name or glob rule does
Ranks = tuple[int, ...]  # (r,) for a Linear, (r_out, r_in) for a conv


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer, and why."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    rule: str
    method: str  # "svd", "tucker2" or "dense"
    ranks: Ranks | None
    reason: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    energy_kept: float | None


@dataclass(frozen=True)
class Plan:
    """The whole plan, with totals over conv and linear weights (biases and norms excluded)."""

    policy: str
    budget: str
    metric: str
    target: float
    layers: tuple[LayerPlan, ...]
    other_params: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Achieved compression of the budget's metric: dense / compressed."""
        if self.metric == "macs":
            return self.macs_before / max(1, self.macs_after)
        return self.params_before / max(1, self.params_after)

    def to_dict(self) -> dict[str, object]:
        """The JSON form (schema in docs/plan.md)."""
        return {
            "schema": "cstar.plan/1",
            "policy": self.policy,
            "budget": self.budget,
            "metric": self.metric,
            "target": self.target,
            "totals": {
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "other_params": self.other_params, "ratio": self.ratio,
            },
            "layers": [{**asdict(layer), "ranks": list(layer.ranks) if layer.ranks else None,
                        "shape": list(layer.shape)} for layer in self.layers],
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------ layer costs


def factorized_params(layer: LayerInfo, ranks: Ranks) -> int:
    if not layer.is_conv:
        return ranks[0] * (layer.in_features + layer.out_features)
    r_out, r_in = ranks
    area = layer.kernel[0] * layer.kernel[1]
    return layer.in_features * r_in + r_out * r_in * area + layer.out_features * r_out


def factorized_macs(layer: LayerInfo, ranks: Ranks) -> int:
    if not layer.is_conv:
        return factorized_params(layer, ranks) * layer.out_positions
    r_out, r_in = ranks
    area = layer.kernel[0] * layer.kernel[1]
    return layer.in_features * r_in * layer.in_positions + (r_out * r_in * area + layer.out_features * r_out) * (
        layer.out_positions)


def energy_kept(layer: LayerInfo, ranks: Ranks) -> float:
    """The share of the layer's normalized spectral energy the ranks keep (product over the modes)."""
    return math.prod(sum(energies[:rank]) for energies, rank in zip(layer.energies, ranks, strict=True))


def _weighted_loss(layer: LayerInfo, ranks: Ranks | None) -> float:
    """What the global policy minimizes, summed over layers: -log(energy kept) x the layer's size.

    The log makes each further cut of a layer dearer than the last, so no layer is destroyed to
    spare another (a linear loss drives whole layers to the rank floor when spectra are flat);
    the size weight makes the cost per parameter saved comparable across layers. Near full
    energy, -log(kept) ~ energy lost, so redundant (fast-decaying) layers are cut first.
    """
    return 0.0 if ranks is None else -math.log(max(energy_kept(layer, ranks), 1e-12)) * layer.params


def full_ranks(layer: LayerInfo) -> Ranks:
    if layer.is_conv:
        return (layer.out_features, layer.in_features)
    return (min(layer.in_features, layer.out_features),)


# ------------------------------------------------------------- per-layer setup


@dataclass
class _Slot:
    """A layer during planning: its bounds and, once chosen, its ranks (None: dense)."""

    layer: LayerInfo
    rule: str
    low: Ranks = ()
    high: Ranks = ()
    ranks: Ranks | None = None
    fixed: bool = False
    reason: str = ""


def make_plan(spec: Spec, layers: Sequence[LayerInfo], other_params: int = 0) -> Plan:
    """Choose every layer's treatment and ranks under the spec's budget and policy.

    Raises:
        SpecProblem: a selector that matches no layer, fixed ranks that do not fit a layer, or an
            infeasible budget (stating the largest reachable ratio).
    """
    compress = spec.compress
    _check_selectors(compress, layers)
    slots = [_slot(layer, compress) for layer in sorted(layers, key=lambda x: _natural(x.name))]
    metric = compress.budget.metric
    cost = _cost_function(metric)
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
            if policy == "energy":
                _energy_ranks(slot, compress.policy.threshold)  # type: ignore[union-attr]
        _require_met(slots, cost, target, compress)
    return Plan(policy=_policy_text(compress), budget=_budget_text(compress), metric=metric, target=target,
                layers=tuple(_layer_plan(s) for s in slots), other_params=other_params)


def _natural(name: str) -> tuple[str | int, ...]:
    """Sort key that puts `features.3` before `features.10`."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _check_selectors(compress: CompressSpec, layers: Sequence[LayerInfo]) -> None:
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


def _matching_rule(layer: LayerInfo, rules: Sequence[LayerRule]) -> LayerRule | None:
    for kind in ("name", "glob", "type"):
        for rule in rules:
            if rule.selector.kind == kind and rule.selector.matches(layer.name, layer.type_name):
                return rule
    return None


def _slot(layer: LayerInfo, compress: CompressSpec) -> _Slot:
    name = normalize_module_name(layer.name)
    kept = next((k for k in compress.keep if fnmatch.fnmatchcase(name, k)), None)
    if kept is not None:
        return _Slot(layer, f'keep "{kept}"', reason="kept dense by `keep`")
    rule = _matching_rule(layer, compress.layers)
    if layer.produces_output and compress.method != "channel-prune" and not (
            rule and rule.selector.kind in ("name", "glob")):
        # A rank below the number of outputs confines the logits to a subspace: the margins shrink,
        # and with them robustness. The layer is a sliver of a conv net (0.4% of cstar:mnist-cnn).
        # (channel-prune protects the classifier's outputs itself; its plan only sets the parameter count.)
        return _Slot(layer, OUTPUT_RULE, reason=f"its {layer.out_features} outputs keep full rank")
    slot = _Slot(layer, f"layer {rule.selector}" if rule else "default")
    slot.reason = _ineligible(layer) or ("dense by rule" if rule and rule.dense else "")
    if slot.reason:
        return slot
    full = full_ranks(layer)
    floor = rule.min_rank if rule and rule.min_rank else compress.min_rank or DEFAULT_MIN_RANK
    ceiling = rule.max_rank if rule and rule.max_rank else max(full)
    slot.low = tuple(min(floor, f) for f in full)
    slot.high = tuple(max(low, min(ceiling, f)) for low, f in zip(slot.low, full, strict=True))
    if rule and rule.rank is not None:
        _fix_rank(slot, rule, compress)
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


def _fix_rank(slot: _Slot, rule: LayerRule, compress: CompressSpec) -> None:
    layer, rank = slot.layer, rule.rank
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


def _fix_ratio(slot: _Slot, ratio: float, loc: tuple[str | int, ...]) -> None:
    slot.ranks, slot.fixed = _ratio_ranks(slot, ratio, _cost_function("params")), True
    if slot.ranks is None:
        floor = factorized_params(slot.layer, slot.low)
        raise SpecProblem(
            loc, "infeasible-ratio",
            f"`{slot.layer.name}` cannot be compressed {ratio:g}x: at its rank floor {list(slot.low)} it "
            f"reaches {slot.layer.params / floor:.2f}x", label="out of reach",
            help="lower the ratio, or lower `min_rank` for this layer")


def _ratio_ranks(slot: _Slot, ratio: float, cost: Cost) -> Ranks | None:
    """The largest ranks, all modes scaled alike, that cost at most 1/ratio of the dense layer."""
    limit = cost(slot.layer, None) / ratio
    ranks = _scaled(slot, _bisect(lambda scale: cost(slot.layer, _scaled(slot, scale)) <= limit))
    return ranks if cost(slot.layer, ranks) <= limit else None


def _scaled(slot: _Slot, scale: float) -> Ranks:
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


# ------------------------------------------------------------------- budgets


Cost = Callable[[LayerInfo, Ranks | None], int]


def _cost_function(metric: str) -> Cost:
    def cost(layer: LayerInfo, ranks: Ranks | None) -> int:
        if metric == "macs":
            return layer.macs if ranks is None else factorized_macs(layer, ranks)
        return layer.params if ranks is None else factorized_params(layer, ranks)
    return cost


def _target(compress: CompressSpec, slots: Sequence[_Slot], cost: Cost, other_params: int) -> float:
    budget = compress.budget
    dense = sum(cost(s.layer, None) for s in slots)
    if budget.kind == "ratio":
        return dense / budget.ratio
    if budget.metric == "params":
        return budget.limit - other_params  # an absolute parameter limit counts the whole model
    return budget.limit


def _total(slots: Sequence[_Slot], cost: Cost) -> int:
    return sum(cost(s.layer, s.ranks) for s in slots)


def _infeasible(slots: Sequence[_Slot], cost: Cost, compress: CompressSpec) -> SpecProblem:
    smallest = sum(min(cost(s.layer, None), cost(s.layer, s.low)) if s.low and not s.fixed and not s.reason
                   else cost(s.layer, s.ranks) for s in slots)
    reachable = math.floor(sum(cost(s.layer, None) for s in slots) / max(1, smallest) * 100) / 100
    outputs = [s.layer.name for s in slots if s.rule == OUTPUT_RULE]
    return SpecProblem(
        ("compress", "budget"), "infeasible-budget",
        f"the budget {_budget_text(compress)} cannot be met: the largest reachable ratio is {reachable:.2f}x",
        label=f"at most {reachable:.2f}x here",
        help="lower the budget, lower `min_rank`, or leave fewer layers dense (`keep`, `dense`, fixed ranks)",
        notes=tuple(f'the output layer `{name}` stays dense; a rule `layer "{name}" {{ min_rank = 1 }}` lets the '
                    "budget cut it" for name in outputs))


def _require_met(slots: Sequence[_Slot], cost: Cost, target: float, compress: CompressSpec) -> None:
    total = _total(slots, cost)
    if total > target:
        dense = sum(cost(s.layer, None) for s in slots)
        raise SpecProblem(
            ("compress", "policy"), "budget-not-met",
            f"policy {_policy_text(compress)} reaches {dense / max(1, total):.2f}x, short of the budget "
            f"{_budget_text(compress)}", label="ranks too large for the budget",
            help="use `policy = global` to choose ranks under the budget, or lower the budget")


# -------------------------------------------------------------------- policies


def _energy_ranks(slot: _Slot, threshold: float) -> None:
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


def _uniform_ranks(free: Sequence[_Slot], slots: Sequence[_Slot], cost: Cost, target: float,
                   compress: CompressSpec) -> None:
    """The same compression ratio for every free layer (in the budget's metric): the smallest
    ratio that meets the budget, found by bisection; a layer that cannot reach it goes to its
    floor. The rounding slack is then given back one rank at a time, as for `global`."""

    def apply(ratio: float) -> int:
        for slot in free:
            slot.ranks = _ratio_ranks(slot, ratio, cost) or slot.low
            if cost(slot.layer, slot.ranks) >= cost(slot.layer, None):
                slot.ranks = None
        return _total(slots, cost)

    low, high = 1.0, 2.0
    while apply(high) > target and high < 1e9:
        low, high = high, high * 2
    if apply(high) > target:
        raise _infeasible(slots, cost, compress)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if apply(middle) <= target else (middle, high)
    _give_back(free, cost, target - apply(high))
    for slot in free:
        if slot.ranks is None:
            slot.reason = "factorizing saves nothing at the uniform ratio"


def _global_ranks(free: Sequence[_Slot], slots: Sequence[_Slot], cost: Cost, target: float,
                  compress: CompressSpec) -> None:
    """Minimize the summed weighted loss under the budget (Lagrangian relaxation).

    Each layer's candidates are dense and the points of its own greedy path from full rank down to
    its floor. For a price ``lam`` on cost, every layer independently takes the candidate that
    minimizes loss + lam * cost; bisection finds the lowest price that meets the budget, and the
    slack left is then given back one rank at a time. Deterministic: no randomness, fixed order.
    """
    paths = {id(slot): _path(slot, cost) for slot in free}
    fixed_cost = _total([s for s in slots if s not in free], cost)

    def choose(lam: float) -> float:
        total = fixed_cost
        for slot in free:
            ranks, slot_cost, _ = min(paths[id(slot)], key=lambda p: (p[2] + lam * p[1], p[1]))
            slot.ranks = ranks
            total += slot_cost
        return total

    low, high = 0.0, 1.0
    while choose(high) > target and high < 1e30:
        low, high = high, high * 16
    if choose(high) > target:
        raise _infeasible(slots, cost, compress)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (low, middle) if choose(middle) <= target else (middle, high)
    total = choose(high)
    _give_back(free, cost, target - total)
    for slot in free:
        if slot.ranks is None:
            slot.reason = "not worth factorizing under this budget"


def _path(slot: _Slot, cost: Cost) -> list[tuple[Ranks | None, int, float]]:
    """Dense, then the layer's ranks from its ceiling down to its floor, always cutting the mode
    that loses the least per unit of cost saved: (ranks, cost, weighted loss) per point."""
    layer, ranks = slot.layer, slot.high
    points: list[tuple[Ranks | None, int, float]] = [(None, cost(layer, None), 0.0)]
    while True:
        points.append((ranks, cost(layer, ranks), _weighted_loss(layer, ranks)))
        cuts = [ranks[:m] + (ranks[m] - 1,) + ranks[m + 1:] for m in range(len(ranks)) if ranks[m] > slot.low[m]]
        cuts = [c for c in cuts if cost(layer, c) < cost(layer, ranks)]
        if not cuts:
            return points
        ranks = min(cuts, key=lambda c: ((_weighted_loss(layer, c) - points[-1][2])
                                         / (points[-1][1] - cost(layer, c)), c))


def _give_back(free: Sequence[_Slot], cost: Cost, slack: float) -> None:
    """Raise ranks again, most energy regained per unit first, while the budget still holds."""
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
                gain = (_weighted_loss(slot.layer, slot.ranks) - _weighted_loss(slot.layer, ranks)) / max(1, extra)
                candidate = (-gain, slot.layer.name, mode, ranks, extra)
                best = candidate if best is None or candidate < best else best
        if best is None:
            return
        slot = next(s for s in free if s.layer.name == best[1])
        slot.ranks, slack = best[3], slack - best[4]


# ---------------------------------------------------------------------- output


def _layer_plan(slot: _Slot) -> LayerPlan:
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


def _budget_text(compress: CompressSpec) -> str:
    budget = compress.budget
    if budget.kind == "ratio":
        return f"{budget.ratio:g}x {budget.metric}"
    return f"{budget.metric} <= {si(budget.limit)}"


def _policy_text(compress: CompressSpec) -> str:
    policy = compress.policy
    return f"energy({policy.threshold:g})" if policy.kind == "energy" else policy.kind  # type: ignore[union-attr]
