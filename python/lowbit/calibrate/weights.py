"""Weight quantization algorithms over one Linear layer: RTN, GPTQ, AWQ-style.

All of them produce integer codes and per-group scales under lowbit's own
scale rule (formats.h: the signed largest-magnitude value maps to -2^(b-1);
asymmetric min-max with an integer zero point), so their output loads into the
same tiled kernels as plain quantization. Codes of 3 or fewer bits are stored
in int4 tiles (the kernels run them as int4).

The float math follows the kernels exactly where it matters: scales in
float32, codes = round_half_even(w * (1 / scale)) clamped, so RTN here equals
``lowbit.quantize_array`` bit for bit (a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

FLT_MIN = torch.finfo(torch.float32).tiny


@dataclass
class QuantizedWeight:
    """Codes [N, K] (int32), scales [N, K // G] float32, zero points (asymmetric)
    and an optional per-input-channel multiplier applied to x first (AWQ)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int]
    input_scale: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernels compute with (in the scaled input basis)."""
        n, k = self.codes.shape
        g = k if self.group_size is None else self.group_size
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


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: Optional[torch.Tensor] = None) -> tuple:
    """lowbit's scale rule over the last axis of w [..., G] (optionally shrunk by clip [...])."""
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
    return scale, zp


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
        clip: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Round to nearest (clip: optional per-(row, group) shrink of the range)."""
    wg = _grouped(w.float(), group)
    scale, zp = group_params(wg, bits, symmetric, clip)
    codes = quant_codes(wg, scale, zp, bits, symmetric)
    return QuantizedWeight(codes.reshape(w.shape), scale, zp, bits, group)


def mse(w: torch.Tensor, bits: int, group: Optional[int], symmetric: bool = True, steps: int = 9) -> QuantizedWeight:
    """Data-free error-minimising scales (csrc/lowbit/scale_search.cc), then the codes they give."""
    from .. import _C
    w32 = np.ascontiguousarray(w.detach().float().cpu().numpy())
    n, k = w32.shape
    g = k if group is None else group
    s, z = _C.search_scales(w32, bits, g, symmetric, steps)  # 3-bit codes: searched on the 3-bit grid
    scale = torch.from_numpy(s.reshape(n, k // g))
    zp = None if symmetric else torch.from_numpy(z.reshape(n, k // g).astype(np.float32))
    wg = _grouped(w.float(), group)
    codes = quant_codes(wg, scale, zp, bits, symmetric)
    return QuantizedWeight(codes.reshape(w.shape), scale, zp, bits, group)


def clip_search(w: torch.Tensor, h_diag: torch.Tensor, bits: int, group: Optional[int], symmetric: bool,
                ratios=None) -> torch.Tensor:
    """Per (row, group) range shrink minimising the activation-weighted error
    sum_j E[x_j^2] (w_j - q_j)^2 (the output error under independent inputs)."""
    ratios = torch.linspace(1.0, 0.55, 19) if ratios is None else ratios
    wg = _grouped(w.float(), group)
    hg = h_diag.float().reshape(1, wg.shape[1], wg.shape[2])
    best = torch.ones(wg.shape[:2])
    best_err = torch.full(wg.shape[:2], float("inf"))
    for r in ratios:
        clip = torch.full(wg.shape[:2], float(r))
        scale, zp = group_params(wg, bits, symmetric, clip)
        q = quant_codes(wg, scale, zp, bits, symmetric).float()
        deq = (q - (0 if zp is None else zp[..., None])) * scale[..., None]
        err = ((deq - wg) ** 2 * hg).sum(-1)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best


def gptq_factor(h: torch.Tensor, act_order: bool = False, damp: float = 0.01) -> tuple:
    """(dead columns, column order, upper Cholesky factor of the damped inverse
    Hessian): what GPTQ needs of H. Layers fed the same input (q/k/v, gate/up)
    share it, so it can be computed once for them."""
    k = h.shape[0]
    H = h.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    return dead, perm, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq(w: torch.Tensor, h: Optional[torch.Tensor], bits: int, group: Optional[int], symmetric: bool = True,
         act_order: bool = False, damp: float = 0.01, block: int = 32, factor: Optional[tuple] = None
         ) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns one at a time and push each
    column's error onto the columns not yet quantized, weighted by the inverse
    Hessian H = E[x x^T] of the layer's inputs (through its Cholesky factor).

    Group scales are chosen when a group's first column is reached (from the
    error-updated weights); with ``act_order`` columns go in order of decreasing
    H diagonal and the scales are fixed up front from the original weights
    ("static groups"), so groups stay contiguous runs of K, as the kernels need.
    ``factor``: :func:`gptq_factor` of h (with the same act_order and damp), if
    already computed; h may then be None.
    """
    n, k = w.shape
    g = k if group is None else group
    dead, perm, Hinv = factor if factor is not None else gptq_factor(h, act_order, damp)
    W = w.detach().double().clone()
    W[:, dead] = 0
    static = None
    if act_order or group is None:
        static = group_params(_grouped(W.float(), group), bits, symmetric)
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
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        # The column loop runs in NumPy: ~10 small ops per column, each ~1 us
        # there against ~8 us in torch (SmolLM2: 150k columns, 93 s -> ~15 s).
        # Same arithmetic as quant_codes: float32 w * (1 / s), clamp, round half even.
        W1 = W[:, i1:i2].numpy().copy()
        Err = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].numpy()
        cur = None
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(perm_np[col]) // g
            if static is None and col % g == 0:  # a new group starts here (never straddles blocks)
                s, z = group_params(torch.from_numpy(W1[:, i:i + g]).float(), bits, symmetric)
                scales[:, gi] = s
                if zps is not None:
                    zps[:, gi] = z
                cur = None
            if gi != cur:  # this column's group parameters, as NumPy float32 (act order jumps between groups)
                cur = gi
                s32 = scales[:, gi].numpy()
                z32 = np.zeros_like(s32) if zps is None else zps[:, gi].numpy()
                inv32 = np.where(s32 == 0, np.float32(0), np.float32(1) / np.where(s32 == 0, np.float32(1), s32))
                lo32, hi32 = (qmin - z32).astype(np.float32), (qmax - z32).astype(np.float32)
                s64, z64 = s32.astype(np.float64), z32.astype(np.float64)
            q = np.rint(np.clip(W1[:, i].astype(np.float32) * inv32, lo32, hi32)) + z32
            codes_np[:, col] = q.astype(np.int32)
            err = (W1[:, i] - (q.astype(np.float64) - z64) * s64) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err[:, i] = err
        W[:, i2:] -= torch.from_numpy(Err) @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return QuantizedWeight(codes[:, inv].contiguous(), scales, zps, bits, group)


