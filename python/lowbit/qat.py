"""Quantization-aware training: ``lowbit.prepare_qat`` and ``lowbit.convert``.

prepare_qat swaps nn.Linear layers for QATLinear (fake-quantized weights, and
per-token int8 activations with ``activations=8``); train as usual; convert
swaps each QATLinear for a QuantLinear holding the codes and scales the
fake quantization used. Both paths run the same kernel code (lowbit::fake_quantize
computes the fake-quantized weight; convert reads the codes back from it), so
the weights of the integer model are bit-identical to the trained ones. The
outputs differ only by float summation order inside the matmul (weight-only:
the kernels multiply the same float weights in another order; W8A8: integer
dot products are exact, then one float scale per group).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .api import Selector, _progress, _select, _set_module
from .calibrate.weights import QuantizedWeight
from .config import QuantConfig, storage_bits
from .nn import QATLinear, QuantLinear


def prepare_qat(model: nn.Module, bits: int = 4, group_size: Optional[int] = 128, activations: Optional[int] = None,
                learnable: bool = False, include: Selector = None, exclude: Selector = None,
                progress: bool = False) -> nn.Module:
    """Replace nn.Linear layers by QATLinear in place (same selection rules as
    ``lowbit.quantize``); returns the model, ready to train.

    >>> import torch, lowbit
    >>> m = torch.nn.Sequential(torch.nn.Linear(128, 64))
    >>> m = lowbit.prepare_qat(m, bits=4, group_size=32)
    >>> type(m[0]).__name__
    'QATLinear'
    >>> m = lowbit.convert(m)
    >>> type(m[0]).__name__
    'QuantLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits!r}")
    targets, skipped = _select(model, include, exclude)
    for name, mod in _progress(targets, progress):
        g = QuantConfig(storage_bits(bits), group_size).for_features(mod.in_features).group_size
        _set_module(model, name, QATLinear.from_linear(mod, bits, g, activations, learnable))
    if progress and skipped:
        print("lowbit: kept in float: " + ", ".join(f"{n} ({why})" for n, why in skipped), file=sys.stderr)
    return model


def quantized_weight(layer: QATLinear) -> QuantizedWeight:
    """The codes and scales a QATLinear's fake quantization currently applies."""
    fq = layer.weight_fake_quant
    with torch.no_grad():
        w_fq = fq(layer.weight.detach().float())  # the very op (and scale) training used
        n, k = layer.weight.shape
        g = k if fq.group_size is None else fq.group_size
        scales = fq.scale.detach().float().reshape(n, k // g)
        codes = torch.round(w_fq.reshape(n, k // g, g) / scales[..., None]).to(torch.int32).reshape(n, k)
    return QuantizedWeight(codes, scales, None, fq.bits, fq.group_size)


def convert(model: nn.Module) -> nn.Module:
    """Replace every QATLinear by the QuantLinear with the same codes and scales, in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QATLinear):
            q = quantized_weight(mod)
            acts = 8 if mod.activation_fake_quant is not None else None
            storage = storage_bits(q.bits)
            cfg = QuantConfig(storage, q.group_size, True, acts, code_bits=q.bits)
            new = QuantLinear.from_quantized(q, mod.bias, cfg, dtype=mod.weight.dtype)
            if not name:
                raise ValueError("the model itself is a QATLinear; wrap it in a container")
            _set_module(model, name, new)
    return model
