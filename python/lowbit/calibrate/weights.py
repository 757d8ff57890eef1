"""Weight quantization algorithms over one Linear layer: RTN, GPTQ, AWQ-style.

All of them produce integer codes and per-group scales under lowbit's own
scale rule (formats.h: the signed largest-magnitude value maps to -2^(b-1);
asymmetric min-max with an integer zero point), so their output loads into the
same tiled kernels as plain quantization. 3-bit codes are stored in int3 tiles
(3 bits per weight, decoded to the int4 form in the kernels).

The float math follows the kernels exactly where it matters: scales in
float32, codes = round_half_even(w * (1 / scale)) clamped, so RTN here equals
``lowbit.quantize_array`` bit for bit (a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _C
from ..arrays import _rounded_scales

FLT_MIN = torch.finfo(torch.float32).tiny


@dataclass
class QuantizedWeight:
    """Codes [N, K] (int32), scales [N, K // G] float32, zero points (asymmetric),
    an optional per-input-channel multiplier applied to x first (AWQ) and an
    optional level table (int8 [16], lowbit.levels: symmetric int4 code q means
    levels[q + 8] * scale)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int]
    input_scale: Optional[torch.Tensor] = None
    levels: Optional[np.ndarray] = None

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernels compute with (in the scaled input basis)."""
        n, k = self.codes.shape
        g = k if self.group_size is None else self.group_size
        if self.levels is not None:
            c = torch.from_numpy(np.asarray(self.levels, np.float32))[self.codes.long() + 8].reshape(n, k // g, g)
            return (c * self.scales[..., None]).reshape(n, k)
        c = self.codes.float().reshape(n, k // g, g)
        if self.zero_points is not None:
            c = c - self.zero_points.float()[..., None]
        return (c * self.scales[..., None]).reshape(n, k)

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original input basis (x @ W_eff.T equals the layer)."""
        w = self.dequantize()
        return w if self.input_scale is None else w * self.input_scale


def qrange(bits: int, symmetric: bool) -> tuple:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def round_scales(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """scale [N, groups] as the layer will store it: float32 as is, float16
    (nearest, a nonzero scale never to 0) or int8 codes times a per-row scale
    (arrays._rounded_scales). Rounding before the codes are chosen keeps every
    code the nearest under the stored scale."""
    if scale_dtype == "float32":
        return scale
    return torch.from_numpy(_rounded_scales(scale.detach().float().cpu().numpy(), scale_dtype))


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: Optional[torch.Tensor] = None,
                 scale_dtype: str = "float32") -> tuple:
    """lowbit's scale rule over the last axis of w [..., G] (optionally shrunk by clip [...]),
    the scales rounded to ``scale_dtype``."""
    w = w.float()
    fin = torch.isfinite(w)
    lo = torch.where(fin, w, 0.0).amin(-1).clamp(max=0)
    hi = torch.where(fin, w, 0.0).amax(-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    if symmetric:
        m = torch.where(-lo >= hi, lo, hi)
        scale = m / float(-(1 << (bits - 1)))
        zp = None
    else:
        qmax = (1 << bits) - 1
        scale = ((hi.double() - lo.double()) / qmax).float()
        inv = torch.where(scale.abs() >= FLT_MIN, 1.0 / scale, torch.zeros_like(scale))
        zp = torch.clamp(-torch.round(lo * inv), 0, qmax)
    degenerate = ~(scale.abs() >= FLT_MIN)
    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    if zp is not None:
        zp = torch.where(degenerate, torch.zeros_like(zp), zp)
    return round_scales(scale, scale_dtype), zp


def quant_codes(w: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], bits: int,
                symmetric: bool) -> torch.Tensor:
    """Codes of w [..., G] given per-row-of-groups scale/zp [...] (formats.h element rule)."""
    qmin, qmax = qrange(bits, symmetric)
    z = torch.zeros_like(scale) if zp is None else zp
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / torch.where(scale == 0, 1.0, scale))
    v = torch.clamp(w.float() * inv[..., None], (qmin - z)[..., None], (qmax - z)[..., None])
    return (torch.round(v) + z[..., None]).to(torch.int32)


