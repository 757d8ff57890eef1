"""Low-bit matmul on NumPy arrays: pack_weights once, then matmul many times.

``lowbit.matmul(x, w, act_bits=None)`` computes ``x @ dequant(w).T``:
  * ``act_bits=None``: weight-only, float activations (codes decoded in registers);
  * ``act_bits=8``: activations quantized per row (token) to int8 on the fly, integer
    dot products (AVX-512 VNNI ``vpdpbusd`` where the CPU has it), W8A8 / W4A8.
Weights are int8, int4 or int3, per row or per group (``csrc/lowbit/formats.h``
documents the tiled layout; it is the same on every SIMD target).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from . import _C
from ._dtypes import float_input
from .arrays import F16, F32, I8, I32, SCALE_DTYPES, U8, QArray, _f16_scales, _field, _is_size, int8_scale_codes
from .floats import decode_float

TILE_ROWS = 16
KSTEP = {8: 4, 4: 8, 3: 8}
INT3_SUPER_STEPS, INT3_SUPER_BYTES = 4, 192  # formats.h "int3 tiles": 4 k-steps in 3 planes of 64 bytes


def tile_bytes(bits: int, kp: int) -> int:
    """Bytes of one 16-row tile over kp (padded) columns (formats.h TileBytes)."""
    steps = kp // KSTEP[bits]
    if bits == 3:
        return -(-steps // INT3_SUPER_STEPS) * INT3_SUPER_BYTES
    return steps * 64


@dataclass(frozen=True, eq=False)
class PackedWeights:
    """A QArray [N, K] rearranged for the matmul kernels (formats.h, "tiled" v1)."""

    data: np.ndarray      # uint8 [tiles * tile_bytes(bits, Kp)]
    scales: np.ndarray    # float32, float16 or int8 codes [tiles, ngroups, 16] (formats.h "scale dtype")
    offsets: Optional[np.ndarray]  # int32 [tiles, ngroups, 16]; None when symmetric
    shape: tuple          # (N, K)
    bits: int
    group_size: Optional[int]  # None: per row
    symmetric: bool
    row_scales: Optional[np.ndarray] = None  # float32 [tiles * 16] with int8 scale codes, else None
    levels: Optional[np.ndarray] = None      # int8 [16] level table of int4 codes (formats.h "level tables")

    def __post_init__(self):
        # Cheap (~1 us; the torch ops build one per call) but complete: a
        # hand-built PackedWeights must not send a short buffer to the kernels.
        shape = self.shape
        if not (type(shape) is tuple and len(shape) == 2 and _is_size(shape[0]) and _is_size(shape[1])
                and shape[0] > 0 and shape[1] > 0):
            raise TypeError(f"PackedWeights.shape must be (N, K) with N, K > 0, got {shape!r}")
        if isinstance(self.bits, bool) or self.bits not in KSTEP:
            raise ValueError(f"PackedWeights.bits must be 8, 4 or 3, got {self.bits!r}")
        if type(self.symmetric) is not bool and not isinstance(self.symmetric, np.bool_):
            raise TypeError(f"PackedWeights.symmetric must be a bool, got {self.symmetric!r}")
        n, k = shape
        g = self.group_size
        step = KSTEP[self.bits]
        if g is not None and not (_is_size(g) and g > 0 and k % g == 0 and g % step == 0):
            raise ValueError(f"PackedWeights.group_size must be None or a divisor of K={k} that is a "
                             f"multiple of {step}, got {g!r}")
        tiles = -(-n // TILE_ROWS)
        _field(self.data, "data", U8, (tiles * tile_bytes(self.bits, self.kp),))
        groups = (tiles, 1 if g is None else k // g, TILE_ROWS)
        sdt = self.scales.dtype if isinstance(self.scales, np.ndarray) and self.scales.dtype in (F16, I8) else F32
        _field(self.scales, "scales", sdt, groups)
        if (sdt == I8) != (self.row_scales is not None):
            raise ValueError("PackedWeights.row_scales must be given exactly when the scales are int8 codes")
        if self.row_scales is not None:
            _field(self.row_scales, "row_scales", F32, (tiles * TILE_ROWS,))
        if self.symmetric != (self.offsets is None):
            raise ValueError("PackedWeights.offsets must be None exactly when symmetric")
        if self.offsets is not None:
            _field(self.offsets, "offsets", I32, groups)
        if self.levels is not None:
            _field(self.levels, "levels", I8, (16,))
            if self.bits != 4 or not self.symmetric:
                raise ValueError("PackedWeights.levels need symmetric int4 weights")
            if not np.all(np.diff(self.levels.astype(np.int32)) > 0) or int(self.levels[0]) < -127:
                raise ValueError("PackedWeights.levels must be 16 increasing values in [-127, 127]")

    @classmethod
    def _unchecked(cls, data, scales, offsets, shape, bits, group_size, symmetric, row_scales=None,
                   levels=None) -> "PackedWeights":
        """For the torch ops' per-call wrapping of a layer's own buffers (checked when
        they were stored; the bindings check sizes again): skips __post_init__'s ~2 us."""
        obj = object.__new__(cls)
        obj.__dict__.update(data=data, scales=scales, offsets=offsets, shape=shape, bits=bits,
                            group_size=group_size, symmetric=symmetric, row_scales=row_scales, levels=levels)
        return obj

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes) + \
            (0 if self.row_scales is None else self.row_scales.nbytes) + \
            (0 if self.levels is None else self.levels.nbytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def scale_dtype(self) -> str:
        return self.scales.dtype.name

    @property
    def kp(self) -> int:
        step = KSTEP[self.bits]
        return (self.shape[1] + step - 1) // step * step

    @property
    def _offsets_flat(self):
        return None if self.offsets is None else self.offsets.reshape(-1)

    @property
    def _group(self) -> int:
        return self.shape[1] if self.group_size is None else self.group_size

    def __repr__(self) -> str:
        g = "per-row" if self.group_size is None else f"group {self.group_size}"
        return f"PackedWeights(shape={self.shape}, int{self.bits}, {g}, {self.nbytes} bytes)"


def pack_weights(q: QArray, scale_dtype: str = "float32", bits: Optional[int] = None,
                 levels=None) -> PackedWeights:
    """Rearrange a 2-D int8/int4 QArray [N, K] into the matmul kernels' tiled layout.

    scale_dtype: "float32" (default), "float16" (half the scale bytes: int4 g32
    takes 4.5 bits/weight instead of 5) or "int8" (codes times one float32 scale
    per row: int4 g16 takes 4.5 + 32 / K). Both round the scales; quantize with
    ``quantize_array(..., scale_dtype=...)`` so the codes were chosen under the
    rounded scales and nothing changes here.
    bits: the tiles' code width, q.bits by default; 3 packs an int4 QArray whose
    codes fit 3 bits (symmetric codes in [-4, 3], or codes and zero points in
    [0, 7]: lowbit.quantize's 3-bit layers) into int3 tiles, 3 bits per weight.
    levels: a level table (formats.h "level tables": 16 increasing int8 values,
    e.g. ``lowbit.levels.level_table("t5")``) for a symmetric int4 q:
    code q then means levels[q + 8] * scale instead of q * scale.

    >>> import numpy as np, lowbit
    >>> w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    >>> pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32))
    >>> pw
    PackedWeights(shape=(32, 64), int4, group 32, 1280 bytes)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a QArray, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"matmul weights must be 2-D [N, K], got shape {q.shape}")
    if q.bits not in (4, 8):
        raise ValueError(f"matmul supports bits=8 and bits=4 weights, got bits={q.bits}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    tile_bits = q.bits if bits is None else bits
    if isinstance(tile_bits, bool) or tile_bits not in (q.bits, 3) or (tile_bits == 3 and q.bits != 4):
        raise ValueError(f"bits must be None, {q.bits} or (for int4 codes) 3, got {bits!r}")
    n, k = q.shape
    step = KSTEP[tile_bits]
    group = None if q.group_size in (None, "tensor") or q.group_size == k else int(q.group_size)
    if group is not None and group % step:
        raise ValueError(f"group_size must be a multiple of {step} for {q.bits}-bit matmul, got {group}")
    ngroups = 1 if group is None else k // group
    scales = q.scales.reshape(-1)
    zps = None if q.zero_points is None else q.zero_points.reshape(-1)
    if q.group_size == "tensor":  # one scale for everything: repeat it per row
        scales = np.repeat(scales, n)
        zps = None if zps is None else np.repeat(zps, n)
    kp = (k + step - 1) // step * step
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    data = np.empty(tiles * tile_bytes(tile_bits, kp), np.uint8)
    tscales = np.empty((tiles, ngroups, TILE_ROWS), np.float32)
    toffs = None if q.symmetric else np.empty((tiles, ngroups, TILE_ROWS), np.int32)
    codes = np.ascontiguousarray(q.codes())
    if tile_bits == 3:
        # Codes outside 3 bits would wrap in the planes: refuse them here.
        lo, hi = (-4, 3) if q.symmetric else (0, 7)
        if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi or
                           (zps is not None and int(zps.max()) > 7)):
            raise ValueError(f"bits=3 needs codes in [{lo}, {hi}]" + ("" if q.symmetric else " and zero points <= 7")
                             + f"; these span [{int(codes.min())}, {int(codes.max())}]")
    _C.pack_tiled(codes.view(np.uint8), tile_bits, q.symmetric, k if group is None else group,
                  np.ascontiguousarray(scales, np.float32), zps, data, tscales.reshape(-1),
                  None if toffs is None else toffs.reshape(-1))
    row_scales = None
    if scale_dtype == "float16":
        tscales = _f16_scales(tscales).astype(np.float16)
    elif scale_dtype == "int8":
        codes8, d = int8_scale_codes(scales.reshape(n, ngroups))
        padded = np.zeros((tiles * TILE_ROWS, ngroups), np.int8)
        padded[:n] = codes8
        tscales = np.ascontiguousarray(padded.reshape(tiles, TILE_ROWS, ngroups).transpose(0, 2, 1))
        row_scales = np.zeros(tiles * TILE_ROWS, np.float32)
        row_scales[:n] = d
    if levels is not None:
        levels = np.ascontiguousarray(levels)
        if levels.dtype != np.int8 or levels.shape != (16,):
            raise ValueError(f"levels must be an int8 array of 16 values, got {levels.dtype} {levels.shape}")
    return PackedWeights(data, tscales, toffs, (n, k), tile_bits, group, q.symmetric, row_scales, levels)


def matmul(x, w: Union[PackedWeights, QArray], act_bits: Optional[int] = None, *, bias=None,
           input_dtype=None, act_scale: Optional[float] = None) -> np.ndarray:
    """``x @ dequant(w).T`` (+ ``bias``) as float32.

    Args:
      x: activations [M, K] (or [K]) in float32, float16 or bfloat16 (bfloat16 as
        an ml_dtypes array or a uint16 view with ``input_dtype="bfloat16"``).
      w: weights [N, K]: a :class:`PackedWeights` from :func:`pack_weights`, or a
        2-D int8/int4 QArray (tiled on the first call and the tiles kept with it:
        see ``QArray.tiles_nbytes``).
      act_bits: None for float activations (weight-only), or 8 to quantize each row
        of x to int8 (amax / 127) and use integer dot products.
      bias: optional float32 [N], added in the kernels' final store (same rounding
        as adding it afterwards, one pass less).
      act_scale: with ``act_bits=8``, one static activation scale for every row
        (calibrated, e.g. by ``lowbit.calibrate``): codes = clamp(round(x / act_scale),
        -127, 127). None: per-row dynamic scales.

    >>> import numpy as np, lowbit
    >>> rng = np.random.default_rng(0)
    >>> w = rng.standard_normal((64, 256)).astype(np.float32)
    >>> x = rng.standard_normal((2, 256)).astype(np.float32)
    >>> pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=8))
    >>> y = lowbit.matmul(x, pw, act_bits=8)
    >>> y.shape, bool(np.abs(y - x @ w.T).max() < 0.05 * np.abs(x @ w.T).max())
    ((2, 64), True)
    """
    if isinstance(w, QArray):
        q, w = w, w._kept_tiles()
        if w is None:
            w = pack_weights(q)
            q._keep_tiles(w)
    if not isinstance(w, PackedWeights):
        raise TypeError(f"w must be PackedWeights (lowbit.pack_weights) or a QArray, got {type(w).__name__}")
    if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, numbers.Integral)):
        raise TypeError(f"act_bits must be None or 8, got {act_bits!r}")
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits}")
    if act_scale is not None:
        if act_bits != 8:
            raise ValueError("act_scale needs act_bits=8")
        if isinstance(act_scale, bool) or not isinstance(act_scale, numbers.Real) or \
                not (0 < float(act_scale) < 3e38):
            raise ValueError(f"act_scale must be a finite float > 0, got {act_scale!r}")
    arr, dname = float_input(x, "x", input_dtype)
    if arr.ndim not in (1, 2):
        raise ValueError(f"x must be 1-D [K] or 2-D [M, K], got shape {arr.shape}")
    vector = arr.ndim == 1
    x2 = arr.reshape(1, -1) if vector else arr
    n, k = w.shape
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} columns but w has K={k}")
    if x2.shape[0] == 0:
        return np.zeros((0, n), np.float32)
    if dname == "bfloat16":
        x2 = decode_float(np.ascontiguousarray(x2), "bfloat16")
    elif dname == "float16":
        x2 = x2.astype(np.float32)
    if x2.strides[1] != 4 or x2.strides[0] % 4 or x2.strides[0] < 0:
        x2 = np.ascontiguousarray(x2)
    m = x2.shape[0]
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.shape != (n,):
            raise ValueError(f"bias must be float32 of shape ({n},), got {bias.dtype} {bias.shape}")
        bias = np.ascontiguousarray(bias)
    out = np.empty((m, n), np.float32)
    group = w._group
    if act_bits == 8:
        if not _C.matmul_quant_act(x2, w.bits, n, k, group, w.data, w.scales.reshape(-1), w._offsets_flat, out, bias,
                                   float(np.float32(act_scale)) if act_scale else 0.0, w.row_scales, w.levels):
            raise ValueError("x contains NaN")
    else:
        if w.kp != k:  # the kernels read whole k-steps: zero-pad the columns
            padded = np.zeros((m, w.kp), np.float32)
            padded[:, :k] = x2
            x2 = padded
        _C.matmul_float_act(x2, w.bits, n, k, group, w.data, w.scales.reshape(-1), w._offsets_flat, out, bias,
                            w.row_scales, w.levels)
    return out[0] if vector else out



def dequantize_packed(w: PackedWeights) -> np.ndarray:
    """The float32 weights [N, K] a PackedWeights holds (the native kernel; for
    input gradients, merging adapters, checks and export)."""
    if not isinstance(w, PackedWeights):
        raise TypeError(f"w must be PackedWeights, got {type(w).__name__}")
    n, k = w.shape
    out = np.empty((n, k), np.float32)
    _C.dequantize_tiled(w.bits, n, k, w._group, w.data, w.scales.reshape(-1), w._offsets_flat, out, w.row_scales,
                        w.levels)
    return out
