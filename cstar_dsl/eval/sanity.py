"""Evaluate stage, sanity checks: the gradient-masking checks of `cstar eval --sanity` (Carlini et al. 2019)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..lang.render import plural
from ..lang.spec import PgdAttack, ThreatSpec
from ..train.attacks import Attack, Fgsm, Pgd, accuracy
from .attack_text import AttackSetting, AutoAttackSetting
from .evaluation import attack_for, attack_name

_UNBOUNDED = Pgd(eps=1.0, step=0.1, steps=50, norm="linf", random_start=True)


@dataclass(frozen=True)
class SanityCheck:
    """One gradient-masking check: its verdict and the numbers behind it."""

    name: str
    passed: bool
    detail: str


def sanity_checks(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], settings: tuple[AttackSetting, ...],
            threat: ThreatSpec, robust: dict[str, float], seed: int, flags: list[str]) -> tuple[SanityCheck, ...]:
    n = sum(len(y) for _, y in batches)
    measure = _Measure(model, batches, seed, n)
    baseline = _strongest_pgd(settings, threat, robust)
    base_accuracy = robust.get(attack_name(baseline))
    if base_accuracy is None:
        base_accuracy = measure(baseline)
    checks = [
        _more_steps_check(baseline, base_accuracy, measure),
        _unbounded_check(measure),
        _single_step_check(baseline, base_accuracy, measure),
    ]
    if any(isinstance(s, AutoAttackSetting) for s in settings):
        checks.append(SanityCheck("autoattack raises none of its flags", not flags,
                                  "; ".join(flags) or "no flag: randomness, softmax output, zero gradients, "
                                  "dynamic defense, Square beating the white-box attacks, out-of-ball examples"))
    return tuple(checks)


@dataclass(frozen=True)
class _Measure:
    """Accuracy under an attack on the evaluated images, the attack's random starts seeded by ``seed``."""

    model: nn.Module
    batches: Iterable[tuple[Tensor, Tensor]]
    seed: int
    samples: int

    def __call__(self, attack: Attack) -> float:
        device = next(iter(self.batches))[0].device
        return accuracy(self.model, self.batches, attack, torch.Generator(device=device).manual_seed(self.seed))

    def tolerance(self) -> float:
        """Noise allowed between two attack runs: one image or half a point, whichever is larger."""
        return max(1 / self.samples, 0.005)

    def shown(self, value: float) -> str:
        return f"{value:.1%} ({round(value * self.samples)}/{self.samples})"


def _strongest_pgd(settings: tuple[AttackSetting, ...], threat: ThreatSpec, robust: dict[str, float]) -> Pgd:
    given = [attack_for(s, threat) for s in settings if isinstance(s, PgdAttack)]
    if not given:
        return attack_for(PgdAttack(), threat)
    return min(given, key=lambda a: (robust[attack_name(a)], -a.steps * a.restarts))


def _more_steps_check(baseline: Pgd, base_accuracy: float, measure: _Measure) -> SanityCheck:
    """PGD with 5x the steps and 2 more restarts must not leave the model more accurate, beyond noise."""
    stronger = dataclasses.replace(baseline, steps=baseline.steps * 5, restarts=baseline.restarts + 2)
    strong_accuracy = measure(stronger)
    tolerance = measure.tolerance()
    return SanityCheck(
        "more steps do not help the model", strong_accuracy <= base_accuracy + tolerance,
        f"{attack_name(baseline)}: {measure.shown(base_accuracy)}; {attack_name(stronger)}: "
        f"{measure.shown(strong_accuracy)} ({(strong_accuracy - base_accuracy) * 100:+.1f} points); "
        f"allowed rise {_points(tolerance)} (1 image or 0.5 points, whichever is larger)")


def _unbounded_check(measure: _Measure) -> SanityCheck:
    """An L-inf attack of eps 1 can reach any image: unless gradients are masked, it leaves ~0% accuracy."""
    reached = measure(_UNBOUNDED)
    allowed = max(0.01, 2 / measure.samples)
    return SanityCheck(
        "an unbounded attack reaches ~0%", reached <= allowed + 1e-12,
        f"{attack_name(_UNBOUNDED)}: {measure.shown(reached)}; allowed at most {allowed:.1%} "
        f"(1% or 2 images, whichever is larger)")


def _points(share: float) -> str:
    return plural(float(f"{share * 100:.2g}"), "point")


def _single_step_check(baseline: Pgd, base_accuracy: float, measure: _Measure) -> SanityCheck:
    """The single-step attack at the same eps must not beat the iterative one, beyond noise."""
    single: Attack = Fgsm(baseline.eps) if baseline.norm == "linf" else Pgd(
        baseline.eps, baseline.eps, 1, baseline.norm, random_start=False)
    single_accuracy = measure(single)
    tolerance = measure.tolerance()
    return SanityCheck(
        "iterative beats single-step", single_accuracy >= base_accuracy - tolerance,
        f"{attack_name(single)}: {measure.shown(single_accuracy)}; {attack_name(baseline)}: "
        f"{measure.shown(base_accuracy)}; the single step may be lower by {_points(tolerance)} at most "
        f"(1 image or 0.5 points, whichever is larger)")
