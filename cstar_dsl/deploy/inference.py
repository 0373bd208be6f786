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
   convs at batch size 1); a 1x1 conv runs as one matrix product (after subsampling its input
   when it is strided), which keeps aten from routing it to oneDNN's costly NCHW path when more
   than one thread is set; a narrow strided conv runs channels-last, and a max pool as
   element-wise maxima (2x2) or channels-last (any other), where aten's NCHW kernels are slow;
   identities and dropouts (identities in eval mode) go.

Every pass keeps the function: the outputs agree with the original model to float rounding
(``tests/deploy/test_inference.py`` bounds the difference by 1e-4). See docs/performance.md for what each
pass is worth.

``to_torchscript(model, example)`` goes one step further for export: the optimized graph, traced
and frozen with TorchScript, runs without the Python interpreter between ops (about 7 us an op at
batch size 1, a fifth of a heavily factorized ResNet-18's latency). TorchScript is deprecated in
recent PyTorch, so this is an export option, not a pass.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..model.factorized import conv_geometry
from ..model.inventory import replace_module, trace

# Strided convs with at most this many output channels run channels-last (see _channels_last_conv).
# Wider ones are dominated by their matrix product, which is as fast or faster in NCHW (ResNet-18's
# 256 -> 512 stride-2 conv: 0.58 ms NCHW, 0.80 ms channels-last).
NARROW_STRIDED = 96


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
                           merge: bool = True, lower: bool = True, matmul_1x1: bool = True,
                           report: InferenceReport | None = None) -> fx.GraphModule:
    """An eval-mode copy of ``model`` with batch norms folded, redundant 1x1 convs merged and
    module calls replaced by function calls (1x1 convs by matrix products unless ``matmul_1x1``
    is false). ``leaves`` are modules kept whole when tracing (the spec's ``model.leaf``). Meant
    for inference only: the folded batch norms cannot train again.
    """
    report = report if report is not None else InferenceReport()
    graph = trace(copy.deepcopy(model).eval(), leaves)
    with torch.no_grad():
        if fold_bn:
            report.folded_bn = _fold_batch_norms(graph)
        if merge:
            report.merged = _merge_pointwise(graph)
        if lower:
            report.lowered = _lower_to_functions(graph, matmul_1x1)
    graph.graph.eliminate_dead_code()
    graph.delete_all_unused_submodules()
    graph.graph.lint()
    graph.recompile()
    return graph.eval()


def to_torchscript(model: nn.Module, example: torch.Tensor, *, leaves: Iterable[str] = (),
                   report: InferenceReport | None = None) -> torch.jit.ScriptModule:
    """``optimize_for_inference(model)``, traced on ``example`` and frozen with TorchScript.

    The trace records the ops, not the shapes, so other batch sizes run too. TorchScript's
    deprecation warnings are silenced here: the result is for export and benchmarks.
    """
    fast = optimize_for_inference(model, leaves=leaves, report=report)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(torch.jit.trace(fast, example))


# ------------------------------------------------------------------- helpers


