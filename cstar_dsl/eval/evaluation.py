"""Evaluate stage: clean accuracy and the accuracy under each of the recipe's attacks, on the test set."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from ..lang.spec import EvaluateSpec, FgsmAttack, PgdAttack, ThreatSpec
from ..train.attacks import Attack, Fgsm, Pgd, accuracy
from ..train.data import dataset_size, loader_batches

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


@overload
def attack_for(setting: PgdAttack, threat: ThreatSpec) -> Pgd: ...
@overload
def attack_for(setting: FgsmAttack, threat: ThreatSpec) -> Fgsm: ...
@overload
def attack_for(setting: PgdAttack | FgsmAttack, threat: ThreatSpec) -> Attack: ...
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


class TestBatches:
    """The first ``samples`` test images (all when None), in fixed order, on ``device``, batch by
    batch; with several ranks, this rank's share of them. Iterable any number of times (once per
    attack); a data set that is not in memory (ImageNet folders) is read again each time."""

    def __init__(self, test: Dataset, samples: int | None, device: torch.device, *, rank: int = 0,
                 ranks: int = 1, workers: int = 0) -> None:
        count = dataset_size(test) if samples is None else min(samples, dataset_size(test))
        self.order = torch.arange(count)[rank::ranks]
        self.test, self.device, self.workers = test, device, workers

    def __len__(self) -> int:
        return -(-len(self.order) // EVAL_BATCH)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in loader_batches(self.test, self.order, EVAL_BATCH, self.workers):
            yield images.to(self.device), labels.to(self.device)

    @property
    def samples(self) -> int:
        return len(self.order)


def test_batches(test: Dataset, samples: int | None, device: torch.device, *, rank: int = 0,
                 ranks: int = 1) -> list[tuple[Tensor, Tensor]] | TestBatches:
    """The test batches: in memory, on ``device``, for in-memory data sets; read as needed otherwise."""
    return _materialized(TestBatches(test, samples, device, rank=rank, ranks=ranks))


def _materialized(batches: TestBatches) -> list[tuple[Tensor, Tensor]] | TestBatches:
    return list(batches) if isinstance(batches.test, TensorDataset) else batches


def evaluate(model: nn.Module, test: Dataset, settings: EvaluateSpec, threat: ThreatSpec, *,
             seed: int, device: torch.device, rank: int = 0, ranks: int = 1,
             reduce: Callable[[Sequence[float]], list[float]] | None = None) -> Evaluation:
    """Clean and robust test accuracy; each attack's random starts come from a generator seeded by
    ``seed``, so the same model gives the same numbers. Several ranks each take a share of the test
    set, and ``reduce`` sums their counts."""
    started = time.perf_counter()
    shard = TestBatches(test, settings.samples, device, rank=rank, ranks=ranks)
    local = shard.samples
    batches = _materialized(shard)
    correct = [round(accuracy(model, batches) * local)]
    described = {}
    for setting in settings.attacks:
        attack = attack_for(setting, threat)
        name = attack_name(attack)
        if name in described:  # `pgd` and `pgd(steps = 20)` are the same attack
            continue
        generator = torch.Generator(device=device).manual_seed(seed + 7919 * rank)
        correct.append(round(accuracy(model, batches, attack, generator) * local))
        described[name] = attack.describe()
    *counts, samples = reduce([*correct, local]) if reduce is not None else [*correct, local]
    shares = [count / max(1, samples) for count in counts]
    robust = dict(zip(described, shares[1:], strict=True))
    return Evaluation(shares[0], robust, described, int(samples), time.perf_counter() - started)