def _grouped(w: torch.Tensor, group: Optional[int]) -> torch.Tensor:
    n, k = w.shape
    g = k if group is None else group
    return w.reshape(n, k // g, g)


def rtn(w: torch.Tensor, bits: int, group: Optional[int], symmetric: bool = True,
        clip: Optional[torch.Tensor] = None, scale_dtype: str = "float32") -> QuantizedWeight:
    """Round to nearest (clip: optional per-(row, group) shrink of the range)."""
    wg = _grouped(w.float(), group)
    scale, zp = group_params(wg, bits, symmetric, clip, scale_dtype)
    codes = quant_codes(wg, scale, zp, bits, symmetric)
    return QuantizedWeight(codes.reshape(w.shape), scale, zp, bits, group)


def mse(w: torch.Tensor, bits: int, group: Optional[int], symmetric: bool = True, steps: int = 9,
        scale_dtype: str = "float32", importance: Optional[np.ndarray] = None) -> QuantizedWeight:
    """Data-free error-minimising scales (csrc/lowbit/scale_search.cc), then the codes they give;
    importance [K]: per-input weights of the squared error (calibrate.importance)."""
    w32 = np.ascontiguousarray(w.detach().float().cpu().numpy())
    n, k = w32.shape
    g = k if group is None else group
    s, z = _C.search_scales(w32, bits, g, symmetric, steps, importance)  # 3-bit codes: searched on the 3-bit grid
    scale = round_scales(torch.from_numpy(s.reshape(n, k // g)), scale_dtype)
    zp = None if symmetric else torch.from_numpy(z.reshape(n, k // g).astype(np.float32))
    wg = _grouped(w.float(), group)
    codes = quant_codes(wg, scale, zp, bits, symmetric)
    return QuantizedWeight(codes.reshape(w.shape), scale, zp, bits, group)


def _level_scales(w32: np.ndarray, g: int, levels: np.ndarray, steps: int, scale_dtype: str,
                  importance: Optional[np.ndarray]) -> np.ndarray:
    """Float32 scales [N, K / g] of float32 w32 [N, K] on a level table: the level
    search's, rounded as ``scale_dtype`` stores them."""
    n, k = w32.shape
    s = _C.search_level_scales(w32, levels, g, steps, importance)
    return np.ascontiguousarray(_rounded_scales(s.reshape(n, k // g), scale_dtype), np.float32)


def _level_fit(w: torch.Tensor, group: Optional[int], levels: np.ndarray, steps: int, scale_dtype: str,
               importance: Optional[np.ndarray]) -> tuple:
    """(level indices uint8 [N, K], float32 scales [N, K / G]) of :func:`mse_levels`."""
    w32 = np.ascontiguousarray(w.detach().float().cpu().numpy())
    if np.isnan(w32).any():
        raise ValueError("weights contain NaN")
    g = w32.shape[1] if group is None else group
    scale = _level_scales(w32, g, levels, steps, scale_dtype, importance)
    return _C.level_codes(w32, levels, g, scale.reshape(-1)), scale


def level_weights(w: torch.Tensor, group: Optional[int], levels: np.ndarray, steps: int = 9,
                  scale_dtype: str = "float32", importance: Optional[np.ndarray] = None) -> np.ndarray:
    """The float32 weights [N, K] that :func:`mse_levels`' codes and scales stand
    for (what a budget's planner compares with the float weights)."""
    idx, scale = _level_fit(w, group, levels, steps, scale_dtype, importance)
    n, k = idx.shape
    g = scale.shape[1]
    deq = np.asarray(levels, np.float32)[idx].reshape(n, g, k // g) * scale[:, :, None]
    return deq.reshape(n, k)


def mse_levels(w: torch.Tensor, group: Optional[int], levels: np.ndarray, steps: int = 9,
               scale_dtype: str = "float32", importance: Optional[np.ndarray] = None) -> tuple:
    """int4 codes on a level table (lowbit.levels): the error-minimising group
    scales of scale_search.cc on the table's levels, rounded to ``scale_dtype``,
    then every weight's nearest level under the rounded scale.

    Returns (packed, scales): the codes as int4 rows (formats.h packed rows, the
    symmetric code q = index - 8 in each nibble, what ``pack_weights(...,
    levels=)`` takes as a QArray) and float32 scales [N, K / G]. Lean on memory
    (quantizing while loading holds one float layer): besides the weight, 1.5
    bytes per weight at the peak."""
    idx, scale = _level_fit(w, group, levels, steps, scale_dtype, importance)
    n, k = idx.shape
    idx ^= 8  # index u -> the low 4 bits of the two's complement code u - 8
    packed = np.zeros((n, (k + 1) // 2), np.uint8)
    packed[:, :k // 2] = idx[:, 0:k - k % 2:2]
    packed[:, :k // 2] |= idx[:, 1::2] << 4
    if k % 2:
        packed[:, -1] = idx[:, -1]
    return packed, scale


def clip_search(w: torch.Tensor, h_diag: torch.Tensor, bits: int, group: Optional[int], symmetric: bool,
                ratios=None, scale_dtype: str = "float32") -> torch.Tensor:
    """Per (row, group) range shrink minimising the activation-weighted error
    sum_j E[x_j^2] (w_j - q_j)^2 (the output error under independent inputs)."""
    ratios = torch.linspace(1.0, 0.55, 19) if ratios is None else ratios
    wg = _grouped(w.float(), group)
    hg = h_diag.float().reshape(1, wg.shape[1], wg.shape[2])
    best = torch.ones(wg.shape[:2])
    best_err = torch.full(wg.shape[:2], float("inf"))
    for r in ratios:
        clip = torch.full(wg.shape[:2], float(r))
        scale, zp = group_params(wg, bits, symmetric, clip, scale_dtype)
        q = quant_codes(wg, scale, zp, bits, symmetric).float()
        deq = (q - (0 if zp is None else zp[..., None])) * scale[..., None]
        err = ((deq - wg) ** 2 * hg).sum(-1)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best


def gptq_factor(h: torch.Tensor, act_order: bool = False, damp: float = 0.01, overwrite: bool = False) -> tuple:
    """(dead columns, column order, upper Cholesky factor of the damped inverse
    Hessian): what GPTQ needs of H. Layers fed the same input (q/k/v, gate/up)
    share it, so it can be computed once for them. ``overwrite``: h is a float64
    tensor the caller no longer needs (LayerStats.hessian is a fresh one).

    Memory: at most 3 K x K float64 matrices besides h (K = 14336, Llama-3-8B's
    down projection, is 1.6 GB each): every step that can is done in place."""
    k = h.shape[0]
    H = h.detach()
    if not (overwrite and H.dtype == torch.float64):
        H = H.to(torch.float64, copy=True)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    if act_order:
        perm = torch.argsort(diag, descending=True)
        H = H[perm][:, perm]
        diag = H.diagonal()
    else:
        perm = torch.arange(k)
    diag += damp * torch.mean(diag)
    # The upper factor U of H^-1 (H^-1 = U^T U) without forming H^-1: with J the
    # reversal and J H J = M M^T (lower Cholesky), U = J M^-1 J. One Cholesky and
    # one triangular solve instead of Cholesky, inverse, Cholesky: 3.5x faster
    # at K = 1536 (0.54 s vs 1.9 s), equal to 1e-15 relative.
    reversed_h = H.flip((0, 1))
    del H, diag
    M = torch.linalg.cholesky(reversed_h)
    del reversed_h
    Minv = torch.linalg.solve_triangular(M, torch.eye(k, dtype=M.dtype), upper=False)
    del M
    return dead, perm, Minv.flip((0, 1))


# GPTQ's column loop; tests swap in reference.gptq_columns to check the whole
# algorithm against its NumPy spec.
_columns = _C.gptq_columns


def gptq(w: torch.Tensor, h: Optional[torch.Tensor], bits: int, group: Optional[int], symmetric: bool = True,
         act_order: bool = False, damp: float = 0.01, block: int = 32, factor: Optional[tuple] = None,
         scale_dtype: str = "float32", levels: Optional[np.ndarray] = None) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns one at a time and push each
    column's error onto the columns not yet quantized, weighted by the inverse
    Hessian H = E[x x^T] of the layer's inputs (through its Cholesky factor).

    Group scales are chosen when a group's first column is reached (from the
    error-updated weights); with ``act_order`` columns go in order of decreasing
    H diagonal and the scales are fixed up front from the original weights
    ("static groups"), so groups stay contiguous runs of K, as the kernels need.
    ``factor``: :func:`gptq_factor` of h (with the same act_order and damp), if
    already computed; h may then be None. ``levels``: symmetric int4 codes on
    this level table (lowbit.levels), the group scales fixed up front by the
    data-free level search of the original weights (:func:`mse_levels`'s),
    each column's codes the nearest levels.
    """
    n, k = w.shape
    g = k if group is None else group
    if levels is not None and (bits != 4 or not symmetric):
        raise ValueError(f"levels need symmetric 4-bit codes, got bits={bits}, symmetric={symmetric}")
    dead, perm, Hinv = factor if factor is not None else gptq_factor(h, act_order, damp)
    W = w.detach().double().clone()
    W[:, dead] = 0
    static = None
    # int8 scale codes share one scale per row, so a row's group scales must all
    # be known before any is rounded: such layers fix them up front ("static
    # groups", as with act_order).
    if levels is not None:
        static = (torch.from_numpy(_level_scales(np.ascontiguousarray(W.float().numpy()), g, levels, 9, scale_dtype,
                                                 None)), None)
    elif act_order or group is None or scale_dtype == "int8":
        static = group_params(_grouped(W.float(), group), bits, symmetric, scale_dtype=scale_dtype)
    identity = bool(torch.equal(perm, torch.arange(k)))  # no act_order: no permuted copies
    if not identity:
        W = W[:, perm]
    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, k // g, dtype=torch.float32)
    zps = None if symmetric else torch.zeros(n, k // g, dtype=torch.float32)
    if static is not None:
        scales.copy_(static[0])
        if zps is not None:
            zps.copy_(static[1])
    # Columns are updated one by one inside a block, later blocks by one matmul
    # per block (the paper's lazy batch update). Group scales chosen on the fly
    # must see their whole group updated, so such a group never straddles blocks;
    # fixed (static) scales allow any block: 32 keeps the per-column work small
    # (a per-row layer would otherwise be one K-wide block).
    if static is None:
        block = max(block, g) // g * g if g <= block else g
    qmin, qmax = qrange(bits, symmetric)
    codes_np = codes.numpy()
    perm_np = perm.numpy()
    # The column loop is the native kernel (csrc/lowbit/gptq.cc; the NumPy spec is
    # reference.gptq_columns): it wants the block's columns as rows, and the group
    # parameters as rows of [G, N] float32 mirrors of scales / zps.
    ngroups = k // g
    scales_t = np.zeros((ngroups, n), np.float32)
    zps_t = None if symmetric else np.zeros((ngroups, n), np.float32)
    if static is not None:
        scales_t[...] = scales.numpy().T
        if zps_t is not None:
            zps_t[...] = zps.numpy().T
    groups_of = (perm_np // g).astype(np.int32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        b = i2 - i1
        wt = np.ascontiguousarray(W[:, i1:i2].numpy().T)
        hinv1 = np.ascontiguousarray(Hinv[i1:i2, i1:i2].numpy())
        codes_b = np.empty((b, n), np.int32)
        err_b = np.empty((b, n), np.float64)
        grp = np.ascontiguousarray(groups_of[i1:i2])
        if static is not None:
            _columns(wt, hinv1, 0, b, scales_t, zps_t, grp, qmin, qmax, codes_b, err_b, levels)
        else:  # a group's scales come from its columns as the block's updates left them
            for c in range(0, b, g):
                gi = (i1 + c) // g
                s, z = group_params(torch.from_numpy(wt[c:c + g].T).float(), bits, symmetric,
                                    scale_dtype=scale_dtype)
                scales[:, gi] = s
                scales_t[gi] = s.numpy()
                if zps is not None:
                    zps[:, gi] = z
                    zps_t[gi] = z.numpy()
                _columns(wt, hinv1, c, c + g, scales_t, zps_t, grp, qmin, qmax, codes_b, err_b, None)
        codes_np[:, i1:i2] = codes_b.T
        W[:, i2:] -= torch.from_numpy(np.ascontiguousarray(err_b.T)) @ Hinv[i1:i2, i2:]
    if not identity:
        codes = codes[:, torch.argsort(perm)].contiguous()
    return QuantizedWeight(codes, scales, zps, bits, group,
                           levels=None if levels is None else np.asarray(levels, np.int8).copy())


def awq(w: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, bits: int, group: Optional[int],
        symmetric: bool = True, grid: int = 20, scale_dtype: str = "float32") -> QuantizedWeight:
    """AWQ-style (Lin et al. 2023): scale input channel j of the weight by
    s_j = mean|x_j|^alpha (alpha searched on a grid to minimise the output error on
    the sample x), so salient channels get finer steps; the layer multiplies its
    input by 1/s at run time. Then a per-group clip search on the scaled weight."""
    w = w.detach().float()
    x = x.float()
    ref = x @ w.T
    h_diag = (x * x).mean(0)
    best, best_err = None, float("inf")
    am = act_mean.float().clamp(min=1e-8)
    for i in range(grid + 1):
        alpha = i / grid
        s = am.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = rtn(w * s, bits, group, symmetric, scale_dtype=scale_dtype)
        err = float(((x @ (q.dequantize() / s).T) - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    s = best
    ws = w * s
    clip = clip_search(ws, h_diag / (s * s), bits, group, symmetric, scale_dtype=scale_dtype)
    q = rtn(ws, bits, group, symmetric, clip, scale_dtype)
    q.input_scale = (1.0 / s).float()
    return q


def add_gram_(h: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """h += x^T x (h float64 [K, K], x float32 [R, K]) from the upper block
    triangle only: with b column blocks, (b + 1) / 2b of the full product's
    multiply-adds (0.625 at b = 4), the lower blocks mirrored. torch has no
    syrk; the Hessians were a quarter of a GPTQ run on SmolLM2. Measured on 2
    AVX2 threads, 4096 rows: K = 1536 0.36-0.41 s against 0.58-0.68 s per 4
    calls; at K = 576 the smaller products gain nothing."""
    k = x.shape[1]
    if k < 1024:
        h += (x.T @ x).double()
        return
    edges = [k * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        a0, a1 = edges[i], edges[i + 1]
        xa = x[:, a0:a1]
        part = (xa.T @ x[:, a0:]).double()  # rows a0:a1, columns a0:
        h[a0:a1, a0:] += part
        h[a1:, a0:a1] += part[:, a1 - a0:].T


class LayerStats:
    """What one layer's inputs look like over the calibration data: the Hessian
    E[x x^T] (float64 [K, K]), mean |x| per channel, and a bounded row sample."""

    def __init__(self, k: int, max_rows: int = 2048, need_hessian: bool = True, need_sample: bool = True):
        self.k, self.rows, self.max_rows = k, 0, max_rows if need_sample else 0
        self.h = torch.zeros(k, k, dtype=torch.float64) if need_hessian else None
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.sample: list = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(0)
        self._cache: dict = {}

    def cached(self, key, make):
        """make() once per key for these statistics (e.g. GPTQ's factor of H)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def add(self, x: torch.Tensor) -> None:
        self._cache.clear()
        x = x.detach().reshape(-1, self.k)
        for r in range(0, x.shape[0], 4096):
            # float32 over chunks of 4096 rows, summed in float64: 4x faster than
            # float64 throughout; a chunk's rounding (~1e-7 relative) is far
            # below GPTQ's 1% damping. (|x| summed in float64 straight from x
            # took 0.2 s per call at 16k x 1536, a fifth of a GPTQ run.)
            c = x[r:r + 4096].float()
            if self.h is not None:
                add_gram_(self.h, c)
            self.abs_sum += c.abs().sum(0).double()
        self.rows += x.shape[0]
        if self._kept < self.max_rows:
            take = x[torch.randperm(x.shape[0], generator=self._gen)[: self.max_rows - self._kept]]
            self.sample.append(take.float())
            self._kept += take.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.h is None:
            raise ValueError("these statistics hold no Hessian (need_hessian=False, or take_hessian() took it)")
        return self.h / max(self.rows, 1)

    def take_hessian(self) -> torch.Tensor:
        """The Hessian, computed in place of the running sum, which is given up: one
        K x K float64 matrix less while GPTQ factors it (8 MB at K = 1024)."""
        h = self.h
        if h is None:
            raise ValueError("these statistics hold no Hessian (need_hessian=False, or take_hessian() took it)")
        self.h = None
        return h.div_(max(self.rows, 1))

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.sample)
