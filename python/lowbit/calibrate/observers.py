"""Observers: watch tensors during calibration and turn what they saw into a
scale and zero point.

The scale/zero-point formulas are torch.ao's (``calculate_qparams``), so a
lowbit observer and its torch.ao counterpart agree on the same data:
  symmetric:  scale = max(-min_neg, max_pos) / ((qmax - qmin) / 2), floored at eps;
              zero_point = 0 for signed codes, the midpoint for unsigned ones
  affine:     scale = (max_pos - min_neg) / (qmax - qmin), floored at eps;
              zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)
with min_neg = min(min, 0), max_pos = max(max, 0), and ``reduce_range``
dropping one bit of the code range (as torch does for x86 fbgemm).
"""
from __future__ import annotations

import abc
import math
from typing import Optional

import torch

EPS = torch.finfo(torch.float32).eps


def code_range(bits: int, signed: bool, reduce_range: bool = False) -> tuple:
    """(qmin, qmax) of b-bit codes; reduce_range keeps b-1 bits like torch.ao."""
    b = bits - 1 if reduce_range else bits
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if signed else (0, (1 << b) - 1)


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int,
                       symmetric: bool) -> tuple:
    """torch.ao's scale and zero point for observed min/max (any shape)."""
    min_val, max_val = torch.as_tensor(min_val, dtype=torch.float32), torch.as_tensor(max_val, dtype=torch.float32)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    eps = torch.tensor(EPS)
    if symmetric:
        scale = torch.maximum(torch.maximum(-min_neg, max_pos) / (float(qmax - qmin) / 2), eps)
        zp = torch.full_like(scale, 0 if qmin < 0 else (qmin + qmax + 1) // 2, dtype=torch.int64)
        if qmin >= 0 and (qmin, qmax) != (0, 255):
            zp = torch.full_like(scale, (qmin + qmax) // 2, dtype=torch.int64)
    else:
        scale = torch.maximum((max_pos - min_neg) / float(qmax - qmin), eps)
        zp = torch.clamp(qmin - torch.round(min_neg / scale).to(torch.int64), qmin, qmax)
    return scale, zp


class Observer(abc.ABC):
    """Base: ``observer(x)`` records x and returns it; ``qparams()`` gives (scale, zero_point).

    bits/signed/symmetric/reduce_range choose the code range and formula; the
    default is what lowbit's int8 activation kernels use: symmetric codes in
    [-127, 127] (``narrow=True`` drops -128, so the scale is amax / 127).
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True, reduce_range: bool = False,
                 narrow: bool = True):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
        self.bits, self.symmetric, self.signed = bits, symmetric, signed
        self.qmin, self.qmax = code_range(bits, signed, reduce_range)
        if narrow and signed and symmetric:
            self.qmin = -self.qmax
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if x.numel():
            if torch.isnan(x).any():
                raise ValueError(f"{type(self).__name__}: the observed tensor contains NaN")
            self._observe(x.float())
            self.count += 1
        return x

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None:
        """Fold one float32 tensor into the statistics."""

    def range(self) -> tuple:
        if self.min_val is None:
            raise RuntimeError(f"{type(self).__name__} has observed nothing yet")
        return self.min_val, self.max_val

    def qparams(self) -> tuple:
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)

    def __repr__(self) -> str:
        seen = "nothing" if self.min_val is None else f"{self.count} tensors"
        return f"{type(self).__name__}(int{self.bits}, {'sym' if self.symmetric else 'affine'}, {seen})"


def _finite_minmax(x: torch.Tensor, dim=None) -> tuple:
    # +-inf saturates like torch's fake-quant: it must not blow up the scale.
    fin = torch.isfinite(x)
    lo = torch.where(fin, x, torch.full_like(x, math.inf))
    hi = torch.where(fin, x, torch.full_like(x, -math.inf))
    if dim is None:
        lo, hi = lo.min(), hi.max()
    else:
        lo, hi = lo.amin(dim=dim), hi.amax(dim=dim)
    return torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)


class MinMaxObserver(Observer):
    """Running min and max over everything observed (torch.ao.MinMaxObserver)."""

    def _observe(self, x):
        lo, hi = _finite_minmax(x)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max
    (torch.ao.MovingAverageMinMaxObserver, averaging_constant c: new = old + c * (batch - old))."""

    def __init__(self, averaging_constant: float = 0.01, **kw):
        super().__init__(**kw)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant

    def _observe(self, x):
        lo, hi = _finite_minmax(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)


class PerChannelMinMaxObserver(Observer):
    """Min and max per channel along ``axis`` (torch.ao.PerChannelMinMaxObserver)."""

    def __init__(self, axis: int = 0, **kw):
        super().__init__(**kw)
        self.axis = axis

    def _observe(self, x):
        xt = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        lo, hi = _finite_minmax(xt, dim=1)
        if self.min_val is not None and self.min_val.shape != lo.shape:
            raise ValueError(f"channel count changed from {self.min_val.numel()} to {lo.numel()}")
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)


class _Sampling(Observer):
    """Keeps a bounded random sample of the observed values (reservoir per call)."""

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0, **kw):
        super().__init__(**kw)
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list = []
        self._kept = 0

    def _observe(self, x):
        flat = x.reshape(-1)
        flat = flat[torch.isfinite(flat)]
        per_call = max(1, self.max_samples // 16)
        if flat.numel() > per_call:
            flat = flat[torch.randint(flat.numel(), (per_call,), generator=self._gen)]
        self._samples.append(flat.clone())
        self._kept += flat.numel()
        while self._kept > self.max_samples and len(self._samples) > 1:
            self._kept -= self._samples.pop(0).numel()
        lo, hi = _finite_minmax(x)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def _values(self) -> torch.Tensor:
        if not self._samples:
            raise RuntimeError(f"{type(self).__name__} has observed nothing yet")
        return torch.cat(self._samples)


class PercentileObserver(_Sampling):
    """Clips at the given percentile of |x| (symmetric) or of x at both ends
    (affine): outliers stop dictating the scale."""

    def __init__(self, percentile: float = 99.99, **kw):
        super().__init__(**kw)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self):
        v = self._values().double()
        q = self.percentile / 100
        if self.symmetric:
            a = torch.quantile(v.abs(), q).float()
            return -a, a
        return torch.quantile(v, 1 - q).float(), torch.quantile(v, q).float()


