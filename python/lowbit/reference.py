"""The executable specification: plain NumPy versions of every kernel.

The Highway kernels must match these bit for bit (codes, packed bytes, scales,
zero points, dequantized values, float-format codes, fake-quant outputs and
masks). ``csrc/lowbit/formats.h`` documents the same rules in prose; when the
two disagree, this file and that header are both wrong until fixed together.

Everything here is written for clarity, not speed.
"""
from __future__ import annotations

import numpy as np

FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32

__all__ = [
    "qrange", "group_range", "choose_scale", "quantize_codes", "pack", "unpack",
    "quantize", "dequantize", "quantize_activations", "matmul", "encode_float", "decode_float", "fake_quantize", "fake_quantize_mask",
]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of b-bit codes: [-2^(b-1), 2^(b-1)-1] or [0, 2^b - 1]."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _as_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(x, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x).astype(np.float32)


def group_range(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (lo, hi): finite min and max folded with 0; +-inf ignored."""
    if np.isnan(groups).any():
        raise ValueError("x contains NaN")
    finite = np.where(np.isfinite(groups), groups, np.float32(0))
    lo = np.minimum(finite.min(axis=-1), np.float32(0)).astype(np.float32)
    hi = np.maximum(finite.max(axis=-1), np.float32(0)).astype(np.float32)
    return lo, hi


def choose_scale(lo, hi, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points for groups with ranges [lo, hi] (see formats.h).

    Symmetric: the signed value of largest magnitude m (ties prefer the negative)
    maps to code -2^(b-1): scale = m / -2^(b-1), so all 2^b levels are used.
    Asymmetric: min-max with an integer zero point.
    Scales with |s| < FLT_MIN become 0 (with zero point 0): such groups quantize
    to all-zero codes.
    """
    lo = np.asarray(lo, np.float32)
    hi = np.asarray(hi, np.float32)
    if symmetric:
        m = np.where(-lo >= hi, lo, hi).astype(np.float32)
        scale = (m / np.float32(-(1 << (bits - 1)))).astype(np.float32)
        zp = np.zeros(scale.shape, np.int32)
    else:
        qmax = (1 << bits) - 1
        scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / qmax).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = np.float32(1) / scale
            zp = np.rint(-(lo * inv))
        zp = np.clip(np.where(np.abs(scale) >= FLT_MIN, zp, 0), 0, qmax).astype(np.int32)
    degenerate = ~(np.abs(scale) >= FLT_MIN)
    scale = np.where(degenerate, np.float32(0), scale).astype(np.float32)
    zp = np.where(degenerate, 0, zp).astype(np.int32)
    return scale, zp


