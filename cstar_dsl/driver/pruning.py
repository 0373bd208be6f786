"""Compile driver, channel pruning: the trained dense model pruned by Torch-Pruning to a plan's parameters (L1 or
Taylor scores on the adversarial loss), and the plan of what it kept; Fisher scores for the robustness-aware joint
structure."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import zoo as models
from ..model.channel_groups import channel_groups
from ..model.prune import Pruned, kept_whole, protected_modules, prune_rule, prune_to_plan, pruned_plan
from ..plan.plans import Plan
from ..plan.robust import ChannelGroup, Fisher
from ..train import distributed
from ..train.attacks import Pgd
from ..train.fisher import fisher_scores
from ..train.optimize import training_attack
from .batches import batches
from .probe import fisher_context
from .state import Context, Run

# Enough adversarial batches for stable Taylor scores; a few seconds even on two cores.
TAYLOR_BATCHES = 8


@dataclass(frozen=True)
class _Scoring:
    """What both scorings run: the network on the device behind its normalization, in eval mode, the first
    TAYLOR_BATCHES training batches of ``context``, and the recipe's training attack with its seeded generator."""

    model: nn.Module
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    attack: Pgd
    generator: torch.Generator


@contextmanager
def _scoring(context: Context, net: nn.Module) -> Iterator[_Scoring]:
    """``net`` set up to be scored; afterwards back on the CPU, in the mode it was in."""
    training, seed = net.training, context.spec.train.seed
    model = models.Normalized(net, context.data.mean, context.data.std).to(context.device).eval()
    try:
        yield _Scoring(model, itertools.islice(batches(context, torch.Generator().manual_seed(seed)), TAYLOR_BATCHES),
                       training_attack(context.spec.threat), torch.Generator(device=context.device).manual_seed(seed))
    finally:
        net.cpu().train(training)


def _adversarial_gradients(context: Context, net: nn.Module) -> None:
    """The gradient of the adversarial loss over the first TAYLOR_BATCHES training batches, left on ``net``'s weights
    (then on the CPU): Taylor importance scores each channel by |weight x gradient| of the loss robustness needs."""
    net.zero_grad(set_to_none=True)
    with _scoring(context, net) as scoring:
        for x, y in scoring.batches:
            adversarial = scoring.attack(scoring.model, x, y, scoring.generator)
            F.cross_entropy(scoring.model(adversarial), y).backward()
        for parameter in net.parameters():  # a weight the loss never reaches (a training-only head) scores zero
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        # Each rank saw its own share of the batches; all must prune the same channels, so rank 0's scores count.
        distributed.broadcast([p.grad for p in net.parameters() if p.grad is not None], context.world)


def prune_structure(context: Context, net: nn.Module, plan: Plan, allocation: str,
                    importance: str | None = None) -> tuple[Pruned, Plan]:
    """Torch-Pruning filter pruning (L1 or Taylor scores; the recipe's unless given) to the plan's parameter budget
    (``Plan.params_budget``)."""
    spec = context.spec
    importance = importance or spec.compress.importance
    if importance == "taylor":
        _adversarial_gradients(context, net)
    pruned = prune_to_plan(net, spec, plan, torch.zeros(1, *spec.model.input), allocation=allocation,
                           importance=importance)
    for model in (net, pruned.model):  # the scores are spent: no stale gradient travels on to the device or a step
        model.zero_grad(set_to_none=True)
    rule = prune_rule(importance, allocation)
    return pruned, pruned_plan(plan, context.layers, pruned, spec, rule, allocation)


def robust_scores(context: Context, net: nn.Module) -> tuple[tuple[ChannelGroup, ...], Fisher]:
    """``net``'s channel groups, and the Fisher scores of its channels and rank components on PGD examples of the
    first TAYLOR_BATCHES batches of ``context``'s training set (rank 0's on every rank); ``net`` ends on the CPU, in
    the mode it was in."""
    spec = context.spec
    example = torch.zeros(1, *spec.model.input)
    groups = channel_groups(net.cpu(), example, protected_modules(net, example, kept_whole(spec, context.layer_names)))
    with _scoring(context, net) as scoring:
        weights = {name: module.weight for name, module in net.named_modules()
                   if isinstance(module, (nn.Conv2d, nn.Linear))}
        channels, modes = fisher_scores(scoring.model, weights, groups, scoring.batches, scoring.attack,
                                        scoring.generator)
        # Each rank saw its own share of the batches; all must build the same structure, so rank 0's scores count
        # (sent from the device: NCCL carries no CPU tensors).
        shared = {key: scores.to(context.device) for key, scores in channels.items()}
        shared_modes = {name: [scores.to(context.device) for scores in layer] for name, layer in modes.items()}
        distributed.broadcast([*shared.values(), *(scores for layer in shared_modes.values() for scores in layer)],
                              context.world)
    return groups, Fisher({root: tuple(scores.tolist()) for root, scores in shared.items()},
                          {name: tuple(tuple(scores.tolist()) for scores in layer)
                           for name, layer in shared_modes.items()})


def cached_scores(context: Context, run: Run) -> Callable[[nn.Module], tuple[tuple[ChannelGroup, ...], Fisher]]:
    """joint-fisher's scorer for the run's dense network: measured once (on the probe's part of the training set
    under `method = auto`), then the same scores for every build from those weights."""

    def score(net: nn.Module) -> tuple[tuple[ChannelGroup, ...], Fisher]:
        if run.fisher is None:
            run.fisher = robust_scores(fisher_context(context), net)
        return run.fisher

    return score
