"""The calibrated quantization pipeline behind ``lowbit.quantize(...,
calibration_data=...)``: per-layer bit plans (explicit or automatic mixed
precision), GPTQ / AWQ-style weights, static activation scales.

Layers are processed one at a time in model order, each seeing the outputs of
the already-quantized layers before it (so it corrects for the error it really
receives). When the batches can be stacked into one (same shapes: fixed-length
token windows, images), that takes ONE forward pass in total: a hook on each
layer records its input, quantizes it there and then, and hands the quantized
layer's output on (cost linear in depth). Otherwise the batches run through the
model once per layer, stopping at it (quadratic in depth; said on stderr).
Memory beyond the model: one layer's statistics (a K x K Hessian and a bounded
sample of input rows), plus, in one pass, the stacked batch's activations.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import QuantConfig, resolve_method, storage_bits
from ..levels import level_table
from .data import StopForward, calibration_autocast, exact, forward_all
from .memory import FreedMemoryReleaser
from .observers import make_observer
from .weights import LayerStats, awq, gptq, gptq_factor, level_weights, mse, rtn

METHODS = ("auto", "rtn", "mse", "gptq", "awq")
DATA_FREE = ("auto", "rtn", "mse")  # "auto": config.resolve_method per layer


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: code bits (3: int3 tiles; 2: packed rows run as
    dequantize + float matmul), group size, scale dtype (float16 / int8 for the
    tiles only; 2-bit rows keep float32), level table of int4 codes (lowbit.levels)."""

    bits: int
    group_size: Optional[int]
    scale_dtype: str = "float32"
    levels: Optional[str] = None

    def __post_init__(self):
        if self.bits == 2 and self.scale_dtype != "float32":
            object.__setattr__(self, "scale_dtype", "float32")

    def bits_per_weight(self, k: int, n: Optional[int] = None) -> float:
        """Stored bits per weight of a layer with k inputs (and n outputs: a level
        table's 16 bytes are counted when n is given)."""
        storage = storage_bits(self.bits)
        g = k if self.group_size is None else self.group_size
        table = 128.0 / (n * k) if self.levels is not None and n else 0.0
        if self.scale_dtype == "int8":  # a code per group, one float32 scale per row
            return storage + 8.0 / g + 32.0 / k + table
        return storage + (16.0 if self.scale_dtype == "float16" else 32.0) / g + table


def layer_group(group_size: Optional[int], k: int, bits: int) -> Optional[int]:
    return QuantConfig(storage_bits(bits), group_size).for_features(k).group_size


def capture(model: nn.Module, module: nn.Module, data: list, stats: LayerStats, observer=None,
            dtype: Optional[torch.dtype] = None) -> None:
    """Run the batches until ``module`` is reached (matmuls in ``dtype``, see
    data.resolve_calibration_dtype); record its input, skip the rest."""
    def hook(mod, args):
        x = args[0]
        with exact():
            stats.add(x)
            if observer is not None:
                observer(x)
        raise StopForward

    h = module.register_forward_pre_hook(hook)
    try:
        forward_all(model, data, dtype=dtype)
    finally:
        h.remove()


def sensitivities(model: nn.Module, targets: list, data: list, candidates: list, symmetric: bool,
                  dtype: Optional[torch.dtype] = None) -> dict:
    """name -> {plan: relative output error ||x (W - Q)^T||^2 / ||x W^T||^2} on the
    float model, for each candidate plan (RTN; one forward pass with all hooks,
    its matmuls in ``dtype``; the errors in float32)."""
    acc = {}
    hooks = []
    for name, mod in targets:
        w = mod.weight.detach().float()
        k = w.shape[1]
        diffs = {}
        for c in candidates:
            plan = LayerPlan(c.bits, layer_group(c.group_size, k, c.bits), c.scale_dtype, c.levels)
            if plan.levels is not None:  # codes on a level table: its search's weights
                diffs[plan] = w - torch.from_numpy(level_weights(w, plan.group_size, level_table(plan.levels),
                                                                 scale_dtype=plan.scale_dtype))
                continue
            diffs[plan] = w - rtn(w, plan.bits, plan.group_size, symmetric,
                                  scale_dtype=plan.scale_dtype).dequantize()
        acc[name] = {"ref": 0.0, **{p: 0.0 for p in diffs}}

        def hook(m, args, name=name, w=w, diffs=diffs):
            with exact():
                x = args[0].detach().reshape(-1, w.shape[1]).float()
                acc[name]["ref"] += float((x @ w.T).pow(2).sum())
                for p, d in diffs.items():
                    acc[name][p] += float((x @ d.T).pow(2).sum())
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        forward_all(model, data, dtype=dtype)
    finally:
        for h in hooks:
            h.remove()
    return {name: {p: v / max(a["ref"], 1e-30) for p, v in a.items() if p != "ref"} for name, a in acc.items()}


