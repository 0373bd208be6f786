"""Training stage, Fisher scores: how much the adversarial loss needs each channel and each rank component of a
dense network, measured on PGD examples of a few training batches (the scores plan.robust allocates by)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plan.robust import ChannelGroup

Attack = Callable[[nn.Module, Tensor, Tensor, torch.Generator | None], Tensor]


def fisher_scores(model: nn.Module, weights: Mapping[str, Tensor], groups: Sequence[ChannelGroup],
                  batches: Iterable[tuple[Tensor, Tensor]], attack: Attack,
                  generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """(channel scores by group root, rank component scores by layer and mode) of ``model``, whose Conv2d / Linear
    ``weights`` are named (every layer the groups reach): for each unit, the square of the first-order change of the
    adversarial loss when it is removed, summed over ``batches`` (Fisher's approximation of the loss increase,
    Molchanov et al. 2019).

    A channel's change is read where its removal acts, on the columns of the layers that consume it (after a batch
    norm, zeroing a filter would not silence the channel); a rank component's is that of projecting it out of the
    weight's unfolding along that mode, in the basis of the dense weight's singular vectors. No parameter's
    ``.grad`` is touched, and the model runs in eval mode (batch norm on its running statistics)."""
    names = list(weights)
    bases = {name: [_left_vectors(_unfolded(weights[name].detach(), mode)) for mode in _modes(weights[name])]
             for name in names}
    channels = {group.root: torch.zeros(group.width, dtype=torch.float64) for group in groups}
    modes = {name: [torch.zeros(basis.shape[1], dtype=torch.float64) for basis in bases[name]] for name in names}
    training = model.training
    model.eval()
    try:
        for x, y in batches:
            adversarial = attack(model, x, y, generator)
            loss = F.cross_entropy(model(adversarial), y)
            gradients = dict(zip(names, torch.autograd.grad(loss, [weights[n] for n in names]), strict=True))
            products = {name: (weights[name].detach() * gradients[name]).double() for name in names}
            for group in groups:
                channels[group.root] += _channel_change(group, products) ** 2
            for name in names:
                for mode, basis in enumerate(bases[name]):
                    modes[name][mode] += _component_change(weights[name].detach(), gradients[name], mode, basis) ** 2
    finally:
        model.train(training)
    return channels, modes


def _channel_change(group: ChannelGroup, products: Mapping[str, Tensor]) -> Tensor:
    """Each channel's first-order loss change, weight x gradient summed over the columns its removal deletes from the
    layers it feeds (over its own rows, where no weighted layer consumes it)."""
    reach = [r for r in group.reach if not r.removes_outputs] or list(group.reach)
    change = torch.zeros(group.width, dtype=torch.float64)
    for item in reach:
        product = products[item.layer]
        dim = 0 if item.removes_outputs else 1
        per_index = product.sum(dim=[d for d in range(product.dim()) if d != dim])
        change.index_add_(0, torch.tensor(item.channels), per_index.cpu())
    return change


def _modes(weight: Tensor) -> range:
    """Tucker-2 cuts a conv's outputs and inputs; a Linear's SVD has one rank."""
    return range(2) if weight.dim() == 4 else range(1)


def _unfolded(weight: Tensor, mode: int) -> Tensor:
    return weight.transpose(0, mode).reshape(weight.shape[mode], -1).double()


def _left_vectors(matrix: Tensor) -> Tensor:
    return torch.linalg.svd(matrix.cpu(), full_matrices=False).U


def _component_change(weight: Tensor, gradient: Tensor, mode: int, basis: Tensor) -> Tensor:
    """Each component's first-order loss change: projecting u_k out of the unfolding W changes it by -u_k u_kᵀ W, so
    the loss by -u_kᵀ W Gᵀ u_k."""
    device = basis.device
    w, g = _unfolded(weight, mode).cpu(), _unfolded(gradient, mode).to(device)
    return -((basis.T @ w) * (basis.T @ g)).sum(dim=1)