def _module(graph: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(node.target, str):
        return graph.get_submodule(node.target)
    return None


def _plain_conv(module: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    """An ungrouped, zero-padded Conv2d with numeric padding: what the passes know how to rewrite."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


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
        if type(conv) is not nn.Conv2d or len(source.users) != 1:
            continue
        replace_module(graph, source.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
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
        if not _plain_conv(a) or len(first.users) != 1 or not _worth_merging(a, b):
            continue
        replace_module(graph, second.target, _merged_conv(a, b))
        second.replace_input_with(first, first.args[0])
        graph.graph.erase_node(first)
        merged += 1
    return merged


def _worth_merging(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    if _one_by_one(a) and _one_by_one(b):  # MACs per output position: merged C_in C_out, apart
        stride = b.stride[0] * b.stride[1]  # C_in C_mid at each of b's input positions + C_mid C_out
        apart = a.in_channels * a.out_channels * stride + b.in_channels * b.out_channels
        return a.in_channels * b.out_channels <= apart
    if _pointwise(b):  # b(a(x)) with b a 1x1: free when b is square (C_out x C_out)
        return b.in_channels == b.out_channels
    if _pointwise(a) and a.bias is None:  # a 1x1 before a padded conv must have no bias
        return a.in_channels == a.out_channels
    return False


def _merged_conv(a: nn.Conv2d, b: nn.Conv2d) -> nn.Conv2d:
    """The single conv computing ``b(a(x))``, for the pairs ``_worth_merging`` accepts."""
    options: dict[str, Any] = {"device": b.weight.device, "dtype": b.weight.dtype}
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
    if bias is not None and conv.bias is not None:
        conv.bias.copy_(bias)
    return conv


def _like(geometry: nn.Conv2d, c_in: int, c_out: int, bias: bool, options: dict[str, Any]) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, **conv_geometry(geometry), bias=bias, **options)


def _bias_through(a: nn.Conv2d, b: nn.Conv2d) -> torch.Tensor | None:
    """The bias of b(a(x)) for b a 1x1 conv: B b_a + b_b."""
    if a.bias is None:
        return b.bias
    carried = b.weight[:, :, 0, 0] @ a.bias
    return carried if b.bias is None else carried + b.bias


# ------------------------------------------------------- lower to functions


def _lower_to_functions(graph: fx.GraphModule, matmul_1x1: bool) -> int:
    lowered = 0
    for node in list(graph.graph.nodes):
        module = _module(graph, node)
        if module is None or len(node.args) != 1 or node.kwargs:
            continue
        with graph.graph.inserting_before(node):
            new = _function_call(graph, node, module, matmul_1x1)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
        lowered += 1
    return lowered


def _function_call(graph: fx.GraphModule, node: fx.Node, module: nn.Module, matmul_1x1: bool) -> fx.Node | None:
    g, x = graph.graph, node.args[0]

    def tensor(field: str) -> fx.Node | None:
        value = getattr(module, field, None)
        return None if value is None else _buffer(graph, node, field, value.detach())

    if _plain_conv(module):
        conv = module
        if _one_by_one(conv) and conv.stride != (1, 1):  # subsample first, then an unstrided 1x1 conv
            x = g.call_function(_subsample, (x, conv.stride))
            if not matmul_1x1:
                return g.call_function(torch.conv2d, (x, tensor("weight"), tensor("bias")))
        if _one_by_one(conv) and matmul_1x1:
            weight = conv.weight.detach().flatten(1)[None]  # 1 x C_out x C_in
            bias = None if conv.bias is None else conv.bias.detach()[None, :, None]  # 1 x C_out x 1
            return g.call_function(_pointwise_conv, (x, _buffer(graph, node, "matrix", weight),
                                                     _buffer(graph, node, "column", bias)))
        if conv.stride != (1, 1) and conv.out_channels <= NARROW_STRIDED:
            weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
            return g.call_function(_channels_last_conv, (x, _buffer(graph, node, "weight", weight), tensor("bias"),
                                                         conv.stride, conv.padding, conv.dilation))
        return g.call_function(torch.conv2d, (x, tensor("weight"), tensor("bias"), conv.stride, conv.padding,
                                              conv.dilation, 1))
    if type(module) is nn.Linear:
        return g.call_function(F.linear, (x, tensor("weight"), tensor("bias")))
    if type(module) in (nn.Identity, nn.Dropout):  # what both compute in eval mode, the only mode here
        return x  # type: ignore[return-value]
    if type(module) is nn.ReLU:
        return g.call_function(torch.relu_ if module.inplace else torch.relu, (x,))
    if type(module) is nn.MaxPool2d and not module.return_indices:
        pool = module
        shape = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation))
        if shape == ((2, 2), (2, 2), (0, 0), (1, 1)) and not pool.ceil_mode:
            return g.call_function(_max_pool_2x2, (x,))
        return g.call_function(_max_pool, (x, *shape, pool.ceil_mode))
    if type(module) is nn.AdaptiveAvgPool2d:
        return g.call_function(F.adaptive_avg_pool2d, (x, module.output_size))
    return None


def _buffer(graph: fx.GraphModule, node: fx.Node, field: str, value: torch.Tensor | None) -> fx.Node | None:
    """``value`` as a buffer of the root module, read by a new get_attr node: one attribute lookup a call."""
    if value is None:
        return None
    name = base = f"_{str(node.target).replace('.', '_')}_{field}"
    suffix = 1
    while hasattr(graph, name):  # "a.b_c" and "a_b.c" flatten alike
        name, suffix = f"{base}_{suffix}", suffix + 1
    graph.register_buffer(name, value)
    return graph.graph.get_attr(name)


def _pointwise_conv(x: torch.Tensor, matrix: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 unstrided conv as one batched matrix product: ``matrix`` is 1 x C_out x C_in, ``column``
    the bias as 1 x C_out x 1. aten's conv would send a large batch-1 input to oneDNN whenever more
    than one thread is set, whose layout conversions cost more than the product itself."""
    if x.dim() == 3:  # an unbatched C x H x W input, as Conv2d accepts
        return _pointwise_conv(x[None], matrix, column)[0]
    n, _, h, w = x.shape
    flat = x.flatten(2)
    out = (torch.matmul(matrix, flat) if column is None
           else torch.baddbmm(column, matrix.expand(n, -1, -1), flat))
    return out.view(n, -1, h, w)


def _channels_last_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                        padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """A strided conv run on a channels-last copy of its input; the result stays channels-last,
    which every consumer accepts (a 1x1 conv lowered to a matrix product reads it as a transposed
    matrix, without a copy). aten's own NCHW kernel gathers a strided conv's input element by
    element; channels-last it copies whole channel vectors: a Tucker-2 core such as 20 -> 21
    channels, stride 2, on 32x32 takes 40-55 us there against 90-140 us in NCHW (one thread)."""
    return torch.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding, dilation)


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 2)`` as two element-wise maxima: of row pairs, then of column pairs (a
    trailing odd row or column dropped, as the pool drops it).

    aten's batch-1 NCHW max pooling reads its input one window at a time: 0.45-0.5 ms for a 2x2
    pool of 64 x 32 x 32 on one thread, more than the factorized convs around it; the two maxima
    take 35 us and give the same values (a maximum is exact). No branch on the shape, so a
    TorchScript trace of it runs at every input size."""
    rows = torch.maximum(x[..., 0:-1:2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0:-1:2], rows[..., 1::2])


def _max_pool(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], ceil_mode: bool) -> torch.Tensor:
    """``max_pool2d`` run channels-last: aten's channels-last kernel is vectorized over channels,
    its NCHW one is not (ResNet's 3x3 stride-2 pool of 64 x 112 x 112: 10 ms NCHW, 1.5 ms
    converted to channels-last and back, on one thread)."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation,
                          ceil_mode)
    return pooled.contiguous()


def _subsample(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    return x[:, :, ::stride[0], ::stride[1]]

