"""Layer facts: what planning knows about one Linear or Conv2d layer (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerInfo:
    """A Linear or Conv2d layer as planning sees it; ``energies`` are normalized squared spectra
    (one tuple per decomposed mode: output then input channels for a conv, one for a Linear)."""

    name: str
    type_name: str
    in_features: int
    out_features: int
    kernel: tuple[int, int]
    groups: int
    calls: int
    in_positions: int  # spatial positions (or tokens) the layer's input has, per sample
    out_positions: int  # the same for its output
    energies: tuple[tuple[float, ...], ...]
    produces_output: bool = False  # its result is the model's output (the logits of a classifier)

    @property
    def is_conv(self) -> bool:
        return self.type_name == "Conv2d"

    @property
    def params(self) -> int:
        """Weight parameters (biases are left out, as in the compression ratio)."""
        return self.out_features * self.in_features * self.kernel[0] * self.kernel[1] // self.groups

    @property
    def macs(self) -> int:
        return self.params * self.out_positions

    @property
    def shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features // self.groups, *self.kernel)
        return (self.out_features, self.in_features)
