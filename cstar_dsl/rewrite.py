"""Rewrite stage: a model and its plan -> a new torch.fx GraphModule with factorized layers.

The caller's model is never modified: it is deep-copied, traced, and the planned Linear and
Conv2d modules are swapped for factorized ones at the same qualified names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import fx, nn

from .factorized import LowRankLinear, Tucker2Conv2d
from .inventory import trace
from .plan import LayerPlan, Plan


def factorize(model: nn.Module, plan: Plan, *, leaves: Iterable[str] = (), sweeps: int = 0) -> fx.GraphModule:
    """The model with every planned layer factorized at its planned ranks (HOSVD + ``sweeps`` HOOI)."""
    graph = trace(copy.deepcopy(model), leaves)
    for layer in plan.layers:
        if layer.method != "dense" and layer.ranks is not None:
            _swap(graph, layer.name, _factorized(graph.get_submodule(layer.name), layer, sweeps))
    graph.graph.lint()
    graph.recompile()
    return graph


def _factorized(module: nn.Module, layer: LayerPlan, sweeps: int) -> nn.Module:
    ranks = layer.ranks or ()
    if isinstance(module, nn.Conv2d):
        return Tucker2Conv2d.from_dense(module, (ranks[0], ranks[1]), sweeps)
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_dense(module, ranks[0])
    raise TypeError(f"planned layer {layer.name} is a {type(module).__name__}, not a Linear or Conv2d")


def _swap(graph: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = graph.get_submodule(parent_name) if parent_name else graph
    setattr(parent, child, module)
