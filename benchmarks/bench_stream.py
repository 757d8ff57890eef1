"""Weight streaming benchmark: a decoder-like stack whose int4 weights are >= 4x
the resident budget, run at batch 1 (one token per forward).

Each variant runs in its own subprocess so its peak RSS (VmHWM from
/proc/self/status) is its own:
  loaded        lowbit.load(path, skeleton): every tile copied into memory
  stream warm   stream=True, max_resident_bytes=BUDGET, file in the page cache
  cold +pf      before each token the file's pages are dropped
                (posix_fadvise DONTNEED); prefetch on (as many layers as fit)
  cold no-pf    the same with prefetch=0 (each layer faults its pages in itself)

    python benchmarks/bench_stream.py [--blocks 44] [--budget-mib 512] [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IN, HID = 4096, 11008


def skeleton(blocks: int):
    import torch
    with torch.device("meta"):
        layers = []
        for _ in range(blocks):
            layers += [torch.nn.Linear(IN, HID, bias=False), torch.nn.SiLU(),
                       torch.nn.Linear(HID, IN, bias=False)]
        return torch.nn.Sequential(*layers)


def build(path: str, blocks: int) -> None:
    """Quantize one up and one down projection and store copies of them per block
    (distinct bytes on disk; quantizing 88 random 45M-weight matrices adds minutes, not information)."""
    import torch

    import lowbit
    from lowbit.config import QuantConfig
    from lowbit.nn import QuantLinear
    torch.manual_seed(0)
    cfg = QuantConfig(4, 128, act_bits=8)
    up = QuantLinear.from_linear(torch.nn.Linear(IN, HID, bias=False), cfg)
    down = QuantLinear.from_linear(torch.nn.Linear(HID, IN, bias=False), cfg)
    layers = []
    for _ in range(blocks):
        for proto in (up, down):
            q = QuantLinear(proto.in_features, proto.out_features, False, cfg)
            q.data, q.scales = proto.data.clone(), proto.scales.clone()
            layers.append(q)
    model = torch.nn.Sequential(*[m for i in range(blocks) for m in (layers[2 * i], torch.nn.SiLU(),
                                                                      layers[2 * i + 1])])
    lowbit.save(model, path)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_variant(path: str, blocks: int, variant: str, budget: int, tokens: int) -> dict:
    import torch

    import lowbit
    torch.set_num_threads(lowbit.get_num_threads())
    base = rss_kib("VmRSS")
    model = skeleton(blocks)
    if variant == "loaded":
        model = lowbit.load(path, model, verify=False)
    else:
        prefetch = 0 if variant == "cold no-pf" else 64
        model = lowbit.load(path, model, stream=True, max_resident_bytes=budget, prefetch=prefetch)
    streamer = getattr(model, "_lowbit_streamer", None)
    x = torch.randn(1, IN)
    times = []
    with torch.no_grad():
        model(x)  # warm-up token (maps/pages everything once)
        for _ in range(tokens):
            if variant.startswith("cold"):
                streamer.release_all()
                drop_cache(path)
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return dict(variant=variant, tokens_per_s=1.0 / times[len(times) // 2], base_rss_mib=base / 1024,
                peak_rss_mib=rss_kib("VmHWM") / 1024, window=len(streamer.window(0)) if streamer else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=46)
    p.add_argument("--budget-mib", type=int, default=512)
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/README.md")
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_path", help=argparse.SUPPRESS)
    args = p.parse_args()
    budget = args.budget_mib << 20
    if args._variant:
        print(json.dumps(run_variant(args._path, args.blocks, args._variant, budget, args.tokens)))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    folder = tempfile.mkdtemp(prefix="lowbit-stream-", dir=os.environ.get("LOWBIT_BENCH_DIR"))
    path = os.path.join(folder, "decoder.safetensors")
    try:
        t0 = time.perf_counter()
        build(path, args.blocks)
        size = os.path.getsize(path)
        print(f"built {path}: {size / 2**30:.2f} GiB ({2 * args.blocks} int4 g128 layers) in "
              f"{time.perf_counter() - t0:.0f} s; budget {args.budget_mib} MiB ({size / budget:.1f}x smaller)")
        rows = []
        for variant in ("loaded", "stream warm", "cold +pf", "cold no-pf"):
            tokens = args.tokens if not variant.startswith("cold") else max(2, args.tokens // 2)
            out = subprocess.run([sys.executable, __file__, "--_variant", variant, "--_path", path,
                                  "--blocks", str(args.blocks), "--budget-mib", str(args.budget_mib),
                                  "--tokens", str(tokens)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"variant {variant!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    finally:
        for f in os.listdir(folder):
            os.unlink(os.path.join(folder, f))
        os.rmdir(folder)
    loaded = rows[0]["tokens_per_s"]
    import lowbit
    lines = [f"Decoder-like stack: {args.blocks} x [4096->11008->4096] int4 g128 W4A8, batch 1, "
             f"{size / 2**30:.2f} GiB of weights, budget {args.budget_mib} MiB ({size / budget:.1f}x smaller); "
             f"`{lowbit.cpu_target()}`, {lowbit.get_num_threads()} threads. RSS from /proc/self/status in a "
             "subprocess per variant; 'base' is the process before loading (torch + lowbit).", "",
             "| variant | tokens/s | vs loaded | peak RSS MiB | base RSS MiB | peak - base MiB | window (layers) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / loaded:.2f}x | "
                     f"{r['peak_rss_mib']:.0f} | {r['base_rss_mib']:.0f} | {r['peak_rss_mib'] - r['base_rss_mib']:.0f} | "
                     f"{r['window'] if r['window'] else '-'} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        from common import write_section
        write_section(Path(__file__).with_name("README.md"), "bench_stream", "## Weight streaming\n\n" + text)


if __name__ == "__main__":
    main()
