"""Fused projections: sibling QuantLinear layers that read the same input
(q/k/v, gate/up) run as ONE kernel call, their outputs split afterwards.

On a small LM, decoding is bound by the fixed cost of each call (Python, views,
pool wake-up: ~20-40 us) more than by the weights: SmolLM2 runs 210 projections
per token, 120 once q/k/v and gate/up are fused. The fused weight is the members'
tiles concatenated (a tile is 16 output rows, so members whose widths are
multiples of 16 concatenate exactly: the results are bit for bit the same as
separate calls).

A fused model is a run-time form: ``lowbit.save`` it before fusing (its file
layout is per layer); ``lowbit.fuse_projections(model)`` again after loading.
"""
from __future__ import annotations

import torch
from torch import nn

from ..matmul import TILE_ROWS
from .quant_linear import QuantLinear

# Sibling names that take the same input in the common architectures.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
          ("w1", "w3"))


def tensor_version(x: torch.Tensor) -> int:
    """x's in-place version counter; inference-mode tensors have none (-1): for
    them the same tensor object is taken to hold the same values."""
    return -1 if x.is_inference() else x._version


class FusedProjection(nn.Module):
    """Owns the concatenated layer; its members call :meth:`slice`."""

    def __init__(self, fused: QuantLinear, bounds):
        super().__init__()
        self.fused = fused
        self.bounds = list(bounds)  # [(start, end)] per member, in output features
        self._last = None           # (input, its version, output) of the latest call

    def slice(self, x: torch.Tensor, i: int) -> torch.Tensor:
        start, end = self.bounds[i]
        if torch.compiler.is_compiling():
            return self.fused(x)[..., start:end]
        last = self._last
        version = tensor_version(x)
        if last is None or last[0] is not x or last[1] != version:
            last = self._last = (x, version, self.fused(x))
        return last[2][..., start:end]


class FusedMember(nn.Module):
    """Stands where one of the fused layers was: the owner's output, sliced."""

    def __init__(self, owner: FusedProjection, index: int, in_features: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: the tiles belong to the owner once
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.slice(x, self.index)

    def extra_repr(self) -> str:
        s, e = self.owner.bounds[self.index]
        return f"in_features={self.in_features}, out_features={self.out_features}, fused outputs [{s}:{e}]"


def _fusable(mods) -> bool:
    a = mods[0]
    if not all(type(m) is QuantLinear for m in mods):
        return False
    c = a.config
    return c.bits in (3, 4, 8) and all(
        m.in_features == a.in_features and m.config == c and m.out_features % TILE_ROWS == 0 and not m.act_scale
        and m.input_scale is None and (m.bias is None) == (a.bias is None) and m.orig_dtype == a.orig_dtype
        and (m.levels is None or torch.equal(m.levels, a.levels))  # one table for the fused layer
        for m in mods)


def fuse(mods) -> QuantLinear:
    """One QuantLinear computing the members' outputs side by side."""
    a = mods[0]
    n = sum(m.out_features for m in mods)
    out = QuantLinear(a.in_features, n, a.bias is not None, a.config, dtype=a.orig_dtype)
    out.data = torch.cat([m.data for m in mods])
    out.scales = torch.cat([m.scales for m in mods])
    out.offsets = None if a.offsets is None else torch.cat([m.offsets for m in mods])
    # Whole tiles only (_fusable), so the members' row scales line up end to end.
    out.row_scales = None if a.row_scales is None else torch.cat([m.row_scales for m in mods])
    out.levels = None if a.levels is None else a.levels.clone()
    if a.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]),
                                requires_grad=any(m.bias.requires_grad for m in mods))
    return out


def fuse_projections(model: nn.Module) -> list:
    """Fuse q/k/v and gate/up (and other GROUPS) QuantLinear siblings in place.

    Returns the names of the fused groups. Siblings are fused only when they are
    int8 / int4 QuantLinear layers with the same input size, format, dynamic (or no)
    activation quantization and bias presence, each a multiple of 16 outputs wide.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for parent_name, parent in list(model.named_modules()):
        for names in GROUPS:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods) or not _fusable(mods):
                continue
            bounds, start = [], 0
            for m in mods:
                bounds.append((start, start + m.out_features))
                start += m.out_features
            owner = FusedProjection(fuse(mods), bounds)
            owner_name = "_".join(n.split("_")[0] for n in names) + "_fused"
            parent.add_module(owner_name, owner)
            for i, (n, m) in enumerate(zip(names, mods)):
                setattr(parent, n, FusedMember(owner, i, m.in_features, m.out_features))
            done.append(f"{parent_name}.{owner_name}" if parent_name else owner_name)
    return done
