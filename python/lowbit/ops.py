"""Every torch.library op of lowbit, with its fake (meta) kernel and autograd.

This is the only file that knows torch.library. Tensors reach the kernels as
NumPy views (zero-copy for contiguous CPU tensors), so the compiled module never
links libtorch and one wheel serves every torch >= 2.4.

Ops (namespace ``lowbit``):
  quantize(x, bits, group_size, symmetric) -> (packed, scales, zero_points)
  dequantize(packed, scales, zero_points, k, bits, group_size, symmetric, dtype) -> x
  linear(x, data, scales, offsets, bias, n, k, bits, group_size, act_bits, act_scale, row_scales, levels) -> y
  linear_grad_input(grad, data, scales, offsets, n, k, bits, group_size, row_scales, levels) -> grad_x
  (scales float32 / float16, or int8 codes with row_scales float32 [tiles * 16]: formats.h "scale dtype")
  fake_quantize(x, scale, zero_point, quant_min, quant_max, axis, group_size) -> y  (STE gradient)
  fake_quantize_learnable(x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor) -> y
      (STE for x, LSQ gradients for scale and the float zero point)
``group_size`` 0 means one group per row; ``act_bits`` 0 means float activations.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .arrays import QArray, dequantize_array, quantize_array
from .fake_quant import fake_quantize_array, fake_quantize_backward_array
from .matmul import PackedWeights, dequantize_packed, matmul

__all__ = ["quantize", "dequantize", "linear", "linear_grad_input", "fake_quantize", "fake_quantize_grad",
           "fake_quantize_learnable", "fake_quantize_learnable_grad"]


def _np(t: Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (bfloat16 as uint16 bits)."""
    t = t.detach()
    if t.device.type != "cpu":
        raise ValueError(f"lowbit kernels run on the CPU; got a tensor on {t.device}")
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def _group(group_size: int, k: int):
    return None if group_size in (0, k) else group_size


def _packed(data, scales, offsets, n, k, bits, group_size, row_scales=None, levels=None) -> PackedWeights:
    g = _group(group_size, k)
    return PackedWeights._unchecked(_np(data), _np(scales), None if offsets is None else _np(offsets), (n, k),
                                    bits, g, offsets is None, None if row_scales is None else _np(row_scales),
                                    None if levels is None else _np(levels))


