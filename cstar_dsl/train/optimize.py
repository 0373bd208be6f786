"""Optimize stage, the building blocks: optimizers and schedules from a phase, and one epoch of
PGD adversarial training (Madry et al.), with an optional extra loss term such as the ADMM penalty.

The loop that chains the phases, checkpoints and reports progress belongs to ``cstar compile``;
these functions are what it runs, one epoch at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RunError
from ..lang.spec import PhaseSpec, ThreatSpec, TrainSpec
from .attacks import Pgd


class TrainingDiverged(RunError):
    """The loss became NaN or infinite; names where, so the run can stop with a clear message."""

    def __init__(self, phase: str, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"the {phase} phase diverged at epoch {epoch}, step {step}: the loss is {loss}",
                         help=f"lower `train.{phase}.lr`" + (" or `rho`" if phase == "admm" else "")
                              + ", or check the data's range ([0, 1] images)")
        self.phase, self.epoch, self.step, self.loss = phase, epoch, step, loss


@dataclass(frozen=True)
class EpochResult:
    """What one epoch did: mean loss, and accuracy on the clean and the adversarial training batches."""

    phase: str
    epoch: int
    loss: float
    clean: float
    robust: float
    seconds: float
    samples: int = 0  # the examples this process trained on


def training_precision(train: TrainSpec) -> torch.dtype | None:
    """The autocast dtype of the training forward (and its attack): bfloat16 for `precision = bf16`, else none."""
    return torch.bfloat16 if train.precision == "bf16" else None


def training_attack(threat: ThreatSpec) -> Pgd:
    """The PGD attack the threat block describes, used to make the training examples."""
    return Pgd(eps=threat.eps, step=threat.step, steps=threat.steps, norm=threat.norm,
               random_start=threat.random_start, restarts=threat.restarts)


def make_optimizer(phase: PhaseSpec, parameters: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The phase's optimizer at its learning rate."""
    options = phase.optimizer
    if options.kind == "adam":
        return torch.optim.Adam(parameters, lr=phase.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(parameters, lr=phase.lr, momentum=options.momentum,
                           weight_decay=options.weight_decay, nesterov=options.nesterov)


def make_schedule(phase: PhaseSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The phase's learning-rate schedule, stepped once per epoch."""
    schedule = phase.schedule
    if schedule.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, phase.epochs))
    if schedule.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.every, gamma=schedule.gamma)
    if schedule.kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                    gamma=schedule.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def adversarial_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                      attack: Pgd, *, phase: str, epoch: int, generator: torch.Generator | None = None,
                      extra_loss: Callable[[], Tensor] | None = None,
                      on_step: Callable[[int, float], None] | None = None,
                      trainer: nn.Module | None = None,
                      agree: Callable[[float], float] | None = None,
                      precision: torch.dtype | None = None) -> EpochResult:
    """One epoch of PGD adversarial training: each batch is attacked (model in eval mode, see
    ``attacks``), then the model, in train mode, takes one step on the adversarial loss (+ extra).
    ``on_step(step, loss)`` runs after each optimizer step (progress, or ADMM updates every N steps).

    Several ranks: ``trainer`` is the DistributedDataParallel copy that takes the steps (the attack
    and the clean forward use ``model`` itself, so they start no gradient reduction), and
    ``agree(loss)`` returns the loss summed over ranks, so that every rank stops at the same step
    when one of them diverges instead of waiting for the others forever.

    ``precision`` (e.g. ``torch.bfloat16``) runs the attack and the training forward under
    autocast; the optimizer step and the weights stay float32.

    Clean accuracy costs one extra eval-mode forward per batch (about 5% of a PGD-7 step); it is
    what a user watches alongside the robust accuracy.

    Raises:
        TrainingDiverged: at the first non-finite loss, before the step that would spread it.
    """
    trainer = trainer if trainer is not None else model
    started = time.perf_counter()
    total_loss, clean, robust, seen = 0.0, 0, 0, 0
    for step, (x, y) in enumerate(batches):
        with torch.autocast(x.device.type, dtype=precision or torch.bfloat16, enabled=precision is not None):
            adversarial = attack(model, x, y, generator)
            trainer.train()
            logits = trainer(adversarial)
            loss = F.cross_entropy(logits.float(), y)
        loss = loss + (extra_loss() if extra_loss is not None else 0.0)
        value = float(loss.detach())
        if not math.isfinite(agree(value) if agree is not None else value):
            raise TrainingDiverged(phase, epoch, step, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            robust += int((logits.argmax(1) == y).sum())
            model.eval()
            clean += int((model(x).argmax(1) == y).sum())
        total_loss += value * len(y)
        seen += len(y)
        if on_step is not None:
            on_step(step, value)
    return EpochResult(phase, epoch, total_loss / max(1, seen), clean / max(1, seen), robust / max(1, seen),
                       time.perf_counter() - started, seen)