def weight_sensitivities(targets: list, candidates: list, symmetric: bool, method: str = "rtn",
                         importance: Optional[dict] = None) -> dict:
    """The data-free stand-in for :func:`sensitivities`: name -> {plan: relative
    weight error ||W - Q||^2 / ||W||^2}, the relative output error if the layer's
    inputs were white (independent, equal variance), or, where ``importance`` has
    the layer's estimated input mean squares c, sum c (W - Q)^2 / sum c W^2 (its
    searches weighted by c too). Native quantizer, so a 1B-parameter model costs
    seconds per candidate."""
    importance = importance or {}
    from ..arrays import dequantize_array, quantize_array
    out = {}
    for name, mod in targets:
        w = np.ascontiguousarray(mod.weight.detach().float().cpu().numpy())
        k = w.shape[1]
        imp = importance.get(name)
        col = np.ones(k) if imp is None else imp.astype(np.float64)
        ref = float((np.square(w, dtype=np.float64) * col).sum())
        out[name] = {}
        for c in candidates:
            plan = LayerPlan(c.bits, layer_group(c.group_size, k, c.bits), c.scale_dtype, c.levels)
            resolved = resolve_method(method, plan.bits)
            if plan.levels is not None:  # int4 codes on a level table, searched as QuantLinear does
                d = level_weights(torch.from_numpy(w), plan.group_size, level_table(plan.levels),
                                  scale_dtype=plan.scale_dtype, importance=imp) - w
            elif plan.bits == 3:  # no 3-bit QArray: the layer algorithms, as QuantLinear.from_linear
                t = torch.from_numpy(w)
                q3 = mse(t, 3, plan.group_size, symmetric, scale_dtype=plan.scale_dtype, importance=imp) \
                    if resolved == "mse" else rtn(t, 3, plan.group_size, symmetric, scale_dtype=plan.scale_dtype)
                d = q3.dequantize().numpy() - w
            else:
                q = quantize_array(w, bits=plan.bits, group_size=plan.group_size,
                                   symmetric=symmetric or plan.bits == 2, method=resolved,
                                   scale_dtype=plan.scale_dtype, importance=imp if resolved == "mse" else None)
                d = dequantize_array(q) - w
            out[name][plan] = float((np.square(d, dtype=np.float64) * col).sum()) / max(ref, 1e-30)
    return out


def mixed_plan(targets: list, sens: dict, budget_bits: float) -> dict:
    """Per-layer plans minimising the summed relative output error with
    sum(weights * bits_per_weight) <= budget * sum(weights): start every layer at
    its cheapest plan, then upgrade greedily by error saved per extra bit."""
    sizes = {name: mod.weight.shape for name, mod in targets}
    total = sum(n * k for n, k in sizes.values())
    choice = {}
    used = 0.0
    for name, _ in targets:
        n, k = sizes[name]
        plans = sorted(sens[name], key=lambda p: p.bits_per_weight(k, n))
        choice[name] = plans[0]
        used += n * k * plans[0].bits_per_weight(k, n)
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
                extra = n * k * (p.bits_per_weight(k, n) - cur.bits_per_weight(k, n))
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
                        act_order: bool, progress: bool, importance: Optional[dict] = None,
                        dtype: Optional[torch.dtype] = None) -> None:
    """Quantize ``targets`` by ``plans`` with a data-driven method or static
    activation scales; the calibration forward runs its matmuls in ``dtype``
    (None: the model's own; see data.resolve_calibration_dtype)."""
    from ..api import _set_module as replace_module
    importance = importance or {}
    items = targets
    if progress:
        try:
            from tqdm.auto import tqdm
            items = tqdm(targets, desc=f"lowbit.quantize ({method})", unit="layer")
        except ImportError:
            pass
    needs_data = method not in DATA_FREE or static
    stacked = stack_batches(data) if needs_data else None
    if stacked is not None:
        return _one_pass(model, targets, plans, method, symmetric, activations, stacked, static, observer,
                         act_order, items, progress, importance, dtype)
    if needs_data:
        print(f"lowbit: calibration batches differ in shape: running them once per layer ({len(targets)} "
              "passes); equal-shape batches take one pass", file=sys.stderr)
    release_freed_memory = FreedMemoryReleaser()
    for name, mod in items:
        w = mod.weight.detach().float()
        obs = make_observer(observer) if static else None
        stats = None
        if needs_data:
            stats = LayerStats(w.shape[1], need_hessian=method == "gptq", need_sample=method == "awq" or static)
            capture(model, mod, data, stats, obs if observer == "minmax" else None, dtype)
            if stats.rows == 0:
                raise ValueError(f"layer {name!r} never ran on the calibration data")
        replace_module(model, name, _quantize_layer(mod, stats, obs, plans[name], method, symmetric, activations,
                                                    static, observer, act_order, importance.get(name)))
        del stats
        release_freed_memory()
    _report_plan(plans, progress)


