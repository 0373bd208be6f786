"""Compile driver, structure choice: each candidate structure briefly fine-tuned on most of the training set and
scored by its robust accuracy on the rest, held out, so that `method = auto` compiles the most robust one."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..eval.evaluation import test_batches
from ..lang.problems import SpecProblem
from ..model import zoo as models
from ..plan.plans import Plan
from ..run_report import Candidate, StructureChoice
from ..train import distributed
from ..train.attacks import accuracy
from ..train.data import dataset_size
from ..train.optimize import (
    TrainingDiverged,
    adversarial_epoch,
    make_optimizer,
    make_schedule,
    training_attack,
    training_precision,
)
from .batches import batches, epoch_seed
from .state import CompileError, Context, place

# The probe's seeds stand apart from those of the recipe's phases (indices 0-2), so it draws its own batches.
_PROBE_PHASE = 99


@dataclass(frozen=True)
class Built:
    """A compressed network, its plan, and how model.json describes its structure."""

    net: nn.Module
    plan: Plan
    structure: dict[str, Any]


def split_holdout(size: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held): a seeded random ``share`` of the training indices held out, at least one on each side."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    held = min(size - 1, max(1, round(size * share)))
    return order[held:].sort().values, order[:held].sort().values


def fisher_context(context: Context) -> Context:
    """What a structure measured on the training data (Fisher scores) measures on: under `method = auto`, the part of
    the training set the probe fine-tunes on, never the images it holds out to score the candidates."""
    return _fit_context(context) if context.spec.compress.method == "auto" else context


def _fit_context(context: Context) -> Context:
    """``context`` with the training set less the probe's held-out share."""
    fit, _ = split_holdout(dataset_size(context.data.train), context.spec.compress.probe_holdout,
                           context.spec.train.seed)
    return dataclasses.replace(context, data=dataclasses.replace(context.data, train=_subset(context.data.train, fit)))


def choose_structure(context: Context, build: Callable[[str], Built],
                     on_candidate: Callable[[str, int, int], None] | None = None) -> StructureChoice:
    """The recipe's candidates, each built by ``build`` and probed; the winner is the most robust on the held-out
    images (then the most accurate, then the first listed).

    Building and probing draw from their own random stream (a new module's initialization, dropout): torch's
    global stream is left as it was, so the caller builds the winner again exactly as its own method would."""
    with torch.random.fork_rng(devices=[context.device] if context.device.type == "cuda" else []):
        torch.manual_seed(context.spec.train.seed)
        return _choose(context, build, on_candidate)


def _choose(context: Context, build: Callable[[str], Built],
            on_candidate: Callable[[str, int, int], None] | None) -> StructureChoice:
    compress, started = context.spec.compress, time.perf_counter()
    _, held = split_holdout(dataset_size(context.data.train), compress.probe_holdout, context.spec.train.seed)
    # Every rank probes the whole batches itself: the scores need no exchange, and rank 0's winner is broadcast.
    fitting = dataclasses.replace(_fit_context(context), world=distributed.World())
    held_batches = test_batches(_subset(_evaluated(context.data.train, context.data.test), held), None,
                                context.device)
    results: list[Candidate] = []
    for index, name in enumerate(compress.candidates):
        if on_candidate is not None:
            on_candidate(name, index, len(compress.candidates))
        try:
            built = build(name)
        except SpecProblem as problem:  # this structure cannot meet the budget; the others may
            results.append(Candidate(name=name, params=0, macs=0, clean=None, robust=None, seconds=0.0,
                                     problem=problem.message))
            continue
        results.append(_probe(fitting, name, built, held_batches))
    scored = [c for c in results if c.robust is not None]
    best = max(scored, key=lambda c: (c.robust, c.clean, -results.index(c))) if scored else None
    # Every rank decides by rank 0's scores, a failure included: one rank stopping alone would leave the others
    # waiting for it forever.
    winner = _agreed(context, -1 if best is None else results.index(best))
    if winner < 0:
        raise CompileError(f"no candidate structure could be probed: {_failures(results)}",
                           help="lower `train.finetune.lr` (the rate the probe fine-tunes at) if they diverged; "
                                "raise the budget or list fewer `keep` layers if it cannot be met")
    return StructureChoice(winner=results[winner].name, holdout=len(held), epochs=compress.probe_epochs,
                           seconds=time.perf_counter() - started, candidates=tuple(results))


def _probe(context: Context, name: str, built: Built, held: Any) -> Candidate:
    spec, started = context.spec, time.perf_counter()
    model = place(models.Normalized(copy.deepcopy(built.net), context.data.mean, context.data.std), context.device)
    phase = spec.train.finetune.model_copy(update={"epochs": spec.compress.probe_epochs})  # type: ignore[union-attr]
    optimizer = make_optimizer(phase, model.parameters())
    schedule = make_schedule(phase, optimizer)
    attack = training_attack(spec.threat)
    plan = built.plan
    try:
        for epoch in range(phase.epochs):
            seed = epoch_seed(spec.train.seed, _PROBE_PHASE, epoch)
            adversarial_epoch(model, batches(context, torch.Generator().manual_seed(seed)), optimizer, attack,
                              phase=f"probe {name}", epoch=epoch,
                              generator=torch.Generator(device=context.device).manual_seed(seed),
                              precision=training_precision(spec.train))
            schedule.step()
    except TrainingDiverged:
        return Candidate(name=name, params=plan.params_after, macs=plan.macs_after, clean=None, robust=None,
                         seconds=time.perf_counter() - started, problem="its probe diverged")
    generator = torch.Generator(device=context.device).manual_seed(spec.train.seed)
    robust = accuracy(model, held, attack, generator)
    return Candidate(name=name, params=plan.params_after, macs=plan.macs_after, clean=accuracy(model, held),
                     robust=robust, seconds=time.perf_counter() - started)


def _failures(results: list[Candidate]) -> str:
    return "; ".join(f"{c.name}: {c.problem}" for c in results)


def _evaluated(train: Dataset, test: Dataset) -> Dataset:
    """The training images as the test set is read: a folder data set augments its training images as it reads
    them (random crops, flips), and held-out images are scored like test images, so they take the test transform."""
    if getattr(train, "transform", None) is None or not hasattr(test, "transform"):
        return train  # in memory: augmentation happens per batch in training only
    held = copy.copy(train)
    held.transform = test.transform  # type: ignore[attr-defined]
    return held


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _agreed(context: Context, index: int) -> int:
    """Rank 0's winner on every rank: a GPU's nondeterminism may tip a close probe differently on each."""
    chosen = torch.tensor([index], device=context.device)
    distributed.broadcast([chosen], context.world)
    return int(chosen.item())
