"""Compile driver, compress: the trained dense model -> factorized (cstar, svd-finetune), channel-pruned
(channel-prune, cstar onto channels), both (a joint structure), or the structure a probe chose (auto)."""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn

from ..lang import registry
from ..model import inventory, rewrite
from ..model import zoo as models
from ..model.channel_cut import cut_channels
from ..model.joint import Joint, Scorer, fisher_structure, joint_description, joint_structure
from ..model.prune import Pruned, admm_channels_rule, kept_whole, pruned_plan, weight_params
from ..plan.costs import energy_kept
from ..plan.plans import Plan
from .admm_steps import admm_structure, admm_weights, structure_plan
from .probe import Built, choose_structure
from .pruning import cached_scores, prune_structure
from .state import Context, Progress, Run, place


def compress(context: Context, run: Run, progress: Progress | None = None) -> None:
    """Dense -> the method's compressed structure: what the ADMM phase projected onto (cstar, or auto with an ADMM
    phase), factorized at the ranks of a plan on the trained weights (svd-finetune), channel-pruned to the same
    parameters, or the best of these by a probe (auto)."""
    assert run.net is not None
    spec = context.spec
    method = spec.compress.method
    if method == "auto" and run.choice is None:
        choose(context, run, progress)
    net = run.net.cpu()
    if run.admm is not None:
        built = _after_admm(context, run, net)
    else:
        if run.choice is not None:
            structure = run.choice.winner
        else:
            structure = f"prune-{spec.compress.allocation}" if method == "channel-prune" else "low-rank"
        weights = admm_weights(run, context.layer_names)
        built = build_structure(context, net, structure, structure_plan(context, weights, structure),
                                cached_scores(context, run))
    run.net, run.plan, run.structure = built.net, built.plan, built.structure
    run.admm = None
    run.model = place(models.Normalized(run.net, context.data.mean, context.data.std), context.device)


def choose(context: Context, run: Run, progress: Progress | None = None) -> None:
    """`method = auto`: the candidates probed from the trained dense model and the winner kept in ``run.choice``;
    the dense network is left on the CPU, where the candidates are built."""
    assert run.net is not None
    compress, net = context.spec.compress, run.net.cpu()
    weights = admm_weights(run, context.layer_names)

    @functools.cache
    def plan_of(kind: str) -> Plan:  # every structure that removes channels is built to the same budget plan
        return structure_plan(context, weights, kind)

    def announce(name: str, index: int, count: int) -> None:
        if progress is not None:
            progress.stage(f"probing structure {index + 1} of {count}: {name} ({compress.probe_epochs} epoch(s), "
                           f"{compress.probe_holdout:.0%} of the training set held out)")

    def build(name: str) -> Built:
        # Inside the build: a plan that cannot meet the budget makes its candidate step aside.
        plan = plan_of(name if name in ("low-rank", registry.JOINT_FISHER) else "prune-uniform")
        return build_structure(context, net, name, plan, cached_scores(context, run))

    run.choice = choose_structure(context, build, announce)
    run.phase_seconds["probe"] = run.choice.seconds


def _after_admm(context: Context, run: Run, net: nn.Module) -> Built:
    """The structure the ADMM phase projected onto, taken from W: factorized at the ranks of the last Z-step, or the
    channels the last Z-step zeroed removed (what W keeps is its own), and for a joint structure what they keep
    factorized at the ranks Z truncated it to."""
    assert run.admm is not None and run.plan is not None  # every Z-step planned
    spec, structure = context.spec, admm_structure(context, run)
    if structure == "low-rank":
        ranks = dict(run.admm.ranks)
        _energy_of_weights(context, run, ranks)
        return Built(rewrite.factorize_ranks(net, ranks, leaves=spec.model.leaf, sweeps=spec.compress.hooi_sweeps),
                     run.plan, {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}})
    cut = cut_channels(net, torch.zeros(1, *spec.model.input), run.admm.pruning_ratio or 0.0,
                       {name: z.cpu() for name, z in run.admm.z.items()}, keep=kept_whole(spec, context.layer_names),
                       kept_counts=run.admm.kept_counts)
    model = cut.apply(net)
    pruned = Pruned(model, run.admm.pruning_ratio or 0.0, weight_params(model), run.admm.kept_counts)
    if registry.is_joint(structure):
        # The joint plan the phase started from: the widths of the cut, and the ranks every Z truncated to.
        joint = Joint(pruned, run.plan)
        return Built(joint.build(spec), joint.plan, joint_description(joint.plan))
    # run.plan is the pruned plan the ADMM phase started from: the same widths, so only the rule changes.
    allocation = registry.channel_allocation(structure)
    plan = pruned_plan(run.plan, context.layers, pruned, spec, admm_channels_rule(allocation), allocation)
    return Built(model, plan, {"kind": "pruned"})


def build_structure(context: Context, net: nn.Module, structure: str, plan: Plan, score: Scorer) -> Built:
    """``net`` (left untouched) compressed to one structure of the plan's budget: factorized at its ranks,
    channel-pruned (uniformly or by one global ranking) to the parameters it leaves, or both (joint; joint-fisher
    by the scores ``score`` measures)."""
    share = registry.channel_share(structure)
    if share is not None or structure == registry.JOINT_FISHER:
        example = torch.zeros(1, *context.spec.model.input)
        joint = (joint_structure(net, context.spec, plan, context.layers, example, share) if share is not None
                 else fisher_structure(net, context.spec, plan, context.layers, example, score))
        return Built(joint.build(context.spec), joint.plan, joint_description(joint.plan))
    if structure == "low-rank":
        ranks = rewrite.planned_ranks(plan)
        factorized = rewrite.factorize_ranks(net, ranks, leaves=context.spec.model.leaf,
                                             sweeps=context.spec.compress.hooi_sweeps)
        description = {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}}
        return Built(factorized, plan, description)
    pruned, pruned_plan = prune_structure(context, net, plan, registry.channel_allocation(structure))
    return Built(pruned.model, pruned_plan, {"kind": "pruned"})


def _energy_of_weights(context: Context, run: Run, ranks: dict[str, tuple[int, ...]]) -> None:
    """The plan of the last Z-step measured its energy on W + U; what the final factorization keeps is W's."""
    assert run.plan is not None
    weights = {name: w.detach().cpu() for name, w in admm_weights(run, ranks).items()}
    layers = {layer.name: layer for layer in inventory.with_weights(context.layers, weights)}
    run.plan = replace(run.plan, layers=tuple(
        replace(entry, energy_kept=energy_kept(layers[entry.name], ranks[entry.name])) if entry.name in ranks else entry
        for entry in run.plan.layers))
