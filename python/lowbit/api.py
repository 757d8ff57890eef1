"""lowbit.quantize(model, bits=4): swap nn.Linear layers for QuantLinear in place."""
from __future__ import annotations

import re
import sys
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .config import DEFAULT_GROUP, DEFAULT_LEVELS, DEFAULT_METHOD, DEFAULT_SCALE_DTYPE, DEFAULT_TABLE, GROUP_MULTIPLE, \
    LEVEL_METHODS, QuantConfig, fit_group, storage_bits
from .nn import QuantLinear

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

# Output heads keep their precision by default: their errors land directly on
# the logits, and they are a small share of a model's weights.
DEFAULT_EXCLUDE = r"(^|\.)(lm_head|classifier|score|qa_outputs)$"
# Layers this small gain nothing measurable and cost accuracy.
MIN_WEIGHTS = 4096
# Output heads and embedding tables this large (vocabulary-sized) are stored in
# int8 by default: SmolLM2's tied 49152 x 576 table is 113 MB in float32, 41% of
# the model, and reading it as the head costs more per token than the 30 int4
# decoder layers. Heads get int8 groups of 64 (8.5 bits/weight, Q8_0's size):
# on SmolLM2 / Emma a per-row int8 head added 0.19% perplexity, g64 0.04%.
LARGE_TABLE = 1 << 20
HEAD_GROUP = 64


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