def quantize_codes(groups, scale, zp, bits: int, symmetric: bool) -> np.ndarray:
    """Integer codes of float32 groups [..., G] with per-group scale/zp [...]."""
    groups = np.asarray(groups, np.float32)
    if np.isnan(groups).any():
        raise ValueError("x contains NaN")
    qmin, qmax = qrange(bits, symmetric)
    scale = np.asarray(scale, np.float32)[..., None]
    zp = np.asarray(zp, np.int32)[..., None]
    degenerate = scale == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(degenerate, np.float32(0), np.float32(1) / np.where(degenerate, 1, scale))
        v = (groups * inv.astype(np.float32)).astype(np.float32)
    v = np.clip(v, (qmin - zp).astype(np.float32), (qmax - zp).astype(np.float32))
    v = np.where(degenerate, np.float32(0), v)
    return (np.rint(v).astype(np.int32) + zp).astype(np.int32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [R, K] into bytes [R, ceil(K*bits/8)], low bits first."""
    codes = np.asarray(codes)
    rows, k = codes.shape
    per_byte = 8 // bits
    field = (codes.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    nbytes = (k * bits + 7) // 8
    padded = np.zeros((rows, nbytes * per_byte), np.uint8)
    padded[:, :k] = field
    padded = padded.reshape(rows, nbytes, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte) * bits).astype(np.uint16)
    return (padded << shifts).sum(axis=-1).astype(np.uint8)


def unpack(packed: np.ndarray, k: int, bits: int, symmetric: bool) -> np.ndarray:
    """Inverse of pack: int32 codes [R, K] (sign-extended when symmetric)."""
    packed = np.asarray(packed, np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    fields = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :k]
    fields = fields.astype(np.int32)
    if symmetric:
        sign = 1 << (bits - 1)
        fields = (fields ^ sign) - sign
    return fields


def _grouping(shape, group_size):
    k = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if group_size == "tensor":
        return rows, k, None
    g = k if group_size is None else int(group_size)
    return rows, k, g


def round_scales_f16(s: np.ndarray) -> np.ndarray:
    """Scales as float16 stores them (formats.h "scale dtype"): nearest float16,
    except that a nonzero scale never becomes 0 (it becomes +-2^-24)."""
    s = np.asarray(s, np.float32)
    r = s.astype(np.float16).astype(np.float32)
    tiny = (r == 0) & (s != 0)
    r[tiny] = np.copysign(np.float32(2.0 ** -24), s[tiny])
    return r


def round_scales_int8(s: np.ndarray) -> np.ndarray:
    """Scales [R, G] as int8 codes store them: per row d = max |s| / 127 (float32)
    rounded to 11 significant bits (half up), c = round-half-even(s / d) clamped to
    [-127, 127]; returns c * d (exact in float32)."""
    s = np.asarray(s, np.float32)
    d = (np.abs(s).max(axis=1) / np.float32(127)).astype(np.float64)
    m, e = np.frexp(d)                                  # d = m * 2^e, m in [0.5, 1)
    d = (np.floor(m * 2048 + 0.5) / 2048 * np.exp2(e)).astype(np.float32)
    c = np.clip(np.rint(s / np.where(d > 0, d, 1)[:, None]), -127, 127)
    return (c * d[:, None]).astype(np.float32)


def quantize(x, bits=8, group_size=None, symmetric=True, dtype="float32", scale=None, zero_point=None,
             scale_dtype="float32"):
    """Reference quantize_array: returns (packed, scales, zero_points or None).

    scales/zero points have shape [R, K // G] ([1] per tensor); given ones are used as is.
    scale_dtype="float16" / "int8": the range rule's scales are rounded
    (round_scales_f16 / round_scales_int8) before the codes are computed, the zero
    points kept.
    """
    x32 = _as_f32(x, dtype)
    rows, k, g = _grouping(x32.shape, group_size)
    x2 = x32.reshape(rows, k)
    if g is None:
        groups = x2.reshape(1, rows * k)
    else:
        groups = x2.reshape(rows, k // g, g)
    if scale is None:
        lo, hi = group_range(groups)
        s, zp = choose_scale(lo, hi, bits, symmetric)
        if scale_dtype == "float16":
            s = round_scales_f16(s)
        elif scale_dtype == "int8":
            s = round_scales_int8(s.reshape(len(s), -1)).reshape(s.shape)
    else:
        s = np.asarray(scale, np.float32).reshape(groups.shape[:-1])
        zp = (np.zeros(s.shape, np.int32) if symmetric
              else np.asarray(zero_point, np.int32).reshape(s.shape))
    codes = quantize_codes(groups, s, zp, bits, symmetric).reshape(rows, k)
    scales = s.reshape(-1 if g is None else rows, 1 if g is None else k // g)
    if g is None:
        scales = scales.reshape(1)
    zps = None if symmetric else zp.astype(np.uint8).reshape(scales.shape)
    return pack(codes, bits), scales.astype(np.float32), zps


def dequantize(packed, shape, bits, group_size, symmetric, scales, zero_points=None):
    """Reference dequantize_array to float32 with the original shape."""
    rows, k, g = _grouping(tuple(shape), group_size)
    codes = unpack(packed, k, bits, symmetric)
    s = np.asarray(scales, np.float32)
    zp = np.zeros(s.shape, np.int32) if symmetric else np.asarray(zero_points, np.int32)
    if g is None:
        out = (codes - zp.reshape(())).astype(np.float32) * s.reshape(())
    else:
        c = codes.reshape(rows, k // g, g)
        out = (c - zp.reshape(rows, k // g, 1)).astype(np.float32) * s.reshape(rows, k // g, 1)
    return out.astype(np.float32).reshape(shape)


# ---------------------------------------------------------------- float formats
_FORMATS = {
    # name: (exponent bits, mantissa bits, ieee specials, code width)
    "float16": (5, 10, True),
    "e4m3": (4, 3, False),
    "e5m2": (5, 2, True),
}


def _fmt(name):
    e, m, ieee = _FORMATS[name]
    bias = (1 << (e - 1)) - 1
    mag_mask = (1 << (e + m)) - 1
    inf = ((1 << e) - 1) << m if ieee else -1
    max_code = inf - 1 if ieee else mag_mask - 1
    nan = (inf | (1 << (m - 1))) if ieee else mag_mask
    return e, m, ieee, bias, mag_mask, inf, max_code, nan


def encode_float(x, fmt: str, saturate: bool = False) -> np.ndarray:
    """float32 -> codes of fmt ("float16", "bfloat16", "e4m3", "e5m2"), RNE.

    Returns uint16 codes for 16-bit formats, uint8 for fp8.
    """
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32).astype(np.int64)
    if fmt == "bfloat16":
        mag = bits & 0x7FFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = ((bits >> 16) & 0x8000) | 0x7FC0
        return np.where(mag > 0x7F800000, nan, rounded).astype(np.uint16)
    e, m, ieee, bias, mag_mask, inf, max_code, nan = _fmt(fmt)
    mag = bits & 0x7FFFFFFF
    sign = (bits >> 31) << (e + m)
    magic = np.array([(127 + 1 - bias - m + 23) << 23], np.int32).view(np.float32)[0]
    sub = (np.abs(x) + magic).view(np.int32).astype(np.int64) - np.int64(np.float32(magic).view(np.int32))
    drop = 23 - m
    normal = ((mag + (1 << (drop - 1)) - 1 + ((mag >> drop) & 1)) >> drop) - ((127 - bias) << m)
    code = np.where(mag < ((127 + 1 - bias) << 23), sub, normal)
    overflow = max_code if saturate else (inf if ieee else nan)
    code = np.where(code > max_code, overflow, code)
    code = np.where(mag > 0x7F800000, nan, code)
    out = code | sign
    return out.astype(np.uint16 if fmt == "float16" else np.uint8)


def decode_float(codes, fmt: str) -> np.ndarray:
    """Codes of fmt -> float32 (exact)."""
    c = np.asarray(codes).astype(np.int64)
    if fmt == "bfloat16":
        return (c.astype(np.uint32) << 16).astype(np.uint32).view(np.float32)
    e, m, ieee, bias, mag_mask, inf, max_code, nan = _fmt(fmt)
    mag = c & mag_mask
    sign = ((c >> (e + m)) & 1).astype(np.uint32) << 31
    normal = ((mag << (23 - m)) + ((127 - bias) << 23)).astype(np.uint32)
    unit = np.float32(2.0) ** np.float32(1 - bias - m)
    sub = (mag.astype(np.float32) * unit).astype(np.float32).view(np.uint32)
    out = np.where(mag < (1 << m), sub, normal).astype(np.uint32)
    if ieee:
        out = np.where(mag >= inf, np.uint32(0x7F800000), out)
        out = np.where(mag > inf, np.uint32(0x7FC00000), out)
    else:
        out = np.where(mag == nan, np.uint32(0x7FC00000), out)
    return (out | sign).astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------- fake quant
def _channel_view(x, scale, zero_point, axis, group_size):
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32).reshape(-1)
    zp = np.asarray(zero_point, np.int64).reshape(-1)
    if group_size is not None:
        shape = (-1, int(group_size))
        return x.reshape(shape), scale[:, None], zp[:, None]
    if axis is None:
        return x.reshape(1, -1), scale.reshape(1, 1), zp.reshape(1, 1)
    axis = axis % x.ndim
    bshape = [1] * x.ndim
    bshape[axis] = -1
    return x, scale.reshape(bshape), zp.reshape(bshape)


def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=None):
    """(clamp(zp + rint(x * (1/scale)), qmin, qmax) - zp) * scale, torch's arithmetic."""
    shape = np.shape(x)
    xv, s, zp = _channel_view(x, scale, zero_point, axis, group_size)
    if np.isnan(xv).any():
        raise ValueError("x contains NaN")
    inv = (np.float32(1) / s).astype(np.float32)
    r = np.rint((xv * inv).astype(np.float32))
    q = np.clip(r, (quant_min - zp).astype(np.float32), (quant_max - zp).astype(np.float32))
    return (q.astype(np.float32) * s).astype(np.float32).reshape(shape)


def fake_quantize_mask(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=None):
    """Straight-through mask: qmin <= zp + rint(x/scale) <= qmax."""
    shape = np.shape(x)
    xv, s, zp = _channel_view(x, scale, zero_point, axis, group_size)
    inv = (np.float32(1) / s).astype(np.float32)
    r = np.rint((xv * inv).astype(np.float32))
    return ((r >= quant_min - zp) & (r <= quant_max - zp)).reshape(shape)


def fake_quantize_lsq(x, grad, scale, zero_point, quant_min, quant_max, axis=None, group_size=None):
    """LSQ sums per scale (float64): dscale = sum g * (in range ? (fq - x) / s : bound - zp),
    dzero_point = sum g * (in range ? 0 : -s), bound = qmin below the range, qmax above."""
    xv, s, zp = _channel_view(x, scale, zero_point, axis, group_size)
    gv = np.asarray(grad, np.float32).reshape(xv.shape)
    inv = (np.float32(1) / s).astype(np.float32)
    r = np.rint((xv * inv).astype(np.float32)).astype(np.float64)
    lo, hi = (quant_min - zp).astype(np.float64), (quant_max - zp).astype(np.float64)
    inside = (r >= lo) & (r <= hi)
    with np.errstate(invalid="ignore"):  # inf - inf in the branch np.where discards
        term = np.where(inside, (r * s - xv) * inv, np.where(r < lo, lo, hi))
    dz = np.where(inside, 0.0, -s.astype(np.float64)) * gv
    keep = tuple(i for i in range(xv.ndim) if s.shape[i] == 1)
    return (np.sum(term * gv, axis=keep).reshape(-1), np.sum(np.broadcast_to(dz, xv.shape), axis=keep).reshape(-1))


# ---------------------------------------------------------------- matmul
def quantize_activations(x):
    """Per-row symmetric int8 activations: scale = amax/127 of finite |x|,
    q = rint(clamp(x * (1/scale), -127, 127)). Returns (int32 codes, float32 scales)."""
    x = np.asarray(x, np.float32)
    if np.isnan(x).any():
        raise ValueError("x contains NaN")
    amax = np.where(np.isfinite(x), np.abs(x), np.float32(0)).max(axis=1).astype(np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    ok = scale >= FLT_MIN
    inv = np.where(ok, np.float32(1) / np.where(ok, scale, 1), np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        v = (x * inv[:, None]).astype(np.float32)
    v = np.where(inv[:, None] == 0, np.float32(0), v)
    q = np.rint(np.clip(v, -127, 127)).astype(np.int32)
    return q, np.where(ok, scale, np.float32(0)).astype(np.float32)


def matmul(x, codes, scales, zero_points, group_size, act_bits=None, bf16_split=False):
    """x [M, K] @ dequant(W).T in float64, and a rigorous bound on the error a
    float32 kernel may add (|result - kernel| <= bound).

    codes [N, K] int (signed when zero_points is None), scales [N, ngroups] (one
    group per row when group_size is None).
    With act_bits=8 the activations are first quantized as the kernels do; the
    integer sums are exact, so the bound only covers the float32 epilogue
    (per-group scale multiply-adds and the final activation-scale multiply).
    Without, the bound is the classic (K + groups + 2) * 2^-24 * sum |w x|.
    bf16_split=True bounds the bfloat16-dot weight-only GEMV (gemv_bf16-inl.h,
    AVX512_BF16, M < 4, symmetric codes): x enters as two bfloat16 parts
    (|x - hi - lo| <= 2^-16 |x|) summed in two accumulators added once per group,
    so the bound gains 2^-16 * sum |w x| and one rounding per group.
    """
    x = np.asarray(x, np.float32)
    c = np.asarray(codes, np.int64)
    n, k = c.shape
    g = k if group_size is None else int(group_size)
    s = np.asarray(scales, np.float64).reshape(n, k // g)
    zp = np.zeros_like(s, dtype=np.int64) if zero_points is None else \
        np.asarray(zero_points, np.int64).reshape(n, k // g)
    w_int = (c.reshape(n, k // g, g) - zp[:, :, None])            # exact integers
    eps = 2.0 ** -24
    if act_bits == 8:
        xq, xs = quantize_activations(x)
        xg = xq.astype(np.int64).reshape(x.shape[0], k // g, g)
        isum = np.einsum("mgk,ngk->mng", xg, w_int)                 # exact
        terms = isum.astype(np.float64) * s[None, :, :]             # [M, N, groups]
        result = terms.sum(axis=2) * xs.astype(np.float64)[:, None]
        mag = np.abs(terms).sum(axis=2) * np.abs(xs.astype(np.float64))[:, None]
        bound = (k // g + 3) * eps * mag * 1.01 + 1e-30
        return result, bound
    w = (w_int * s[:, :, None]).reshape(n, k)
    x64 = x.astype(np.float64)
    result = x64 @ w.T
    mag = np.abs(x64) @ np.abs(w).T
    if bf16_split:
        bound = ((k + 2 * (k // g) + 3) * eps + 2.0 ** -16) * mag * 1.01 + 1e-30
    else:
        bound = (k + k // g + 3) * eps * mag * 1.01 + 1e-30
    return result, bound


def search_scales(x, bits: int, group_size, symmetric: bool, steps: int = 9,
                  importance=None) -> tuple[np.ndarray, np.ndarray]:
    """The error-minimising scale search of csrc/lowbit/scale_search.cc, in NumPy
    (float32 math; sums may differ from the kernels' in the last bits).
    importance: optional per-column weights [K] of the squared error."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    g = k if group_size is None else group_size
    groups = x.reshape(-1, k // g, g)
    c = (np.ones((k // g, g), np.float32) if importance is None
         else np.asarray(importance, np.float32).reshape(k // g, g))
    groups = np.where(np.isfinite(groups), groups, np.float32(0)).astype(np.float32)
    lo, hi = group_range(groups)
    s0, z0 = choose_scale(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    f32 = np.float32
    delta = f32(0.1 * (1 << bits) / 16)
    m = np.where(-lo >= hi, lo, hi).astype(np.float32)
    live = s0 != 0

    def trial(inv, zp):
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.clip(groups * inv[..., None], (qmin - zp)[..., None], (qmax - zp)[..., None])
        L = np.rint(v).astype(np.float32)
        return (c * groups * L).sum(-1, dtype=np.float32), (c * L * L).sum(-1, dtype=np.float32)

    def error(s, zp):
        with np.errstate(divide="ignore"):
            inv = np.where(s == 0, f32(0), f32(1) / np.where(s == 0, f32(1), s)).astype(np.float32)
        v = np.clip(groups * inv[..., None], (qmin - zp)[..., None], (qmax - zp)[..., None])
        d = groups - np.rint(v).astype(np.float32) * s[..., None]
        return (c * d * d).sum(-1, dtype=np.float32)

    best_err = np.full(s0.shape, np.inf, np.float32)
    best_s, best_z = s0.copy(), z0.astype(np.float32)
    safe_m = np.where(m == 0, f32(1), m)
    safe_r = np.where(hi - lo == 0, f32(1), (hi - lo).astype(np.float32))
    for i in range(-steps, steps + 1):
        if symmetric:
            inv = (-(f32(1 << (bits - 1)) + f32(i) * delta) / safe_m).astype(np.float32)
            zp = np.zeros(s0.shape, np.float32)
        else:
            inv = ((f32(qmax) + f32(i) * delta) / safe_r).astype(np.float32)
            zp = np.clip(np.rint(-lo * inv), 0, qmax).astype(np.float32)
        xl, ll = trial(inv, zp)
        ok = live & (ll > 0) & (inv != 0)
        ls = (xl / np.where(ll > 0, ll, 1)).astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.clip(groups * inv[..., None], (qmin - zp)[..., None], (qmax - zp)[..., None])
        d = groups - np.rint(v).astype(np.float32) * ls[..., None]
        err = np.where(ok, (c * d * d).sum(-1, dtype=np.float32), np.inf).astype(np.float32)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, ls, best_s).astype(np.float32)
        best_z = np.where(better, zp, best_z)
    win_s, win_z = s0.copy(), z0.astype(np.float32)
    win_err = error(s0, win_z)
    s = best_s
    active = live.copy()
    for _ in range(3):
        active &= (np.abs(s) >= FLT_MIN) & np.isfinite(s)
        err = error(np.where(active, s, f32(0)), best_z)
        better = active & (err < win_err)
        win_err = np.where(better, err, win_err)
        win_s = np.where(better, s, win_s)
        win_z = np.where(better, best_z, win_z)
        with np.errstate(divide="ignore", invalid="ignore"):
            xl, ll = trial(np.where(active, f32(1) / np.where(active, s, f32(1)), f32(0)).astype(np.float32), best_z)
        active &= ll > 0
        s = np.where(active, xl / np.where(ll > 0, ll, 1), s).astype(np.float32)
    shape = x.shape[:-1] + (k // g,)
    return win_s.reshape(shape).astype(np.float32), win_z.reshape(shape).astype(np.uint8)


def gptq_columns(wt, hinv, c0, c1, scales, zps, groups, qmin, qmax, codes, err, levels=None) -> None:
    """GPTQ's column loop on one block, in place (the spec of ``_C.gptq_columns``,
    csrc/lowbit/gptq.cc): wt float64 [B, R] (the block's columns as rows), hinv
    float64 [B, B] (upper factor of the inverse Hessian), scales / zps float32
    [G, R] (zps None when symmetric), groups int32 [B]; writes codes int32 [B, R]
    and err float64 [B, R] for columns c0..c1 and updates the later columns.
    ``levels``: int8 [16], symmetric int4 codes q on a level table (q means
    levels[q + 8] * scale; the nearest level as in :func:`level_codes`)."""
    lv = None if levels is None else np.asarray(levels, np.float32)
    for c in range(c0, c1):
        s32 = scales[groups[c]]
        z32 = np.zeros_like(s32) if zps is None else zps[groups[c]]
        inv32 = np.where(s32 == 0, np.float32(0), np.float32(1) / np.where(s32 == 0, np.float32(1), s32))
        if lv is not None:
            mids = (np.float32(0.5) * (lv[1:] + lv[:-1])).astype(np.float32)
            u = ((wt[c].astype(np.float32) * inv32)[:, None] > mids).sum(-1)
            codes[c] = (u - 8).astype(np.int32)
            e = (wt[c] - lv[u].astype(np.float64) * s32.astype(np.float64)) / hinv[c, c]
            err[c] = e
            wt[c + 1:] -= hinv[c, c + 1:, None] * e[None, :]
            continue
        lo32, hi32 = (np.float32(qmin) - z32).astype(np.float32), (np.float32(qmax) - z32).astype(np.float32)
        q = np.rint(np.clip(wt[c].astype(np.float32) * inv32, lo32, hi32)) + z32
        codes[c] = q.astype(np.int32)
        e = (wt[c] - (q.astype(np.float64) - z32.astype(np.float64)) * s32.astype(np.float64)) / hinv[c, c]
        err[c] = e
        wt[c + 1:] -= hinv[c, c + 1:, None] * e[None, :]


def dequantize_tiled(w) -> np.ndarray:
    """The float32 weights [N, K] of tiled weights ``w`` (a lowbit.PackedWeights):
    the spec of _C.dequantize_tiled (matmul.dequantize_packed)."""
    TILE_ROWS, KSTEP = 16, {8: 4, 4: 8, 3: 8}
    n, k = w.shape
    step = KSTEP[w.bits]
    kp = (k + step - 1) // step * step
    tiles = w.scales.shape[0]
    if w.bits == 3:  # super-blocks of 4 k-steps: planes [low bits s = 0, 1], [s = 2, 3], [bit 2]
        supers = -(-(kp // step) // 4)
        sb = w.data.reshape(tiles, supers, 3, TILE_ROWS, 4)
        u = np.empty((tiles, supers, 4, TILE_ROWS, 2, 4), np.uint8)  # [t, S, s, i, half, j]
        for s in range(4):
            for half in range(2):
                low = (sb[:, :, s // 2] >> (2 * (s & 1) + 4 * half)) & 3
                high = (sb[:, :, 2] >> (s + 4 * half)) & 1
                u[:, :, s, :, half] = low | (high << 2)
        u = u.transpose(0, 3, 1, 2, 4, 5).reshape(tiles * TILE_ROWS, supers * 32)[:, :kp]
    elif w.bits == 8:
        b = w.data.reshape(tiles, kp // step, TILE_ROWS, 4)
        u = b.transpose(0, 2, 1, 3).reshape(tiles * TILE_ROWS, kp)
    else:
        b = w.data.reshape(tiles, kp // step, TILE_ROWS, 4)
        halves = np.stack([b & 0x0F, b >> 4], axis=3)            # [t, kb, i, half, j]
        u = halves.reshape(tiles, kp // step, TILE_ROWS, 8).transpose(0, 2, 1, 3).reshape(tiles * TILE_ROWS, kp)
    ngroups = w.scales.shape[1]
    per_row = lambda a: a.transpose(0, 2, 1).reshape(tiles * TILE_ROWS, ngroups)  # noqa: E731
    scales = per_row(w.scales).astype(np.float32)  # float16 scales widen exactly
    if w.row_scales is not None:  # int8 codes c: scale = c * d of the row (exact)
        scales = scales * w.row_scales[:, None]
    offs = (np.full(scales.shape, 1 << (w.bits - 1), np.int32) if w.offsets is None else per_row(w.offsets))
    g = kp if ngroups == 1 else w.group_size
    if getattr(w, "levels", None) is not None:  # formats.h "level tables": code u means L[u]
        ints = w.levels.astype(np.int32)[u.astype(np.int32)].reshape(-1, ngroups, g)
    else:
        ints = u.astype(np.int32).reshape(-1, ngroups, g) - offs[:, :, None]
    vals = ints.astype(np.float32) * scales[:, :, None]
    return np.ascontiguousarray(vals.reshape(tiles * TILE_ROWS, kp)[:n, :k])


def level_codes(x, levels, group_size, scales) -> np.ndarray:
    """The spec of _C.level_codes: for float32 x [rows, K] and scales [rows, K /
    group], the index of the level nearest to x * (1 / scale) in float32 (ties to
    the lower level; scale 0 reads every x as 0)."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    s = np.asarray(scales, np.float32).reshape(rows, k // group_size)
    inv = np.where(s == 0, np.float32(0), np.float32(1) / np.where(s == 0, np.float32(1), s)).astype(np.float32)
    t = (x.reshape(rows, k // group_size, group_size) * inv[:, :, None]).reshape(rows, k)
    lv = np.asarray(levels, np.float32)
    mids = (np.float32(0.5) * (lv[1:] + lv[:-1])).astype(np.float32)
    return (t[..., None] > mids).sum(-1).astype(np.uint8)