# ---------------------------------------------------------------- quantize / dequantize
@torch.library.custom_op("lowbit::quantize", mutates_args=())
def quantize(x: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize the last axis of x (float32/float16/bfloat16) as lowbit.quantize_array does;
    zero_points is empty for symmetric quantization."""
    if x.numel() == 0:
        return _empty_quant(x, bits, group_size, symmetric)
    arr = _np(x)
    q = quantize_array(arr, bits, _group(group_size, x.shape[-1]) if x.dim() else None, symmetric,
                       input_dtype="bfloat16" if x.dtype == torch.bfloat16 else None)
    zps = torch.from_numpy(q.zero_points) if q.zero_points is not None else torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(q.packed), torch.from_numpy(q.scales), zps


def _empty_quant(x, bits, group_size, symmetric):
    k = x.shape[-1] if x.dim() else 1
    rows = x.numel() // k if k else 0
    groups = 1 if group_size in (0, k) or k == 0 else k // group_size
    zp = torch.empty((0,) if symmetric else (rows, groups), dtype=torch.uint8)
    return (torch.empty((rows, (k * bits + 7) // 8), dtype=torch.uint8),
            torch.empty((rows, groups), dtype=torch.float32), zp)


@quantize.register_fake
def _(x, bits, group_size, symmetric):
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    groups = 1 if group_size in (0, k) else k // group_size
    zp = x.new_empty((0,) if symmetric else (rows, groups), dtype=torch.uint8)
    return (x.new_empty((rows, (k * bits + 7) // 8), dtype=torch.uint8),
            x.new_empty((rows, groups), dtype=torch.float32), zp)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(packed: Tensor, scales: Tensor, zero_points: Tensor, k: int, bits: int, group_size: int,
               symmetric: bool, dtype: torch.dtype) -> Tensor:
    """Float values [rows, k] of packed codes (see lowbit.dequantize_array)."""
    rows = packed.shape[0]
    if rows == 0 or k == 0:
        return torch.empty((rows, k), dtype=dtype)
    q = QArray(_np(packed), _np(scales).reshape(rows, -1), None if symmetric else _np(zero_points).reshape(rows, -1),
               (rows, k), bits, _group(group_size, k), symmetric)
    out = dequantize_array(q)
    return torch.from_numpy(out).to(dtype)


@dequantize.register_fake
def _(packed, scales, zero_points, k, bits, group_size, symmetric, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


# ---------------------------------------------------------------- linear
def linear_impl(x: Tensor, data: Tensor, scales: Tensor, offsets: Optional[Tensor], bias: Optional[Tensor],
                n: int, k: int, bits: int, group_size: int, act_bits: int, act_scale: float = 0.0,
                row_scales: Optional[Tensor] = None, levels: Optional[Tensor] = None) -> Tensor:
    """The body of lowbit::linear; QuantLinear calls it directly in eager inference,
    where the custom-op dispatch (~100 us) would cost more than a small layer."""
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the layer expects {k}")
    w = _packed(data, scales, offsets, n, k, bits, group_size, row_scales, levels)
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    y = matmul(_np(x2), w, act_bits=act_bits or None, bias=None if bias is None else _np(bias.float()),
               act_scale=act_scale or None)
    out = torch.from_numpy(y)
    return (out if x.dtype == torch.float32 else out.to(x.dtype)).reshape(*x.shape[:-1], n)


@torch.library.custom_op("lowbit::linear", mutates_args=())
def linear(x: Tensor, data: Tensor, scales: Tensor, offsets: Optional[Tensor], bias: Optional[Tensor],
           n: int, k: int, bits: int, group_size: int, act_bits: int, act_scale: float = 0.0,
           row_scales: Optional[Tensor] = None, levels: Optional[Tensor] = None) -> Tensor:
    """y = x @ dequant(W).T (+ bias) over tiled weights (lowbit.pack_weights), in x's dtype.
    act_scale > 0: static int8 activation scale (calibrated); 0: per-token dynamic.
    levels: int8 [16] level table of int4 codes (formats.h "level tables"), or None."""
    return linear_impl(x, data, scales, offsets, bias, n, k, bits, group_size, act_bits, act_scale, row_scales,
                       levels)


@linear.register_fake
def _(x, data, scales, offsets, bias, n, k, bits, group_size, act_bits, act_scale=0.0, row_scales=None,
      levels=None):
    torch._check(x.shape[-1] == k, lambda: f"x has {x.shape[-1]} features, the layer expects {k}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("lowbit::linear_grad_input", mutates_args=())
def linear_grad_input(grad: Tensor, data: Tensor, scales: Tensor, offsets: Optional[Tensor], n: int, k: int,
                      bits: int, group_size: int, row_scales: Optional[Tensor] = None,
                      levels: Optional[Tensor] = None) -> Tensor:
    """grad @ dequant(W): the input gradient of lowbit::linear (the weights stay frozen)."""
    w = torch.from_numpy(dequantize_packed(_packed(data, scales, offsets, n, k, bits, group_size, row_scales,
                                                   levels)))
    return (grad.reshape(-1, n).float() @ w).to(grad.dtype).reshape(*grad.shape[:-1], k)


@linear_grad_input.register_fake
def _(grad, data, scales, offsets, n, k, bits, group_size, row_scales=None, levels=None):
    return grad.new_empty((*grad.shape[:-1], k))


def _linear_setup(ctx, inputs, output):
    x, data, scales, offsets, bias, n, k, bits, group_size, act_bits, act_scale, row_scales, levels = inputs
    ctx.save_for_backward(data, scales, offsets, row_scales, levels)
    ctx.meta = (n, k, bits, group_size, bias is not None)


def _linear_backward(ctx, grad):
    data, scales, offsets, row_scales, levels = ctx.saved_tensors
    n, k, bits, group_size, has_bias = ctx.meta
    gx = torch.ops.lowbit.linear_grad_input(grad, data, scales, offsets, n, k, bits, group_size, row_scales, levels)
    gb = grad.reshape(-1, n).sum(0) if has_bias and ctx.needs_input_grad[4] else None
    return gx, None, None, None, gb, None, None, None, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- fake quantize
def _fq_layout(axis: Optional[int], group_size: int) -> dict:
    return dict(axis=axis, group_size=group_size or None)


@torch.library.custom_op("lowbit::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  axis: Optional[int], group_size: int = 0) -> Tensor:
    """torch.fake_quantize_per_{tensor,channel}_affine numerics on the Highway kernel
    (group_size > 0: one scale per group_size elements of the last axis)."""
    xf = x.float()
    out = fake_quantize_array(_np(xf), _np(scale.float()), _np(zero_point.to(torch.int32)), quant_min, quant_max,
                              **_fq_layout(axis, group_size))
    return torch.from_numpy(out).to(x.dtype)


@fake_quantize.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, group_size=0):
    return x.new_empty(x.shape)


@torch.library.custom_op("lowbit::fake_quantize_grad", mutates_args=())
def fake_quantize_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                       quant_max: int, axis: Optional[int], group_size: int = 0) -> Tensor:
    """Straight-through input gradient: grad where the code is inside [quant_min, quant_max]."""
    dx = fake_quantize_backward_array(_np(x.float()), _np(grad.float()), _np(scale.float()),
                                      _np(zero_point.to(torch.int32)), quant_min, quant_max,
                                      **_fq_layout(axis, group_size))
    return torch.from_numpy(dx).to(grad.dtype)


@fake_quantize_grad.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, group_size=0):
    return grad.new_empty(grad.shape)


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, group_size = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.meta = (quant_min, quant_max, axis, group_size)


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, group_size = ctx.meta
    dx = torch.ops.lowbit.fake_quantize_grad(grad, x, scale, zero_point, qmin, qmax, axis, group_size)
    return dx, None, None, None, None, None, None


fake_quantize.register_autograd(_fq_backward, setup_context=_fq_setup)


# ---------------------------------------------------------------- learnable (LSQ) fake quantize
def _rounded_zero_point(zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    # The learnable ops keep a float zero point and quantize with it rounded and
    # clamped, as torch._fake_quantize_learnable_* do.
    return zero_point.detach().float().round().clamp(quant_min, quant_max).to(torch.int32)


@torch.library.custom_op("lowbit::fake_quantize_learnable", mutates_args=())
def fake_quantize_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                            axis: Optional[int], group_size: int, grad_factor: float) -> Tensor:
    """Fake quantization whose scale and (float) zero point learn by LSQ, with the
    numerics of torch._fake_quantize_learnable_per_{tensor,channel}_affine."""
    return fake_quantize(x, scale.detach(), _rounded_zero_point(zero_point, quant_min, quant_max), quant_min,
                         quant_max, axis, group_size)


@fake_quantize_learnable.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor):
    return x.new_empty(x.shape)


@torch.library.custom_op("lowbit::fake_quantize_learnable_grad", mutates_args=())
def fake_quantize_learnable_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                                 quant_max: int, axis: Optional[int], group_size: int,
                                 grad_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero_point): STE for x; LSQ for scale and zero point:
    inside the range dscale = (fq(x) - x) / scale, below/above it qmin - zp / qmax - zp,
    dzero_point = -scale outside the range and 0 inside; summed per scale, times grad_factor.
    (+inf saturates to quant_max here, forward and backward alike; torch's learnable
    ops convert codes to int64 first and so treat +inf as below the range.)"""
    zp = _rounded_zero_point(zero_point, quant_min, quant_max)
    dx, ds, dz = fake_quantize_backward_array(_np(x.float()), _np(grad.float()), _np(scale.detach().float()),
                                              _np(zp), quant_min, quant_max, lsq=True,
                                              **_fq_layout(axis, group_size))
    dscale = torch.from_numpy(ds * grad_factor).to(scale.dtype).reshape(scale.shape)
    dzp = torch.from_numpy(dz * grad_factor).to(zero_point.dtype).reshape(zero_point.shape)
    return torch.from_numpy(dx).to(grad.dtype), dscale, dzp


@fake_quantize_learnable_grad.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor):
    return grad.new_empty(grad.shape), scale.new_empty(scale.shape), zero_point.new_empty(zero_point.shape)


def _fql_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.meta = (quant_min, quant_max, axis, group_size, grad_factor)


def _fql_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    dx, ds, dz = torch.ops.lowbit.fake_quantize_learnable_grad(grad, x, scale, zero_point, *ctx.meta)
    return dx, ds, dz, None, None, None, None, None


fake_quantize_learnable.register_autograd(_fql_backward, setup_context=_fql_setup)
