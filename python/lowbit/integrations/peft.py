"""LoRA adapters on a lowbit-quantized base with peft (QLoRA-style, on the CPU).

    from lowbit.integrations.peft import lora_config, load_adapter
    model = peft.get_peft_model(quantized_model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    ...train: only the adapters have gradients; the frozen QuantLinear base passes input gradients...
    model.save_pretrained("adapters")
    model = load_adapter(quantized_model, "adapters")      # the same adapters on a quantized base
    float_model = model.merge_and_unload()                  # merged into float nn.Linear layers

peft knows third-party layer types through ``LoraConfig._register_custom_module``;
``lora_config`` builds a LoraConfig with QuantLinear registered (``register``
does it for a config you built), and ``load_adapter`` registers it on the
config it reads from the adapter folder (peft does not save the registration).

Merging cannot go back into 4-bit codes without a second rounding, so
``merge`` turns the layer into a float ``nn.Linear`` holding dequant(W) +
scaling * B @ A: ``merge_and_unload()`` returns the float model the adapters
were trained for (``unmerge`` restores the quantized layer).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn import QuantLinear


class LoraQuantLinear(nn.Module, LoraLayer):
    """LoRA around a frozen QuantLinear: y = base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        if config.use_dora or getattr(config, "lora_bias", False):
            raise ValueError("lowbit's LoRA layer supports plain LoRA (use_dora=False, lora_bias=False)")
        super().__init__()
        with warnings.catch_warnings():  # peft warns for every layer type it does not list; it reads in/out_features
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._quantized_base: Optional[QuantLinear] = None  # kept while merged into a float layer
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None  # plain LoRA only (checked in __init__)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        quantized = isinstance(base, QuantLinear)  # else: an already merged float layer gets more adapters
        weight = base.dequantized_weight().float() if quantized else base.weight.detach().float()
        names = [name for name in adapter_names if name in self.lora_A]
        for name in names:
            weight = weight + self.get_delta_weight(name).float()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"the merged weights of adapters {adapter_names} are not finite")
        if quantized:
            # On meta: its random init would be overwritten at once.
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            if base.bias is not None:
                merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            self._quantized_base, dtype = base, base.orig_dtype
        else:
            merged, dtype = base, base.weight.dtype
        merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        self.merged_adapters.extend(names)
        self.base_layer = merged

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer = self._quantized_base
        self._quantized_base = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("lowbit's LoRA layer does not mix adapters within a batch (adapter_names)")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            result = result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Let ``config`` wrap QuantLinear layers (returns it)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config


def lora_config(**kwargs) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` that also wraps lowbit's QuantLinear layers."""
    return register(LoraConfig(**kwargs))


def load_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for adapters trained on a lowbit base."""
    config = register(LoraConfig.from_pretrained(str(path)))
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)
