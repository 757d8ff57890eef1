"""Hugging Face folders written by ``save_pretrained`` of a lowbit model, read
without transformers' loader: the layer table, ``lowbit.load(folder, ...)`` and
``lowbit info FOLDER`` (transformers itself is only needed to build a skeleton).

What such a folder holds:
  * config.json: the model's config with ``quantization_config`` =
    LowbitConfig.to_dict(), whose ``layers`` maps each quantized module name to a
    record ``[bits, group_size, symmetric, act_bits, code_bits, has_input_scale,
    act_scale]`` (bits 8/4/2 is the storage, code_bits the codes' precision),
    with an eighth entry, the scale dtype ("float16" or "int8"), when the layer's
    scales are not float32.
  * *.safetensors (one file or shards): for a quantized layer ``{name}.data``
    (U8 tiles), ``{name}.scales`` (F32, or F16 / I8 per the record; I8 codes come
    with ``{name}.row_scales``, F32) and, asymmetric, ``{name}.offsets`` (I32),
    in the tiled-v1 layout of csrc/lowbit/formats.h exactly as QuantLinear holds
    them (io.expected_packed_shapes gives the shapes), plus ``input_scale`` (F32,
    AWQ) and ``bias`` when present; every other tensor as transformers writes it.
    Tied parameters are stored once (transformers drops the alias).
The tiled layout does not depend on the CPU that wrote it (a 64-byte block is
one AVX-512 vector, two AVX2 or four SSE ones; every kernel target reads the
same bytes, which the suite checks per target), so a folder written anywhere
loads anywhere without repacking.
"""
from __future__ import annotations

import glob
import json
import os

from ..io import FormatError, transformers_model_class

# torch and lowbit.nn are imported where used: `lowbit info FOLDER` reads only
# config.json and the safetensors headers, without loading torch.

RECORD_FIELDS = ("bits", "group_size", "symmetric", "act_bits", "code_bits", "has_input_scale", "act_scale")


def layer_record(mod) -> list:
    """The config.json record of one quantized layer (RECORD_FIELDS)."""
    c = mod.config
    record = [c.bits, c.group_size, c.symmetric, c.act_bits, c.code_bits, mod.input_scale is not None,
              float(mod.act_scale)]
    # Only narrow scales (and level tables) add entries: folders of float32 layers
    # stay readable by earlier lowbit versions, which refuse what they could not run.
    if c.levels is not None:
        return record + [c.scale_dtype, c.levels]
    return record + ([c.scale_dtype] if c.scale_dtype != "float32" else [])


def placeholder(linear, record: list):
    """A QuantLinear for the float ``linear``'s place with empty tensors of exactly
    the stored shapes (meta device), for the tiles to load into."""
    import torch
    from torch import nn

    from ..config import QuantConfig
    from ..nn import QuantLinear
    if not isinstance(record, (list, tuple)) or len(record) - len(RECORD_FIELDS) not in (0, 1, 2):
        raise FormatError(f"a layer record must be {list(RECORD_FIELDS)} (+ scale dtype, + level table), "
                          f"got {record!r}")
    bits, group, symmetric, act_bits, code_bits, has_input_scale, act_scale = record[:len(RECORD_FIELDS)]
    scale_dtype = record[len(RECORD_FIELDS)] if len(record) > len(RECORD_FIELDS) else "float32"
    levels = record[len(RECORD_FIELDS) + 1] if len(record) > len(RECORD_FIELDS) + 1 else None
    try:
        cfg = QuantConfig(bits, group, symmetric, act_bits, code_bits, scale_dtype, levels)
    except (TypeError, ValueError) as e:
        raise FormatError(f"bad layer record {record!r}: {e}") from None
    with torch.device("meta"):
        mod = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, cfg,
                          dtype=linear.weight.dtype if isinstance(linear, nn.Linear) else linear.orig_dtype,
                          has_input_scale=bool(has_input_scale))
        for part, (dtype, shape) in mod._tile_shapes().items():
            setattr(mod, part, torch.empty(shape, dtype=dtype))
    mod.act_scale = float(act_scale)
    return mod


def is_lowbit_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_quantization_config(folder) -> dict:
    """config.json's lowbit quantization_config (with its layer table), checked."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        with open(config_path) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise FormatError(f"{config_path}: not a JSON object ({e})") from None
    if qc.get("quant_method") != "lowbit" or not isinstance(qc.get("layers"), dict):
        raise FormatError(f"{folder}: config.json has no lowbit quantization_config with a layer table "
                          f"(quant_method {qc.get('quant_method')!r}): not written by save_pretrained of a "
                          "lowbit model")
    return qc


def shards(folder) -> list:
    found = sorted(glob.glob(os.path.join(os.fspath(folder), "*.safetensors")))
    if not found:
        raise FormatError(f"{folder}: no .safetensors files")
    return found


def state_dict(folder) -> dict:
    """Every tensor of the folder's shards (name -> CPU tensor)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading a Hugging Face folder needs safetensors: pip install safetensors") from None
    sd = {}
    for shard in shards(folder):
        try:
            part = load_file(shard)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise FormatError(f"{shard}: not a readable safetensors file ({e})") from None
        clash = set(part) & set(sd)
        if clash:
            raise FormatError(f"{shard}: tensors also in another shard: {sorted(clash)[:4]}")
        sd.update(part)
    return sd


def skeleton(folder):
    """The float transformers model of a lowbit folder: built from its config,
    parameters on the meta device (no float weights are allocated), buffers
    computed on the CPU. Pass it to ``lowbit.load(folder, model)``."""
    import transformers
    from accelerate import init_empty_weights
    read_quantization_config(folder)
    config = transformers.AutoConfig.from_pretrained(os.fspath(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is the float architecture
    names = getattr(config, "architectures", None) or []
    cls = transformers_model_class(names[0]) if names else None
    if cls is None:
        raise FormatError(f"{folder}: config.json names no known transformers architecture ({names!r})")
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()  # as from_pretrained does: tied parameters are stored once
    return model.eval()


def load(folder, model):
    """Load a lowbit folder into ``model`` (its float architecture, e.g.
    :func:`skeleton`): the listed layers become QuantLinear holding the stored
    tiles, everything else loads strictly; tied parameters are tied again. All
    names and shapes are checked before the model is changed."""
    from torch import nn

    from ..nn import QuantLinear
    qc = read_quantization_config(folder)
    sd = state_dict(folder)
    replacements = {}
    for name, record in qc["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model has no module {name!r}, which {folder} quantizes") from None
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ValueError(f"model.{name} must be a Linear to take the folder's layer, got {type(old).__name__}")
        new = placeholder(old, record)
        for part, (dtype, shape) in new._tile_shapes().items():
            t = sd.get(f"{name}.{part}")
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise FormatError(f"{folder}: {name}.{part} must be {dtype} {list(shape)} for "
                                  f"{new.config.label} [{new.out_features}x{new.in_features}], got {got}")
        replacements[name] = new
    # Parameters shared under several names are stored once: keep the first name.
    params = dict(model.named_parameters(remove_duplicate=False))
    first, aliases = {}, {}
    for n, p in params.items():
        if id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in replacements}
    expected |= {f"{n}.{k}" for n, mod in replacements.items() for k in mod.state_dict()}
    stored_aliases = {a for a, target in aliases.items() if a in sd}
    expected -= set(aliases) - stored_aliases
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    from ..api import _set_module
    for name, new in replacements.items():
        _set_module(model, name, new)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # assign onto meta tensors
        model.load_state_dict(sd, strict=False, assign=True)
    from ..io import _retie
    _retie(model, aliases)
    return model
