"""The contract path: ``lowbit.matmul(x, QArray)`` vs ``lowbit.matmul(x, PackedWeights)``.

    .venv/bin/python benchmarks/bench_contract.py [--pairs 30] [--no-write]

DESIGN.md's matmul takes a QArray. Its first call builds the tiles and keeps them
with the array (issue 11/11); from the second call on it must cost the same as
passing PackedWeights (goal: within 5%). Both sides rotate over the same number
of weight copies (>= 256 MiB, from DRAM); ABAB pairs, median of per-pair ratios.
The first-call cost (tiling) is shown separately, as a multiple of a packed call.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from common import abab, timed, write_section  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROTATE_BYTES = 256 << 20


def rotating_pair(w, bits, group):
    """(QArrays with their tiles built, the same tiles as PackedWeights), as cycles."""
    q0 = lowbit.quantize_array(w, bits=bits, group_size=group)
    copies = max(2, -(-ROTATE_BYTES // lowbit.pack_weights(q0).nbytes))
    qs = [lowbit.quantize_array(w, bits=bits, group_size=group) for _ in range(copies)]
    pws = [lowbit.pack_weights(q) for q in qs]
    return qs, pws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = [("GEMV 4096x4096", 1, 4096, 4096), ("GEMM M=16 4096²", 16, 4096, 4096),
              ("GEMM M=128 4096²", 128, 4096, 4096)]
    variants = [("int4 g128 weight-only", 4, 128, None), ("int4 g128 W4A8", 4, 128, 8),
                ("int8 W8A8", 8, None, 8)]
    lines = ["| threads | shape | weights | QArray / PackedWeights (2nd call on) | first QArray call / packed call |",
             "|---|---|---|---|---|"]
    for threads in args.threads:
        lowbit.set_num_threads(threads)
        for label, m, n, k in shapes:
            w = rng.standard_normal((n, k)).astype(np.float32)
            x = rng.standard_normal((m, k)).astype(np.float32)
            for vlabel, bits, group, act_bits in variants:
                qs, pws = rotating_pair(w, bits, group)
                first = timed(lambda: lowbit.matmul(x, qs[0], act_bits=act_bits))
                for q in qs[1:]:
                    lowbit.matmul(x, q, act_bits=act_bits)
                iq, ip = itertools.cycle(qs), itertools.cycle(pws)
                tq, tp, r = abab(lambda: lowbit.matmul(x, next(iq), act_bits=act_bits),
                                 lambda: lowbit.matmul(x, next(ip), act_bits=act_bits), args.pairs)
                line = f"| {threads} | {label} | {vlabel} | {r:.3f} | {first / tp:.0f}x |"
                print(line, flush=True)
                lines.append(line)
                del qs, pws
    text = "\n".join([
        f"## Contract path: matmul(x, QArray) ({datetime.date.today().isoformat()})",
        "",
        f"`cpu_target()`: {lowbit.cpu_target()}. Time ratio of `lowbit.matmul(x, q)` (q a QArray "
        "whose tiles the first call built) to `lowbit.matmul(x, lowbit.pack_weights(q))`, both "
        f"rotating over >= 256 MiB of weight copies, {args.pairs} ABAB pairs, median of per-pair "
        "ratios (1.00 = same cost; goal <= 1.05). The last column is the one-time tiling cost.",
        "",
        *lines,
    ])
    print(text)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "README.md", "bench_contract", text)
        print("wrote benchmarks/README.md")


if __name__ == "__main__":
    main()
