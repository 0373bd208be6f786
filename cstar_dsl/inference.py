"""Inference-time optimization of a model, dense or factorized: the same math in fewer, cheaper ops.

``optimize_for_inference(model)`` returns a new ``torch.fx.GraphModule`` for eval-mode use under
``torch.inference_mode()``; ``model`` itself is left untouched. The passes, in order:

1. **inline**: trace through ``Tucker2Conv2d`` and ``LowRankLinear`` so the convs and linears they
   run are plain graph nodes the other passes can see;
2. **fold batch norm**: an eval-mode ``BatchNorm2d`` whose input is a conv used by nothing else is
   folded into that conv's weight and bias (for a Tucker-2 layer, into its last 1x1 conv);
3. **merge pointwise convs**: two 1x1 convs in a row become one (a Tucker-2 form of a 1x1 conv,
   such as a ResNet shortcut, runs its first 1x1 conv at the input resolution before the stride:
   merged, the stride comes first), and a 1x1 conv whose input and output widths are equal (a
   Tucker-2 rank equal to the full channel count) is multiplied into its neighbouring conv;
4. **call functions, not modules**: every ``Conv2d``, ``Linear``, ``ReLU``, ``MaxPool2d`` and
   ``AdaptiveAvgPool2d`` call becomes a direct call of its torch function, the weights held as
   buffers of the returned module, which saves the ``nn.Module.__call__``
   overhead (a few microseconds a call, which matters when a factorized layer runs three small
   convs at batch size 1); a strided 1x1 conv subsamples its input first and runs unstrided.

Every pass keeps the function: the outputs agree with the original model to float rounding
(``tests/test_inference.py`` bounds the difference by 1e-4). See docs/performance.md for what each
pass is worth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .inventory import trace


@dataclass
class InferenceReport:
    """What ``optimize_for_inference`` did."""

    folded_bn: int = 0
    merged: int = 0
    lowered: int = 0

    def summary(self) -> str:
        return (f"{self.folded_bn} batch norms folded, {self.merged} 1x1 convs merged, "
                f"{self.lowered} module calls lowered to functions")


def optimize_for_inference(model: nn.Module, *, leaves: Iterable[str] = (), fold_bn: bool = True,
                           merge: bool = True, lower: bool = True,
                           report: InferenceReport | None = None) -> fx.GraphModule:
    """An eval-mode copy of ``model`` with batch norms folded, redundant 1x1 convs merged and
    module calls replaced by function calls. ``leaves`` are modules kept whole when tracing (the
    spec's ``model.leaf``). Meant for inference only: the folded batch norms cannot train again.
    """
    report = report if report is not None else InferenceReport()
    graph = trace(copy.deepcopy(model).eval(), leaves)
    with torch.no_grad():
        if fold_bn:
            report.folded_bn = _fold_batch_norms(graph)
        if merge:
            report.merged = _merge_pointwise(graph)
        if lower:
            report.lowered = _lower_to_functions(graph)
    graph.graph.eliminate_dead_code()
    graph.delete_all_unused_submodules()
    graph.graph.lint()
    graph.recompile()
    return graph.eval()


# ------------------------------------------------------------------- helpers


def _module(graph: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return graph.get_submodule(node.target)  # type: ignore[arg-type]
    return None


def _replace(graph: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(graph.get_submodule(parent_name) if parent_name else graph, child, module)


def _plain_conv(module: nn.Module | None) -> bool:
    """An ungrouped, zero-padded Conv2d with numeric padding: what the passes know how to rewrite."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"  # type: ignore[union-attr]
            and not isinstance(module.padding, str))  # type: ignore[union-attr]


def _one_by_one(conv: nn.Conv2d) -> bool:
    """A 1x1 conv with no padding: a per-position linear map (after its stride)."""
    return conv.kernel_size == (1, 1) and conv.padding == (0, 0)