def _report_plan(plans: dict, progress: bool) -> None:
    if progress and len({p.bits for p in plans.values()}) > 1:
        counts = {}
        for p in plans.values():
            counts[p.bits] = counts.get(p.bits, 0) + 1
        print("lowbit: mixed precision plan: " + ", ".join(f"{c} layers at {b} bits" for b, c in
                                                            sorted(counts.items())), file=sys.stderr)


def stack_batches(data: list):
    """One batch holding all of ``data`` (concatenated along dim 0), or None when
    the batches do not stack (different shapes, keys or types)."""
    first = data[0]
    try:
        if isinstance(first, torch.Tensor):
            if all(isinstance(b, torch.Tensor) and b.shape == first.shape for b in data):
                return torch.cat(data) if len(data) > 1 else first
        elif isinstance(first, dict):
            keys = set(first)
            if all(isinstance(b, dict) and set(b) == keys for b in data):
                out = {}
                for k in keys:
                    v = [b[k] for b in data]
                    if all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape == v[0].shape for t in v):
                        out[k] = torch.cat(v) if len(v) > 1 else v[0]
                    elif all(t is v[0] or (not isinstance(t, torch.Tensor) and t == v[0]) for t in v):
                        out[k] = v[0]
                    else:
                        return None
                return out
        elif isinstance(first, (tuple, list)):
            if all(isinstance(b, (tuple, list)) and len(b) == len(first) for b in data):
                cols = []
                for i in range(len(first)):
                    v = [b[i] for b in data]
                    if all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape == v[0].shape for t in v):
                        cols.append(torch.cat(v) if len(v) > 1 else v[0])
                    else:
                        return None
                return tuple(cols)
    except (RuntimeError, TypeError):
        return None
    return None


