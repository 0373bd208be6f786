"""Fisher scores (cstar_dsl/train/fisher.py) and channel groups (cstar_dsl/model/channel_groups.py): each score is the
square of the loss's directional derivative along the removal it stands for, checked against autograd's own."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from cstar_dsl.model.channel_groups import channel_groups
from cstar_dsl.model.prune import protected_modules
from cstar_dsl.model.zoo import SmallCnn
from cstar_dsl.train.fisher import fisher_scores

SMALL, CIFAR = torch.zeros(1, 1, 12, 12), torch.zeros(1, 3, 32, 32)  # example inputs


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCnn(1, 10, (4, "M", 6, 8))
    with torch.no_grad():  # running statistics away from the identity, so eval-mode batch norm is not a no-op
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(5, 1, 12, 12, generator=generator), torch.randint(0, 10, (5,), generator=generator)


def _unperturbed(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
    return x  # the scores' arithmetic, not the attack, is under test


def _derivative(model: nn.Module, x: Tensor, y: Tensor, direction: dict[str, Tensor]) -> float:
    """d/dt of the loss at weights W + t * direction, t = 0: a central difference, in float64."""
    step = 1e-5

    def loss(t: float) -> float:
        moved = copy.deepcopy(model).double()
        with torch.no_grad():
            for name, change in direction.items():
                moved.get_parameter(name).add_(t * change.double())
            return float(F.cross_entropy(moved(x.double()), y))

    return (loss(step) - loss(-step)) / (2 * step)


def test_a_channels_score_is_the_squared_change_of_removing_it_where_it_is_consumed() -> None:
    model, (x, y) = _model(), _batch()
    weights = {name: model.get_parameter(f"{name}.weight") for name in ("features.0", "features.4", "features.7",
                                                                        "fc")}
    groups = channel_groups(model, SMALL, protected_modules(model, SMALL, ()))
    channels, _ = fisher_scores(model, weights, groups, [(x, y)], _unperturbed, torch.Generator())
    assert sorted(channels) == ["features.0", "features.4", "features.7"]  # the classifier keeps its outputs
    group = next(g for g in groups if g.root == "features.4")
    for channel in range(group.width):
        # Removing the channel zeroes its column in the next conv: the only weight that reads it.
        direction = {"features.7.weight": torch.zeros_like(weights["features.7"])}
        direction["features.7.weight"][:, channel] = -weights["features.7"].detach()[:, channel]
        expected = _derivative(model, x, y, direction) ** 2
        assert torch.isclose(channels["features.4"][channel], torch.tensor(expected, dtype=torch.float64),
                             rtol=1e-4, atol=1e-12)


def test_a_rank_components_score_is_the_squared_change_of_projecting_it_out() -> None:
    model, (x, y) = _model(), _batch()
    weights = {name: model.get_parameter(f"{name}.weight") for name in ("features.4", "fc")}
    _, modes = fisher_scores(model, weights, (), [(x, y)], _unperturbed, torch.Generator())
    assert [len(scores) for scores in modes["features.4"]] == [6, 4] and len(modes["fc"][0]) == 8
    w = weights["features.4"].detach().double()
    inputs = w.transpose(0, 1).reshape(4, -1)  # the unfolding along the input channels
    basis = torch.linalg.svd(inputs, full_matrices=False).U
    for k in range(4):
        u = basis[:, k:k + 1]
        change = -(u @ (u.T @ inputs)).reshape(4, 6, 3, 3).transpose(0, 1)
        expected = _derivative(model, x, y, {"features.4.weight": change}) ** 2
        assert torch.isclose(modes["features.4"][1][k], torch.tensor(expected, dtype=torch.float64), rtol=1e-3,
                             atol=1e-12)


def test_scores_add_over_batches_and_leave_the_model_as_it_was() -> None:
    model, batch = _model().train(), _batch()
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    groups = channel_groups(model, SMALL, protected_modules(model, SMALL, ()))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    once, _ = fisher_scores(model, weights, groups, [batch], _unperturbed, torch.Generator())
    twice, _ = fisher_scores(model, weights, groups, [batch, batch], _unperturbed, torch.Generator())
    assert torch.allclose(twice["features.4"], 2 * once["features.4"])
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_a_residual_sum_is_one_group_reaching_every_layer_it_touches() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    groups = {group.root: group for group in channel_groups(model, CIFAR, protected_modules(model, CIFAR, ()))}
    stem = next(group for group in groups.values() if any(r.layer == "conv1" and r.removes_outputs
                                                          for r in group.reach))
    touched = {(r.layer, r.removes_outputs) for r in stem.reach}
    # The stem's channels run through layer1's sum: both blocks' last convs write them, four layers read them.
    assert {("conv1", True), ("layer1.0.conv2", True), ("layer1.1.conv2", True), ("layer1.0.conv1", False),
            ("layer1.1.conv1", False), ("layer2.0.conv1", False), ("layer2.0.downsample.0", False)} <= touched
    assert all(sorted(set(r.channels)) == list(range(stem.width)) for r in stem.reach)
    assert "fc" not in groups and all(not (r.layer == "fc" and r.removes_outputs) for g in groups.values()
                                      for r in g.reach)
