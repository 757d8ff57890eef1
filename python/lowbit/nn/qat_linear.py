"""QATLinear: an nn.Linear that trains through fake-quantized weights (and activations)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .fake_quantize import FakeQuantize


class QATLinear(nn.Linear):
    """y = fq_act(x) @ fq_weight(W).T + b, with W and b trainable float parameters.

    The weight fake quantization uses exactly the scale rule and code math of
    ``lowbit.quantize``, so ``lowbit.convert`` turns this layer into a
    QuantLinear with the same codes and scales.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: Optional[int] = None, activations: Optional[int] = None, learnable: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if activations not in (None, 8):
            raise ValueError(f"activations must be None or 8, got {activations!r}")
        scales = out_features * (1 if group_size is None else in_features // group_size)
        self.weight_fake_quant = FakeQuantize(bits, "weight", group_size, learnable=learnable, num_scales=scales)
        self.activation_fake_quant = FakeQuantize(8, "dynamic") if activations == 8 else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: Optional[int] = None,
                    activations: Optional[int] = None, learnable: bool = False) -> "QATLinear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, activations,
                  learnable, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            mod.weight.copy_(linear.weight)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quant is not None:
            x = self.activation_fake_quant(x)
        return nn.functional.linear(x, self.weight_fake_quant(self.weight), self.bias)