def awq(w: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, bits: int, group: Optional[int],
        symmetric: bool = True, grid: int = 20) -> QuantizedWeight:
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
        q = rtn(w * s, bits, group, symmetric)
        err = float(((x @ (q.dequantize() / s).T) - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    s = best
    ws = w * s
    clip = clip_search(ws, h_diag / (s * s), bits, group, symmetric)
    q = rtn(ws, bits, group, symmetric, clip)
    q.input_scale = (1.0 / s).float()
    return q


class LayerStats:
    """What one layer's inputs look like over the calibration data: the Hessian
    E[x x^T] (float64 [K, K]), mean |x| per channel, and a bounded row sample."""

    def __init__(self, k: int, max_rows: int = 2048, need_hessian: bool = True):
        self.k, self.rows, self.max_rows = k, 0, max_rows
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
        if self.h is not None:
            # float32 products over chunks of 4096 rows, summed in float64: 4x
            # faster than float64 throughout; a chunk's rounding (~1e-7 relative)
            # is far below GPTQ's 1% damping.
            xf = x.float()
            for r in range(0, xf.shape[0], 4096):
                c = xf[r:r + 4096]
                self.h += (c.T @ c).double()
        x = x.double()
        self.abs_sum += x.abs().sum(0)
        self.rows += x.shape[0]
        if self._kept < self.max_rows:
            take = x[torch.randperm(x.shape[0], generator=self._gen)[: self.max_rows - self._kept]]
            self.sample.append(take.float())
            self._kept += take.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.h / max(self.rows, 1)

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.sample)
