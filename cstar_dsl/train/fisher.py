"""Training stage, Fisher scores: how much the adversarial loss needs each channel and each rank component of a
dense network, measured on PGD examples of a few training batches (the scores plan.robust allocates by)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.decompose import leading_vectors, unfold
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
    # Per layer and mode: the basis U of the dense weight's unfolding W, and Uᵀ W, fixed for every batch.
    bases = {name: [_basis(weights[name].detach(), mode) for mode in _modes(weights[name])] for name in names}
    channels = {group.root: torch.zeros(group.width, dtype=torch.float64) for group in groups}
    modes = {name: [torch.zeros(basis.shape[1], dtype=torch.float64) for basis, _ in bases[name]] for name in names}
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in batches:
                gradients = _gradients(model, weights, attack(model, x, y, generator), y)
                products = {name: (weights[name].detach() * gradients[name]).double() for name in names}
                for group in groups:
                    channels[group.root] += _channel_change(group, products) ** 2
                for name in names:
                    for mode, (basis, projected) in enumerate(bases[name]):
                        modes[name][mode] += _component_change(gradients[name], mode, basis, projected) ** 2
    finally:
        model.train(training)
    return channels, modes


def _gradients(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The adversarial loss's gradient for each named weight (zero for a weight it never reaches, such as a
    training-only head's)."""
    names = list(weights)
    loss = F.cross_entropy(model(x), y)
    found = torch.autograd.grad(loss, [weights[name] for name in names], allow_unused=True)
    return {name: torch.zeros_like(weights[name]) if gradient is None else gradient
            for name, gradient in zip(names, found, strict=True)}


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


def _basis(weight: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """(U, Uᵀ W) for the unfolding W of ``weight`` along ``mode``: U's columns are its left singular vectors, as
    many as its rank can be (the basis Tucker-2 and the SVD truncate in)."""
    unfolded = unfold(weight, mode).double().cpu()
    basis = leading_vectors(unfolded, min(unfolded.shape))
    return basis, basis.T @ unfolded


def _component_change(gradient: Tensor, mode: int, basis: Tensor, projected: Tensor) -> Tensor:
    """Each component's first-order loss change: projecting u_k out of the unfolding W changes it by -u_k u_kᵀ W, so
    the loss by -u_kᵀ W Gᵀ u_k."""
    return -(projected * (basis.T @ unfold(gradient, mode).double().cpu())).sum(dim=1)
