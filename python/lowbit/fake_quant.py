"""Fake quantization on NumPy arrays: the numeric core that QAT binds to torch.

Forward and straight-through mask follow ``torch.fake_quantize_per_tensor_affine``
(``axis=None``) and ``torch.fake_quantize_per_channel_affine`` (``axis=int``);
``group_size`` (scales per G consecutive elements of the last axis) is lowbit's
extension.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _C
from ._dtypes import contiguous

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _layout(x: np.ndarray, scale, zero_point, axis, group_size):
    """(outer, channels, inner, scales, zero points) for the kernel's [outer, C, inner] view."""
    s = np.atleast_1d(np.asarray(scale, np.float32)).reshape(-1)
    z = np.atleast_1d(np.asarray(zero_point))
    if z.dtype.kind not in "iu" and not (z.dtype.kind == "f" and np.all(z == np.round(z))):
        raise TypeError("zero_point must hold integers")
    if z.size and (z.min() < INT32_MIN or z.max() > INT32_MAX):
        raise ValueError(f"zero_point must lie in the int32 range, got values in [{z.min()}, {z.max()}]")
    z = z.astype(np.int32).reshape(-1)
    if axis is not None and group_size is not None:
        raise ValueError("give axis or group_size, not both")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if x.ndim == 0 or x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last axis of x")
        outer, channels, inner = 1, x.size // group_size, int(group_size)
    elif axis is None:
        outer, channels, inner = 1, 1, x.size
    else:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} out of range for x with ndim {x.ndim}")
        axis %= x.ndim
        outer = int(np.prod(x.shape[:axis], dtype=np.int64))
        channels = x.shape[axis]
        inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    if s.size != channels:
        raise ValueError(f"scale must have {channels} elements, got {s.size}")
    if z.size != channels:
        raise ValueError(f"zero_point must have {channels} elements, got {z.size}")
    # Like torch's fake_quantize_* ops, any finite non-zero scale works; a negative
    # one mirrors the codes (lowbit's symmetric rule produces them).
    if not np.all(np.isfinite(s)) or not np.all(s != 0):
        raise ValueError("scale must be finite and non-zero")
    return outer, channels, inner, np.ascontiguousarray(s), np.ascontiguousarray(z)


def _check(x, quant_min, quant_max):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"x must be a float32 NumPy array, got {getattr(x, 'dtype', type(x).__name__)}")
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if not INT32_MIN <= v <= INT32_MAX:  # the kernels' codes are int32
            raise ValueError(f"{name} must lie in the int32 range [{INT32_MIN}, {INT32_MAX}], got {v}")
    if quant_min > quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be <= quant_max ({quant_max})")
    return contiguous(x)


def fake_quantize_array(x, scale, zero_point, quant_min: int, quant_max: int, axis=None,
                        group_size=None, return_mask: bool = False):
    """(clamp(zp + round(x / scale), qmin, qmax) - zp) * scale, torch's arithmetic.

    Returns the fake-quantized float32 array, and with ``return_mask`` also the
    straight-through mask (True where qmin <= zp + round(x/scale) <= qmax).

    >>> import numpy as np, lowbit
    >>> lowbit.fake_quantize_array(np.array([0.3, -2.0], np.float32), 0.25, 0, -4, 3).tolist()
    [0.25, -1.0]
    """
    x = _check(x, quant_min, quant_max)
    outer, channels, inner, s, z = _layout(x, scale, zero_point, axis, group_size)
    out = np.empty_like(x)
    mask = np.empty(x.shape, np.bool_) if return_mask else None
    if x.size and not _C.fake_quant_forward(x, outer, channels, inner, s, z, int(quant_min),
                                            int(quant_max), out, mask):
        raise ValueError("x contains NaN")
    return (out, mask) if return_mask else out


def fake_quantize_backward_array(x, grad, scale, zero_point, quant_min: int, quant_max: int,
                                 axis=None, group_size=None, lsq: bool = False):
    """Straight-through input gradient: grad where the code is in range, else 0.

    ``lsq=True`` also returns the LSQ sums per scale (float64, before any grad
    factor): (dx, dscale, dzero_point), see ``csrc/lowbit/kernels.h``.
    """
    x = _check(x, quant_min, quant_max)
    if not isinstance(grad, np.ndarray) or grad.dtype != np.float32 or grad.shape != x.shape:
        raise TypeError("grad must be a float32 array shaped like x")
    outer, channels, inner, s, z = _layout(x, scale, zero_point, axis, group_size)
    dx = np.empty_like(x)
    ds = np.zeros(channels, np.float64) if lsq else None
    dz = np.zeros(channels, np.float64) if lsq else None
    if x.size:
        _C.fake_quant_backward(x, contiguous(grad), outer, channels, inner, s, z,
                               int(quant_min), int(quant_max), dx, ds, dz)
    return (dx, ds, dz) if lsq else dx
