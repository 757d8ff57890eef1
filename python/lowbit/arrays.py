"""The NumPy API: QArray, quantize_array, dequantize_array (needs only NumPy)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from . import _C
from ._dtypes import FLAG_OF, dtype_name, float_input, rows_view
from .reference import _as_f32

SUPPORTED_BITS = (2, 4, 8)
GroupSize = Union[None, int, str]


@dataclass(frozen=True, eq=False)
class QArray:
    """A quantized array: packed codes plus scales (and zero points).

    Layout (``csrc/lowbit/formats.h``): ``packed`` is uint8 [R, ceil(K*bits/8)]
    for the R = prod(shape[:-1]) rows of K = shape[-1] elements; ``scales`` is
    float32 [R, K // group] (per group), [R, 1] (per row) or [1] (per tensor);
    ``zero_points`` is uint8 of the same shape for asymmetric arrays, else None.

    The first ``lowbit.matmul(x, q)`` builds the matmul kernels' tiled copy of the
    codes (``lowbit.pack_weights``) and keeps it with the array, so later calls
    cost the same as passing PackedWeights. The copy is about as large as the
    codes and scales again; ``tiles_nbytes`` reports it (``nbytes`` stays the
    quantized storage) and ``drop_tiles()`` frees it. While it is kept, the
    arrays are read-only, so an edit cannot leave the two copies disagreeing;
    ``quantize_array(..., out=q)`` drops the copy and rewrites the arrays.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: Optional[np.ndarray]
    shape: tuple
    bits: int
    group_size: GroupSize  # None: per row; int: per group; "tensor": one scale
    symmetric: bool
    dtype: str = "float32"  # the float dtype that was quantized

    def __post_init__(self):
        # Hand-built QArrays reach the kernels too: a field of the wrong kind or
        # size must fail here, naming it, not deep inside a binding.
        shape = self.shape
        if type(shape) is not tuple or not shape or not all(_is_size(d) and d >= 0 for d in shape):
            raise TypeError(f"QArray.shape must be a non-empty tuple of sizes, got {shape!r}")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QArray.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if type(self.symmetric) is not bool and not isinstance(self.symmetric, np.bool_):
            raise TypeError(f"QArray.symmetric must be a bool, got {self.symmetric!r}")
        k = int(shape[-1])
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        group = self.group_size
        if not (group is None or group == "tensor" or (_is_size(group) and group > 0 and k % group == 0)):
            raise ValueError(f"QArray.group_size must be None, 'tensor' or a positive divisor of K={k}, got {group!r}")
        _field(self.packed, "packed", U8, (rows, (k * self.bits + 7) // 8))
        sshape = (1,) if group == "tensor" else (rows, 1 if group is None or k == 0 else k // group)
        _field(self.scales, "scales", F32, sshape)
        if self.symmetric:
            if self.zero_points is not None:
                raise ValueError("QArray.zero_points must be None when symmetric")
        else:
            _field(self.zero_points, "zero_points", U8, sshape)
        if self.dtype not in FLAG_OF:
            raise ValueError(f"QArray.dtype must be one of {tuple(FLAG_OF)}, got {self.dtype!r}")

    @property
    def size(self) -> int:
        """Number of quantized elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zero points."""
        n = self.packed.nbytes + self.scales.nbytes
        return n + (self.zero_points.nbytes if self.zero_points is not None else 0)

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per element, scales (float32) and zero points included."""
        return 8.0 * self.nbytes / self.size

    @property
    def tiles_nbytes(self) -> int:
        """Bytes of the matmul tiles kept since the first ``lowbit.matmul`` (0 if none)."""
        tiles = self._kept_tiles()
        return 0 if tiles is None else tiles.nbytes

    def drop_tiles(self) -> None:
        """Free the kept matmul tiles and make the arrays writable again."""
        self.__dict__.pop("_tiles", None)
        for a in self.__dict__.pop("_locked", ()):
            a.flags.writeable = True

    def _keep_tiles(self, tiles) -> None:
        # Read-only while the tiled copy lives: a write through q.packed would
        # otherwise be silently ignored by every later matmul.
        arrays = (self.packed, self.scales) + (() if self.zero_points is None else (self.zero_points,))
        locked = [a for a in arrays if a.flags.writeable]
        for a in locked:
            a.flags.writeable = False
        object.__setattr__(self, "_tiles", tiles)
        object.__setattr__(self, "_locked", locked)

    def _kept_tiles(self):
        return self.__dict__.get("_tiles")

    def codes(self) -> np.ndarray:
        """The integer codes, unpacked, shaped like the original array
        (int8 when symmetric, uint8 otherwise)."""
        k = self.shape[-1]
        out = np.empty((self.packed.shape[0], k), np.int8 if self.symmetric else np.uint8)
        _C.unpack_codes(self.packed, k, self.bits, self.symmetric, out)
        return out.reshape(self.shape)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """Same as ``lowbit.dequantize_array(self, dtype)``."""
        return dequantize_array(self, dtype)

    def __repr__(self) -> str:
        g = {None: "per-row", "tensor": "per-tensor"}.get(self.group_size, f"group {self.group_size}")
        kind = "sym" if self.symmetric else "asym"
        return (f"QArray(shape={self.shape}, int{self.bits} {kind}, {g}, "
                f"{self.bits_per_weight:.3f} bits/weight, {self.nbytes} bytes)")


def _field(a, name: str, dtype: np.dtype, shape) -> None:
    # Identity first: the dtype objects of native arrays are singletons (~0.1 us
    # against ~0.5 us for ==, and the torch ops build these per call).
    if not isinstance(a, np.ndarray) or (a.dtype is not dtype and a.dtype != dtype):
        raise TypeError(f"{name} must be a {dtype.name} NumPy array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def _is_size(d) -> bool:
    return type(d) is int or (isinstance(d, numbers.Integral) and not isinstance(d, bool))


U8, I32, F32 = np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.float32)
F16, I8 = np.dtype(np.float16), np.dtype(np.int8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int in {SUPPORTED_BITS}, got {bits!r}")
    if int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return int(bits)


def _check_group(group_size, k: int) -> GroupSize:
    if group_size is None or group_size == "tensor":
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be None, a positive int or 'tensor', got {group_size!r}")
    g = int(group_size)
    if g <= 0:
        raise ValueError(f"group_size must be positive, got {g}")
    if k % g != 0:
        raise ValueError(f"group_size {g} does not divide the last axis K={k}")
    return g


def _scale_shape(rows: int, k: int, group_size: GroupSize) -> tuple:
    if group_size == "tensor":
        return (1,)
    return (rows, k // (k if group_size is None else group_size))


SCALE_METHODS = ("rtn", "mse")
SCALE_DTYPES = ("float32", "float16", "int8")
F16_MAX = 65504.0
F16_TINY = float(np.float16(2.0 ** -24))  # the smallest positive float16 (subnormal)


def _f16_scales(scales: np.ndarray) -> np.ndarray:
    """float32 scales rounded to the nearest float16 value (returned as float32).
    A nonzero scale below float16's smallest step keeps its sign and becomes that
    step (its group's codes are then recomputed under it: tiny weights flush
    towards 0, by at most 8 * 2^-24 per weight for int4); one beyond float16's
    range is an error, since the group's values would not be representable."""
    s = np.asarray(scales, np.float32)
    big = np.abs(s) > F16_MAX
    if big.any():
        raise ValueError(f"scale_dtype='float16': a scale of {float(np.abs(s).max()):.4g} is beyond float16's "
                         f"{F16_MAX:g} (weights this large need scale_dtype='float32')")
    r = s.astype(np.float16).astype(np.float32)
    lost = (r == 0) & (s != 0)
    if lost.any():
        r[lost] = np.copysign(np.float32(F16_TINY), s[lost])
    return r


def _round_significand(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 x rounded to `bits` significant bits (nearest, ties away), exponent kept."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    drop = 24 - bits
    u = (u + np.uint32(1 << (drop - 1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return u.view(np.float32)


def int8_scale_codes(scales: np.ndarray) -> tuple:
    """(codes int8 [R, G], row scales float32 [R]) of float32 scales [R, G] in the
    int8 scale format (formats.h "scale dtype"): d = max |s| / 127 of the row,
    rounded to 11 significant bits so every c * d is exact in float32, and
    c = round(s / d) in [-127, 127]."""
    s = np.asarray(scales, np.float32)
    d = _round_significand(np.abs(s).max(axis=1) / np.float32(127), 11)
    safe = np.where(d > 0, d, np.float32(1))
    codes = np.clip(np.rint(s / safe[:, None]), -127, 127).astype(np.int8)
    return codes, d


def _int8_scales(scales: np.ndarray) -> np.ndarray:
    """Scales [R, G] as the int8 format stores them (c * d per row), float32."""
    codes, d = int8_scale_codes(scales)
    return codes.astype(np.float32) * d[:, None]


def _rounded_scales(scales: np.ndarray, scale_dtype: str) -> np.ndarray:
    """scales [R, G] (or [1]) as ``scale_dtype`` stores them, float32 values."""
    if scale_dtype == "float16":
        return _f16_scales(scales)
    if scale_dtype == "int8":
        return _int8_scales(np.asarray(scales).reshape(len(scales), -1)).reshape(np.shape(scales))
    return np.asarray(scales, np.float32)


def quantize_array(x, bits: int = 8, group_size: GroupSize = None, symmetric: bool = True, *,
                   scale=None, zero_point=None, input_dtype=None, out: Optional[QArray] = None,
                   method: str = "rtn", search_steps: int = 9, scale_dtype: str = "float32",
                   importance=None) -> QArray:
    """Quantize a float array along its last axis.

    Args:
      x: float32, float16 or bfloat16 array [..., K] (bfloat16 as an ml_dtypes
        array, or a uint16 view with ``input_dtype="bfloat16"``).
      bits: 2, 4 or 8.
      group_size: None = one scale per row (output channel); an int G dividing K =
        one scale per G consecutive elements; "tensor" = one scale in all.
      symmetric: signed codes and scale only (default; the largest-magnitude value
        maps to -2^(bits-1) so all 2^bits levels are used), or unsigned codes with a
        zero point (min-max).
      scale, zero_point: use these instead of computing them; shaped like
        ``QArray.scales`` (broadcastable scalars allowed). Scales must be finite and
        > 0; zero points integers in [0, 2^bits - 1].
      out: a QArray of the same shape and format whose buffers are overwritten
        and returned (saves allocating, e.g. when re-quantizing in a loop).
      method: how scales are chosen when none are given: "rtn" (the range rule
        above) or "mse" (per group, the scale and zero point with the least squared
        error among 2 * search_steps + 1 candidates around the range rule's and
        their least-squares refinements; never worse than "rtn" in that error;
        csrc/lowbit/scale_search.cc). Same format and kernels either way.
      scale_dtype: "float32" (default), "float16" or "int8": every scale is
        chosen as usual, rounded to what the format stores (float16: nearest, a
        nonzero one never to 0; int8: per row, a code in [-127, 127] times one
        float32 row scale), and the codes are then computed with the rounded
        scale, so ``pack_weights(q, scale_dtype=...)`` stores the scales in half
        (a quarter) of the bytes without further loss: int4 groups of 32 with
        float16 scales take 4.5 bits/weight (llama.cpp Q4_0's size), groups of 16
        with int8 scales 4.5 + 32 / K. The QArray keeps the rounded values as float32.

    NaN in x raises ValueError; +-inf saturates to the end codes.

    >>> import numpy as np, lowbit
    >>> w = np.array([[0.5, -1.0, 0.25, 0.0]], np.float32)
    >>> q = lowbit.quantize_array(w, bits=4)
    >>> q.codes().tolist(), q.scales.tolist()
    ([[4, -8, 2, 0]], [[0.125]])
    >>> lowbit.dequantize_array(q).tolist()
    [[0.5, -1.0, 0.25, 0.0]]
    """
    bits = _check_bits(bits)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    symmetric = bool(symmetric)
    arr, dname = float_input(x, "x", input_dtype)
    if arr.ndim == 0:
        raise ValueError("x must have at least one dimension")
    if arr.size == 0:
        raise ValueError(f"x must not be empty, got shape {arr.shape}")
    shape = tuple(arr.shape)
    k = shape[-1]
    group_size = _check_group(group_size, k)
    x2 = rows_view(arr)
    rows = x2.shape[0]
    sshape = _scale_shape(rows, k, group_size)
    if method not in SCALE_METHODS:
        raise ValueError(f"method must be one of {SCALE_METHODS}, got {method!r}")
    if isinstance(search_steps, bool) or not isinstance(search_steps, (int, np.integer)) or not 0 <= search_steps <= 64:
        raise ValueError(f"search_steps must be an int in [0, 64], got {search_steps!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    if importance is not None:
        if method != "mse":
            raise ValueError(f"importance weights the scale search: it needs method='mse', got {method!r}")
        if group_size == "tensor":
            raise ValueError("importance needs a group_size of None or an int, not 'tensor'")
        importance = np.asarray(importance, np.float32)
        if importance.shape != (k,) or not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise ValueError(f"importance must be {k} finite values >= 0 (one per column), got shape "
                             f"{importance.shape}")
    if scale_dtype != "float32" and scale is None:
        # Choose the scales (and zero points) first, then re-quantize with them
        # rounded as scale_dtype stores them: the codes must be the nearest ones
        # under the scale that is stored. Cheap: quantizing is ~1 ns per weight.
        q = quantize_array(arr, bits, group_size, symmetric, input_dtype=input_dtype, method=method,
                           search_steps=search_steps, importance=importance)
        scales = _rounded_scales(q.scales, scale_dtype)
        group = k if group_size in (None, "tensor") else group_size
        zps = None if q.zero_points is None else q.zero_points.reshape(-1)
        _C.quantize_rows(x2, FLAG_OF[dname], bits, group, symmetric, group_size == "tensor", True,
                         scales.reshape(-1), zps, q.packed)  # NaN was refused by the first pass
        if out is None:
            return QArray(q.packed, scales, q.zero_points, shape, bits, group_size, symmetric, dname)
        _check_out(out, shape, bits, group_size, symmetric)
        out.packed[...] = q.packed
        out.scales[...] = scales.reshape(out.scales.shape)
        if q.zero_points is not None:
            out.zero_points[...] = q.zero_points
        object.__setattr__(out, "dtype", dname)
        return out
    given = scale is not None
    if given and scale_dtype != "float32":
        scale = _rounded_scales(_given_scales(scale, sshape), scale_dtype)
        if not np.all(scale > 0):
            raise ValueError(f"scale_dtype={scale_dtype!r}: a given scale is too small next to its row's largest")
    if zero_point is not None and not given:
        raise ValueError("zero_point given without scale")
    if method == "mse" and given:
        raise ValueError("method='mse' searches the scales: do not pass scale as well")
    if out is not None:
        _check_out(out, shape, bits, group_size, symmetric)
    if method == "mse" and group_size != "tensor":  # searched scales take the given-scale path
        x32 = x2 if dname == "float32" else _as_f32(x2, dname)
        if np.isnan(x32).any():
            raise ValueError("x contains NaN")
        found, found_zp = _C.search_scales(x32, bits, k if group_size is None else group_size, symmetric,
                                           int(search_steps), importance)
        given = True
        scales = found.reshape(sshape)
        zps = None if symmetric else found_zp.reshape(sshape)
    elif given:
        scales = _given_scales(scale, sshape)
        zps = None if symmetric else _given_zero_points(zero_point, sshape, bits)
    if given and out is not None:
        out.scales[...] = scales.reshape(out.scales.shape)
        if zps is not None:
            out.zero_points[...] = zps.reshape(out.zero_points.shape)
    if out is not None:
        scales, zps, packed = out.scales, out.zero_points, out.packed
    elif not given:
        scales = np.empty(sshape, np.float32)
        zps = None if symmetric else np.empty(sshape, np.uint8)
    if out is None:
        packed = np.empty((rows, (k * bits + 7) // 8), np.uint8)
    group = k if group_size in (None, "tensor") else group_size
    ok = _C.quantize_rows(x2, FLAG_OF[dname], bits, group, symmetric, group_size == "tensor", given,
                          scales.reshape(-1), None if zps is None else zps.reshape(-1), packed)
    if not ok:
        raise ValueError("x contains NaN")
    _check_grid_finite(scales, zps, bits, symmetric, given)
    if out is not None:
        object.__setattr__(out, "dtype", dname)
        return out
    return QArray(packed, scales, zps, shape, bits, group_size, symmetric, dname)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_grid_finite(scales, zps, bits, symmetric, given) -> None:
    """Every code must dequantize to a finite float32. Only inputs near +-3.4e38
    (or a given scale that large) break this: an asymmetric grid's integer zero
    point shifts one end past float32's range. O(groups), cheap next to quantizing."""
    s = scales.astype(np.float64)
    if symmetric:
        extent = s * (1 << (bits - 1))
    else:
        z = zps.astype(np.float64)
        extent = s * np.maximum(z, (1 << bits) - 1 - z)
    if extent.size and extent.max() > FLOAT32_MAX:
        what = "scale" if given else "x"
        raise ValueError(f"{what}: the int{bits} grid would reach {extent.max():.3g}, beyond float32's "
                         f"{FLOAT32_MAX:.3g}; values this close to float32's limit need "
                         + ("a smaller scale" if given else "symmetric=True"))


def _check_out(out, shape, bits, group_size, symmetric) -> None:
    if not isinstance(out, QArray):
        raise TypeError(f"out must be a QArray, got {type(out).__name__}")
    out.drop_tiles()  # its codes are about to change
    if (tuple(out.shape), out.bits, out.group_size, out.symmetric) != (shape, bits, group_size, symmetric):
        raise ValueError(f"out must have shape {shape}, bits={bits}, group_size={group_size!r}, "
                         f"symmetric={symmetric}; got {out!r}")
    for name in ("packed", "scales") + (() if symmetric else ("zero_points",)):
        a = getattr(out, name)
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"out.{name} must be writable and C-contiguous")


def _given_scales(scale, sshape) -> np.ndarray:
    s = np.asarray(scale)
    if s.dtype.kind not in "fiu":
        raise TypeError(f"scale must be a float array, got dtype {s.dtype}")
    try:
        s = np.ascontiguousarray(np.broadcast_to(s.astype(np.float32), sshape))
    except ValueError:
        raise ValueError(f"scale must have shape {sshape} (or broadcast to it), got {np.shape(scale)}") from None
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError("scale must be finite and > 0")
    return s


def _given_zero_points(zero_point, sshape, bits) -> np.ndarray:
    if zero_point is None:
        raise ValueError("zero_point is required with scale when symmetric=False")
    z = np.asarray(zero_point)
    if z.dtype.kind not in "iu":
        raise TypeError(f"zero_point must hold integers, got dtype {z.dtype}")
    try:
        z = np.broadcast_to(z, sshape)
    except ValueError:
        raise ValueError(f"zero_point must have shape {sshape}, got {np.shape(zero_point)}") from None
    if z.min() < 0 or z.max() > (1 << bits) - 1:
        raise ValueError(f"zero_point must lie in [0, {(1 << bits) - 1}]")
    return np.ascontiguousarray(z.astype(np.uint8))


def dequantize_array(q: QArray, dtype=np.float32, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Float values of a QArray: (code - zero_point) * scale, shaped like the original.

    dtype: float32 (default), float16, or "bfloat16" (returned as a uint16 view
    holding bfloat16 bits, or an ml_dtypes bfloat16 array when that is installed).
    out: an array of q's shape and that dtype to write into (rows may be strided).
    """
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a QArray, got {type(q).__name__}")
    dname = dtype_name(dtype)
    k = q.shape[-1]
    rows = q.packed.shape[0]
    storage = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dname]
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
        if tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"out must have shape {q.shape}, got {out.shape}")
        view = out.view(np.uint16) if out.dtype.name == "bfloat16" else out
        if view.dtype != storage:
            raise TypeError(f"out must have dtype {dname}, got {out.dtype}")
        target = view.reshape(rows, k)
        if not np.shares_memory(target, view):
            raise ValueError("out must be reshapeable to rows without a copy")
        _dequantize_into(q, target, dname)
        return out
    out = np.empty((rows, k), storage)
    _dequantize_into(q, out, dname)
    out = out.reshape(q.shape)
    if dname == "bfloat16" and not isinstance(dtype, str):
        return out.view(dtype)  # e.g. ml_dtypes.bfloat16
    return out


def _dequantize_into(q: QArray, out: np.ndarray, dname: str) -> None:
    k = q.shape[-1]
    group = k if q.group_size in (None, "tensor") else q.group_size
    _C.dequantize_rows(q.packed, k, q.bits, group, q.symmetric, q.group_size == "tensor",
                       q.scales.reshape(-1), None if q.zero_points is None else q.zero_points.reshape(-1),
                       out, FLAG_OF[dname])


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of y against x, in dB."""
    x = np.asarray(x, np.float64)
    noise = np.sum((x - np.asarray(y, np.float64)) ** 2)
    return math.inf if noise == 0 else 10.0 * math.log10(np.sum(x ** 2) / noise)
