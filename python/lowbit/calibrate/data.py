"""Feeding calibration batches to a model: tensors, tuples/lists (positional
arguments) or dicts (keyword arguments, the transformers style)."""
from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Mapping
from typing import Iterable, Optional

import torch

CALIBRATION_DTYPES = ("auto", "bfloat16", None)


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early (the rest is not needed)."""


def _no_cache(model: torch.nn.Module, batch) -> dict:
    """use_cache=False for models that take it (transformers' causal LMs) unless
    the batch sets it: calibration never decodes, and the KV cache it would
    build holds every layer's keys and values until the pass ends (40 MB for
    4 x 64 tokens through a 40-layer, 512-wide Llama: most of what a capped
    calibration pass had beyond the quantized model)."""
    if isinstance(batch, Mapping) and "use_cache" in batch:
        return {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def run_batch(model: torch.nn.Module, batch) -> None:
    extra = _no_cache(model, batch)
    if isinstance(batch, torch.Tensor):
        model(batch, **extra)
    elif isinstance(batch, dict):
        model(**batch, **extra)
    elif isinstance(batch, (tuple, list)):
        model(*batch, **extra)
    else:
        raise TypeError(f"calibration batches must be tensors, tuples/lists or dicts, got {type(batch).__name__}")


def batches(data, max_batches: Optional[int]) -> list:
    """The first max_batches batches of data (a tensor is one batch), as a list
    (GPTQ passes over them once per layer)."""
    if data is None:
        raise ValueError("calibration_data is required")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration_data must be an iterable of batches, got {type(data).__name__}")
    # A tokenizer's BatchEncoding is a Mapping, not a dict: plain dicts from here on.
    out = [dict(b) if isinstance(b, Mapping) and not isinstance(b, dict) else b
           for b in itertools.islice(data, max_batches)]
    if not out:
        raise ValueError("calibration_data yielded no batches")
    return out


def forward_all(model: torch.nn.Module, data: list, progress: bool = False, desc: str = "calibrate",
                dtype: Optional[torch.dtype] = None) -> None:
    """Run every batch through the model (matmuls in ``dtype`` if given); a hook
    may end a batch early with StopForward."""
    items = data
    if progress:
        try:
            from tqdm.auto import tqdm
            items = tqdm(data, desc=desc, unit="batch", leave=False)
        except ImportError:
            pass
    with torch.no_grad(), calibration_autocast(dtype):
        for b in items:
            try:
                run_batch(model, b)
            except StopForward:
                pass


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512_BF16: Zen 4, Cooper
    Lake, Sapphire Rapids), where torch's bfloat16 GEMMs run ~2x its float32
    ones (2.05x at 16384 x 576 x 1536 on the Zen 4); elsewhere they are emulated
    and slower than float32."""
    from .. import _C
    return bool(_C.cpu_features().get("avx512bf16"))


def resolve_calibration_dtype(value, targets: list) -> Optional[torch.dtype]:
    """The dtype a calibration forward runs its matmuls and attention in (torch's
    CPU autocast), or None for the model's own. "auto": bfloat16 for a float32
    model on a CPU with bfloat16 dot products, else None. The statistics taken
    from that forward (Hessians, means, samples, ranges) stay float32/float64."""
    if value not in CALIBRATION_DTYPES:
        raise ValueError(f"calibration_dtype must be 'auto', 'bfloat16' or None, got {value!r}")
    if value is None:
        return None
    if value == "auto" and (not native_bf16() or any(m.weight.dtype != torch.float32 for _, m in targets)):
        return None
    return torch.bfloat16


def calibration_autocast(dtype: Optional[torch.dtype]):
    """The context a calibration forward runs in (see resolve_calibration_dtype)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def exact():
    """For a hook's body inside calibration_autocast: statistics, searches and
    quantizers run in their own dtypes (a Hessian from an autocast bfloat16 GEMM
    is rounded to bfloat16 and stops being positive definite)."""
    return torch.autocast("cpu", enabled=False)
