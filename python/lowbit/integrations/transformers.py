"""lowbit as a transformers quantization method (``quant_method="lowbit"``).

    import lowbit
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.LowbitConfig(bits=4))
    model.save_pretrained("smollm2-lowbit")            # a pre-quantized checkpoint
    model = AutoModelForCausalLM.from_pretrained("smollm2-lowbit")   # loads the tiles, no re-quantizing

transformers only knows third-party methods after they are registered. An
installed lowbit does it at start-up (``_lowbit_autoregister``, from a .pth file:
the moment transformers' quantizers are imported), so a shared lowbit folder
loads quantized without ``import lowbit``. Without that hook (``python -S``,
LOWBIT_AUTOREGISTER=0, a source tree on PYTHONPATH only), touching
``lowbit.LowbitConfig`` or importing this module registers both classes, and so
does ``import lowbit`` when transformers is already imported. Unregistered,
transformers only warns and random-initialises the quantized layers; lowbit's
quantize / summary / perplexity refuse such a model (api.refuse_unloaded_checkpoint).

What happens:
  * quantizing while loading: the layers lowbit.quantize would pick (not the
    output head, not tiny layers, not ``modules_to_not_convert``; by default
    also transformers' own skips: tied weights) are chosen on the meta skeleton;
    each of their weights is quantized the moment the loader reads it (shard by
    shard, memory-mapped) and the float tensor is dropped, so the process holds
    the quantized model plus about one float layer (a 389 MB float32 Llama:
    +66 MB anonymous memory at the peak against 412 MB resident in float).
    The per-layer formats are recorded in the config (``layers``).
  * ``save_pretrained``: the QuantLinear tensors as they sit in memory (tiled-v1,
    csrc/lowbit/formats.h) in safetensors, ``quantization_config`` with the
    layer table in config.json.
  * loading that folder: the listed layers become QuantLinear placeholders of
    the stored shapes on the meta device before the weights load, then the tiles
    load into them as they are; outputs are bit-identical to the saved model.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..api import _resolve_levels, _set_module
from ..calibrate.ptq import DATA_FREE
from ..arrays import SCALE_DTYPES
from ..config import DEFAULT_GROUP, DEFAULT_LEVELS, DEFAULT_METHOD, DEFAULT_SCALE_DTYPE, QuantConfig, resolve_method, \
    storage_bits
from ..nn import QuantLinear
from .hf_folder import layer_record, placeholder

METHOD = "lowbit"
_FIELDS = ("bits", "group_size", "symmetric", "activations", "method", "modules_to_not_convert", "scale_dtype",
           "levels")


class LowbitConfig(QuantizationConfigMixin):
    """The quantization_config of ``from_pretrained``: the fields of
    ``lowbit.quantize`` that apply while loading. Frozen once built (a config
    shared between loads must not drift); JSON-serialisable (``to_dict``).

    Args:
      bits: 8, 4, 3 or 2 (as lowbit.quantize).
      group_size: scales per this many inputs (None: per row); fitted per layer.
      symmetric: signed codes (default) or codes with zero points.
      activations: None (weight-only) or 8 (dynamic per-token int8, W8A8 / W4A8).
      method: "auto" (default: mse for int4, rtn for int8), "rtn" or "mse" (data-free; calibrated methods need lowbit.quantize).
      modules_to_not_convert: module names kept in float (added to transformers'
        default: the output head and tied weights).
      scale_dtype: "int8" (default), "float16" or "float32" (int8/int4 layers;
        int8 codes with one float32 scale per row quarter the scale bytes: int4
        groups of 16 at 4.5 + 32 / K bits/weight; float16 halves them).
      levels: int4 codes on a level table, as lowbit.quantize's ``levels``
        ("auto": table "t5" for data-free symmetric int4, None: evenly spaced).
      The defaults are lowbit.quantize's (int4, groups of 16, int8 scale codes, "mse").
      layers: filled when a model is quantized: {name: [bits, group_size,
        symmetric, act_bits, code_bits, has_input_scale, act_scale(, "float16")]}
        so a pre-quantized checkpoint rebuilds the exact layers.
    """

    def __init__(self, bits: int = 4, group_size: Optional[int] = DEFAULT_GROUP, symmetric: bool = True,
                 activations: Optional[int] = None, method: str = DEFAULT_METHOD,
                 modules_to_not_convert: Optional[list] = None, layers: Optional[dict] = None,
                 scale_dtype: str = DEFAULT_SCALE_DTYPE, levels: Optional[str] = DEFAULT_LEVELS, **kwargs):
        if isinstance(bits, bool) or bits not in (8, 4, 3, 2):
            raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0):
            raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        if activations not in (None, 8):
            raise ValueError(f"activations must be None or 8, got {activations!r}")
        if method not in DATA_FREE:
            raise ValueError(f"method must be one of {DATA_FREE} while loading (calibrated methods: "
                             f"lowbit.quantize(model, method=..., calibration_data=...)), got {method!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
        if modules_to_not_convert is not None and (isinstance(modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError("modules_to_not_convert must be a list of module names")
        _resolve_levels(levels, bits, symmetric, method)  # validates
        values = dict(quant_method=METHOD, bits=bits, group_size=group_size, symmetric=symmetric,
                      activations=activations, method=method, scale_dtype=scale_dtype, levels=levels,
                      modules_to_not_convert=None if modules_to_not_convert is None else list(modules_to_not_convert),
                      layers=None if layers is None else {str(k): list(v) for k, v in dict(layers).items()})
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False) and (name in _FIELDS or name in ("quant_method", "layers")):
            raise AttributeError(f"LowbitConfig is frozen: build a new one instead of setting {name}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in ("quant_method",) + _FIELDS + ("layers",)}

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        d = {k: v for k, v in dict(config_dict).items() if k != "quant_method"}
        config = cls(**{k: d.pop(k) for k in list(d) if k in _FIELDS + ("layers",)})
        return (config, {**d, **kwargs}) if return_unused_kwargs else config

    def with_layers(self, layers: dict) -> "LowbitConfig":
        return LowbitConfig(**{k: getattr(self, k) for k in _FIELDS}, layers=layers)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS)
        n = 0 if self.layers is None else len(self.layers)
        return f"LowbitConfig({fields}, layers=<{n}>)"


class LowbitHfQuantizer(HfQuantizer):
    """transformers' hooks for quant_method="lowbit" (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list = []
        self._plans: dict = {}  # layer name -> QuantConfig, for quantizing while loading
        self._importance = None  # calibrate.importance.DataFreeImportance under method="auto"
        self._waiting: dict = {}  # down projection name -> float weight, until its gate and up are in

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        bad = {str(d) for d in devices} - {"None", "cpu"}
        if bad:
            raise ValueError(f"lowbit runs on the CPU: device_map must be None or 'cpu', got {device_map!r}")
        if self.pre_quantized and not self.quantization_config.layers:
            raise ValueError("this lowbit checkpoint's quantization_config has no layer table: it was not "
                             "written by save_pretrained of a lowbit model")

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        from ..api import _select
        from ..calibrate.ptq import layer_group
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, keep_in_fp32_modules, add_default_skips=True)
        if self.pre_quantized:
            for name, record in self.quantization_config.layers.items():
                linear = model.get_submodule(name)
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"the checkpoint quantized {name}, but the model has a "
                                     f"{type(linear).__name__} there")
                _set_module(model, name, placeholder(linear, record))
            return model
        # The same choice of layers as lowbit.quantize, made on the meta skeleton.
        cfg = self.quantization_config
        targets, _ = _select(model, None, self._excluded, devices=("cpu", "meta"))
        storage = storage_bits(cfg.bits)
        table = _resolve_levels(cfg.levels, cfg.bits, cfg.symmetric, cfg.method)
        self._plans = {name: QuantConfig(storage, layer_group(cfg.group_size, mod.in_features, cfg.bits),
                                         cfg.symmetric, cfg.activations, None if storage == cfg.bits else cfg.bits,
                                         cfg.scale_dtype if storage != 2 else "float32", table)
                       for name, mod in targets}
        # method="auto" weighs down projections by an importance computed from the
        # float gate and up weights as they arrive (calibrate.importance): a down
        # projection that arrives before them waits, in float, until they are in.
        if cfg.method == "auto" and resolve_method(cfg.method, cfg.bits) == "mse":
            from ..calibrate.importance import DataFreeImportance
            from ..calibrate.memory import FreedMemoryReleaser
            self._importance = DataFreeImportance(model, targets)
            self._release_freed_memory = FreedMemoryReleaser()
        return model

    def _excluded(self, name: str, mod) -> bool:
        return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in self.modules_to_not_convert)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        name, _, part = param_name.rpartition(".")
        return not self.pre_quantized and part == "weight" and name in self._plans

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def quantize_loaded(self, model, name: str, weight: torch.Tensor) -> None:
        """Replace layer `name` (still on meta, or with its bias loaded) by its
        QuantLinear, quantized from the weight that just arrived."""
        old = model.get_submodule(name)
        imp = self._importance
        if imp is not None:
            imp.observe(name, weight)
        if imp is not None and name in imp.names() and not imp.ready(name):
            self._waiting[name] = weight.detach()
            return
        self._replace(model, name, old, weight)
        if imp is not None:
            for down in [d for d in self._waiting if name in imp.inputs_of(d) and imp.ready(d)]:
                self._replace(model, down, model.get_submodule(down), self._waiting.pop(down))
                # The held weight freed below later allocations: under a memory cap,
                # give the heap back (calibrate.memory), or the holes add up per layer.
                self._release_freed_memory()

    def _replace(self, model, name: str, old: nn.Module, weight: torch.Tensor) -> None:
        linear = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        importance = self._importance.get(name, model) if self._importance is not None else None
        new = QuantLinear.from_linear(linear, self._plans[name], method=self.quantization_config.method,
                                      importance=importance)
        if old.bias is not None and old.bias.device.type != "meta":  # the bias arrived first
            new.bias = nn.Parameter(old.bias.detach().to(new.orig_dtype))
        elif old.bias is not None:  # it arrives later, into the new layer
            new.bias = nn.Parameter(torch.empty(old.out_features, dtype=new.orig_dtype, device="meta"))
        _set_module(model, name, new)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            return model
        cfg = self.quantization_config
        for name in list(self._waiting):  # gate or up kept in float (excluded), or read after down
            self._replace(model, name, model.get_submodule(name), self._waiting.pop(name))
        layers = {name: layer_record(mod) for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
        self.quantization_config = cfg.with_layers(layers)
        model.config.quantization_config = self.quantization_config
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on the frozen base: QuantLinear passes input gradients


class _QuantizeOnLoad(ConversionOps):
    """transformers' loader hands each target weight here as it is read: it is
    quantized at once and the float tensor dropped, so peak memory is the
    quantized model plus about one float layer."""

    def __init__(self, quantizer: LowbitHfQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, full_layer_name=None,
                missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        weight = value[0] if isinstance(value, (list, tuple)) else value
        name = full_layer_name.rpartition(".")[0]
        self.quantizer.quantize_loaded(model, name, weight)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


def register() -> None:
    """Make quant_method="lowbit" known to transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(LowbitConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(LowbitHfQuantizer)


register()
