"""Model surgery, joint structure: channels removed (a uniform prune, or by Fisher scores on the adversarial loss)
and what the layers keep factorized, one plan whose totals are those of the model it builds."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from ..lang.spec import LimitBudget, Spec
from ..plan import allocate, robust
from ..plan.layers import LayerInfo
from ..plan.plans import LayerPlan, Plan
from .inventory import collect
from .prune import Pruned, channel_prune, floors_of, kept_whole, prune_counts, prune_rule, pruned_plan
from .rewrite import factorize_ranks, planned_ranks

# The rule of a layer whose channels and ranks the Fisher allocation chose (plan.robust).
FISHER_RULE = "Fisher on the adversarial loss"


@dataclass(frozen=True)
class Joint:
    """A channel-pruned model, then factorized to the rest of the budget."""

    pruned: Pruned
    plan: Plan  # every layer: the dense shape, the shape pruning left, the ranks, and the totals of the built model

    def build(self, spec: Spec, *, decompose: bool = True) -> fx.GraphModule:
        """The pruned model with the planned layers factorized (the pruned model is left as it is)."""
        return factorize_ranks(self.pruned.model, planned_ranks(self.plan), leaves=spec.model.leaf,
                               sweeps=spec.compress.hooi_sweeps, decompose=decompose)


def joint_description(plan: Plan) -> dict[str, object]:
    """How model.json describes a joint structure: each factorized layer's ranks and the pruned shape they factorize
    (the weights carry the shapes of the layers left whole)."""
    factorized = planned_ranks(plan)
    return {"kind": "joint", "ranks": {name: list(ranks) for name, ranks in factorized.items()},
            "shapes": {layer.name: list(layer.shape_after or layer.shape) for layer in plan.layers
                       if layer.name in factorized}}


def channel_target(plan: Plan, channel_share: float) -> int:
    """The parameters channel pruning leaves: ``channel_share`` of the compression the plan asks for, on a log scale
    (at 64x, a share of 50% prunes to 8x and leaves 8x to the ranks)."""
    ratio = plan.params_before / max(1, plan.params_budget)
    return max(1, math.floor(plan.params_before / ratio ** channel_share))


def joint_structure(model: nn.Module, spec: Spec, plan: Plan, layers: Sequence[LayerInfo], example: torch.Tensor,
                    channel_share: float) -> Joint:
    """``model`` (left untouched) pruned uniformly to ``channel_target``, then planned by the recipe's rank policy to
    the budget of ``plan`` (the dense model's budget plan, plan.allocate.budget_plan); ``layers`` is the dense
    model's inventory.

    Raises:
        SpecProblem: channel pruning or the ranks cannot meet their share of the budget.
    """
    pruned = joint_channels(model, spec, plan, channel_share, example)
    return factorized_after_pruning(pruned, spec, plan, layers, prune_rule("l1", "uniform"))


def joint_channels(model: nn.Module, spec: Spec, plan: Plan, channel_share: float,
                   example: torch.Tensor | None = None) -> Pruned:
    """A joint structure's channels: ``model`` pruned uniformly (L1) to ``channel_target``, `keep` layers whole, none
    below its `min_channels`."""
    example = torch.zeros(1, *spec.model.input) if example is None else example
    kept = kept_whole(spec, (layer.name for layer in plan.layers))
    return channel_prune(model, example, channel_target(plan, channel_share), keep=kept, floors=floors_of(spec, plan))


def factorized_after_pruning(pruned: Pruned, spec: Spec, plan: Plan, layers: Sequence[LayerInfo],
                             rule: str) -> Joint:
    """A channel-pruned model (its channels removed by ``rule``) planned by the recipe's rank policy to the target of
    ``plan``, the dense model's budget plan; ``layers`` is the dense model's inventory."""
    shrunk = collect(pruned.model, spec.model.input, spec.model.leaf)
    # The ranks meet the budget's target, in the recipe's metric, over the pruned layers.
    limit = LimitBudget(metric=spec.compress.budget.metric, limit=plan.target)
    ranks_spec = spec.model_copy(update={"compress": spec.compress.model_copy(update={"budget": limit})})
    ranked = allocate.make_plan(ranks_spec, shrunk.layers)
    channels = pruned_plan(plan, layers, pruned, spec, rule, "uniform")
    return Joint(pruned, replace(ranked, budget=plan.budget, target=plan.target, other_params=shrunk.other_params,
                                 layers=_joined(channels, ranked)))


# Scores a model's channel groups and rank components (Fisher on the adversarial loss, measured by the driver).
Scorer = Callable[[nn.Module], tuple[Sequence[robust.ChannelGroup], robust.Fisher]]


def fisher_structure(model: nn.Module, spec: Spec, plan: Plan, layers: Sequence[LayerInfo], example: torch.Tensor,
                     score: Scorer) -> Joint:
    """``model`` (left untouched) with the channels and ranks of least Fisher score per unit saved removed, to the
    target of ``plan`` (a plan of the dense model at the budget, plan.allocate.target_plan): plan.robust's
    allocation on the scores ``score`` measures of ``model``, the channels of least score gone from each layer;
    ``layers`` is the dense inventory.

    Raises:
        SpecProblem: no removal of channels and ranks meets the budget.
    """
    kept = kept_whole(spec, (layer.name for layer in plan.layers))
    groups, fisher = score(model)
    allocation = robust.allocate(groups, fisher, layers, _measure(model, spec, example, kept), spec.compress,
                                 plan.target, floors=floors_of(spec, plan))
    pruned = prune_counts(model, example, allocation.kept_counts, keep=kept, scores=fisher.channels)
    shrunk = collect(pruned.model, spec.model.input, spec.model.leaf)
    ranked = allocate.given_plan(spec, shrunk.layers, allocation.ranks, plan.target, shrunk.other_params,
                                 policy="fisher", reason="not worth factorizing at the price that meets the budget")
    channels = pruned_plan(plan, layers, pruned, spec, FISHER_RULE, "fisher")
    return Joint(pruned, replace(ranked, budget=plan.budget, layers=_joined(channels, ranked)))


def _measure(model: nn.Module, spec: Spec, example: torch.Tensor,
             kept: Sequence[str]) -> Callable[[Mapping[str, int]], tuple[LayerInfo, ...]]:
    """The inventory of ``model`` pruned to a count of outputs per group root: shapes and costs only (which
    channels go does not change them, and spectra are not needed)."""

    def measure(counts: Mapping[str, int]) -> tuple[LayerInfo, ...]:
        pruned = prune_counts(model, example, counts, keep=kept).model
        return collect(pruned, spec.model.input, spec.model.leaf, read_spectra=False).layers

    return measure


def _joined(channels: Plan, ranked: Plan) -> tuple[LayerPlan, ...]:
    """Each dense layer's plan: its shape and counts before, the pruned shape, and the ranks and counts after."""
    by_name = {layer.name: layer for layer in ranked.layers}
    joined = []
    for pruned in channels.layers:
        factorized = by_name[pruned.name]
        removed = pruned.shape_after != pruned.shape
        method = factorized.method if factorized.method != "dense" else ("pruned" if removed else "dense")
        joined.append(replace(
            factorized, shape=pruned.shape, shape_after=pruned.shape_after,
            rule=f"{pruned.rule} + {factorized.rule}" if removed and pruned.rule != factorized.rule
            else factorized.rule, method=method,
            reason="; ".join(r for r in (pruned.reason if removed else "", factorized.reason) if r),
            params_before=pruned.params_before, macs_before=pruned.macs_before))
    return tuple(joined)
