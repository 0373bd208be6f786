"""Evaluate stage: clean accuracy and the accuracy under each of the recipe's attacks, on the test set."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .attacks import Attack, Fgsm, Pgd, accuracy
from .spec import EvaluateSpec, FgsmAttack, PgdAttack, ThreatSpec

EVAL_BATCH = 500


@dataclass(frozen=True)
class Evaluation:
    """Accuracies as fractions in [0, 1]; ``robust`` and ``attacks`` are keyed by the attack's own name."""

    clean: float
    robust: dict[str, float]
    attacks: dict[str, dict[str, object]]
    samples: int
    seconds: float

    @property
    def worst_robust(self) -> float | None:
        """The accuracy under the strongest of the attacks: what a robustness requirement is held to."""
        return min(self.robust.values()) if self.robust else None


def attack_for(setting: PgdAttack | FgsmAttack, threat: ThreatSpec) -> Attack:
    """An attack of the ``evaluate`` block, its unset eps and step taken from the threat model."""
    eps = setting.eps if setting.eps is not None else threat.eps
    if isinstance(setting, FgsmAttack):
        return Fgsm(eps)
    step = setting.step if setting.step is not None else min(threat.step, eps)
    return Pgd(eps=eps, step=step, steps=setting.steps, norm=threat.norm, random_start=True,
               restarts=setting.restarts)


def attack_name(attack: Attack) -> str:
    """A name that states the attack's settings, e.g. ``pgd(linf, eps=0.3, step=0.01, steps=20, restarts=1)``."""
    if isinstance(attack, Fgsm):
        return f"fgsm(linf, eps={attack.eps:g})"
    return (f"pgd({attack.norm}, eps={attack.eps:g}, step={attack.step:g}, steps={attack.steps}, "
            f"restarts={attack.restarts})")


def test_batches(test: TensorDataset, samples: int | None, device: torch.device, *, rank: int = 0,
                 ranks: int = 1) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` test images (all when None), in fixed order, on ``device``; with several
    ranks, this rank's share of them."""
    images, labels = test.tensors
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    images, labels = images[rank::ranks], labels[rank::ranks]
    return [(images[i:i + EVAL_BATCH].to(device), labels[i:i + EVAL_BATCH].to(device))
            for i in range(0, len(labels), EVAL_BATCH)]


def evaluate(model: nn.Module, test: TensorDataset, settings: EvaluateSpec, threat: ThreatSpec, *,
             seed: int, device: torch.device, rank: int = 0, ranks: int = 1,
             reduce: Callable[[Sequence[float]], list[float]] | None = None) -> Evaluation:
    """Clean and robust test accuracy; each attack's random starts come from a generator seeded by
    ``seed``, so the same model gives the same numbers. Several ranks each take a share of the test
    set, and ``reduce`` sums their counts."""
    started = time.perf_counter()
    batches = test_batches(test, settings.samples, device, rank=rank, ranks=ranks)
    local = sum(len(y) for _, y in batches)
    correct = [round(accuracy(model, batches) * local)]
    described = {}
    for setting in settings.attacks:
        attack = attack_for(setting, threat)
        if attack_name(attack) in described:  # `pgd` and `pgd(steps = 20)` are the same attack
            continue
        generator = torch.Generator(device=device).manual_seed(seed + 7919 * rank)
        correct.append(round(accuracy(model, batches, attack, generator) * local))
        described[attack_name(attack)] = attack.describe()
    *counts, samples = reduce([*correct, local]) if reduce is not None else [*correct, local]
    shares = [count / max(1, samples) for count in counts]
    robust = dict(zip(described, shares[1:], strict=True))
    return Evaluation(shares[0], robust, described, int(samples), time.perf_counter() - started)
