"""FakeQuantize: an observer plus fake quantization, for QAT."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.lowbit)
from ..calibrate.observers import make_observer
from ..calibrate.weights import group_params, qrange


def fake_quantize_per_token(x: torch.Tensor, static_scale: float = 0.0) -> torch.Tensor:
    """The int8 activation codes the W8A8 kernels use, in float: per row (token)
    scale amax / 127 (or one static scale), codes clamped to [-127, 127]."""
    rows = x.reshape(-1, x.shape[-1])
    if static_scale:
        scale = torch.full((rows.shape[0],), float(static_scale))
    else:
        amax = rows.detach().abs().amax(1).float()
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    y = torch.ops.lowbit.fake_quantize(rows, scale, torch.zeros(rows.shape[0], dtype=torch.int32), -127, 127, 0, 0)
    return y.reshape(x.shape)


class FakeQuantize(nn.Module):
    """Fake-quantizes its input with a scale (and zero point) it keeps.

    mode="weight": the scale follows lowbit's weight rule per channel (dim 0) or
      per group of the last dim: the signed largest-magnitude value maps to
      -2^(b-1), exactly what ``lowbit.quantize`` stores, so the converted integer
      layer has the same codes and scales.
    mode="activation": per-tensor symmetric int8 codes in [-127, 127] from an
      observer (min-max by default) while observing; mode="dynamic": a fresh
      per-row (token) scale amax / 127 at every call, what the W8A8 kernels do.

    ``enable_observer(False)`` freezes the scale; ``learnable=True`` makes scale
    (and zero point) parameters trained by LSQ (observing then only initialises
    them, on the first call). ``enable_fake_quant(False)`` passes x through.
    """

    def __init__(self, bits: int = 4, mode: str = "weight", group_size: Optional[int] = None,
                 symmetric: bool = True, learnable: bool = False, observer="minmax", num_scales: int = 1):
        super().__init__()
        if mode not in ("weight", "activation", "dynamic"):
            raise ValueError(f"mode must be 'weight', 'activation' or 'dynamic', got {mode!r}")
        if mode != "weight" and (bits != 8 or not symmetric):
            raise ValueError("activation fake quantization is symmetric int8 (the kernels' format)")
        if mode == "weight" and not symmetric:
            raise ValueError("QAT weights are symmetric (the kernels' signed codes)")
        if learnable and mode == "dynamic":
            raise ValueError("dynamic per-token scales are computed, not learned")
        self.bits, self.mode, self.group_size, self.learnable = bits, mode, group_size, learnable
        self.quant_min, self.quant_max = qrange(bits, True)
        if mode != "weight":
            self.quant_min = -self.quant_max  # [-127, 127]
        self.observer = make_observer(observer) if mode == "activation" else None
        # num_scales: channels or groups of the tensor it will see (sized up front so
        # a fresh module loads a trained state dict).
        if learnable:
            self.scale = nn.Parameter(torch.ones(num_scales))
            self.zero_point = nn.Parameter(torch.zeros(num_scales), requires_grad=False)
        else:
            self.register_buffer("scale", torch.ones(num_scales))
            self.register_buffer("zero_point", torch.zeros(num_scales, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("initialized", torch.tensor(False))

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled.fill_(bool(enabled))
        return self

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled.fill_(bool(enabled))
        return self

    # ------------------------------------------------------------ scales
    def _weight_scales(self, w: torch.Tensor) -> torch.Tensor:
        g = w.shape[-1] if self.group_size is None else self.group_size
        s, _ = group_params(w.detach().reshape(w.shape[0], -1, g), self.bits, True)
        # An all-zero group has scale 0 in storage; any scale gives the same zero codes here.
        return torch.where(s == 0, torch.ones_like(s), s).reshape(-1)

    def _layout(self, x: torch.Tensor) -> tuple:
        """(axis, group_size) of the op call."""
        if self.mode == "weight":
            return (0, 0) if self.group_size is None else (None, self.group_size)
        return None, 0

    def _update(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            if self.mode == "weight":
                s = self._weight_scales(x)
            else:
                self.observer(x)
                s = self.observer.qparams()[0].reshape(1)
            if self.scale.shape != s.shape:
                self.scale.data = torch.empty_like(s)
                self.zero_point.data = torch.zeros(s.shape, dtype=self.zero_point.dtype)
            self.scale.copy_(s)
            self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return fake_quantize_per_token(x) if bool(self.fake_quant_enabled) else x
        if bool(self.observer_enabled) and not (self.learnable and bool(self.initialized)):
            self._update(x)
        if not bool(self.fake_quant_enabled):
            return x
        axis, group = self._layout(x)
        if self.learnable:
            per_scale = x.numel() / self.scale.numel()
            factor = 1.0 / math.sqrt(per_scale * self.quant_max)  # LSQ's gradient scale
            return torch.ops.lowbit.fake_quantize_learnable(x, self.scale, self.zero_point, self.quant_min,
                                                            self.quant_max, axis, group, factor)
        return torch.ops.lowbit.fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                              axis, group)

    def extra_repr(self) -> str:
        g = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"int{self.bits} {self.mode}{g}{', learnable' if self.learnable else ''}"
