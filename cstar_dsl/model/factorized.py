"""Factorized layers: low-rank Linear (SVD) and Tucker-2 Conv2d modules that run as small dense ops."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .decompose import Tucker2Factors, truncated_svd, tucker2, tucker2_to_dense


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """``conv``'s kernel size, stride, padding and dilation, as keyword arguments for a new Conv2d."""
    # Keywords, not the attributes themselves: torch types them as tuples of any length, while
    # Conv2d's constructor takes pairs, which these always are.
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation}


class LowRankLinear(nn.Module):
    """A Linear layer of rank ``rank``: in -> rank -> out, the bias on the second map.

    Parameters: rank * (in + out) (+ out for the bias), against in * out dense.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``layer`` (exact when rank = min(in, out))."""
        weight = layer.weight
        module = cls(layer.in_features, layer.out_features, rank, layer.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        factors = truncated_svd(weight, rank)
        with torch.no_grad():
            module.first.weight.copy_(factors.right)
            module.second.weight.copy_(factors.left)
            if layer.bias is not None:
                module.second.bias.copy_(layer.bias)
        return module

    def to_dense(self) -> nn.Linear:
        """The dense Linear layer this one computes."""
        weight = self.second.weight
        layer = nn.Linear(self.in_features, self.out_features, self.second.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.second.weight @ self.first.weight)
            if self.second.bias is not None:
                layer.bias.copy_(self.second.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class Tucker2Conv2d(nn.Module):
    """A Conv2d in Tucker-2 form: 1x1 (C_in -> r_in), k x k (r_in -> r_out), 1x1 (r_out -> C_out).

    The k x k conv keeps the original stride, padding and dilation; the last 1x1 conv carries the
    bias. Parameters: C_in*r_in + r_out*r_in*k*k + C_out*r_out.
    """

    def __init__(self, dense: nn.Conv2d, ranks: tuple[int, int]) -> None:
        super().__init__()
        if dense.groups != 1:
            raise ValueError(f"Tucker-2 needs an ungrouped conv, got groups={dense.groups}")
        r_out, r_in = ranks
        options: dict[str, Any] = {"device": dense.weight.device, "dtype": dense.weight.dtype}
        self.in_channels, self.out_channels, self.ranks = dense.in_channels, dense.out_channels, (r_out, r_in)
        self.compress = nn.Conv2d(dense.in_channels, r_in, 1, bias=False, **options)
        self.core = nn.Conv2d(r_in, r_out, **conv_geometry(dense), padding_mode=dense.padding_mode, bias=False,
                              **options)
        self.expand = nn.Conv2d(r_out, dense.out_channels, 1, bias=dense.bias is not None, **options)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, ranks: tuple[int, int], sweeps: int = 0) -> Tucker2Conv2d:
        """Tucker-2 of ``layer`` at ``ranks = (r_out, r_in)`` (HOSVD, then ``sweeps`` HOOI sweeps)."""
        module = cls(layer, ranks)
        factors = tucker2(layer.weight, ranks, sweeps)
        with torch.no_grad():
            module.compress.weight.copy_(factors.in_basis.T[:, :, None, None])
            module.core.weight.copy_(factors.core)
            module.expand.weight.copy_(factors.out_basis[:, :, None, None])
            if layer.bias is not None and module.expand.bias is not None:
                module.expand.bias.copy_(layer.bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        """The C_out x C_in x k x k weight the three convs compute together."""
        factors = Tucker2Factors(self.core.weight, self.expand.weight[:, :, 0, 0], self.compress.weight[:, :, 0, 0].T)
        return tucker2_to_dense(factors)

    def to_dense(self) -> nn.Conv2d:
        """The dense Conv2d layer this one computes."""
        core = self.core
        layer = nn.Conv2d(self.in_channels, self.out_channels, **conv_geometry(core), padding_mode=core.padding_mode,
                          bias=self.expand.bias is not None, device=core.weight.device, dtype=core.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.expand.bias is not None and layer.bias is not None:
                layer.bias.copy_(self.expand.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.core(self.compress(x)))

    def extra_repr(self) -> str:
        r_out, r_in = self.ranks
        kernel = self.core.kernel_size
        return f"{self.in_channels}, {self.out_channels}, kernel_size={kernel}, ranks=(out={r_out}, in={r_in})"