class MSEObserver(_Sampling):
    """Searches the clipping range that minimises the squared quantization error
    of the observed values (the aim of torch.ao's HistogramObserver, by direct
    search over 100 shrink factors of the min-max range)."""

    def __init__(self, steps: int = 100, min_ratio: float = 0.3, **kw):
        super().__init__(**kw)
        self.steps, self.min_ratio = steps, min_ratio

    def range(self):
        v = self._values()
        lo, hi = self.min_val, self.max_val
        best, best_err = (lo, hi), math.inf
        for r in torch.linspace(1.0, self.min_ratio, self.steps):
            clo, chi = lo * r, hi * r
            scale, zp = qparams_from_range(clo, chi, self.qmin, self.qmax, self.symmetric)
            q = torch.clamp(torch.round(v / scale) + zp, self.qmin, self.qmax)
            err = float(((q - zp) * scale - v).pow(2).sum())
            if err < best_err:
                best, best_err = (clo, chi), err
        return best


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "per_channel": PerChannelMinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(kind, **kw) -> Observer:
    """An observer from a name in OBSERVERS, a class, or a ready instance."""
    if isinstance(kind, Observer):
        return kind
    if isinstance(kind, type) and issubclass(kind, Observer):
        return kind(**kw)
    if kind not in OBSERVERS:
        raise ValueError(f"observer must be one of {sorted(OBSERVERS)}, an Observer class or instance; got {kind!r}")
    return OBSERVERS[kind](**kw)