def quantize(model: nn.Module, bits: Union[int, float, dict] = 4, group_size: Optional[int] = DEFAULT_GROUP,
             symmetric: bool = True, activations: Optional[int] = None, method: str = DEFAULT_METHOD,
             calibration_data=None, include: Selector = None, exclude: Selector = None, progress: bool = True,
             *, max_batches: Optional[int] = 64, observer="minmax", act_order: bool = True,
             embeddings: Union[None, int, str] = "auto", heads: Optional[int] = 8,
             scale_dtype: str = DEFAULT_SCALE_DTYPE, levels: Optional[str] = DEFAULT_LEVELS,
             calibration_dtype: Optional[str] = "auto") -> nn.Module:
    """Replace the model's nn.Linear layers by lowbit QuantLinear, in place; returns the model.

    Args:
      bits: 8, 4, 3 or 2 (3-bit layers are int3 tiles, 3 bits per weight plus the
        scales: 3.56 b/w at the default g16 on 576 inputs; 2-bit layers are packed
        rows run as dequantize + float matmul, warned once); a float budget such as
        4.5 for automatic mixed precision (bits go where they help most per byte:
        each layer's output error per format is measured on ``calibration_data``,
        or without data its relative weight error stands in, weighted as the search
        is under ``method="auto"``; the formats: int4 at the asked group, 4x coarser
        and half of it, and int8 per row; below the coarse int4's size also int3 at
        the asked group and 4x coarser, and below those int2; under
        ``method="auto"`` the errors of value projections and of a
        language model's last block count 10x, see lowbit.calibrate.priors); or a dict
        ``{layer name: bits}`` (key "default" for the rest).
      group_size: scales per this many inputs (default 16; None: per row). Where it does not
        divide a layer's inputs, the nearest divisor is used (the largest not above
        it, e.g. 96 for 576 inputs at 128; see config.fit_group) and reported.
      symmetric: signed codes (default) or codes with zero points.
      activations: None (weight-only, float activations) or 8 (int8 activations,
        integer kernels: W8A8 / W4A8): per token (dynamic), or static per-tensor
        scales calibrated by ``observer`` when ``calibration_data`` is given.
      method: "auto" (the default: "mse" for 4/3-bit layers, its squared error weighted
        per input where the model's weights estimate the inputs' mean squares: the
        down projections of gated MLPs, see lowbit.calibrate.importance; "rtn" for
        8-bit ones),
        "rtn" (round to nearest with the range rule's scales), "mse" (data-free
        too: per group the scale, and zero point, with the least squared weight
        error from a search around the range rule's; same format and kernels), "gptq"
        (Hessian-aware error feedback; see ``act_order``) or "awq"
        (activation-aware channel scaling + clip search); the last two need
        ``calibration_data``.
      act_order: GPTQ quantizes the columns in order of decreasing Hessian
        diagonal (default), its group scales fixed up front from the weights, so
        groups stay contiguous and the layer runs as fast as in order; False: in
        column order, each group's scales from the error-updated weights (the
        default before: SmolLM2 g16 1.106x float32 perplexity against 1.057x).
      calibration_data: an iterable of batches (tensors, tuples or dicts of model
        inputs); at most ``max_batches`` are used.
      include / exclude: regex, list of regexes, or callable(name, module) -> bool over
        module names. By default output heads (lm_head, classifier, ...) and layers
        with fewer than 4096 weights stay in float; the progress output says which.
      progress: show a progress bar over layers and the skipped layers.
      embeddings: None (keep nn.Embedding in float) or 8 / 4: store embedding tables
        of at least 4096 weights as QuantEmbedding (per-row scales), unless tied to
        another module's weight (an output head sharing it), which would duplicate it.
        "auto" (default): int8 for tables of at least 2^20 weights (vocabularies).
      heads: bits (8 or 4; groups of 64, else per row) for output heads (lm_head, classifier, ...)
        of at least 2^20 weights, round to nearest; None keeps them in float.
        An embedding tied to a quantized head becomes a TiedQuantEmbedding that
        reads its rows from the head's tiles (one copy of the table, quantized).
      scale_dtype: how the scales of int8/int4 layers and heads are stored
        (2-bit layers keep float32): "int8" (default: per-group codes times one
        float32 scale per row, a quarter of the bytes: int4 groups of 16 at
        4.5 + 32 / K bits/weight), "float16" (half: int4 groups of 32 at 4.5, llama.cpp
        Q4_0's size) or "float32". Every method chooses its codes under the
        rounded scales. The format before this default: ``group_size=128,
        method="rtn", scale_dtype="float32"``.
      levels: int4 codes on a level table (lowbit.levels; formats.h
        "level tables"): "t5" (16 levels dense near 0, fitted to heavy-tailed
        groups; same size and kernels as even int4) or None (16 evenly spaced
        levels). "auto": "t5" for a ``bits=4`` call with symmetric codes and
        method "auto", "mse" or "gptq" (GPTQ then fixes the group scales by
        the level search and pushes each column's error to the nearest level:
        SmolLM2 1.029x float32 perplexity against 1.059x on even codes), None
        otherwise (budgets, int8/int3/int2, AWQ, RTN and zero points use the
        even grid). A named table also applies to a budget's int4 candidates
        (``bits=5.6, levels="t5"``: SmolLM2 1.029x against 1.044x).
      calibration_dtype: what the forward over ``calibration_data`` runs its
        matmuls and attention in: "bfloat16" (torch's CPU autocast; the Hessians,
        samples and ranges taken from it stay float32/float64), None (the model's
        own dtype) or "auto" (default: bfloat16 for a float32 model on a CPU with
        bfloat16 dot products, AVX512_BF16, else None). GPTQ on SmolLM2 with 32 x
        512 tokens, 2 threads of a Zen 4: 60.4 -> 44.9-46.9 s, perplexity ratio
        1.060 -> 1.059.

    >>> import torch, lowbit
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> _ = lowbit.quantize(m, bits=4, progress=False)
    >>> type(m[0]).__name__, type(m[2]).__name__
    ('QuantLinear', 'Linear')
    """
    from .calibrate.ptq import DATA_FREE, METHODS, LayerPlan, layer_group, mixed_plan, quantize_calibrated, \
        sensitivities, weight_sensitivities

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_unloaded_checkpoint(model)
    if isinstance(bits, bool) or not isinstance(bits, (int, float, dict)):
        raise TypeError(f"bits must be an int (8, 4, 3, 2), a float budget or a dict, got {bits!r}")
    if isinstance(bits, int) and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits}")
    mixed = isinstance(bits, float)
    if mixed and not 2.0 <= bits <= 9.0:
        raise ValueError(f"a bits budget must be between 2.0 and 9.0 bits/weight (layers are 2, 3, 4 or 8 bits "
                         f"plus scales), got {bits}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method not in DATA_FREE and calibration_data is None:
        raise ValueError(f"method={method!r} needs calibration_data")
    static = calibration_data is not None and activations == 8
    QuantConfig(8, group_size, symmetric, activations, scale_dtype=scale_dtype)  # validates the settings
    table = _resolve_levels(levels, bits, symmetric, method)
    targets, skipped = _select(model, include, exclude)
    from .calibrate.data import resolve_calibration_dtype
    forward_dtype = resolve_calibration_dtype(calibration_dtype, targets)
    names = {n for n, _ in targets}
    if isinstance(bits, dict):
        unknown = set(bits) - names - {"default"}
        if unknown:
            raise ValueError(f"bits names layers that are not quantized targets: {sorted(unknown)[:5]}")
        if any(b not in (2, 3, 4, 8) for b in bits.values()):
            raise ValueError("every bits value in the map must be 8, 4, 3 or 2")
    data = None
    if calibration_data is not None:
        from .calibrate.data import batches
        data = batches(calibration_data, max_batches)
    importance = {}
    if method == "auto":
        from .calibrate.importance import DataFreeImportance
        importance = DataFreeImportance(model, targets)
    if mixed:
        # int4 at the asked group and 4x coarser (g16 -> g64: 4.55 -> 4.18 b/w at
        # K = 576), so a budget between them mixes int4 formats instead of
        # reaching for int2; 2x finer where int4 tiles allow it (g16 -> g8: 5.06
        # b/w), a step between the asked group and int8 per row (8.06): SmolLM2,
        # data-free bits=5.6, 32 windows of Emma: 1.056x float32 perplexity with
        # it, 1.065x without (llama.cpp Q4_K_M 1.057x); bits=4.6 1.129x.
        coarse = None if group_size is None else 4 * group_size
        fine = group_size // 2 if group_size is not None and group_size // 2 >= GROUP_MULTIPLE[4] else None
        plans4 = [LayerPlan(4, g, scale_dtype, table) for g in [coarse, group_size] + ([fine] if fine else [])]
        candidates = list(dict.fromkeys(plans4 + [LayerPlan(8, None, scale_dtype)]))
        def mean_bits(b):  # of every target at b bits and the coarse group
            return sum(m.weight.numel() * LayerPlan(b, layer_group(coarse, m.in_features, b), scale_dtype)
                       .bits_per_weight(m.in_features) for _, m in targets) / \
                max(1, sum(m.weight.numel() for _, m in targets))

        if bits < mean_bits(4):
            # int3 only when the budget cannot be met at 4 bits, int2 only when not
            # at 3: the greedy plan's per-layer error model underrates how
            # low-bit errors compound through a model (MiniLM at 4.5 b/w: cosine
            # 0.9896 with int2 layers, 0.9955 without).
            candidates = list(dict.fromkeys([LayerPlan(3, coarse, scale_dtype), LayerPlan(3, group_size, scale_dtype)]
                                            + candidates))
            if bits < mean_bits(3):
                candidates.insert(0, LayerPlan(2, group_size))
        if data is None:  # data-free: weight-space error stands in for the output error
            sens = weight_sensitivities(targets, candidates, symmetric, method, importance)
            if method == "auto":  # value projections, a language model's last block: calibrate.priors
                from .calibrate.priors import scale_sensitivities, sensitivity_priors
                sens = scale_sensitivities(sens, sensitivity_priors(model, targets))
        else:
            sens = sensitivities(model, targets, data, candidates, symmetric, forward_dtype)
        plans = mixed_plan(targets, sens, bits)
    else:
        plans = {}
        for name, mod in targets:
            b = bits.get(name, bits.get("default")) if isinstance(bits, dict) else bits
            if b is None:
                skipped.append((name, "not in the bits map"))
                continue
            plans[name] = LayerPlan(b, layer_group(group_size, mod.in_features, b), scale_dtype,
                                    table if b == 4 else None)
        targets = [(n, m) for n, m in targets if n in plans]
    if progress:
        _report_groups(targets, plans, group_size)
    simple = method in DATA_FREE and not static and all(p.bits in (2, 3, 4, 8) for p in plans.values())
    if simple:  # the native quantizer, no calibration pass
        for name, mod in _progress(targets, progress):
            p = plans[name]
            _set_module(model, name, QuantLinear.from_linear(mod, QuantConfig(p.bits, p.group_size, symmetric,
                                                                                 activations,
                                                                                 scale_dtype=p.scale_dtype,
                                                                                 levels=p.levels),
                                                             method=method, importance=importance.get(name)))
    else:
        quantize_calibrated(model, targets, plans, method, symmetric, activations, data, static, observer,
                            act_order, progress, importance, forward_dtype)
    if heads is not None:
        skipped = _quantize_heads(model, heads, activations, skipped, progress, scale_dtype)
    if embeddings == "auto":
        skipped += _quantize_embeddings(model, 8, _matcher(exclude, "exclude"), min_weights=LARGE_TABLE,
                                        report_small=False)
    elif embeddings is not None:
        skipped += _quantize_embeddings(model, embeddings, _matcher(exclude, "exclude"))
    if progress and skipped:
        print("lowbit: kept in float: " + ", ".join(f"{n} ({why})" for n, why in skipped), file=sys.stderr)
    return model


def _resolve_levels(levels, bits, symmetric: bool, method: str) -> Optional[str]:
    """The level table of the call's int4 layers (see quantize's ``levels``)."""
    from .levels import LEVEL_TABLES
    uniform_int4 = not isinstance(bits, bool) and bits == 4 and not isinstance(bits, float)
    if levels == "auto":  # budgets keep even codes: see the comment on DEFAULT_TABLE
        return DEFAULT_TABLE if uniform_int4 and symmetric and method in LEVEL_METHODS else None
    if levels is None:
        return None
    if levels not in LEVEL_TABLES:
        raise ValueError(f"levels must be 'auto', None or one of {sorted(LEVEL_TABLES)}, got {levels!r}")
    if not (uniform_int4 or isinstance(bits, float)) or not symmetric or method not in LEVEL_METHODS:
        raise ValueError(f"levels={levels!r} needs bits=4 (or a budget), symmetric codes and method 'auto', "
                         f"'mse' or 'gptq' "
                         f"(got bits={bits!r}, symmetric={symmetric}, method={method!r})")
    return levels


def _report_groups(targets: list, plans: dict, group_size: Optional[int]) -> None:
    """Say where a layer's group differs from the one asked for (config.fit_group)."""
    if group_size is None:
        return
    changed = {}
    for name, mod in targets:
        bits = storage_bits(plans[name].bits)
        g = fit_group(group_size, mod.in_features, GROUP_MULTIPLE[bits])
        if g != group_size and group_size < mod.in_features:
            changed.setdefault((mod.in_features, g), []).append(name)
    for (k, g), names in sorted(changed.items()):
        what = f"groups of {g}" if g is not None else "one scale per row (no divisor near it)"
        print(f"lowbit: group_size={group_size} does not divide in_features={k}: {what} in {len(names)} "
              f"layer{'s' if len(names) > 1 else ''} (e.g. {names[0]})", file=sys.stderr)


def _quantize_heads(model: nn.Module, bits: int, activations, skipped: list, progress: bool,
                    scale_dtype: str = "float32") -> list:
    """Quantize the large output heads that _select left in float (groups of HEAD_GROUP);
    tie embeddings that shared a head's weight to its tiles. Returns the new skip list."""
    from .nn import TiedQuantEmbedding
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"heads must be None, 8 or 4, got {bits!r}")
    owners = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Embedding:
            owners.setdefault(id(mod.weight), []).append((name, mod))
    keep = []
    for name, why in skipped:
        mod = model.get_submodule(name) if name else model
        if why != "output head" or type(mod) is not nn.Linear or mod.weight.numel() < LARGE_TABLE:
            keep.append((name, why))
            continue
        head = QuantLinear.from_linear(mod, QuantConfig(bits, HEAD_GROUP, True, activations,
                                                        scale_dtype=scale_dtype))
        _set_module(model, name, head)
        for emb_name, emb in owners.get(id(mod.weight), []):
            if emb.max_norm is None and not emb.sparse and emb.weight.shape == mod.weight.shape:
                _set_module(model, emb_name, TiedQuantEmbedding(head, emb.padding_idx, emb.weight.dtype))
        if progress:
            print(f"lowbit: output head {name} in {head.config.label} (heads={bits}; heads=None keeps it float)",
                  file=sys.stderr)
    return keep


