"""ADMM pieces of the CSTAR joint phase: the Z-step projection, the U-step and the rho penalty.

Pure tensor functions over the compressed layers' weights (name -> tensor), so that the training
loop owns the loop and calls these as hooks (as Torch-Pruning's ``regularize`` does):

    W-step: SGD on the adversarial loss + ``penalty(weights, state, rho)``
    Z-step: ``z_step(weights, state, ranks)``: Z = Proj_ranks(W + U)   (decompose.project)
    U-step: ``u_step(weights, state)``:         U = U + W - Z
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.decompose import project

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class AdmmState:
    """The auxiliary copies Z in the target structure, the scaled duals U, and the ranks Z was projected to (when
    the structure is channels: each layer's kept output channels, the share of channels removed, and the layers
    whose count is not that share's, see prune.Pruned.kept_counts)."""

    z: dict[str, Tensor]
    u: dict[str, Tensor]
    ranks: dict[str, Ranks]
    pruning_ratio: float | None = None
    kept_counts: tuple[tuple[str, int], ...] = ()


def admm_start(weights: Mapping[str, Tensor], ranks: Mapping[str, Ranks], sweeps: int = 0) -> AdmmState:
    """Z = Proj(W), U = 0: the state before the first W-step."""
    with torch.no_grad():
        z = {name: project(w.detach(), _pair(ranks[name]), sweeps) for name, w in weights.items()}
        u = {name: torch.zeros_like(w) for name, w in weights.items()}
    return AdmmState(z, u, dict(ranks))


def z_step(weights: Mapping[str, Tensor], state: AdmmState, ranks: Mapping[str, Ranks],
           sweeps: int = 0) -> AdmmState:
    """Z = Proj_ranks(W + U), the ranks possibly re-chosen since the last Z-step."""
    with torch.no_grad():
        z = {name: project(w.detach() + state.u[name], _pair(ranks[name]), sweeps) for name, w in weights.items()}
    return AdmmState(z, state.u, dict(ranks))


def u_step(weights: Mapping[str, Tensor], state: AdmmState) -> AdmmState:
    """U = U + W - Z."""
    with torch.no_grad():
        u = {name: state.u[name] + w.detach() - state.z[name] for name, w in weights.items()}
    return dataclasses.replace(state, u=u)


def penalty(weights: Mapping[str, Tensor], state: AdmmState, rho: float) -> Tensor:
    """sum over layers of rho/2 ||W - Z + U||^2, differentiable in W."""
    terms = [(w - state.z[name] + state.u[name]).pow(2).sum() for name, w in weights.items()]
    return 0.5 * rho * torch.stack(terms).sum() if terms else torch.zeros(())


def residuals(weights: Mapping[str, Tensor], state: AdmmState) -> dict[str, float]:
    """||W - Z|| / ||W|| per layer: how far each weight still is from its low-rank copy."""
    with torch.no_grad():
        return {name: float((w - state.z[name]).norm() / w.norm().clamp_min(1e-12)) for name, w in weights.items()}


def _pair(ranks: Ranks) -> int | tuple[int, int]:
    return ranks[0] if len(ranks) == 1 else (ranks[0], ranks[1])