def _pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 conv with no padding and no stride: the same linear map at every position."""
    return _one_by_one(conv) and conv.stride == (1, 1)


# ---------------------------------------------------------- fold batch norms


def _fold_batch_norms(graph: fx.GraphModule) -> int:
    folded = 0
    for node in list(graph.graph.nodes):
        bn = _module(graph, node)
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or bn.running_mean is None:
            continue
        source = node.args[0]
        conv = _module(graph, source)
        if type(conv) is not nn.Conv2d or len(source.users) != 1:  # type: ignore[union-attr]
            continue
        _replace(graph, source.target, fuse_conv_bn_eval(conv, bn))  # type: ignore[union-attr,arg-type]
        node.replace_all_uses_with(source)  # type: ignore[arg-type]
        graph.graph.erase_node(node)
        folded += 1
    return folded


# ------------------------------------------------------- merge pointwise convs


def _merge_pointwise(graph: fx.GraphModule) -> int:
    """Merge pairs of convs ``b(a(x))`` (``a`` used only by ``b``) where that removes work."""
    merged = 0
    for second in list(graph.graph.nodes):
        b = _module(graph, second)
        if not _plain_conv(b) or not second.args:
            continue
        first = second.args[0]
        a = _module(graph, first)
        if not _plain_conv(a) or len(first.users) != 1 or not _worth_merging(a, b):  # type: ignore[arg-type]
            continue
        _replace(graph, second.target, _merged_conv(a, b))  # type: ignore[arg-type]
        second.replace_input_with(first, first.args[0])
        graph.graph.erase_node(first)
        merged += 1
    return merged


def _worth_merging(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    if _one_by_one(a) and _one_by_one(b):  # per output position: C_in C_out merged, against
        stride = b.stride[0] * b.stride[1]  # C_in C_mid at each of b's input positions + C_mid C_out
        return a.in_channels * b.out_channels <= a.in_channels * a.out_channels * stride + b.in_channels * b.out_channels
    if _pointwise(b):  # b(a(x)) with b a 1x1: free when b is square (C_out x C_out)
        return b.in_channels == b.out_channels
    if _pointwise(a) and a.bias is None:  # a 1x1 before a padded conv must have no bias
        return a.in_channels == a.out_channels
    return False


def _merged_conv(a: nn.Conv2d, b: nn.Conv2d) -> nn.Conv2d:
    """The single conv computing ``b(a(x))``, for the pairs ``_worth_merging`` accepts."""
    options = {"device": b.weight.device, "dtype": b.weight.dtype}
    has_bias = a.bias is not None or b.bias is not None
    if _one_by_one(a) and _one_by_one(b):  # strides compose; a 1x1 conv has no use for dilation
        stride = (a.stride[0] * b.stride[0], a.stride[1] * b.stride[1])
        conv = nn.Conv2d(a.in_channels, b.out_channels, 1, stride=stride, bias=has_bias, **options)
        weight = b.weight[:, :, 0, 0] @ a.weight[:, :, 0, 0]
        conv.weight.copy_(weight[:, :, None, None])
        bias = _bias_through(a, b)
    elif _pointwise(b):  # b(a(x)): W = B . A over a's output channels, bias = B b_a + b_b
        conv = _like(a, a.in_channels, b.out_channels, has_bias, options)
        conv.weight.copy_(torch.einsum("os,sihw->oihw", b.weight[:, :, 0, 0], a.weight))
        bias = _bias_through(a, b)
    else:  # a is a bias-free 1x1: W = B . A over b's input channels
        conv = _like(b, a.in_channels, b.out_channels, has_bias, options)
        conv.weight.copy_(torch.einsum("oshw,si->oihw", b.weight, a.weight[:, :, 0, 0]))
        bias = b.bias
    if bias is not None:
        conv.bias.copy_(bias)  # type: ignore[union-attr]
    return conv


def _like(geometry: nn.Conv2d, c_in: int, c_out: int, bias: bool, options: dict) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, geometry.kernel_size, stride=geometry.stride, padding=geometry.padding,
                     dilation=geometry.dilation, bias=bias, **options)


def _bias_through(a: nn.Conv2d, b: nn.Conv2d) -> torch.Tensor | None:
    """The bias of b(a(x)) for b a 1x1 conv: B b_a + b_b."""
    if a.bias is None:
        return b.bias
    carried = b.weight[:, :, 0, 0] @ a.bias
    return carried if b.bias is None else carried + b.bias


# ------------------------------------------------------- lower to functions


def _lower_to_functions(graph: fx.GraphModule) -> int:
    lowered = 0
    for node in list(graph.graph.nodes):
        module = _module(graph, node)
        if module is None or len(node.args) != 1 or node.kwargs:
            continue
        with graph.graph.inserting_before(node):
            new = _function_call(graph, node, module)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
        lowered += 1
    return lowered


def _function_call(graph: fx.GraphModule, node: fx.Node, module: nn.Module) -> fx.Node | None:
    g, x = graph.graph, node.args[0]

    def tensor(field: str) -> fx.Node | None:
        """The module's weight or bias as a buffer of the root module: one attribute lookup a call."""
        value = getattr(module, field, None)
        if value is None:
            return None
        name = f"_{str(node.target).replace('.', '_')}_{field}"
        graph.register_buffer(name, value.detach())
        return g.get_attr(name)

    if _plain_conv(module):
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if _one_by_one(conv) and conv.stride != (1, 1):  # subsample, then an unstrided 1x1 conv
            x = g.call_function(_subsample, (x, conv.stride))
            return g.call_function(torch.conv2d, (x, tensor("weight"), tensor("bias")))
        return g.call_function(torch.conv2d, (x, tensor("weight"), tensor("bias"), conv.stride, conv.padding,
                                              conv.dilation, 1))
    if type(module) is nn.Linear:
        return g.call_function(F.linear, (x, tensor("weight"), tensor("bias")))
    if type(module) is nn.ReLU:
        return g.call_function(torch.relu_ if module.inplace else torch.relu, (x,))
    if type(module) is nn.MaxPool2d:
        pool: nn.MaxPool2d = module  # type: ignore[assignment]
        return g.call_function(F.max_pool2d, (x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                              pool.ceil_mode))
    if type(module) is nn.AdaptiveAvgPool2d:
        return g.call_function(F.adaptive_avg_pool2d, (x, module.output_size))
    return None


def _subsample(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    return x[:, :, ::stride[0], ::stride[1]]

