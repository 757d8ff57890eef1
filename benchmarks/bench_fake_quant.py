"""Fake quantization, forward + backward, lowbit vs torch's own ops on large tensors.

    .venv/bin/python benchmarks/bench_fake_quant.py [--mib 64] [--pairs 15] [--no-write]

Each row runs x -> fake_quantize -> backward with a random upstream gradient,
ABAB-alternated in the same run with torch's op of the same semantics
(torch.fake_quantize_per_tensor_affine / _per_channel_affine, and the learnable
_fake_quantize_learnable_per_channel_affine). ratio = median of per-pair time
ratios lowbit / torch (below 1: lowbit faster). Same thread count for both.
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


def cases(n_rows: int, k: int):
    x = torch.randn(n_rows, k) * 2
    dy = torch.randn_like(x)
    z = torch.zeros(n_rows, dtype=torch.int32)
    s = x.abs().amax(1) / 7

    def run(fn, learnable=False):
        def go():
            xs = x.detach().requires_grad_()
            if learnable:
                sc, zp = s.clone().requires_grad_(), z.float().requires_grad_()
                fn(xs, sc, zp).backward(dy)
            else:
                fn(xs).backward(dy)
        return go

    yield ("per-tensor int8 [-128, 127]",
           run(lambda xs: lowbit.fake_quantize(xs, 0.02, 3, -128, 127)),
           run(lambda xs: torch.fake_quantize_per_tensor_affine(xs, 0.02, 3, -128, 127)))
    yield ("per-channel int4 (axis 0)",
           run(lambda xs: lowbit.fake_quantize(xs, s, z, -8, 7, 0)),
           run(lambda xs: torch.fake_quantize_per_channel_affine(xs, s, z, 0, -8, 7)))
    yield ("per-channel int4, learnable scale (LSQ)",
           run(lambda xs, sc, zp: lowbit.fake_quantize(xs, sc, zp, -8, 7, 0, grad_factor=0.01), True),
           run(lambda xs, sc, zp: torch._fake_quantize_learnable_per_channel_affine(xs, sc, zp, 0, -8, 7, 0.01), True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    threads = lowbit.get_num_threads()
    torch.set_num_threads(threads)
    k = 4096
    rows = args.mib * 2**20 // 4 // k
    lines = [f"x float32 [{rows}, {k}] ({args.mib} MiB), forward + backward, {threads} threads, "
             f"`{lowbit.cpu_target()}`, torch {torch.__version__}.", "",
             "| case | lowbit ms | torch ms | ratio lowbit/torch | speedup |", "|---|---|---|---|---|"]
    for label, ours, theirs in cases(rows, k):
        ta, tb, r = abab(ours, theirs, args.pairs)
        lines.append(f"| {label} | {ta * 1e3:.1f} | {tb * 1e3:.1f} | {r:.2f} | {1 / r:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    if not args.no_write:
        write_section(Path(__file__).with_name("README.md"), "bench_fake_quant",
                      f"## Fake quantization, QAT ({datetime.date.today()})\n\n" + text)


if __name__ == "__main__":
    main()
