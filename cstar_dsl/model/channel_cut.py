"""Model surgery, channel cut: which channels a uniform prune removes from given weights, the projection of weights
onto the pruned structure (the ADMM Z-step when cstar's ADMM targets channels), and the cut applied to a model."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..lang.problems import SpecProblem
from .decompose import project
from .prune import kept_count_ratios, protected_modules, torch_pruning_ratio

# Torch-Pruning's handlers that remove a Conv2d's or Linear's outputs (rows of its weight) or inputs (columns).
# A depthwise conv's outputs are its inputs: Torch-Pruning names one handler for both, and its rows go.
_REMOVES_OUTPUTS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
_REMOVES_INPUTS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


@dataclass(frozen=True)
class ChannelCut:
    """Every module a removal touches, with Torch-Pruning's handler and the indices it removes there."""

    items: tuple[tuple[str, Callable[[nn.Module, list[int]], nn.Module], tuple[int, ...]], ...]

    def project(self, weights: Mapping[str, Tensor], ranks: Mapping[str, tuple[int, ...]] | None = None,
                sweeps: int = 0) -> dict[str, Tensor]:
        """``weights`` with the rows (outputs) and columns (inputs) of the removed channels set to zero: the
        nearest point of the pruned structure once the channels are chosen. With ``ranks`` (a joint structure),
        what each named layer keeps is then truncated to its Tucker-2 / SVD ranks (HOSVD, plus ``sweeps``)."""
        projected = {name: weight.detach().clone() for name, weight in weights.items()}
        for name, handler, indices in self.items:
            if name in projected and handler in _REMOVES_OUTPUTS:
                projected[name][list(indices)] = 0
            elif name in projected and handler in _REMOVES_INPUTS:
                projected[name][:, list(indices)] = 0
        for name, layer_ranks in (ranks or {}).items():
            weight = projected[name]
            rows, columns = (torch.tensor(kept) for kept in self.kept_slices(name, tuple(weight.shape)))
            kept = weight[rows][:, columns]
            pair = layer_ranks[0] if len(layer_ranks) == 1 else (layer_ranks[0], layer_ranks[1])
            weight[rows.unsqueeze(1), columns] = project(kept, pair, sweeps)
        return projected

    def kept_slices(self, name: str, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The output rows and input columns of the layer ``name`` (its weight of ``shape``) the cut keeps."""
        removed_rows = {i for owner, handler, indices in self.items if owner == name and handler in _REMOVES_OUTPUTS
                        for i in indices}
        removed_columns = {i for owner, handler, indices in self.items
                           if owner == name and handler in _REMOVES_INPUTS for i in indices}
        return ([i for i in range(shape[0]) if i not in removed_rows],
                [i for i in range(shape[1]) if i not in removed_columns])

    def kept_outputs(self, model: nn.Module) -> dict[str, int]:
        """The output channels each Conv2d / Linear the cut shrinks keeps."""
        kept = {}
        for name, handler, indices in self.items:
            if handler in _REMOVES_OUTPUTS:
                kept[name] = model.get_parameter(f"{name}.weight").shape[0] - len(indices)
        return kept

    def apply(self, model: nn.Module) -> nn.Module:
        """A pruned deep copy of ``model``: the same removals, replayed on its modules."""
        pruned = copy.deepcopy(model)
        for name, handler, indices in self.items:
            handler(pruned.get_submodule(name), list(indices))
        return pruned


def cut_channels(model: nn.Module, example_input: Tensor, pruning_ratio: float, weights: Mapping[str, Tensor], *,
                 keep: Iterable[str] = (), kept_counts: Iterable[tuple[str, int]] = ()) -> ChannelCut:
    """The channels a prune removes when the Conv2d / Linear layers hold ``weights``: a uniform share
    ``pruning_ratio`` of each layer's, except the layers ``kept_counts`` gives their own count of outputs
    (see prune.Pruned.kept_counts).

    A channel scores the sum of squares of every Conv2d / Linear slice its removal deletes (its filter's row, the
    next layers' columns, across Torch-Pruning's dependency group), so removing the lowest-scoring channels is the
    Euclidean projection of those weights onto the structure with that many channels per layer. The model's output
    layer and the ``keep`` modules lose nothing; ``model`` is left untouched.
    """
    shadow = copy.deepcopy(model).cpu()  # traced on the CPU, like the pruner's own trials, wherever training runs
    example_input = example_input.cpu()
    with torch.no_grad():
        for name, weight in weights.items():
            target = shadow.get_parameter(f"{name}.weight")
            target.copy_(weight.detach().to(target.device))
    ignored = protected_modules(shadow, example_input, keep)
    importance = tp.importance.MagnitudeImportance(p=2, group_reduction="sum", normalizer=None,
                                                   target_types=[nn.Conv2d, nn.Linear])
    names = {id(module): name for name, module in shadow.named_modules()}
    items = []
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch_pruning\.")  # see prune._Trials
        pruner = tp.pruner.MetaPruner(shadow, example_input, importance=importance,
                                      pruning_ratio=torch_pruning_ratio(pruning_ratio),
                                      pruning_ratio_dict=kept_count_ratios(shadow, dict(kept_counts)) or None,
                                      ignored_layers=ignored)
        for group in pruner.step(interactive=True):
            for dependency, indices in group:
                target = dependency.target.module
                owner = names.get(id(target))
                if owner is not None:
                    items.append((owner, dependency.handler, tuple(int(i) for i in indices)))
                elif isinstance(target, nn.Parameter):  # a bare parameter (ConvNeXt's layer_scale): not replayable
                    raise SpecProblem(("compress", "structure"), "unsupported-model",
                                      "cstar's ADMM onto channels cannot prune a parameter that belongs to no module "
                                      f"(a {tuple(target.shape)} tensor this model uses directly)",
                                      help="use `method = channel-prune` (Torch-Pruning prunes it itself), or "
                                           "`structure = low-rank`")
                # else: an operation with no parameters (an addition, a reshape)
    return ChannelCut(tuple(items))
