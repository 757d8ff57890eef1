"""LoRA training steps on SmolLM2: float32 base vs lowbit int4 base (issue 10/11).

    .venv/bin/python benchmarks/bench_lora.py [--pairs 5] [--tokens 128] [--no-write]

Same adapters (r=8 on q/v/up/down), same batch of Emma; each pair runs one
optimizer step on each model (ABAB), the table gives median seconds per step and
the speed ratio (float time / lowbit time, median of pairs). Memory is the bytes
the base holds (distinct parameters and buffers); both models live in one run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import lowbit  # noqa: E402
from common import abab, write_section  # noqa: E402
from lowbit.eval import material  # noqa: E402
from lowbit.integrations.peft import lora_config  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def held_bytes(model) -> int:
    """Bytes of the distinct tensors (a tied embedding and head count once)."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
    return sum(seen.values())


def main() -> None:
    import peft
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tok = material.load_smollm2()[1]
    ids = tok(material.austen("emma")[:20000], return_tensors="pt")["input_ids"][0][: args.tokens][None]
    models = {}
    for label in ("float32", "lowbit int4"):
        base, _ = material.load_smollm2()
        if label != "float32":
            lowbit.quantize(base, bits=4, progress=False)
        mem = held_bytes(base)
        model = peft.get_peft_model(base, lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        models[label] = (step, mem)
    threads = torch.get_num_threads()
    t_float, t_low, ratio = abab(models["float32"][0], models["lowbit int4"][0], args.pairs)
    lines = ["| base | held MiB | s / step | speed vs float32 |", "|---|---|---|---|",
             f"| float32 | {models['float32'][1] / 2**20:.1f} | {t_float:.2f} | 1.00x |",
             f"| lowbit int4 | {models['lowbit int4'][1] / 2**20:.1f} | {t_low:.2f} | {ratio:.2f}x |"]
    text = "\n".join([f"## LoRA training step ({datetime.date.today().isoformat()})", "",
                      f"SmolLM2-135M, LoRA r=8 on {', '.join(TARGETS)}, one AdamW step on {args.tokens} tokens of "
                      f"Emma, {threads} torch threads, {args.pairs} ABAB pairs (median). `cpu_target()`: "
                      f"{lowbit.cpu_target()}. Held: the base's parameters and buffers (the int4 base keeps its "
                      "tied embedding in int8 rows of the head).", "", *lines])
    print(text)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "README.md", "bench_lora", text)


if __name__ == "__main__":
    main()
