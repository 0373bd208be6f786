"""Compile driver, compress: the trained dense model -> factorized (cstar, svd-finetune) or channel-pruned."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..model import inventory, rewrite
from ..model import zoo as models
from ..plan.costs import energy_kept
from ..plan.layers import LayerInfo
from ..plan.plans import LayerPlan, Plan
from ..train import distributed
from ..train.optimize import training_attack
from .admm_steps import admm_weights, choose_ranks, replan
from .batches import batches
from .state import Context, Run, place

# Enough adversarial batches for stable Taylor scores; a few seconds even on two cores.
TAYLOR_BATCHES = 8


def compress(context: Context, run: Run) -> None:
    """Dense -> the method's compressed structure: factorized at the ranks of the last Z-step (cstar)
    or of a plan on the trained weights (svd-finetune), or channel-pruned to the same parameters."""
    assert run.net is not None
    spec = context.spec
    net = run.net.cpu()
    method = spec.compress.method
    if method == "channel-prune":
        run.net, run.plan = _prune(context, net, replan(context, admm_weights(run, context.layer_names)))
        run.structure = {"kind": "pruned"}
    else:
        if method == "cstar" and run.admm is not None:
            ranks = dict(run.admm.ranks)
            _energy_of_weights(context, run, ranks)
        else:
            ranks, run.plan = choose_ranks(context, admm_weights(run, context.layer_names))
        run.net = rewrite.factorize_ranks(net, ranks, leaves=spec.model.leaf, sweeps=spec.compress.hooi_sweeps)
        run.structure = {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}}
    run.admm = None
    run.model = place(models.Normalized(run.net, context.data.mean, context.data.std), context.device)


def _energy_of_weights(context: Context, run: Run, ranks: dict[str, tuple[int, ...]]) -> None:
    """The plan of the last Z-step measured its energy on W + U; what the final factorization keeps is W's."""
    assert run.plan is not None
    weights = {name: w.detach().cpu() for name, w in admm_weights(run, ranks).items()}
    layers = {layer.name: layer for layer in inventory.with_weights(context.layers, weights)}
    run.plan = replace(run.plan, layers=tuple(
        replace(entry, energy_kept=energy_kept(layers[entry.name], ranks[entry.name])) if entry.name in ranks else entry
        for entry in run.plan.layers))


def _pruned_reason(before: LayerInfo, after: LayerInfo | None, pruning_ratio: float, allocation: str) -> str:
    if allocation == "uniform":
        return f"{pruning_ratio:.1%} of channels removed"
    kept = after.shape[0] if after is not None else 0
    return f"{kept} of {before.shape[0]} outputs kept ({pruning_ratio:.1%} of all channels removed, ranked globally)"


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
    distributed.broadcast([p.grad for p in net.parameters()], context.world)
    net.cpu()


def _prune(context: Context, net: nn.Module, plan: Plan) -> tuple[nn.Module, Plan]:
    """Torch-Pruning filter pruning (L1 or Taylor scores) to the parameter count the factorized model would have."""
    from ..model.prune import prune_to_plan

    spec = context.spec
    allocation, importance = spec.compress.allocation, spec.compress.importance
    if importance == "taylor":
        _adversarial_gradients(context, net)
    pruned = prune_to_plan(net, spec, plan, torch.zeros(1, *spec.model.input), importance=importance)
    for model in (net, pruned.model):  # the scores are spent: no stale gradient travels on to the device or a step
        model.zero_grad(set_to_none=True)
    after = {layer.name: layer for layer in inventory.collect(pruned.model, spec.model.input, spec.model.leaf).layers}
    rule = f"channel-prune ({'L1' if importance == 'l1' else 'Taylor'}, {allocation})"
    layers = tuple(_pruned_layer(layer, after.get(layer.name), rule,
                                 _pruned_reason(layer, after.get(layer.name), pruned.pruning_ratio, allocation))
                   for layer in context.layers)
    return pruned.model, replace(plan, layers=layers, other_params=context.other_params)


def _pruned_layer(layer: LayerInfo, new: LayerInfo | None, rule: str, reason: str) -> LayerPlan:
    """A layer as pruning left it: ``new`` is None when no channel of it is left."""
    return LayerPlan(name=layer.name, type_name=layer.type_name, shape=tuple(layer.shape), rule=rule,
                     method="dense" if new and new.params == layer.params else "pruned", ranks=None, reason=reason,
                     params_before=layer.params, params_after=new.params if new else 0, macs_before=layer.macs,
                     macs_after=new.macs if new else 0, energy_kept=None,
                     shape_after=tuple(new.shape) if new else None)
