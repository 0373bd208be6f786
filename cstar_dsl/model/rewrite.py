"""Rewrite stage: a model and its plan -> a new torch.fx GraphModule with factorized layers.

The caller's model is never modified: it is deep-copied, traced, and the planned Linear and
Conv2d modules are swapped for factorized ones at the same qualified names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from torch import fx, nn

from ..plan.plans import Plan, Ranks
from .factorized import LowRankLinear, Tucker2Conv2d
from .inventory import replace_module, trace


def factorize(model: nn.Module, plan: Plan, *, leaves: Iterable[str] = (), sweeps: int = 0) -> fx.GraphModule:
    """The model with every planned layer factorized at its planned ranks (HOSVD + ``sweeps`` HOOI)."""
    return factorize_ranks(model, planned_ranks(plan), leaves=leaves, sweeps=sweeps)


def planned_ranks(plan: Plan) -> dict[str, Ranks]:
    """The ranks of every layer the plan factorizes, by qualified name."""
    return {layer.name: layer.ranks for layer in plan.layers if layer.method != "dense" and layer.ranks is not None}


def factorize_ranks(model: nn.Module, ranks: Mapping[str, Ranks], *, leaves: Iterable[str] = (), sweeps: int = 0,
                    decompose: bool = True) -> fx.GraphModule:
    """The model with the named layers factorized at ``ranks``. With ``decompose=False`` the factors
    are left uninitialized: the structure only, for loading saved weights into."""
    graph = trace(copy.deepcopy(model), leaves)
    for name, layer_ranks in ranks.items():
        replace_module(graph, name, _factorized(graph.get_submodule(name), name, layer_ranks, sweeps, decompose))
    graph.graph.lint()
    graph.recompile()
    return graph


def _factorized(module: nn.Module, name: str, ranks: Ranks, sweeps: int, decompose: bool) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        pair = (ranks[0], ranks[1])
        return Tucker2Conv2d.from_dense(module, pair, sweeps) if decompose else Tucker2Conv2d(module, pair)
    if isinstance(module, nn.Linear):
        if decompose:
            return LowRankLinear.from_dense(module, ranks[0])
        weight = module.weight
        return LowRankLinear(module.in_features, module.out_features, ranks[0], module.bias is not None,
                             device=weight.device, dtype=weight.dtype)
    raise TypeError(f"planned layer {name} is a {type(module).__name__}, not a Linear or Conv2d")

