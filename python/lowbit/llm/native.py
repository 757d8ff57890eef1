"""NativeDecoder: a quantized Llama-family causal LM decoded by one C++ call per step.

Through transformers, a decode step of SmolLM2 is ~600 torch operations and
~200 projection calls, each with Python and dispatcher costs of tens of
microseconds, while the int4 weights of the whole model stream in a few
milliseconds. The native decoder (csrc/lowbit/decoder.h) runs the layer stack
(RMSNorm, q/k/v, RoPE, attention over its own KV cache, o, SiLU-gated MLP, the
final norm and a quantized head) in C++ on lowbit's kernels, reading the
QuantLinear tiles in place: no copy of the weights is made.

    model = AutoModelForCausalLM.from_pretrained(...)
    lowbit.quantize(model, bits=4)
    dec = lowbit.NativeDecoder(model)
    out = dec.generate(tokenizer("Once", return_tensors="pt").input_ids, max_new_tokens=64)

Supported: LlamaForCausalLM-shaped models (llama, mistral without sliding
window, qwen2 without sliding window) whose seven projections per layer are
int8 / int4 QuantLinear layers (weight-only or int8 activations, fused or not,
AWQ input scales included). The embedding stays the model's own module (a float
table or lowbit's TiedQuantEmbedding); a float head runs in torch, a quantized
one in C++. Batch size 1. Everything computes in float32, like the model's
float32 forward in transformers (tests compare the two logit for logit).

The decoder reads the model's tensors as they are when it is built: quantize,
fuse or load first, then build it (a layer replaced afterwards is not seen; the
decoder keeps the old tensors alive, so nothing dangles).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import _C
from ..matmul import KSTEP

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Rotary embeddings whose frequencies do not change with the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _layer_spec(layer, col: int, name: str) -> dict:
    """The kernel-facing description of one QuantLinear (its tiles, not a copy)."""
    from ..nn.quant_linear import QuantLinear
    if type(layer) is not QuantLinear:
        kind = "a float nn.Linear: quantize the model first (lowbit.quantize)" if isinstance(layer, nn.Linear) \
            else f"a {type(layer).__name__}"
        raise ValueError(f"{name} is {kind}; the native decoder needs lowbit int8 / int4 QuantLinear layers")
    c = layer.config
    if c.bits not in (3, 4, 8):
        raise ValueError(f"{name} is int{c.bits}: the native decoder runs int8 / int4 / int3 tiles only")
    if c.act_bits not in (None, 0, 8):
        raise ValueError(f"{name}: activation bits {c.act_bits} are not supported (float or 8)")
    # The same views (and group rule) the layer's own eager forward hands the kernels.
    _, data, scales, offsets, group, bias, _, row_scales, levels = layer._kernel_args()
    return dict(bits=c.bits, n=layer.out_features, k=layer.in_features, group=group, data=data, scales=scales,
                offsets=offsets, row_scales=row_scales, levels=levels, bias=bias,
                input_scale=None if layer.input_scale is None else _f32(layer.input_scale),
                act_bits=c.act_bits or 0, act_scale=float(np.float32(layer.act_scale)), col=col)


def _slot_specs(parent, names, prefix: str) -> list:
    """Specs filling one slot's buffer: the named layers side by side, where a
    fused group (lowbit.fuse_projections) counts once for all its members."""
    from ..nn.fused import FusedMember
    specs, col, owners = [], 0, {}
    for n in names:
        mod = getattr(parent, n, None)
        if mod is None:
            raise ValueError(f"{prefix}.{n} is missing")
        if isinstance(mod, FusedMember):
            start, end = mod.owner.bounds[mod.index]
            key = id(mod.owner)
            if key not in owners:  # the fused layer's first member: the whole layer goes here
                if start != 0:
                    raise ValueError(f"{prefix}.{n}: fused members are not in their fused order")
                owners[key] = col
                specs.append(_layer_spec(mod.owner.fused, col, f"{prefix}.{n} (fused)"))
            elif owners[key] + start != col:
                raise ValueError(f"{prefix}.{n}: fused members are not in their fused order")
            col += end - start
            continue
        specs.append(_layer_spec(mod, col, f"{prefix}.{n}"))
        col += mod.out_features
    return specs


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise ValueError(f"model_type {mtype!r} is not supported by the native decoder (supported: "
                         f"{', '.join(SUPPORTED_TYPES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mtype == "mistral"):
        raise ValueError("sliding-window attention is not supported by the native decoder")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise ValueError("pretraining_tp > 1 is not supported")
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ValueError("the model has no rotary embedding with inv_freq (model.model.rotary_emb)")
    if getattr(rot, "rope_type", "default") not in STATIC_ROPE:
        raise ValueError(f"rope_type {rot.rope_type!r} changes with the sequence length; supported: "
                         f"{', '.join(STATIC_ROPE)}")


class NativeDecoder:
    """Prefill and decode a quantized Llama-family model in C++ (module docstring).

    ``prefill_chunk`` bounds how many prompt tokens go through one forward
    (buffers grow with it: 512 is llama.cpp's default batch).
    """

    def __init__(self, model: nn.Module, prefill_chunk: int = 512):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")
        _check_model(model)
        cfg, inner = model.config, model.model
        self.model, self.prefill_chunk = model, prefill_chunk
        attn0 = inner.layers[0].self_attn
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // heads
        rot = inner.rotary_emb
        eps = float(inner.layers[0].input_layernorm.variance_epsilon)
        self._dec = _C.Decoder(hidden=cfg.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                               intermediate=cfg.intermediate_size, eps=eps,
                               attn_scale=float(getattr(attn0, "scaling", head_dim ** -0.5)),
                               rope_scale=float(getattr(rot, "attention_scaling", 1.0)),
                               inv_freq=_f32(rot.inv_freq))
        for i, layer in enumerate(inner.layers):
            p = f"model.layers.{i}"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if float(norm.variance_epsilon) != eps:
                    raise ValueError(f"{p}: RMSNorm eps differs between layers")
            a, m = layer.self_attn, layer.mlp
            self._dec.add_layer(_f32(layer.input_layernorm.weight), _f32(layer.post_attention_layernorm.weight),
                                _slot_specs(a, ("q_proj", "k_proj", "v_proj"), p + ".self_attn"),
                                _slot_specs(a, ("o_proj",), p + ".self_attn"),
                                _slot_specs(m, ("gate_proj", "up_proj"), p + ".mlp"),
                                _slot_specs(m, ("down_proj",), p + ".mlp"))
        head = model.get_output_embeddings()
        from ..nn.quant_linear import QuantLinear
        if type(head) is QuantLinear:
            self._dec.set_final(_f32(inner.norm.weight), _layer_spec(head, 0, "lm_head"))
            self._float_head = None
        elif isinstance(head, nn.Linear):
            self._dec.set_final(_f32(inner.norm.weight), None)
            self._float_head = head
        else:
            raise ValueError(f"lm_head is a {type(head).__name__}: expected nn.Linear or QuantLinear")
        self.embed = model.get_input_embeddings()
        self.vocab_size = head.out_features
        self.head_kernel = "lowbit " + head.kernel if self._float_head is None else "torch float32 linear"

    # ---------------------------------------------------------------- state
    @property
    def position(self) -> int:
        """Tokens in the KV cache."""
        return self._dec.position

    def reset(self, position: int = 0) -> None:
        """Forget the cache from ``position`` on (0: everything)."""
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be an int >= 0, got {position!r}")
        self._dec.truncate(position)

    # ---------------------------------------------------------------- forward
    def _ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"input_ids: the native decoder runs batch size 1, got {ids.shape[0]} rows")
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            raise ValueError("input_ids must be a non-empty 1-D (or [1, L]) integer sequence")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        return ids.long()

    def _step(self, ids: torch.Tensor, keep: int) -> np.ndarray:
        """Runs ids after the cached positions; float32 logits [keep, vocab] of the last rows."""
        with torch.inference_mode():
            x = self.embed(ids[None])[0].to(torch.float32).contiguous().numpy()
        hidden, logits = self._dec.forward(x, keep, self._float_head is None)
        if logits is not None:
            return logits
        with torch.inference_mode():
            return nn.functional.linear(torch.from_numpy(hidden).to(self._float_head.weight.dtype),
                                        self._float_head.weight, self._float_head.bias).float().numpy()

    def forward(self, input_ids, all_logits: bool = False) -> torch.Tensor:
        """Appends ``input_ids`` to the cache; returns float32 logits [vocab] of the
        last token, or [len(input_ids), vocab] with ``all_logits``."""
        ids = self._ids(input_ids)
        outs = []
        for start in range(0, ids.numel(), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            last = start + self.prefill_chunk >= ids.numel()
            keep = chunk.numel() if all_logits else (1 if last else 0)
            out = self._step(chunk, keep)
            if keep:
                outs.append(out)
        return torch.from_numpy(np.concatenate(outs) if all_logits else outs[-1][0])

    __call__ = forward

    def logits(self, input_ids) -> torch.Tensor:
        """float32 logits [L, vocab] of a whole sequence, from an empty cache."""
        self.reset()
        return self.forward(input_ids, all_logits=True)

    # ---------------------------------------------------------------- generate
    def generate(self, input_ids, max_new_tokens: int = 128, *, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                 generator: Optional[torch.Generator] = None, streamer=None) -> torch.Tensor:
        """Greedy (or sampled) continuation of ``input_ids`` from an empty cache.

        Returns int64 [1, prompt + new] like transformers' ``generate``. ``eos_token_id``
        (an int or a list; default: the model's generation config) stops early, not
        before ``min_new_tokens``. Sampling: ``temperature``, ``top_k`` (0: off) and
        ``top_p`` (1: off), drawn with ``generator``. ``streamer`` receives the
        prompt, then each new token, as transformers' streamers do.
        """
        ids = self._ids(input_ids)
        for name, v in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens), ("top_k", top_k)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if do_sample and not (temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if eos_token_id is None:
            gc = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None)
        eos = set() if eos_token_id is None else \
            {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
        if streamer is not None:
            streamer.put(ids[None])
        out = ids.tolist()
        self.reset()
        logits = self.forward(ids).numpy() if max_new_tokens else None
        for i in range(max_new_tokens):
            token = self._choose(logits, do_sample, temperature, top_k, top_p, generator)
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if (token in eos and i + 1 >= min_new_tokens) or i + 1 == max_new_tokens:
                break
            logits = self._step(torch.tensor([token]), 1)[0]
        if streamer is not None:
            streamer.end()
        return torch.tensor(out, dtype=torch.int64)[None]

    @staticmethod
    def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator) -> int:
        if not do_sample:  # NumPy: no torch thread wake-up per token
            return int(np.argmax(logits))
        scores = torch.from_numpy(logits) / temperature
        if top_k and top_k < scores.numel():
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, -1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            drop = torch.cumsum(probs, -1) - probs >= top_p
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def __repr__(self) -> str:
        return f"NativeDecoder({type(self.model).__name__}, {self._dec.layers} layers, head: {self.head_kernel}, " \
               f"cached {self.position} tokens)"
