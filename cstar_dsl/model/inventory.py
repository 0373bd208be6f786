"""Inventory stage: a model -> its traced graph and the facts planning needs about each layer.

This is the one place where torch facts (shapes, spectra) become plain data; planning after it
is pure Python.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..lang.problems import SpecProblem
from ..plan.layers import LayerInfo
from .decompose import spectra


@dataclass(frozen=True)
class Inventory:
    """The traced model, its compressible layers, and the parameters outside them."""

    graph: fx.GraphModule
    layers: tuple[LayerInfo, ...]
    total_params: int

    @property
    def other_params(self) -> int:
        return self.total_params - sum(layer.params for layer in self.layers)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the spec's leaf modules, remembering where it is for error messages."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self.path: list[tuple[str, str]] = []

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (qualified_name in self.leaves or type(module).__name__ in self.leaves
                or super().is_leaf_module(module, qualified_name))

    def call_module(self, module: nn.Module, forward, args, kwargs):  # noqa: ANN001, ANN201 (fx's signature)
        self.path.append((self.path_of_module(module), type(module).__name__))
        result = super().call_module(module, forward, args, kwargs)
        self.path.pop()
        return result


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; an untraceable model names the module that failed.

    Raises:
        SpecProblem: ``untraceable-model`` at the spec's ``model.arch``.
    """
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many kinds; each means the same to the user
        where = tracer.path[-1] if tracer.path else ("", type(model).__name__)
        name = where[0] or "the model itself"
        frame = _user_frame(error)
        raise SpecProblem(
            ("model", "arch"), "untraceable-model", f"torch.fx cannot trace `{name}` ({where[1]}): {error}",
            label="this model", notes=(f"failed at {frame.filename}:{frame.lineno}",),
            help=f'mark the module a leaf so it is kept whole: `leaf = ["{where[0] or where[1]}"]` in the model block',
        ) from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _user_frame(error: BaseException) -> traceback.FrameSummary:
    """The innermost frame of the traceback outside torch: the model's own line that failed."""
    frames = traceback.extract_tb(error.__traceback__)
    torch_root = str(Path(torch.__file__).parent)
    outside = [f for f in frames if not f.filename.startswith(torch_root) and f.filename != __file__]
    return (outside or frames)[-1]


def collect(model: nn.Module, input_shape: tuple[int, ...], leaves: Iterable[str] = (), *,
            read_spectra: bool = True) -> Inventory:
    """Trace the model, run it once on zeros to learn each layer's positions, and read spectra (unless told not to:
    only the shapes and costs are needed)."""
    graph = trace(model, leaves)
    calls = Counter(node.target for node in graph.graph.nodes if node.op == "call_module")
    shapes = _io_positions(model, input_shape)
    outputs = output_layers(graph)
    layers = []
    for name, module in model.named_modules():
        if name in calls and isinstance(module, (nn.Linear, nn.Conv2d)) and name in shapes:
            layers.append(_layer_info(name, module, calls[name], shapes[name], name in outputs, read_spectra))
    total = sum(p.numel() for p in model.parameters())
    return Inventory(graph, tuple(layers), total)


# Ops that act on each channel alone: a layer behind them still decides the output's channels (a
# fully convolutional classifier ends in conv -> ReLU -> pooling -> flatten).
_PASSING_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "contiguous", "float", "relu", "mean"})
_PASSING_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.relu, torch.mean,
                                nn.functional.relu, nn.functional.adaptive_avg_pool2d})
_PASSING_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.ReLU, nn.BatchNorm2d, nn.AdaptiveAvgPool2d,
                    nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)


def output_layers(graph: fx.GraphModule) -> set[str]:
    """The Linear/Conv2d modules whose result is the model's output, seen through reshapes and dropout."""
    found: set[str] = set()
    pending = list(graph.graph.output_node().all_input_nodes)
    while pending:
        node = pending.pop()
        if node.op == "call_module":
            module = graph.get_submodule(str(node.target))
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                found.add(str(node.target))
                continue
            if not isinstance(module, _PASSING_MODULES):
                continue
        elif not ((node.op == "call_method" and node.target in _PASSING_METHODS)
                  or (node.op == "call_function" and node.target in _PASSING_FUNCTIONS)):
            continue
        if node.args and isinstance(node.args[0], fx.Node):
            pending.append(node.args[0])
    return found


def _io_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            found.setdefault(name, (_positions(inputs[0], module), _positions(output, module)))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    parameter = next(model.parameters(), None)
    options: dict[str, Any] = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, **options))
    except (NotImplementedError, torch.cuda.OutOfMemoryError):
        raise  # RuntimeErrors too, but not about the input's size
    except RuntimeError as error:  # torch's error for a shape the layers cannot take (an image too small)
        size = "x".join(map(str, input_shape))
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecProblem(("model", "input"), "input-mismatch", f"the model cannot run on a {size} input: {reason}",
                          label="does not fit the model",
                          help="give the input size the model was built for (inception_v3 needs at least 75x75), "
                               "or choose a model for this size") from None
    finally:
        for handle in handles:
            handle.remove()
    return found


def _positions(tensor: torch.Tensor, module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(tensor.shape[-1] * tensor.shape[-2])
    return int(tensor.numel() // tensor.shape[-1] // tensor.shape[0])


def _layer_info(name: str, module: nn.Linear | nn.Conv2d, calls: int, positions: tuple[int, int],
                produces_output: bool, read_spectra: bool = True) -> LayerInfo:
    weight = module.weight.detach()
    if isinstance(module, nn.Conv2d):
        in_features, out_features = module.in_channels, module.out_channels
        kernel, groups = (int(module.kernel_size[0]), int(module.kernel_size[1])), module.groups
    else:
        in_features, out_features, kernel, groups = module.in_features, module.out_features, (1, 1), 1
    useful = groups == 1 and calls == 1 and read_spectra
    energies = tuple(_normalized(s) for s in spectra(weight)) if useful else ()
    return LayerInfo(name, type(module).__name__, in_features, out_features, kernel, groups, calls,
                     positions[0], positions[1], energies, produces_output)


def with_weights(layers: Iterable[LayerInfo], weights: Mapping[str, torch.Tensor]) -> tuple[LayerInfo, ...]:
    """The layers with their spectra read again from ``weights`` (for ADMM: W + U at each Z-step);
    layers without spectra, or not in ``weights``, stay as they were."""
    return tuple(dataclasses.replace(layer, energies=tuple(_normalized(s) for s in spectra(weights[layer.name])))
                 if layer.energies and layer.name in weights else layer for layer in layers)


def _normalized(singular_values: torch.Tensor) -> tuple[float, ...]:
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return tuple(1.0 / len(energy) for _ in range(len(energy)))
    return tuple(float(e) / total for e in energy)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """In place: the submodule of ``root`` at the qualified ``name`` (``features.0``) becomes ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
