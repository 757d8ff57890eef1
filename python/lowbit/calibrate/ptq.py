"""The calibrated quantization pipeline behind ``lowbit.quantize(...,
calibration_data=...)``: per-layer bit plans (explicit or automatic mixed
precision), GPTQ / AWQ-style weights, static activation scales.

Layers are processed one at a time in model order. For each, the calibration
batches run through the model (whose earlier layers are already quantized, so
each layer corrects for the error it really receives) and stop right after the
layer's input has been recorded. Memory beyond the model: one layer's
statistics (a K x K Hessian and a bounded sample of input rows).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..config import QuantConfig, storage_bits
from .data import StopForward, forward_all
from .observers import make_observer
from .weights import LayerStats, awq, gptq, rtn

METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: code bits (3 and 2 run in int4 tiles), group size."""

    bits: int
    group_size: Optional[int]

    def bits_per_weight(self, k: int) -> float:
        storage = storage_bits(self.bits)
        g = k if self.group_size is None else self.group_size
        return storage + 32.0 / g


def layer_group(group_size: Optional[int], k: int, bits: int) -> Optional[int]:
    return QuantConfig(storage_bits(bits), group_size).for_features(k).group_size


def capture(model: nn.Module, module: nn.Module, data: list, stats: LayerStats, observer=None) -> None:
    """Run the batches until ``module`` is reached; record its input, skip the rest."""
    def hook(mod, args):
        x = args[0]
        stats.add(x)
        if observer is not None:
            observer(x)
        raise StopForward

    h = module.register_forward_pre_hook(hook)
    try:
        forward_all(model, data)
    finally:
        h.remove()


def sensitivities(model: nn.Module, targets: list, data: list, candidates: list, symmetric: bool) -> dict:
    """name -> {plan: relative output error ||x (W - Q)^T||^2 / ||x W^T||^2} on the
    float model, for each candidate plan (RTN; one forward pass with all hooks)."""
    acc = {}
    hooks = []
    for name, mod in targets:
        w = mod.weight.detach().float()
        k = w.shape[1]
        diffs = {}
        for c in candidates:
            plan = LayerPlan(c.bits, layer_group(c.group_size, k, c.bits))
            diffs[plan] = w - rtn(w, plan.bits, plan.group_size, symmetric).dequantize()
        acc[name] = {"ref": 0.0, **{p: 0.0 for p in diffs}}

        def hook(m, args, name=name, w=w, diffs=diffs):
            x = args[0].detach().reshape(-1, w.shape[1]).float()
            acc[name]["ref"] += float((x @ w.T).pow(2).sum())
            for p, d in diffs.items():
                acc[name][p] += float((x @ d.T).pow(2).sum())
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        forward_all(model, data)
    finally:
        for h in hooks:
            h.remove()
    return {name: {p: v / max(a["ref"], 1e-30) for p, v in a.items() if p != "ref"} for name, a in acc.items()}


def mixed_plan(targets: list, sens: dict, budget_bits: float) -> dict:
    """Per-layer plans minimising the summed relative output error with
    sum(weights * bits_per_weight) <= budget * sum(weights): start every layer at
    its cheapest plan, then upgrade greedily by error saved per extra bit."""
    sizes = {name: mod.weight.shape for name, mod in targets}
    total = sum(n * k for n, k in sizes.values())
    choice = {}
    used = 0.0
    for name, _ in targets:
        plans = sorted(sens[name], key=lambda p: p.bits_per_weight(sizes[name][1]))
        choice[name] = plans[0]
        used += sizes[name][0] * sizes[name][1] * plans[0].bits_per_weight(sizes[name][1])
    if used > budget_bits * total + 1e-6:
        cheapest = used / total
        raise ValueError(f"a budget of {budget_bits} bits/weight is below the cheapest plan available "
                         f"({cheapest:.3f} bits/weight with these candidates)")
    while True:
        best = None
        for name, _ in targets:
            n, k = sizes[name]
            cur = choice[name]
            for p, err in sens[name].items():
                extra = n * k * (p.bits_per_weight(k) - cur.bits_per_weight(k))
                gain = sens[name][cur] - err
                if extra <= 0 or gain <= 0 or used + extra > budget_bits * total + 1e-6:
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, name, p, extra)
        if best is None:
            return choice
        _, name, p, extra = best
        choice[name] = p
        used += extra


def quantize_calibrated(model: nn.Module, targets: list, plans: dict, method: str, symmetric: bool,
                        activations: Optional[int], data: Optional[list], static: bool, observer,
                        act_order: bool, progress: bool) -> None:
    from ..nn import QuantLinear
    from ..api import _set_module as replace_module
    items = targets
    if progress:
        try:
            from tqdm.auto import tqdm
            items = tqdm(targets, desc=f"lowbit.quantize ({method})", unit="layer")
        except ImportError:
            pass
    for name, mod in items:
        plan = plans[name]
        w = mod.weight.detach().float()
        needs_data = method != "rtn" or static
        obs = make_observer(observer) if static else None
        stats = None
        if needs_data:
            stats = LayerStats(w.shape[1], need_hessian=method == "gptq")
            capture(model, mod, data, stats, obs if observer == "minmax" else None)
            if stats.rows == 0:
                raise ValueError(f"layer {name!r} never ran on the calibration data")
        if method == "gptq":
            q = gptq(w, stats.hessian, plan.bits, plan.group_size, symmetric, act_order=act_order)
        elif method == "awq":
            q = awq(w, stats.x, stats.act_mean, plan.bits, plan.group_size, symmetric)
        else:
            q = rtn(w, plan.bits, plan.group_size, symmetric)
        storage = storage_bits(plan.bits)
        cfg = QuantConfig(storage, plan.group_size, symmetric, activations, code_bits=plan.bits)
        new = QuantLinear.from_quantized(q, mod.bias, cfg, dtype=mod.weight.dtype)
        if static:
            if observer == "minmax" and q.input_scale is None:
                scale = float(obs.qparams()[0])
            else:  # the kernels see x * input_scale: observe that, on the sample rows
                o = make_observer(observer)
                o(stats.x * (1 if q.input_scale is None else q.input_scale))
                scale = float(o.qparams()[0])
            new.act_scale = scale
        replace_module(model, name, new)
    if progress and len({p.bits for p in plans.values()}) > 1:
        counts = {}
        for p in plans.values():
            counts[p.bits] = counts.get(p.bits, 0) + 1
        print("lowbit: mixed precision plan: " + ", ".join(f"{c} layers at {b} bits" for b, c in
                                                            sorted(counts.items())), file=sys.stderr)
