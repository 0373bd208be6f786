"""Attacks: PGD (L-inf, L2; random start, restarts) and FGSM on inputs in [0, 1].

Conventions, shared by every attack here:
- inputs are images in [0, 1] with normalization inside the model, so ``eps`` is in pixels;
- gradients are taken with respect to the input only (``torch.autograd.grad``): the model's
  parameter ``.grad`` fields are never touched;
- the model runs in eval mode while the attack is generated (batch norm uses its running
  statistics and updates none of them, dropout is off); its previous mode is restored after.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Pgd:
    """Projected gradient descent (Madry et al. 2018) within an ``norm`` ball of radius ``eps``."""

    eps: float
    step: float
    steps: int
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return pgd(model, x, y, self, generator)

    def describe(self) -> dict[str, object]:
        return {"attack": "pgd", "norm": self.norm, "eps": self.eps, "step": self.step, "steps": self.steps,
                "random_start": self.random_start, "restarts": self.restarts}


@dataclass(frozen=True)
class Fgsm:
    """The fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size ``eps``."""

    eps: float

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return pgd(model, x, y, Pgd(self.eps, self.eps, 1, "linf", random_start=False), generator)

    def describe(self) -> dict[str, object]:
        return {"attack": "fgsm", "norm": "linf", "eps": self.eps}


Attack = Pgd | Fgsm


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the duration, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd(model: nn.Module, x: Tensor, y: Tensor, attack: Pgd, generator: torch.Generator | None = None) -> Tensor:
    """Adversarial examples for ``x`` (N x C x H x W in [0, 1]) with labels ``y`` (N).

    Each restart starts from a random point of the ball (when ``random_start``); per sample, the
    restart with the highest final loss is kept. Returns a detached tensor within the ball and [0, 1].
    """
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
    with evaluating(model):
        for _ in range(attack.restarts):
            candidate = _one_run(model, x, y, attack, generator)
            with torch.no_grad():
                loss = F.cross_entropy(model(candidate), y, reduction="none")
            better = loss > best_loss
            best[better], best_loss[better] = candidate[better], loss[better]
    return best


def _one_run(model: nn.Module, x: Tensor, y: Tensor, attack: Pgd, generator: torch.Generator | None) -> Tensor:
    delta = _random_start(x, attack, generator) if attack.random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (gradient,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(delta + attack.step * _direction(gradient, attack.norm), attack)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _direction(gradient: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return gradient.sign()
    flat = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    return gradient / flat.view(-1, *[1] * (gradient.dim() - 1))


def _project(delta: Tensor, attack: Pgd) -> Tensor:
    if attack.norm == "linf":
        return delta.clamp(-attack.eps, attack.eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (attack.eps / norms).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


def _random_start(x: Tensor, attack: Pgd, generator: torch.Generator | None) -> Tensor:
    if attack.norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * noise - 1) * attack.eps
    # uniform in the L2 ball: a random direction, a radius distributed as eps * u^(1/d)
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    dims = x[0].numel()
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1 / dims)
    return direction * (attack.eps * radius).view(-1, *[1] * (x.dim() - 1))


def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
             attack: Attack | None = None, generator: torch.Generator | None = None) -> float:
    """Top-1 accuracy on clean inputs, or on the attack's adversarial examples, as a fraction."""
    correct = total = 0
    with evaluating(model):
        for x, y in batches:
            inputs = attack(model, x, y, generator) if attack is not None else x
            with torch.no_grad():
                correct += int((model(inputs).argmax(1) == y).sum())
            total += len(y)
    return correct / max(1, total)
