"""Torch-facing functions that are not modules."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops  # noqa: F401  (registers torch.ops.lowbit)


def fake_quantize(x: torch.Tensor, scale: Union[float, torch.Tensor], zero_point: Union[int, torch.Tensor],
                  quant_min: int, quant_max: int, axis: Optional[int] = None, *, group_size: Optional[int] = None,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine (axis=None) / _per_channel_affine (axis=int)
    numerics on lowbit's kernel, with the straight-through input gradient.

    When ``scale`` or ``zero_point`` is a tensor that requires grad, they learn by
    LSQ exactly like ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``
    (the float zero point is rounded and clamped for the forward), the gradients
    multiplied by ``grad_factor``. ``group_size``: one scale per group of that many
    consecutive elements of the last axis (lowbit's extension).

    >>> import torch, lowbit
    >>> lowbit.fake_quantize(torch.tensor([0.3, -2.0]), 0.25, 0, -4, 3)
    tensor([ 0.2500, -1.0000])
    >>> s = torch.tensor([0.25], requires_grad=True)
    >>> lowbit.fake_quantize(torch.tensor([0.3, -2.0]), s, torch.tensor([0.0]), -4, 3).sum().backward()
    >>> s.grad
    tensor([-4.2000])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if group_size is not None and axis is not None:
        raise ValueError("give axis or group_size, not both")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    learnable = any(isinstance(t, torch.Tensor) and t.requires_grad for t in (scale, zero_point))
    scale_t = torch.as_tensor(scale, dtype=torch.float32) if not isinstance(scale, torch.Tensor) else scale
    zp_t = torch.as_tensor(zero_point) if not isinstance(zero_point, torch.Tensor) else zero_point
    if learnable:
        return torch.ops.lowbit.fake_quantize_learnable(x, scale_t.reshape(-1).float(), zp_t.reshape(-1).float(),
                                                        int(quant_min), int(quant_max), axis, group_size or 0,
                                                        float(grad_factor))
    zp_t = zp_t.reshape(-1)
    if zp_t.is_floating_point():
        if not torch.equal(zp_t, zp_t.round()):
            raise TypeError("zero_point must hold integers")
    return torch.ops.lowbit.fake_quantize(x, scale_t.reshape(-1).float(), zp_t.to(torch.int32), int(quant_min),
                                          int(quant_max), axis, group_size or 0)
