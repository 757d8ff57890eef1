"""Feeding calibration batches to a model: tensors, tuples/lists (positional
arguments) or dicts (keyword arguments, the transformers style)."""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from typing import Iterable, Optional

import torch


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


def forward_all(model: torch.nn.Module, data: list, progress: bool = False, desc: str = "calibrate") -> None:
    items = data
    if progress:
        try:
            from tqdm.auto import tqdm
            items = tqdm(data, desc=desc, unit="batch", leave=False)
        except ImportError:
            pass
    with torch.no_grad():
        for b in items:
            try:
                run_batch(model, b)
            except StopForward:
                pass
