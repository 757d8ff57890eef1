"""Torch-facing functions that are not modules."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops  # noqa: F401  (registers torch.ops.lowbit)


def fake_quantize(x: torch.Tensor, scale: Union[float, torch.Tensor], zero_point: Union[int, torch.Tensor],
                  quant_min: int, quant_max: int, axis: Optional[int] = None) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine (axis=None) / _per_channel_affine (axis=int)
    numerics on lowbit's kernel, with the straight-through input gradient.

    >>> import torch, lowbit
    >>> lowbit.fake_quantize(torch.tensor([0.3, -2.0]), 0.25, 0, -4, 3)
    tensor([ 0.2500, -1.0000])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    zero_point = torch.as_tensor(zero_point).reshape(-1)
    if zero_point.is_floating_point():
        if not torch.equal(zero_point, zero_point.round()):
            raise TypeError("zero_point must hold integers")
    zero_point = zero_point.to(torch.int32)
    return torch.ops.lowbit.fake_quantize(x, scale, zero_point, int(quant_min), int(quant_max), axis)
