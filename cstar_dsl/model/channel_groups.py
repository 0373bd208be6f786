"""Model surgery, channel groups: which rows and columns of which layers go with each channel a prune can remove
(Torch-Pruning's dependency groups), as plain data for the robustness-aware allocation (plan.robust)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..plan.robust import ChannelGroup, Reach

_WEIGHTED = (nn.Conv2d, nn.Linear)


def channel_groups(model: nn.Module, example_input: torch.Tensor,
                   protected: Sequence[nn.Module]) -> tuple[ChannelGroup, ...]:
    """Every group of channels a prune of ``model`` may remove (the ``protected`` modules, prune.protected_modules,
    lose none), with each Conv2d / Linear row and column that goes with each channel; ``model`` is left as it was,
    its mode included (the caller puts it and ``example_input`` on one device, the CPU for the pruner's trials)."""
    ignored = [sub for module in protected for sub in module.modules()]
    names = {id(module): name for name, module in model.named_modules()}
    training = model.training
    groups = []
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch_pruning\.")  # notes for its own users; see prune._Trials
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_WEIGHTED):
                reach = tuple(Reach(names[id(item.dep.target.module)],
                                    graph.is_out_channel_pruning_fn(item.dep.handler),
                                    tuple(int(channel) for channel in item.root_idxs))
                              for item in group.items if isinstance(item.dep.target.module, _WEIGHTED))
                groups.append(ChannelGroup(names[id(group[0].dep.target.module)], len(group[0].idxs), reach))
    finally:
        model.train(training)  # tracing leaves the model in eval mode
    return tuple(groups)