def _one_pass(model, targets, plans, method, symmetric, activations, batch, static, observer, act_order, items,
              progress, importance, dtype=None):
    """Quantize every target during a single forward pass over ``batch`` (its
    matmuls in ``dtype``; statistics and quantizers in their own dtypes)."""
    from ..api import _set_module as replace_module
    from ..nn.fused import tensor_version
    from .data import StopForward, run_batch
    done, hooks, swapped = {}, [], {}
    release_freed_memory = FreedMemoryReleaser()
    shared = {}  # layers fed the very same tensor (q/k/v, gate/up) share one LayerStats
    bar = items if hasattr(items, "update") else None

    def pre_hook(mod, args, name):
        if name in done:
            return
        with exact():
            quantize_here(mod, args, name)

    def quantize_here(mod, args, name):
        x = args[0]
        if shared.get("x") is not x or shared.get("version") != tensor_version(x):
            shared.clear()
            shared.update(x=x, version=tensor_version(x))
        stats = shared.get(mod.in_features)
        if stats is None:
            stats = shared[mod.in_features] = LayerStats(mod.in_features, need_hessian=method == "gptq",
                                                         need_sample=method == "awq" or static)
            stats.add(x)
        obs = None
        if static:
            obs = make_observer(observer)
            if observer == "minmax":
                obs(x)
        new = _quantize_layer(mod, stats, obs, plans[name], method, symmetric, activations, static, observer,
                              act_order, importance.get(name))
        w = None if activations == 8 else new.dequantized_weight().to(mod.weight.dtype)
        done[name] = (new, w)
        replace_module(model, name, new)
        if w is not None and type(mod) is nn.Linear:
            # This very call computes the quantized output: the old module's own
            # weight entry points at the dequantized weights until post_hook (a
            # shared/tied Parameter is not touched), so the layer runs once, not twice.
            swapped[name] = mod._parameters["weight"]
            mod._parameters["weight"] = nn.Parameter(w, requires_grad=False)
        if bar is not None:
            bar.update(1)

    def post_hook(mod, args, output, name):
        ran_quantized = name in swapped
        if ran_quantized:
            mod._parameters["weight"] = swapped.pop(name)
        new, w = done[name]
        # The layer is done: drop its dequantized copy, so memory holds one layer's
        # float weights at a time (a checkpoint bigger than RAM, memory-mapped by
        # transformers, is read from disk layer by layer; tests/integrations). A
        # second call of the same module gets the QuantLinear's own output.
        done[name] = (new, None)
        release_freed_memory()
        if len(done) == len(targets):
            raise StopForward  # the rest (e.g. a vocabulary head, 20% of SmolLM2) feeds no target
        if ran_quantized:
            return None  # this output already came from the quantized weights
        # The next layers must see this layer's quantized output. Weight-only: the
        # same weights through torch's float GEMM (faster than lowbit's weight-only
        # GEMM at thousands of rows; differs by summation order only).
        return new(args[0]) if w is None else nn.functional.linear(args[0], w, new.bias)

    for name, mod in targets:
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: pre_hook(m, a, name)))
        hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: post_hook(m, a, o, name)))
    try:
        with torch.no_grad(), calibration_autocast(dtype):
            run_batch(model, batch)
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
        for name, weight in swapped.items():  # a forward that stopped midway
            dict(targets)[name]._parameters["weight"] = weight
        shared.clear()
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    missing = [name for name, _ in targets if name not in done]
    if missing:
        raise ValueError(f"layers never ran on the calibration data: {missing[:5]}")
    _report_plan(plans, progress)


def _quantize_layer(mod, stats, obs, plan, method, symmetric, activations, static, observer, act_order,
                    importance=None):
    from ..nn import QuantLinear
    w = mod.weight.detach().float()
    method = resolve_method(method, plan.bits)
    cfg = QuantConfig(storage_bits(plan.bits), plan.group_size, symmetric, activations, code_bits=plan.bits,
                      scale_dtype=plan.scale_dtype, levels=plan.levels)
    if plan.levels is not None and method not in ("gptq", "mse"):
        raise ValueError(f"level tables are quantized with method 'gptq', 'mse' or 'auto', not {method!r}")
    if method == "mse" and plan.levels is not None:  # the level search (static activation scales)
        new = QuantLinear.from_linear(mod, cfg, method="mse", importance=importance)
    else:
        if method == "gptq":
            factor = stats.cached(("gptq", act_order),
                                  lambda: gptq_factor(stats.take_hessian(), act_order, overwrite=True))
            q = gptq(w, None, plan.bits, plan.group_size, symmetric, act_order=act_order, factor=factor,
                     scale_dtype=plan.scale_dtype, levels=None if plan.levels is None else level_table(plan.levels))
        elif method == "awq":
            q = awq(w, stats.x, stats.act_mean, plan.bits, plan.group_size, symmetric, scale_dtype=plan.scale_dtype)
        elif method == "mse":
            q = mse(w, plan.bits, plan.group_size, symmetric, scale_dtype=plan.scale_dtype, importance=importance)
        else:
            q = rtn(w, plan.bits, plan.group_size, symmetric, scale_dtype=plan.scale_dtype)
        new = QuantLinear.from_quantized(q, mod.bias, cfg, dtype=mod.weight.dtype)
    if static:
        input_scale = new.input_scale
        if observer == "minmax" and input_scale is None:
            scale = float(obs.qparams()[0])
        else:  # the kernels see x * input_scale: observe that, on the sample rows
            o = make_observer(observer)
            o(stats.x * (1 if input_scale is None else input_scale))
            scale = float(o.qparams()[0])
        new.act_scale = scale
    return new
