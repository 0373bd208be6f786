"""Optimize building blocks: optimizers and schedules from the spec, adversarial epochs, divergence."""

from __future__ import annotations

import pytest
import torch

from cstar_dsl.api import build_model
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.train.data import datasets
from cstar_dsl.train.optimize import TrainingDiverged, adversarial_epoch, make_optimizer, make_schedule, training_attack
from tests.helpers import DIGITS, variant


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    spec = load_spec(variant(folder, DIGITS, 'model {\n  arch = "cstar:mlp"\n}\n', "mlp-digits.cstar"))
    x, y = datasets(spec).train.tensors
    return spec, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]


def test_optimizer_and_schedule_follow_the_phase(setup):
    spec, _ = setup
    model = build_model(spec)
    optimizer = make_optimizer(spec.train.pretrain, model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)
    schedule = make_schedule(spec.train.pretrain, optimizer)
    for _ in range(spec.train.pretrain.epochs):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0 at the end


def test_adversarial_training_learns(setup):
    spec, batches = setup
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attack = training_attack(spec.threat)
    generator = torch.Generator().manual_seed(0)
    results = [adversarial_epoch(model, batches, optimizer, attack, phase="pretrain", epoch=e, generator=generator)
               for e in range(6)]
    assert results[-1].loss < 0.7 * results[0].loss
    assert results[-1].clean > 0.8 and results[-1].robust > results[0].robust
    assert all(r.phase == "pretrain" and r.seconds > 0 for r in results)


def test_a_non_finite_loss_stops_with_where_it_happened(setup):
    spec, batches = setup
    model = build_model(spec)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingDiverged) as caught:
        adversarial_epoch(model, batches, optimizer, training_attack(spec.threat), phase="admm", epoch=3,
                          extra_loss=lambda: torch.tensor(float("nan")))
    assert (caught.value.phase, caught.value.epoch, caught.value.step) == ("admm", 3, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step was taken