def _quantize_embeddings(model: nn.Module, bits: int, skip, min_weights: int = MIN_WEIGHTS,
                         report_small: bool = True) -> list:
    from .nn import QuantEmbedding
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"embeddings must be None, \"auto\", 8 or 4, got {bits!r}")
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    skipped = []
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Embedding:
            continue
        shared = [n for n in owners.get(id(mod.weight), []) if n != f"{name}.weight"]
        if skip(name, mod):
            skipped.append((name, "excluded"))
        elif shared:
            skipped.append((name, f"tied to {shared[0]}"))
        elif mod.weight.numel() < min_weights or mod.max_norm is not None or mod.sparse:
            if report_small:
                skipped.append((name, "tiny or max_norm/sparse embedding"))
        else:
            _set_module(model, name, QuantEmbedding.from_embedding(mod, bits))
    return skipped


def _select(model: nn.Module, include: Selector, exclude: Selector, devices=("cpu",)) -> tuple:
    """(layers to quantize, [(name, why skipped)]); devices: where weights may be
    (transformers' loader also asks about a skeleton on "meta")."""
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
        elif mod.weight.device.type not in devices:
            skipped.append((name, f"on {mod.weight.device}"))
        else:
            targets.append((name, mod))
    return targets, skipped


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


def refuse_unloaded_checkpoint(model: nn.Module) -> None:
    """Raise if ``model`` came from a lowbit checkpoint that transformers loaded
    without lowbit registered: its config says quant_method "lowbit", yet no
    layer is quantized, so transformers random-initialised every layer the
    checkpoint held as tiles (it only logs that). Quantizing or measuring such a
    model would silently work on noise."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    # Registered, transformers holds a LowbitConfig there (also while its quantizer
    # calls lowbit.quantize for 3-bit layers); unregistered, the raw JSON dict.
    if not isinstance(qc, dict) or qc.get("quant_method") != "lowbit":
        return
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return
    raise ValueError("model was loaded from a lowbit checkpoint while transformers did not know "
                     "quant_method='lowbit' (lowbit's start-up registration off, e.g. LOWBIT_AUTOREGISTER=0, "
                     "and no `import lowbit` before from_pretrained): transformers replaced every quantized "
                     "layer by a randomly initialised float one. Load it again after `import lowbit`.")


def summary(model: nn.Module, file=None) -> dict:
    """Per-layer table (bits, group, bytes before/after, kernel) and totals of a
    quantized model; prints it to ``file`` when given. Returns the numbers."""
    refuse_unloaded_checkpoint(model)
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
    from .nn import QuantEmbedding, TiedQuantEmbedding
    emb_rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantEmbedding, TiedQuantEmbedding)):
            before = mod.num_embeddings * mod.embedding_dim * torch.finfo(mod.orig_dtype).bits // 8
        if isinstance(mod, TiedQuantEmbedding):
            emb_rows.append(dict(name=name, shape=(mod.num_embeddings, mod.embedding_dim), config=mod.label,
                                 bytes_before=before, bytes_after=0, kernel="row gather from the head's tiles"))
        if isinstance(mod, QuantEmbedding):
            emb_rows.append(dict(name=name, shape=(mod.num_embeddings, mod.embedding_dim), config=mod.label,
                                 bytes_before=before, bytes_after=mod.nbytes, kernel="row gather + dequantize"))
    for p in model.parameters():
        float_params += p.numel() * p.element_size()
    quant_weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    emb_after = sum(r["bytes_after"] for r in emb_rows)
    out = dict(layers=rows, embeddings=emb_rows, quantized_bytes_before=total_before,
               quantized_bytes_after=total_after, float_bytes=float_params,
               bits_per_weight=8.0 * total_after / quant_weights if quant_weights else float("nan"),
               model_bytes=float_params + total_after + emb_after)
    if file is not None:
        print(f"{'layer':40s} {'shape':>14s} {'format':>14s} {'KiB before':>11s} {'KiB after':>10s}  kernel", file=file)
        for r in rows + emb_rows:
            print(f"{r['name'][:40]:40s} {str(r['shape']):>14s} {r['config']:>14s} {r['bytes_before'] / 1024:11.1f} "
                  f"{r['bytes_after'] / 1024:10.1f}  {r['kernel']}", file=file)
        print(f"{len(rows)} layers: {total_before / 2**20:.2f} MiB -> {total_after / 2**20:.2f} MiB "
              f"({out['bits_per_weight']:.3f} bits/weight); quantized embeddings {emb_after / 2**20:.2f} MiB; "
              f"other float tensors {float_params / 2**20:.2f} MiB", file=file)
    return out
