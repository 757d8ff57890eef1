"""lowbit.quantize(model, bits=4): swap nn.Linear layers for QuantLinear in place."""
from __future__ import annotations

import re
import sys
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .config import QuantConfig
from .nn import QuantLinear

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

# Output heads keep their precision by default: their errors land directly on
# the logits, and they are a small share of a model's weights.
DEFAULT_EXCLUDE = r"(^|\.)(lm_head|classifier|score|qa_outputs)$"
# Layers this small gain nothing measurable and cost accuracy.
MIN_WEIGHTS = 4096


def _matcher(sel: Selector, what: str) -> Callable[[str, nn.Module], bool]:
    if sel is None:
        return lambda name, mod: False
    if callable(sel):
        return sel
    if isinstance(sel, str):
        pat = re.compile(sel)
        return lambda name, mod: bool(pat.search(name))
    try:
        pats = [re.compile(s) for s in sel]
    except TypeError:
        raise TypeError(f"{what} must be None, a regex string, a list of them or a callable") from None
    return lambda name, mod: any(p.search(name) for p in pats)


def quantize(model: nn.Module, bits: int = 4, group_size: Optional[int] = 128, symmetric: bool = True,
             activations: Optional[int] = None, method: str = "rtn", calibration_data=None,
             include: Selector = None, exclude: Selector = None, progress: bool = True) -> nn.Module:
    """Replace the model's nn.Linear layers by lowbit QuantLinear, in place; returns the model.

    Args:
      bits: 4 or 8 (weights). group_size: scales per this many inputs (None: per row;
        falls back to per row where it does not divide a layer's inputs).
      symmetric: signed codes (default) or codes with zero points.
      activations: None (weight-only, float activations) or 8 (per-token int8
        activations, integer kernels: W8A8 / W4A8).
      method: "rtn" (round to nearest).
      include / exclude: regex, list of regexes, or callable(name, module) -> bool over
        module names. By default output heads (lm_head, classifier, ...) and layers
        with fewer than 4096 weights stay in float; the progress output says which.
      progress: show a progress bar over layers and the skipped layers.

    >>> import torch, lowbit
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> _ = lowbit.quantize(m, bits=4, progress=False)
    >>> type(m[0]).__name__, type(m[2]).__name__
    ('QuantLinear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be 4 or 8, got {bits!r}")
    if method != "rtn":
        raise ValueError(f"method={method!r} is not available; this version supports method='rtn'")
    if calibration_data is not None:
        raise ValueError("calibration_data is not used by method='rtn' with dynamic activations; "
                         "leave it None")
    config = QuantConfig(bits, group_size, symmetric, activations)
    want = _matcher(include, "include")
    skip = _matcher(exclude, "exclude")
    default_skip = re.compile(DEFAULT_EXCLUDE)
    targets, skipped = [], []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if include is not None:
            if want(name, mod) and not skip(name, mod):
                targets.append((name, mod))
            continue
        if skip(name, mod):
            skipped.append((name, "excluded"))
        elif default_skip.search(name):
            skipped.append((name, "output head"))
        elif mod.weight.numel() < MIN_WEIGHTS:
            skipped.append((name, f"tiny ({mod.weight.numel()} weights)"))
        elif mod.weight.device.type != "cpu":
            skipped.append((name, f"on {mod.weight.device}"))
        else:
            targets.append((name, mod))
    bar = _progress(targets, progress)
    for name, mod in bar:
        _set_module(model, name, QuantLinear.from_linear(mod, config))
    if progress and skipped:
        print("lowbit: kept in float: " + ", ".join(f"{n} ({why})" for n, why in skipped), file=sys.stderr)
    return model


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
        return tqdm(items, desc="lowbit.quantize", unit="layer")
    except ImportError:
        return items


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def summary(model: nn.Module, file=None) -> dict:
    """Per-layer table (bits, group, bytes before/after, kernel) and totals of a
    quantized model; prints it to ``file`` when given. Returns the numbers."""
    rows = []
    total_before = total_after = 0
    float_params = 0
    quant_ids = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            before = mod.in_features * mod.out_features * torch.finfo(mod.orig_dtype).bits // 8
            after = mod.nbytes - (0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size())
            rows.append(dict(name=name, shape=(mod.out_features, mod.in_features), config=mod.config.label,
                             bytes_before=before, bytes_after=after, kernel=mod.kernel))
            total_before += before
            total_after += after
            quant_ids.update(id(b) for b in (mod.data, mod.scales))
    for p in model.parameters():
        float_params += p.numel() * p.element_size()
    quant_weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    out = dict(layers=rows, quantized_bytes_before=total_before, quantized_bytes_after=total_after,
               float_bytes=float_params,
               bits_per_weight=8.0 * total_after / quant_weights if quant_weights else float("nan"),
               model_bytes=float_params + total_after)
    if file is not None:
        print(f"{'layer':40s} {'shape':>14s} {'format':>14s} {'KiB before':>11s} {'KiB after':>10s}  kernel", file=file)
        for r in rows:
            print(f"{r['name'][:40]:40s} {str(r['shape']):>14s} {r['config']:>14s} {r['bytes_before'] / 1024:11.1f} "
                  f"{r['bytes_after'] / 1024:10.1f}  {r['kernel']}", file=file)
        print(f"{len(rows)} layers: {total_before / 2**20:.2f} MiB -> {total_after / 2**20:.2f} MiB "
              f"({out['bits_per_weight']:.3f} bits/weight); other float tensors {float_params / 2**20:.2f} MiB",
              file=file)
    return out
