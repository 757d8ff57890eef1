"""Low-bit matmul vs torch on the CPU (DESIGN.md section 5 method).

    .venv/bin/python benchmarks/bench_matmul.py [--pairs 20] [--threads 1 2] [--no-write]
    .venv/bin/python benchmarks/bench_matmul.py --busy-core   # only the busy-core table

Weights come from DRAM: every contender rotates over copies of its weights
totalling >= 256 MiB. Each ratio is an ABAB-alternated pair in the same run, same
thread count; the table gives the median of per-pair time ratios as a speed-up
(other time / lowbit time: > 1 = lowbit faster). Writes benchmarks/README.md
and, when matplotlib is installed, benchmarks/matmul_speedup.png.
"""
from __future__ import annotations

import argparse
import os
import datetime
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from common import abab, ceilings_line, timed, write_section  # noqa: E402

# torch's OpenMP workers spin after each op and would steal the core that
# lowbit's next call needs (and the other way round) in an ABAB run; passive
# waiting makes the alternation fair to both. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROTATE_BYTES = 256 << 20


class Rotating:
    """Calls fn(copy) over copies of some weights, one copy per call."""

    def __init__(self, make_copy, nbytes):
        self.copies = [make_copy() for _ in range(max(2, -(-ROTATE_BYTES // max(1, nbytes))))]
        self.it = itertools.cycle(self.copies)

    def next(self):
        return next(self.it)


def lowbit_contender(w, x, bits, group, act_bits):
    pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=bits, group_size=group))
    rot = Rotating(lambda: lowbit.PackedWeights(pw.data.copy(), pw.scales.copy(), None if pw.offsets is None else pw.offsets.copy(),
                                                pw.shape, pw.bits, pw.group_size, pw.symmetric), pw.nbytes)
    return (lambda: lowbit.matmul(x, rot.next(), act_bits=act_bits)), pw.nbytes


def torch_contenders(torch, w, x):
    n, k = w.shape
    xt = torch.from_numpy(x)
    xb = xt.to(torch.bfloat16)
    wt = torch.from_numpy(w)
    out = {}
    rot = Rotating(lambda: wt.clone(), w.nbytes)
    if x.shape[0] == 1:
        x1 = xt[0]
        out["torch fp32"] = (lambda: torch.mv(rot.next(), x1)), w.nbytes
    else:
        out["torch fp32"] = (lambda: torch.matmul(xt, rot.next().T)), w.nbytes
    wb = wt.to(torch.bfloat16)
    rotb = Rotating(lambda: wb.clone(), wb.numel() * 2)
    out["torch bf16"] = (lambda: torch.matmul(xb, rotb.next().T)), wb.numel() * 2
    # int4pack: asymmetric codes 0..15 with bf16 scales and zeros, group 128.
    g = 128
    wg = wt.reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    codes = torch.clamp(torch.round((wg - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    rot4 = Rotating(lambda: (packed.clone(), sz.clone()), packed.numel() + sz.numel() * 2)

    def int4pack():
        p, s = rot4.next()
        return torch._weight_int4pack_mm_for_cpu(xb, p, g, s)
    out["torch int4pack (bf16)"] = int4pack, packed.numel() + sz.numel() * 2
    w8 = torch.clamp(torch.round(wt / (wt.abs().amax(1, keepdim=True) / 127)), -127, 127).to(torch.int8)
    s8 = (wt.abs().amax(1) / 127).contiguous()
    rot8 = Rotating(lambda: (w8.clone(), s8.clone()), w8.numel())

    def int8pack():
        a, s = rot8.next()
        return torch._weight_int8pack_mm(xt, a, s)
    out["torch int8pack"] = int8pack, w8.numel()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic
            lin = torch.nn.Linear(k, n, bias=False)
            lin.weight.data = wt
            dq = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        rotd = Rotating(lambda: dq, w8.numel())  # one module: its packed weight is ~k*n bytes
        out["torch dynamic int8 Linear"] = (lambda: rotd.next()(xt)), w8.numel()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"torch dynamic int8 Linear unavailable: {e}")
    return out


def in_cache_gemm(threads):
    """W8A8 GEMM micro-kernel on in-cache data: GOP/s (2*M*N*K / s)."""
    m, n, k = 128, 512, 1024
    rng = np.random.default_rng(1)
    pw = lowbit.pack_weights(lowbit.quantize_array(rng.standard_normal((n, k)).astype(np.float32), bits=8))
    x = rng.standard_normal((m, k)).astype(np.float32)
    lowbit.matmul(x, pw, act_bits=8)
    t = min(timed(lambda: lowbit.matmul(x, pw, act_bits=8)) for _ in range(50))
    return 2 * m * n * k / t / 1e9


def busy_core_table(pairs: int) -> str:
    """2 threads against 1 while another process keeps one core busy.

    A busy loop in a second process holds one of the cores; each pair times a
    block of calls on 1 thread, then a block on 2 threads (the pool is rebuilt
    at each switch, so one untimed call follows it). Ratio > 1: the 2-thread
    call is faster even though one of its threads shares a core.
    """
    import subprocess
    rng = np.random.default_rng(2)
    cases = [("GEMV 4096x4096", 1, 4096, 4096, None), ("GEMV 4096x4096", 1, 4096, 4096, 8),
             ("GEMM M=128 4096x4096", 128, 4096, 4096, None), ("GEMM M=128 4096x4096", 128, 4096, 4096, 8)]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    lines = ["| shape | lowbit int4 g128 | 1 thread ms | 2 threads ms | 2 threads / 1 thread speed |", "|---|---|---|---|---|"]
    try:
        for label, m, n, k, act_bits in cases:
            w = rng.standard_normal((n, k)).astype(np.float32)
            x = rng.standard_normal((m, k)).astype(np.float32)
            fn, _ = lowbit_contender(w, x, 4, 128, act_bits)
            calls = 20 if m == 1 else 3

            def block(threads):
                lowbit.set_num_threads(threads)
                fn()
                return timed(lambda: [fn() for _ in range(calls)]) / calls

            t1, t2 = [], []
            for _ in range(pairs):
                t1.append(block(1))
                t2.append(block(2))
            r = sorted(a / b for a, b in zip(t1, t2))[len(t1) // 2]
            line = (f"| {label} | {'W4A8' if act_bits else 'weight-only'} | {sorted(t1)[len(t1) // 2] * 1e3:.2f} | "
                    f"{sorted(t2)[len(t2) // 2] * 1e3:.2f} | {r:.2f}x |")
            print(line, flush=True)
            lines.append(line)
    finally:
        busy.kill()
        busy.wait()
    return "\n".join([f"## Two threads with one core busy ({datetime.date.today().isoformat()})", "",
                      f"`cpu_target()`: {lowbit.cpu_target()}. A `while True: pass` process holds one core; "
                      f"{pairs} pairs of 1-thread and 2-thread blocks, medians, weights from DRAM. "
                      "The pool hands out 4 chunks per thread to whichever thread is free "
                      "(csrc/lowbit/parallel.cc), so the thread sharing the busy core holds up at most one chunk.",
                      "", *lines])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--busy-core", action="store_true", help="only the table of 2 threads with one core busy")
    args = ap.parse_args()
    if args.busy_core:
        text = busy_core_table(min(args.pairs, 10))
        print(text)
        if not args.no_write:
            write_section(Path(__file__).resolve().parent / "README.md", "bench_matmul_busy", text)
        return
    import torch

    shapes = [("GEMV 4096x4096", 1, 4096, 4096), ("GEMV 11008x4096", 1, 11008, 4096),
              ("GEMV 4096x11008", 1, 4096, 11008), ("GEMM M=16 4096²", 16, 4096, 4096),
              ("GEMM M=128 4096²", 128, 4096, 4096), ("GEMM M=512 4096²", 512, 4096, 4096)]
    variants = [("int4 g128 W4A8", 4, 128, 8), ("int4 g128 weight-only", 4, 128, None),
                ("int8 W8A8", 8, None, 8), ("int8 weight-only", 8, None, None)]
    rng = np.random.default_rng(0)
    lines = ["| threads | shape | lowbit | ms | GB/s (weights) | vs fp32 | vs bf16 | vs int4pack | vs int8pack | vs dyn int8 |",
             "|" + "---|" * 10]
    plot = {}
    ceil = ceilings_line()
    for threads in args.threads:
        lowbit.set_num_threads(threads)
        torch.set_num_threads(threads)
        for label, m, n, k in shapes:
            w = rng.standard_normal((n, k)).astype(np.float32)
            x = rng.standard_normal((m, k)).astype(np.float32)
            anchors = torch_contenders(torch, w, x)
            for vlabel, bits, group, act_bits in variants:
                fn, nbytes = lowbit_contender(w, x, bits, group, act_bits)
                t_ours = None
                ratios = {}
                for aname in ("torch fp32", "torch bf16", "torch int4pack (bf16)", "torch int8pack",
                              "torch dynamic int8 Linear"):
                    if aname not in anchors:
                        continue
                    ta, tb, r = abab(fn, anchors[aname][0], args.pairs)
                    t_ours = ta if t_ours is None else min(t_ours, ta)
                    ratios[aname] = 1.0 / r
                cells = [f"{ratios.get(a, float('nan')):.2f}x" for a in
                         ("torch fp32", "torch bf16", "torch int4pack (bf16)", "torch int8pack",
                          "torch dynamic int8 Linear")]
                line = (f"| {threads} | {label} | {vlabel} | {t_ours * 1e3:.3f} | {nbytes / t_ours / 1e9:.1f} | "
                        + " | ".join(cells) + " |").replace("nanx", "–")
                print(line, flush=True)
                lines.append(line)
                plot.setdefault((threads, vlabel), []).append((label, ratios.get("torch fp32")))
            del anchors
        lines.append(f"| {threads} | in-cache W8A8 GEMM 128x512x1024 | int8 W8A8 | | {in_cache_gemm(threads):.0f} GOP/s | | | | | |")
    text = "\n".join([
        f"## Matmul ({datetime.date.today().isoformat()})",
        "",
        f"`cpu_target()`: {lowbit.cpu_target()}. Weights rotate over >= 256 MiB of copies (DRAM), "
        f"{args.pairs} ABAB pairs per comparison, median of per-pair ratios, shown as speed-up "
        "(torch time / lowbit time). `ms` is lowbit's median time; GB/s is lowbit's weight bytes "
        "(codes + scales + offsets) per second. int4pack gets bf16 activations (its AVX-512 path), "
        "int8pack and dynamic int8 Linear get float32. W4A8/W8A8 quantize activations per token "
        "to int8 inside the call.",
        "",
        "Ceilings (`../shared/tools/ceilings.cc`):",
        "```",
        ceil,
        "```",
        "",
        *lines,
    ])
    print(text)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent / "README.md", "bench_matmul", text)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(10, 5))
            for (threads, vlabel), pts in plot.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{vlabel}, {threads} thr")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylabel("speed-up vs torch fp32")
            ax.set_title("lowbit matmul vs torch fp32 (weights from DRAM)")
            ax.tick_params(axis="x", rotation=20)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(Path(__file__).resolve().parent / "matmul_speedup.png", dpi=100)
        except ImportError:
            print("matplotlib not installed: no plot")
        print("wrote benchmarks/README.md")


if __name__ == "__main__":
    main()
