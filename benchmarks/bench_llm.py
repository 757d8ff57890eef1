"""Model-level benchmark: SmolLM2-135M and a 1B-shaped Llama through lowbit,
torch and llama.cpp, on the field's numbers (DESIGN.md section 5):

* perplexity on Jane Austen's *Emma* with llama.cpp's protocol (512-token
  windows, second half scored; ``lowbit.eval.perplexity`` and ``llama-perplexity
  -c 512`` on the same text file);
* pp512 (one forward of 512 tokens) and tg128 (greedy generation of 128 tokens
  with the KV cache), 1 and 2 threads; llama.cpp through ``llama-bench -p 512
  -n 128`` on GGUFs converted from the same HF folders.

Every (model, variant, threads) runs in its own process, so thread settings and
memory do not leak. torch variants run with torch's default OpenMP settings;
lowbit variants with OMP_WAIT_POLICY=PASSIVE (torch's spinning OpenMP workers
otherwise take the cores lowbit's pool runs on; see README). The 1B-shaped model
has random weights (speed only: its perplexity means nothing).

    python benchmarks/bench_llm.py            # everything, writes llm_results.json + README section + plot
    python benchmarks/bench_llm.py --quick    # SmolLM2 only, 2 threads
    python benchmarks/bench_llm.py --int3     # the 3.5 b/w class beside llama.cpp Q3_K_M (llm_int3_results.json)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {  # name -> (float dtype, lowbit.quantize kwargs or None)
    "torch fp32": ("float32", None),
    "torch bf16": ("bfloat16", None),
    "lowbit int4": ("float32", dict(bits=4)),
    # The data-free bits=4.6 budget (int4 g64/g16/g8 + int8 per row, sensitivity
    # priors): SmolLM2 only, its planner is about quality, not speed.
    "lowbit bits=4.6": ("float32", dict(bits=4.6)),
    "lowbit W4A8": ("float32", dict(bits=4, activations=8)),
    "lowbit W8A8": ("float32", dict(bits=8, group_size=None, activations=8)),
    "lowbit int8": ("float32", dict(bits=8, group_size=None)),
    # The same quantized models decoded by lowbit.NativeDecoder (one C++ call per token).
    "lowbit int4 native": ("float32", dict(bits=4)),
    "lowbit W4A8 native": ("float32", dict(bits=4, activations=8)),
    # The default before level tables (evenly spaced int4 codes), for the ratio.
    "lowbit int4 even native": ("float32", dict(bits=4, levels=None)),
    # The 3.5 bits/weight class (--int3): int3 tiles at the default g16 with int8
    # scale codes (3.5 + 32 / K b/w), and the data-free budget over int3 / int4 / int8.
    "lowbit int3 native": ("float32", dict(bits=3)),
    "lowbit bits=3.6 native": ("float32", dict(bits=3.6)),
}
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
PPL_WINDOWS = 32


def llama1b_dir() -> Path:
    """A Llama with 1B-class shapes and random weights (seeded), SmolLM2's tokenizer."""
    from lowbit.eval.material import cache_dir, smollm2_dir
    path = cache_dir() / "llama1b-random"
    if (path / "config.json").exists():
        return path
    import shutil
    import tempfile

    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + "."))
    model.save_pretrained(tmp)
    for f in smollm2_dir().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, path)
    return path


def model_dir(name: str) -> Path:
    from lowbit.eval.material import smollm2_dir
    return smollm2_dir() if name == "smollm2" else llama1b_dir()


