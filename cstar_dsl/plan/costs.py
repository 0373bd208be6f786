"""Planning stage, costs: a layer's parameters, MACs and kept spectral energy at given ranks, dense or factorized."""

from __future__ import annotations

import math
from collections.abc import Callable

from .layers import LayerInfo
from .plans import Ranks


def factorized_params(layer: LayerInfo, ranks: Ranks) -> int:
    if not layer.is_conv:
        return ranks[0] * (layer.in_features + layer.out_features)
    r_out, r_in = ranks
    area = layer.kernel[0] * layer.kernel[1]
    return layer.in_features * r_in + r_out * r_in * area + layer.out_features * r_out


def factorized_macs(layer: LayerInfo, ranks: Ranks) -> int:
    if not layer.is_conv:
        return factorized_params(layer, ranks) * layer.out_positions
    r_out, r_in = ranks
    area = layer.kernel[0] * layer.kernel[1]
    return layer.in_features * r_in * layer.in_positions + (r_out * r_in * area + layer.out_features * r_out) * (
        layer.out_positions)


def energy_kept(layer: LayerInfo, ranks: Ranks) -> float:
    """The share of the layer's normalized spectral energy the ranks keep (product over the modes)."""
    return math.prod(sum(energies[:rank]) for energies, rank in zip(layer.energies, ranks, strict=True))


def weighted_loss(layer: LayerInfo, ranks: Ranks | None) -> float:
    """What the global policy minimizes, summed over layers: -log(energy kept) x the layer's size.

    The log makes each further cut of a layer dearer than the last, so no layer is destroyed to
    spare another (a linear loss drives whole layers to the rank floor when spectra are flat);
    the size weight makes the cost per parameter saved comparable across layers. Near full
    energy, -log(kept) ~ energy lost, so redundant (fast-decaying) layers are cut first.
    """
    return 0.0 if ranks is None else -math.log(max(energy_kept(layer, ranks), 1e-12)) * layer.params


def full_ranks(layer: LayerInfo) -> Ranks:
    if layer.is_conv:
        return (layer.out_features, layer.in_features)
    return (min(layer.in_features, layer.out_features),)


Cost = Callable[[LayerInfo, Ranks | None], int]
# What cutting a layer to its ranks loses (0 dense), in units one allocation compares across layers.
Loss = Callable[[LayerInfo, Ranks | None], float]


def cost_function(metric: str) -> Cost:
    def cost(layer: LayerInfo, ranks: Ranks | None) -> int:
        if metric == "macs":
            return layer.macs if ranks is None else factorized_macs(layer, ranks)
        return layer.params if ranks is None else factorized_params(layer, ranks)
    return cost
