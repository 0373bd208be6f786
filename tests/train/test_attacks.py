"""Attacks: the perturbation stays in the ball and the image range, more effort never helps the
model, the model's state is left alone, and an unbounded attack breaks a toy model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar_dsl.train.attacks import Fgsm, Pgd, accuracy, pgd


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A toy model fitted to its batch, so that clean accuracy is high and attacks have work to do."""
    model, (x, y) = _toy_model(), _batch(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_within_eps_and_range(norm):
    model, (x, y) = _toy_model(), _batch()
    attack = Pgd(eps=0.1 if norm == "linf" else 0.5, step=0.05, steps=5, norm=norm, restarts=2)
    adversarial = attack(model, x, y, torch.Generator().manual_seed(0))
    delta = (adversarial - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= attack.eps + 1e-6).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_fgsm_is_one_signed_step():
    model, (x, y) = _toy_model(), _batch()
    adversarial = Fgsm(0.05)(model, x, y)
    moved = (adversarial - x).abs()
    inside = (x > 0.05) & (x < 0.95)  # away from the clamp, every pixel moves by exactly eps
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], 0.05), atol=1e-6)


def test_gradients_only_reach_the_input_and_bn_stats_stay():
    model, (x, y) = _toy_model(), _batch()
    model.train()
    bn = model[1]
    mean, var, batches = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    Pgd(eps=0.1, step=0.02, steps=3)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == batches
    assert model.training  # the caller's mode is restored


def test_more_steps_and_restarts_never_help_the_model(trained):
    model, x, y = trained
    weak = accuracy(model, [(x, y)], Pgd(eps=0.1, step=0.025, steps=1, restarts=1), torch.Generator().manual_seed(0))
    strong = accuracy(model, [(x, y)], Pgd(eps=0.1, step=0.025, steps=20, restarts=3),
                      torch.Generator().manual_seed(0))
    clean = accuracy(model, [(x, y)])
    assert clean > 0.9
    assert strong <= weak + 1 / len(y)  # beyond noise: one sample
    assert strong <= clean


def test_unbounded_attack_breaks_the_model(trained):
    model, x, y = trained
    robust = accuracy(model, [(x, y)], Pgd(eps=1.0, step=0.1, steps=50), torch.Generator().manual_seed(0))
    assert robust <= 0.05


def test_same_generator_same_examples():
    model, (x, y) = _toy_model(), _batch()
    attack = Pgd(eps=0.1, step=0.02, steps=3)
    first = pgd(model, x, y, attack, torch.Generator().manual_seed(7))
    second = pgd(model, x, y, attack, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
