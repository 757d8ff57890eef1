"""Quantize / dequantize throughput on 128 MiB float32 arrays (DRAM-resident),
against a memcpy of the same floats and the same job done with torch / NumPy ops.

    .venv/bin/python benchmarks/bench_quantize.py [--mib 128] [--pairs 20] [--no-write]

Each comparison is ABAB-alternated in the same run; the ratio column is the
median of per-pair time ratios (lowbit / other: below 1 means lowbit is faster).
Writes the table into benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from common import abab, ceilings_line, write_section  # noqa: E402

FORMATS = [  # label, bits, group, symmetric
    ("int8 per-row", 8, None, True),
    ("int8 per-row asym", 8, None, False),
    ("int4 g128", 4, 128, True),
    ("int4 g32", 4, 32, True),
    ("int4 g128 asym", 4, 128, False),
    ("int2 g32", 2, 32, True),
]


def torch_quantize(torch, x, bits, group, sym):
    """The same job with plain torch ops (absmax / min-max, round, clamp, pack)."""
    g = x.view(-1, x.shape[-1] if group is None else group)
    if sym:
        scale = g.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1))
        q = torch.clamp(torch.round(g / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
    else:
        lo, hi = g.amin(dim=1, keepdim=True).clamp(max=0), g.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (2 ** bits - 1)
        zp = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale) + zp, 0, 2 ** bits - 1).to(torch.uint8)
    q = q.view(torch.uint8).view(x.shape[0], -1)
    if bits == 4:
        q = (q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)
    elif bits == 2:
        q = (q[:, 0::4] & 3) | ((q[:, 1::4] & 3) << 2) | ((q[:, 2::4] & 3) << 4) | (q[:, 3::4] << 6)
    return q, scale


def numpy_quantize(x, bits, group, sym):
    g = x.reshape(-1, x.shape[-1] if group is None else group)
    scale = np.abs(g).max(axis=1, keepdims=True) / np.float32(2 ** (bits - 1))
    q = np.clip(np.rint(g * (np.float32(1) / scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int8)
    q = q.view(np.uint8).reshape(x.shape[0], -1)
    if bits == 4:
        q = (q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)
    return q, scale


def torch_dequantize(torch, q_unpacked, scale, group, shape):
    g = q_unpacked.view(-1, shape[-1] if group is None else group)
    return (g.float() * scale).view(shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None

    k = 4096
    rows = args.mib * 2 ** 20 // 4 // k
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    dst = np.empty_like(x)
    lines = []
    header = ("| threads | format | quantize GB/s | vs memcpy | quantize out= GB/s | vs memcpy "
              "| vs torch ops | vs NumPy | dequantize out= GB/s | vs memcpy | vs torch |")
    lines += [header, "|" + "---|" * 11]
    memcpy = lambda: np.copyto(dst, x)  # noqa: E731
    gb = x.nbytes / 1e9
    for threads in args.threads:
        lowbit.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for label, bits, group, sym in FORMATS:
            quant = lambda: lowbit.quantize_array(x, bits, group, sym)  # noqa: E731
            q = quant()
            quant_out = lambda: lowbit.quantize_array(x, bits, group, sym, out=q)  # noqa: E731
            tq, tm, r_mem = abab(quant, memcpy, args.pairs)
            tqo, _, r_mem_out = abab(quant_out, memcpy, args.pairs)
            r_torch = r_np = r_dt = float("nan")
            if torch is not None:
                xt = torch.from_numpy(x)
                _, _, r_torch = abab(quant, lambda: torch_quantize(torch, xt, bits, group, sym), args.pairs)
            if threads == 1 and sym and bits in (8, 4):
                _, _, r_np = abab(quant, lambda: numpy_quantize(x, bits, group, sym), max(3, args.pairs // 4))
            deq = lambda: lowbit.dequantize_array(q, out=dst)  # noqa: E731
            td, _, r_dmem = abab(deq, memcpy, args.pairs)
            if torch is not None:
                codes = torch.from_numpy(q.codes().astype(np.int8 if sym else np.uint8))
                scale = torch.from_numpy(np.abs(q.scales).reshape(-1, 1))
                _, _, r_dt = abab(lambda: lowbit.dequantize_array(q),
                                  lambda: torch_dequantize(torch, codes, scale, group, x.shape), args.pairs)
            line = (f"| {threads} | {label} | {gb / tq:.2f} | {r_mem:.2f}x | {gb / tqo:.2f} | {r_mem_out:.2f}x "
                    f"| {r_torch:.2f}x | {r_np:.2f}x | {gb / td:.2f} | {r_dmem:.2f}x | {r_dt:.2f}x |"
                    ).replace("nanx", "–")
            print(line, flush=True)
            lines.append(line)
    print(f"memcpy of the same floats: {gb / tm:.2f} GB/s (read side)")
    text = "\n".join([
        f"## Quantize / dequantize ({datetime.date.today().isoformat()})",
        "",
        f"`cpu_target()`: {lowbit.cpu_target()}; array {rows}x{k} float32 = {args.mib} MiB (DRAM); "
        f"{args.pairs} ABAB pairs, median of per-pair time ratios (lowbit / other: < 1 = lowbit faster). "
        "GB/s counts the float32 bytes read. The torch and NumPy columns do the same job with plain "
        "ops (absmax or min-max scale, round, clamp, pack), both allocating outputs like lowbit's "
        "first column; the dequantize-vs-torch column compares freshly allocated outputs on both sides, "
        "torch starting from already-unpacked int8 codes. memcpy = `np.copyto` into a preallocated "
        "array, so the `out=` columns (lowbit writing into existing buffers) are the like-for-like "
        "comparison; the first column adds fresh output pages (glibc maps allocations >= 32 MiB "
        "anew on every call, and the kernel zero-fills them on first touch).",
        "",
        "memcpy is NumPy's single-threaded copy, so rows with 2 lowbit threads compare against a "
        "1-thread copy (the DRAM ceiling below is what both share).",
        "",
        "Ceilings (`../shared/tools/ceilings.cc`):",
        "```",
        ceilings_line(),
        "```",
        "",
        *lines,
    ])
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "README.md", "bench_quantize", text)
        print("wrote benchmarks/README.md")


if __name__ == "__main__":
    main()
