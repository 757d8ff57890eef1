"""Perplexity with llama.cpp's protocol, so numbers compare with ``llama-perplexity -c 512``.

The protocol (llama.cpp ``tools/perplexity``): tokenize the whole text once; cut
it into consecutive, non-overlapping windows of ``context`` tokens (the tail
shorter than a window is dropped); if the tokenizer adds a BOS token, the first
token of every window is replaced by BOS; run each window from an empty cache and
score only its second half: the logits at positions ``context // 2`` ..
``context - 2`` predict tokens ``context // 2 + 1`` .. ``context - 1`` (255 tokens
per 512-window). Perplexity = exp(mean negative log-likelihood over all scored
tokens), accumulated in float64.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch


@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`; ``float(result)`` is the perplexity."""

    ppl: float
    nll: float                 # mean negative log-likelihood per scored token (nats)
    stderr: float              # standard error of ppl (delta method over scored tokens, as llama.cpp prints)
    scored_tokens: int
    windows: int
    context: int
    seconds: float
    window_nll: List[float] = field(default_factory=list, repr=False)  # mean nll of each window

    def __float__(self) -> float:
        return self.ppl

    def __str__(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.stderr:.4f} ({self.windows} windows of {self.context}, " \
               f"{self.scored_tokens} tokens scored)"


def tokenize(tokenizer, text: str) -> List[int]:
    """Token ids of text without special tokens (BOS is the protocol's business)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def perplexity(model, tokenizer, text, context: int = 512, *, max_tokens: Optional[int] = None,
               max_windows: Optional[int] = None, batch_size: int = 1, add_bos: Optional[bool] = None,
               progress: bool = True) -> Perplexity:
    """Perplexity of a causal LM on ``text`` with llama.cpp's protocol (module docstring).

    Args:
      model: a causal LM whose forward takes ``input_ids`` and returns ``.logits``
        (transformers' ``*ForCausalLM``; lowbit-quantized or not).
      tokenizer: its tokenizer (called on the whole text), or None when ``text``
        is already a sequence of token ids.
      text: a string, or token ids.
      context: window length in tokens (llama.cpp's ``-c``); even, >= 4.
      max_tokens: use only the first this many tokens of the text.
      max_windows: at most this many windows (llama.cpp's ``--chunks``).
      batch_size: windows per forward pass (same result, more memory).
      add_bos: put BOS at the start of every window; None: when the tokenizer adds one.
      progress: a progress bar over windows (tqdm) with the running perplexity.
    """
    from ..api import refuse_unloaded_checkpoint
    refuse_unloaded_checkpoint(model)
    if isinstance(context, bool) or not isinstance(context, int) or context < 4 or context % 2:
        raise ValueError(f"context must be an even int >= 4, got {context!r}")
    for name, v in (("max_tokens", max_tokens), ("max_windows", max_windows)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(text, str):
        if tokenizer is None:
            raise TypeError("tokenizer is None but text is a string: pass a tokenizer or token ids")
        ids = tokenize(tokenizer, text)
    elif isinstance(text, (Sequence, torch.Tensor)):
        ids = [int(t) for t in text]
    else:
        raise TypeError(f"text must be a string or a sequence of token ids, got {type(text).__name__}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = len(ids) // context
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of context={context}")
    if add_bos is None:
        add_bos = tokenizer is not None and _adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    first = context // 2
    data = torch.tensor(ids[:windows * context], dtype=torch.long).reshape(windows, context)
    targets = data[:, first + 1:]
    inputs = data.clone()
    if add_bos:
        inputs[:, 0] = bos
    # Only the scored half needs logits: transformers' logits_to_keep skips the
    # output head on the first half (the head is ~a quarter of SmolLM2's FLOPs).
    keep = {"logits_to_keep": context - first} if _accepts(model, "logits_to_keep") else {}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=windows, desc="perplexity", unit="window")
        except ImportError:
            pass
    window_nll: List[float] = []
    total = 0.0
    total_sq = 0.0
    count = 0
    t0 = time.perf_counter()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, windows, batch_size):
                x = inputs[b:b + batch_size]
                logits = model(input_ids=x, use_cache=False, **keep).logits
                logits = logits[:, -(context - first):][:, :-1] if keep else logits[:, first:-1]
                logp = torch.log_softmax(logits.float(), dim=-1)
                nll = -logp.gather(-1, targets[b:b + batch_size, :, None]).squeeze(-1).double()
                for row in nll:
                    window_nll.append(float(row.mean()))
                total += float(nll.sum())
                total_sq += float((nll * nll).sum())
                count += nll.numel()
                if bar is not None:
                    bar.update(x.shape[0])
                    bar.set_postfix(ppl=f"{math.exp(total / count):.4f}")
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(var / max(count - 1, 1))
    return Perplexity(ppl, mean, stderr, count, windows, context, time.perf_counter() - t0, window_nll)