# ----------------------------------------------------------------------------- worker (one process)
def worker(spec: dict) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit.eval.perplexity import perplexity, tokenize
    from lowbit.eval.speed import generation_speed, prompt_speed

    threads = spec["threads"]
    torch.set_num_threads(threads)
    lowbit.set_num_threads(threads)
    dtype, kwargs = VARIANTS[spec["variant"]]
    path = model_dir(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    out = dict(spec)
    t0 = time.perf_counter()
    if kwargs is not None:
        lowbit.quantize(model, progress=False, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            out["file_bytes"] = lowbit.save(model, os.path.join(tmp, "m.safetensors"))
    else:
        out["file_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["quantize_s"] = time.perf_counter() - t0
    reps = spec.get("reps", 2)
    runner = lowbit.NativeDecoder(model) if spec["variant"].endswith("native") else model
    out["pp"] = prompt_speed(runner, 512, repeats=reps).tokens_per_s
    out["tg"] = generation_speed(runner, tok, 128, repeats=reps).tokens_per_s
    if spec.get("ppl"):
        from lowbit.eval.material import EVALUATION_NOVEL, austen
        out["ppl"] = perplexity(model, None, tokenize(tok, austen(EVALUATION_NOVEL)), max_windows=PPL_WINDOWS,
                                progress=False).ppl
    if spec.get("profile"):
        out["profile"] = decode_profile(model, tok)
    return out


def decode_profile(model, tok, steps: int = 32) -> dict:
    """Where one decode step's time goes (ms per token), by module class, each
    counted exclusive of the modules it calls: quantized / float linears, the
    embedding, RMSNorm, attention outside its projections, the MLP's activation,
    and the rest (decoder glue, generate's loop, Python)."""
    import torch

    from lowbit.eval.speed import generate
    from lowbit.nn import QuantLinear, TiedQuantEmbedding
    from transformers.models.llama import modeling_llama as ml
    classes = {QuantLinear: "lowbit linear", torch.nn.Linear: "torch linear", TiedQuantEmbedding: "embedding",
               torch.nn.Embedding: "embedding", ml.LlamaRMSNorm: "RMSNorm",
               ml.LlamaAttention: "attention (outside projections)", ml.LlamaMLP: "MLP activation"}
    totals = {v: 0.0 for v in classes.values()}
    stack = []  # [category, start, child time]
    originals = {}

    def wrap(cls, cat):
        orig = cls.forward

        def forward(self, *a, **k):
            stack.append([cat, time.perf_counter(), 0.0])
            try:
                return orig(self, *a, **k)
            finally:
                c, t0, child = stack.pop()
                dt = time.perf_counter() - t0
                totals[c] += dt - child
                if stack:
                    stack[-1][2] += dt
        originals[cls] = orig
        cls.forward = forward
    generate(model, tok, n_gen=4)
    for cls, cat in classes.items():
        wrap(cls, cat)
    try:
        t0 = time.perf_counter()
        generate(model, tok, n_gen=steps)
        wall = time.perf_counter() - t0
    finally:
        for cls, orig in originals.items():
            cls.forward = orig
    per_token = {k: 1e3 * v / steps for k, v in totals.items()}
    per_token["rest (decoder glue, generate, Python)"] = 1e3 * wall / steps - sum(per_token.values())
    per_token["total"] = 1e3 * wall / steps
    return per_token


def run_worker(spec: dict) -> dict:
    from llamacpp import env_without_wait_policy
    env = env_without_wait_policy()
    if spec["variant"].startswith("lowbit"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 at 2 threads only")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--native", action="store_true",
                    help="only the NativeDecoder rows and llama.cpp Q4_0 / Q4_K_M speed, both models, 1 and 2 "
                         "threads; prints a markdown table (writes llm_native_results.json)")
    ap.add_argument("--int3", action="store_true",
                    help="the 3.5 bits/weight class: lowbit int3 (native decoder) beside llama.cpp Q3_K_M and Q4_0, "
                         "both models, 1 and 2 threads, SmolLM2 perplexity; writes llm_int3_results.json")
    ap.add_argument("--out", default=str(HERE / "llm_results.json"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.native:
        return native_table(args)
    if args.int3:
        return int3_table(args)
    import lowbit
    from lowbit.eval.material import EVALUATION_NOVEL, austen, cache_dir
    models = ["smollm2"] if args.quick else ["smollm2", "llama1b"]
    threads = [2] if args.quick else [1, 2]
    results = dict(machine=lowbit.cpu_target(), date=time.strftime("%Y-%m-%d"), lowbit=[], llamacpp=[])
    for m in models:
        model_dir(m)
        for th in threads:
            for v in VARIANTS:
                if m == "llama1b" and v == "torch bf16" and th == 1:
                    continue  # no bf16 units on AVX2-only CPUs: ~5 minutes for one row
                if m == "llama1b" and v == "lowbit bits=4.6":
                    continue  # random weights: a plan for quality means nothing there
                spec = dict(model=m, variant=v, threads=th, ppl=(m == "smollm2" and th == max(threads)),
                            reps=1 if (m == "llama1b" and v.startswith("torch")) else 2,
                            profile=(v in ("torch fp32", "lowbit int4", "lowbit W4A8") and th == max(threads)))
                r = run_worker(spec)
                results["lowbit"].append(r)
                print(f"{m:8s} {v:13s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}"
                      + (f"  ppl {r['ppl']:.3f}" if r.get("ppl") else ""), flush=True)
    if not args.no_llamacpp:
        import llamacpp
        text = cache_dir() / "emma.txt"
        text.write_text(austen(EVALUATION_NOVEL))
        for m in models:
            ggufs = llamacpp.convert(model_dir(m), m, LLAMA_TYPES)
            for t in (("F32",) if m == "smollm2" else ()) + LLAMA_TYPES:
                for th in threads:
                    r = dict(model=m, type=t, threads=th, file_bytes=ggufs[t].stat().st_size,
                             **llamacpp.bench(ggufs[t], th))
                    if m == "smollm2" and th == max(threads):
                        r["ppl"] = llamacpp.perplexity(ggufs[t], text, th, PPL_WINDOWS)
                    results["llamacpp"].append(r)
                    print(f"{m:8s} llama.cpp {t:7s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}"
                          + (f"  ppl {r['ppl']:.3f}" if r.get("ppl") else ""), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


def native_table(args) -> int:
    """Decode / prompt speed of lowbit.NativeDecoder beside llama.cpp, ABAB over two rounds."""
    import lowbit
    import llamacpp
    rows = []
    for m in ("smollm2", "llama1b"):
        ggufs = llamacpp.convert(model_dir(m), m, ("Q4_0", "Q4_K_M"))
        for th in (1, 2):
            for rnd in range(2 if m == "smollm2" else 1):  # the 1B model: one round (~3 minutes a row)
                for v in ("lowbit int4 native", "lowbit W4A8 native", "lowbit int4"):
                    if v == "lowbit int4" and (rnd or m == "llama1b"):
                        continue  # the transformers path once, for the ratio to it
                    r = run_worker(dict(model=m, variant=v, threads=th, reps=2 if m == "smollm2" else 1))
                    rows.append(r)
                    print(f"{m:8s} {v:19s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}", flush=True)
                for t in ("Q4_0", "Q4_K_M"):
                    r = dict(model=m, variant=f"llama.cpp {t}", threads=th, **llamacpp.bench(ggufs[t], th, reps=2))
                    rows.append(r)
                    print(f"{m:8s} {r['variant']:19s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}", flush=True)
    out = HERE / "llm_native_results.json"
    out.write_text(json.dumps(dict(machine=lowbit.cpu_target(), date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))
    import statistics
    print("\n| model | threads | variant | pp512 tok/s | tg128 tok/s | tg vs llama.cpp Q4_0 |\n|---|---|---|---|---|---|")
    for m in ("smollm2", "llama1b"):
        for th in (1, 2):
            med = {}
            for r in rows:
                if r["model"] == m and r["threads"] == th:
                    med.setdefault(r["variant"], []).append((r["pp"], r["tg"]))
            q4 = statistics.median(t for _, t in med["llama.cpp Q4_0"])
            for v, vals in med.items():
                pp, tg = statistics.median(p for p, _ in vals), statistics.median(t for _, t in vals)
                print(f"| {m} | {th} | {v} | {pp:.1f} | {tg:.1f} | {tg / q4:.2f}x |")
    return 0


def int3_table(args) -> int:
    """lowbit's int3 tiles against llama.cpp's 3-bit K-quant and Q4_0 on the same
    models: file size, SmolLM2 perplexity (32 windows of Emma), pp512 / tg128."""
    import lowbit
    import llamacpp
    from lowbit.eval.material import EVALUATION_NOVEL, austen, cache_dir
    text = cache_dir() / "emma.txt"
    text.write_text(austen(EVALUATION_NOVEL))
    rows = []
    for m in ("smollm2", "llama1b"):
        ggufs = llamacpp.convert(model_dir(m), m, ("Q4_0", "Q3_K_M"))
        variants = ["lowbit int3 native", "lowbit int4 native"] + (["lowbit bits=3.6 native"] if m == "smollm2" else [])
        for th in (1, 2):
            for v in variants:
                r = run_worker(dict(model=m, variant=v, threads=th, reps=2 if m == "smollm2" else 1,
                                    ppl=m == "smollm2" and th == 2))
                rows.append(r)
                print(f"{m:8s} {v:22s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}"
                      + (f"  ppl {r['ppl']:.3f}" if r.get("ppl") else ""), flush=True)
            for t in ("Q3_K_M", "Q4_0"):
                r = dict(model=m, variant=f"llama.cpp {t}", threads=th, file_bytes=ggufs[t].stat().st_size,
                         **llamacpp.bench(ggufs[t], th, reps=2))
                if m == "smollm2" and th == 2:
                    r["ppl"] = llamacpp.perplexity(ggufs[t], text, th, PPL_WINDOWS)
                rows.append(r)
                print(f"{m:8s} {r['variant']:22s} {th}t  pp {r['pp']:7.1f}  tg {r['tg']:6.1f}"
                      + (f"  ppl {r['ppl']:.3f}" if r.get("ppl") else ""), flush=True)
    out = HERE / "llm_int3_results.json"
    out.write_text(json.dumps(dict(machine=lowbit.cpu_target(), date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))
    print("\n| model | variant | file MiB | perplexity | pp512 1t / 2t | tg128 1t / 2t | tg vs Q3_K_M 1t / 2t |\n"
          "|---|---|---|---|---|---|---|")
    for m in ("smollm2", "llama1b"):
        by = {}
        for r in rows:
            if r["model"] == m:
                by.setdefault(r["variant"], {})[r["threads"]] = r
        k3 = by["llama.cpp Q3_K_M"]
        for v, rs in by.items():
            ppl = next((f"{r['ppl']:.3f}" for r in rs.values() if r.get("ppl")), "-")
            print(f"| {m} | {v} | {rs[2]['file_bytes'] / 2**20:.1f} | {ppl} | {rs[1]['pp']:.1f} / {rs[2]['pp']:.1f} "
                  f"| {rs[1]['tg']:.1f} / {rs[2]['tg']:.1f} | {rs[1]['tg'] / k3[1]['tg']:.2f}x / "
                  f"{rs[2]['tg'] / k3[2]['tg']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
