"""Factorized layers (cstar_dsl/model/factorized.py): LowRankLinear (SVD) and Tucker2Conv2d.

At full rank a factorized layer computes exactly what the dense layer does, for every stride,
padding and dilation, with and without bias; ``to_dense`` gives that dense layer back; the
parameter counts are the formulas planning uses (``plan.factorized_params``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar_dsl.model.factorized import LowRankLinear, Tucker2Conv2d
from cstar_dsl.plan.allocate import factorized_params, full_ranks
from cstar_dsl.plan.layers import LayerInfo

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _weight_params(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight"))


def _info(layer: nn.Linear | nn.Conv2d) -> LayerInfo:
    if isinstance(layer, nn.Conv2d):
        return LayerInfo("layer", "Conv2d", layer.in_channels, layer.out_channels, tuple(layer.kernel_size),
                         layer.groups, 1, 1, 1, ())
    return LayerInfo("layer", "Linear", layer.in_features, layer.out_features, (1, 1), 1, 1, 1, 1, ())


# -------------------------------------------------------------- LowRankLinear


@pytest.mark.parametrize(("in_features", "out_features"), [(20, 12), (12, 20), (16, 16), (1, 5), (7, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_matches_the_dense_layer(in_features, out_features, bias):
    dense = nn.Linear(in_features, out_features, bias=bias)
    low = LowRankLinear.from_dense(dense, min(in_features, out_features))
    x = torch.randn(4, in_features)
    torch.testing.assert_close(low(x), dense(x), **TOLERANCE)
    assert (low.second.bias is not None) == bias


def test_linear_works_on_token_inputs():
    dense = nn.Linear(10, 6)
    low = LowRankLinear.from_dense(dense, 6)
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(low(x), dense(x), **TOLERANCE)


def test_low_rank_linear_is_the_best_rank_r_approximation():
    dense = nn.Linear(12, 9)
    low = LowRankLinear.from_dense(dense, 3)
    singular = torch.linalg.svdvals(dense.weight.detach())
    error = torch.linalg.norm(low.to_dense().weight - dense.weight).item()
    assert error == pytest.approx(singular[3:].square().sum().sqrt().item(), rel=1e-4)
    torch.testing.assert_close(low.to_dense().bias, dense.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense_round_trip(bias):
    dense = nn.Linear(10, 8, bias=bias)
    back = LowRankLinear.from_dense(dense, 8).to_dense()
    assert isinstance(back, nn.Linear) and (back.in_features, back.out_features) == (10, 8)
    torch.testing.assert_close(back.weight, dense.weight, **TOLERANCE)
    assert (back.bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(back.bias, dense.bias)
    low = LowRankLinear(10, 8, 3, bias=bias)  # any factorized layer, not only one from a dense one
    x = torch.randn(5, 10)
    torch.testing.assert_close(low.to_dense()(x), low(x), **TOLERANCE)


@pytest.mark.parametrize(("in_features", "out_features", "rank"), [(20, 12, 4), (64, 10, 10), (5, 50, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_parameter_count_is_the_planning_formula(in_features, out_features, rank, bias):
    dense = nn.Linear(in_features, out_features, bias=bias)
    low = LowRankLinear.from_dense(dense, rank)
    assert _weight_params(low) == factorized_params(_info(dense), (rank,)) == rank * (in_features + out_features)
    assert sum(p.numel() for p in low.parameters()) == rank * (in_features + out_features) + out_features * bias


def test_linear_extra_repr_shows_the_rank():
    low = LowRankLinear.from_dense(nn.Linear(20, 12), 5)
    assert low.extra_repr() == "in_features=20, out_features=12, rank=5"
    assert "rank=5" in repr(low)


def test_linear_keeps_device_and_float64():
    dense = nn.Linear(9, 7, dtype=torch.float64)
    low = LowRankLinear.from_dense(dense, 7)
    assert {p.dtype for p in low.parameters()} == {torch.float64}
    assert {p.device for p in low.parameters()} == {dense.weight.device}
    x = torch.randn(3, 9, dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-10, atol=1e-12)
    back = low.to_dense()
    assert back.weight.dtype == torch.float64 and back.weight.device == dense.weight.device


# -------------------------------------------------------------- Tucker2Conv2d


CONV_VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"padding": 1}, id="padding"),
    pytest.param({"stride": 2, "padding": 1}, id="stride2"),
    pytest.param({"stride": (2, 1), "padding": (0, 2)}, id="asymmetric-stride-padding"),
    pytest.param({"dilation": 2, "padding": 2}, id="dilation"),
    pytest.param({"dilation": (1, 2), "stride": 3}, id="asymmetric-dilation"),
    pytest.param({"padding": "same", "dilation": 2}, id="padding-same"),
    pytest.param({"padding": 1, "padding_mode": "reflect"}, id="reflect"),
    pytest.param({"padding": 1, "padding_mode": "circular"}, id="circular"),
    pytest.param({"padding": 2, "padding_mode": "replicate", "stride": 2}, id="replicate"),
]


@pytest.mark.parametrize("options", CONV_VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("in_channels", "out_channels", "kernel"), [(6, 10, 3), (12, 5, 3), (4, 4, (3, 1))])
def test_full_rank_conv_matches_the_dense_layer(options, bias, in_channels, out_channels, kernel):
    dense = nn.Conv2d(in_channels, out_channels, kernel, bias=bias, **options)
    tucker = Tucker2Conv2d.from_dense(dense, (out_channels, in_channels))
    x = torch.randn(2, in_channels, 11, 9)
    expected = dense(x)
    assert tucker(x).shape == expected.shape
    torch.testing.assert_close(tucker(x), expected, **TOLERANCE)
    assert (tucker.expand.bias is not None) == bias


def test_conv_sublayers_keep_the_geometry():
    dense = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
    tucker = Tucker2Conv2d.from_dense(dense, (4, 3))
    assert (tucker.compress.kernel_size, tucker.expand.kernel_size) == ((1, 1), (1, 1))
    core = tucker.core
    assert (core.in_channels, core.out_channels, core.kernel_size) == (3, 4, (3, 5))
    assert (core.stride, core.padding, core.dilation, core.padding_mode) == ((2, 1), (1, 2), (1, 2), "reflect")
    assert tucker.compress.bias is None and core.bias is None and tucker.expand.bias is not None


def test_full_rank_1x1_conv_matches():
    dense = nn.Conv2d(16, 8, 1)
    tucker = Tucker2Conv2d.from_dense(dense, (8, 16))
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(tucker(x), dense(x), **TOLERANCE)


@pytest.mark.parametrize("sweeps", [0, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_to_dense_round_trip(sweeps, bias):
    dense = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, bias=bias)
    back = Tucker2Conv2d.from_dense(dense, (10, 6), sweeps).to_dense()
    assert isinstance(back, nn.Conv2d)
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(back, attribute) == getattr(dense, attribute), attribute
    torch.testing.assert_close(back.weight, dense.weight, **TOLERANCE)
    assert (back.bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(back.bias, dense.bias)


def test_low_rank_conv_to_dense_computes_the_same_function():
    dense = nn.Conv2d(8, 12, 3, padding=1, dilation=1, stride=1)
    tucker = Tucker2Conv2d.from_dense(dense, (5, 3), sweeps=1)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(tucker.to_dense()(x), tucker(x), **TOLERANCE)
    torch.testing.assert_close(tucker.dense_weight(), tucker.to_dense().weight)


@pytest.mark.parametrize(("in_channels", "out_channels", "kernel", "ranks"), [
    (16, 32, 3, (8, 4)), (64, 64, 1, (10, 20)), (3, 16, (5, 3), (16, 3)), (7, 5, 3, (1, 1)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_parameter_count_is_the_planning_formula(in_channels, out_channels, kernel, ranks, bias):
    dense = nn.Conv2d(in_channels, out_channels, kernel, bias=bias)
    tucker = Tucker2Conv2d.from_dense(dense, ranks)
    r_out, r_in = ranks
    area = dense.kernel_size[0] * dense.kernel_size[1]
    formula = in_channels * r_in + r_out * r_in * area + out_channels * r_out
    assert _weight_params(tucker) == factorized_params(_info(dense), ranks) == formula
    assert sum(p.numel() for p in tucker.parameters()) == formula + out_channels * bias


def test_full_ranks_of_planning_are_what_reconstructs():
    conv, linear = nn.Conv2d(6, 10, 3), nn.Linear(12, 5)
    assert full_ranks(_info(conv)) == (10, 6) and full_ranks(_info(linear)) == (5,)
    x = torch.randn(1, 6, 8, 8)
    torch.testing.assert_close(Tucker2Conv2d.from_dense(conv, full_ranks(_info(conv)))(x), conv(x), **TOLERANCE)


def test_conv_extra_repr_shows_the_ranks():
    tucker = Tucker2Conv2d.from_dense(nn.Conv2d(16, 32, 3), (8, 4))
    assert tucker.extra_repr() == "16, 32, kernel_size=(3, 3), ranks=(out=8, in=4)"
    assert "ranks=(out=8, in=4)" in repr(tucker)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_is_refused(groups):
    with pytest.raises(ValueError, match=f"groups={groups}"):
        Tucker2Conv2d.from_dense(nn.Conv2d(8, 8, 3, groups=groups), (4, 4))


def test_depthwise_conv_is_refused():
    with pytest.raises(ValueError, match="ungrouped"):
        Tucker2Conv2d(nn.Conv2d(8, 8, 3, groups=8), (2, 2))


def test_conv_keeps_device_and_float64():
    dense = nn.Conv2d(5, 7, 3, padding=1, dtype=torch.float64)
    tucker = Tucker2Conv2d.from_dense(dense, (7, 5), sweeps=1)
    assert {p.dtype for p in tucker.parameters()} == {torch.float64}
    assert {p.device for p in tucker.parameters()} == {dense.weight.device}
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(tucker(x), dense(x), rtol=1e-10, atol=1e-12)
    back = tucker.to_dense()
    assert back.weight.dtype == torch.float64 and back.weight.device == dense.weight.device


def test_from_dense_does_not_share_or_change_the_dense_weights():
    dense = nn.Conv2d(6, 8, 3)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tucker = Tucker2Conv2d.from_dense(dense, (8, 6))
    with torch.no_grad():
        for parameter in tucker.parameters():
            parameter.add_(1.0)
    for key, value in dense.state_dict().items():
        assert torch.equal(value, before[key])


def test_factorized_layers_are_trainable():
    tucker = Tucker2Conv2d.from_dense(nn.Conv2d(4, 6, 3), (3, 2))
    low = LowRankLinear.from_dense(nn.Linear(6, 3), 2)
    out = low(tucker(torch.randn(2, 4, 5, 5)).mean(dim=(2, 3)))
    out.sum().backward()
    assert all(p.grad is not None for p in (*tucker.parameters(), *low.parameters()))
