"""Prompt-processing and generation speed, the way ``llama-bench -p 512 -n 128`` counts them.

* pp (prompt processing): one forward pass over ``n_prompt`` tokens from an empty
  cache; only the last position's logits are needed (llama-bench asks for the
  same), tokens/s = n_prompt / time.
* tg (text generation): greedy ``generate`` of exactly ``n_gen`` new tokens with the
  KV cache after a short prompt; tokens/s = n_gen / time (the short prompt's
  prefill is included, as a user waiting for the text sees it).
Each figure is the median of ``repeats`` timed runs after one warm-up run.

``model`` may also be a :class:`lowbit.NativeDecoder`: pp is then one forward of
its C++ decoder from an empty cache, tg its own greedy ``generate``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

DEFAULT_PROMPT = "It is a truth universally acknowledged, that"


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    seconds: float      # median time of one run
    tokens: int
    runs: int


def _median_time(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()  # warm-up: thread pool, allocator, lazily built state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _native(model) -> bool:
    from ..llm.native import NativeDecoder
    return isinstance(model, NativeDecoder)


def prompt_speed(model, n_prompt: int = 512, repeats: int = 3, seed: int = 0) -> Speed:
    """pp<n_prompt>: tokens/s of one forward over n_prompt random tokens."""
    if n_prompt < 1 or repeats < 1:
        raise ValueError(f"n_prompt and repeats must be >= 1, got {n_prompt}, {repeats}")
    native = _native(model)
    vocab = model.vocab_size if native else model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, n_prompt), generator=g)

    def run():
        if native:
            model.reset()
            model(ids)
            return
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    t = _median_time(run, repeats)
    return Speed(n_prompt / t, t, n_prompt, repeats)


def generate(model, tokenizer, prompt: str = DEFAULT_PROMPT, n_gen: int = 128):
    """Greedy generation of exactly n_gen tokens; returns (new token ids, prompt ids)."""
    enc = tokenizer(prompt, return_tensors="pt")
    if _native(model):
        out = model.generate(enc["input_ids"], n_gen, min_new_tokens=n_gen)
        return out[0, enc["input_ids"].shape[1]:], enc["input_ids"][0]
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return out[0, enc["input_ids"].shape[1]:], enc["input_ids"][0]


def generation_speed(model, tokenizer, n_gen: int = 128, repeats: int = 3, prompt: str = DEFAULT_PROMPT,
                     return_text: bool = False):
    """tg<n_gen>: tokens/s of greedy generation with the KV cache; with
    ``return_text``, (Speed, the generated text)."""
    if n_gen < 1 or repeats < 1:
        raise ValueError(f"n_gen and repeats must be >= 1, got {n_gen}, {repeats}")
    last = []
    t = _median_time(lambda: last.append(generate(model, tokenizer, prompt, n_gen)[0]), repeats,
                     warmup=lambda: generate(model, tokenizer, prompt, min(n_gen, 8)))
    speed = Speed(n_gen / t, t, n_gen, repeats)
    return (speed, tokenizer.decode(last[-1], skip_special_tokens=True)) if return_text else speed


def first_sentence(text: str, limit: int = 90) -> str:
    """The first sentence of generated text, on one line, cut at ``limit`` characters."""
    text = " ".join(text.split())
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            text = text[:i + 1]
            break
    return text if len(text) <= limit else text[:limit - 3] + "..."
