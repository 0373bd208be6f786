"""Compile driver, compress: the trained dense model -> factorized (cstar, svd-finetune) or channel-pruned."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..model import inventory, rewrite
from ..model import zoo as models
from ..model.channel_cut import cut_channels
from ..model.prune import (
    ADMM_CHANNELS_RULE,
    Pruned,
    kept_whole,
    prune_rule,
    prune_to_plan,
    pruned_plan,
    weight_params,
)
from ..plan.allocate import make_plan
from ..plan.costs import energy_kept
from ..plan.plans import Plan
from ..train import distributed
from ..train.optimize import training_attack
from .admm_steps import admm_weights, replan
from .batches import batches
from .probe import Built, choose_structure
from .state import Context, Progress, Run, place

# Enough adversarial batches for stable Taylor scores; a few seconds even on two cores.
TAYLOR_BATCHES = 8


def compress(context: Context, run: Run, progress: Progress | None = None) -> None:
    """Dense -> the method's compressed structure: factorized at the ranks of the last Z-step (cstar) or of a plan
    on the trained weights (svd-finetune), channel-pruned to the same parameters, or the best of these by a probe
    (auto)."""
    assert run.net is not None
    spec = context.spec
    net = run.net.cpu()
    method = spec.compress.method
    if method == "cstar" and run.admm is not None and run.admm.pruning_ratio is not None:
        built = _admm_pruned(context, run, net, run.admm.pruning_ratio)
    elif method == "cstar" and run.admm is not None:
        assert run.plan is not None  # every Z-step planned
        ranks = dict(run.admm.ranks)
        _energy_of_weights(context, run, ranks)
        built = Built(rewrite.factorize_ranks(net, ranks, leaves=spec.model.leaf, sweeps=spec.compress.hooi_sweeps),
                      run.plan, {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}})
    else:
        plan = replan(context, admm_weights(run, context.layer_names))
        if method == "auto":
            built = _probed(context, run, net, plan, progress)
        else:
            structure = f"prune-{spec.compress.allocation}" if method == "channel-prune" else "low-rank"
            built = build_structure(context, net, structure, plan)
    run.net, run.plan, run.structure = built.net, built.plan, built.structure
    run.admm = None
    run.model = place(models.Normalized(run.net, context.data.mean, context.data.std), context.device)


def _admm_pruned(context: Context, run: Run, net: nn.Module, pruning_ratio: float) -> Built:
    """cstar onto channels: the channels the last Z-step zeroed removed from W (what W keeps is its own)."""
    assert run.admm is not None and run.plan is not None
    spec = context.spec
    plan = make_plan(spec, context.layers, context.other_params)
    cut = cut_channels(net, torch.zeros(1, *spec.model.input), pruning_ratio,
                       {name: z.cpu() for name, z in run.admm.z.items()}, keep=kept_whole(spec, context.layer_names))
    model = cut.apply(net)
    pruned = Pruned(model, pruning_ratio, weight_params(model))
    return Built(model, pruned_plan(plan, context.layers, pruned, spec.model, ADMM_CHANNELS_RULE, "uniform"),
                 {"kind": "pruned"})


def _probed(context: Context, run: Run, net: nn.Module, plan: Plan, progress: Progress | None) -> Built:
    """`method = auto`: the candidate that wins the probe, built; the choice and its cost kept for the report."""
    compress = context.spec.compress

    def announce(name: str, index: int, count: int) -> None:
        if progress is not None:
            progress.stage(f"probing structure {index + 1} of {count}: {name} ({compress.probe_epochs} epoch(s), "
                           f"{compress.probe_holdout:.0%} of the training set held out)")

    run.choice = choose_structure(context, lambda name: build_structure(context, net, name, plan), announce)
    run.phase_seconds["probe"] = run.choice.seconds
    return build_structure(context, net, run.choice.winner, plan)


def build_structure(context: Context, net: nn.Module, structure: str, plan: Plan) -> Built:
    """``net`` (left untouched) compressed to one structure of the plan's budget: factorized at its ranks, or
    channel-pruned (uniformly or by one global ranking) to the parameters it leaves."""
    if structure == "low-rank":
        ranks = rewrite.planned_ranks(plan)
        factorized = rewrite.factorize_ranks(net, ranks, leaves=context.spec.model.leaf,
                                             sweeps=context.spec.compress.hooi_sweeps)
        description = {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}}
        return Built(factorized, plan, description)
    pruned, pruned_plan = prune_structure(context, net, plan, "global" if structure == "prune-global" else "uniform")
    return Built(pruned.model, pruned_plan, {"kind": "pruned"})


def _energy_of_weights(context: Context, run: Run, ranks: dict[str, tuple[int, ...]]) -> None:
    """The plan of the last Z-step measured its energy on W + U; what the final factorization keeps is W's."""
    assert run.plan is not None
    weights = {name: w.detach().cpu() for name, w in admm_weights(run, ranks).items()}
    layers = {layer.name: layer for layer in inventory.with_weights(context.layers, weights)}
    run.plan = replace(run.plan, layers=tuple(
        replace(entry, energy_kept=energy_kept(layers[entry.name], ranks[entry.name])) if entry.name in ranks else entry
        for entry in run.plan.layers))


def _adversarial_gradients(context: Context, net: nn.Module) -> None:
    """The gradient of the adversarial loss over the first TAYLOR_BATCHES training batches, left on ``net``'s weights
    (then on the CPU): Taylor importance scores each channel by |weight x gradient| of the loss robustness needs."""
    model = models.Normalized(net, context.data.mean, context.data.std).to(context.device).eval()
    seed = context.spec.train.seed
    attack, generator = training_attack(context.spec.threat), torch.Generator(device=context.device).manual_seed(seed)
    net.zero_grad(set_to_none=True)
    for x, y in itertools.islice(batches(context, torch.Generator().manual_seed(seed)), TAYLOR_BATCHES):
        F.cross_entropy(model(attack(model, x, y, generator)), y).backward()
    for parameter in net.parameters():  # a weight the loss never reaches (a training-only head) scores zero
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    # Each rank saw its own share of the batches; all must prune the same channels, so rank 0's scores count.
    distributed.broadcast([p.grad for p in net.parameters() if p.grad is not None], context.world)
    net.cpu()


def prune_structure(context: Context, net: nn.Module, plan: Plan, allocation: str,
                    importance: str | None = None) -> tuple[Pruned, Plan]:
    """Torch-Pruning filter pruning (L1 or Taylor scores; the recipe's unless given) to the parameter count the
    factorized model would have."""
    spec = context.spec
    importance = importance or spec.compress.importance
    if importance == "taylor":
        _adversarial_gradients(context, net)
    pruned = prune_to_plan(net, spec, plan, torch.zeros(1, *spec.model.input), allocation=allocation,
                           importance=importance)
    for model in (net, pruned.model):  # the scores are spent: no stale gradient travels on to the device or a step
        model.zero_grad(set_to_none=True)
    rule = prune_rule(importance, allocation)
    return pruned, pruned_plan(plan, context.layers, pruned, spec.model, rule, allocation)


