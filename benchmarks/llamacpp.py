"""llama.cpp as the anchor of bench_llm.py, built for benchmarks only (never a
dependency of lowbit).

PyPI's ``llama-cpp-python`` sdist vendors the whole llama.cpp tree; its tools
(llama-bench, llama-quantize, llama-perplexity) and convert_hf_to_gguf.py are
built / used in ``$LOWBIT_CACHE/llama.cpp`` (CPU, GGML_NATIVE). The AMX repack
is compiled out (-mno-amx-*): it crashed in this VM on an AMX machine.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import subprocess
import sys
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def root() -> Path:
    from lowbit.eval.material import cache_dir
    return cache_dir() / "llama.cpp"


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def source() -> Path:
    r = root()
    found = glob.glob(str(r / "llama_cpp_python-*" / "vendor" / "llama.cpp"))
    if found:
        return Path(found[0])
    r.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", r])
    tarball = sorted(r.glob("llama_cpp_python-*.tar.gz"))[-1]
    _run(["tar", "xzf", tarball, "-C", r])
    return Path(glob.glob(str(r / "llama_cpp_python-*" / "vendor" / "llama.cpp"))[0])


def build() -> Path:
    """The tools' folder (built once, ~10 minutes on 2 cores)."""
    bin_dir = root() / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    src = source()
    _run(["cmake", "-S", src, "-B", root() / "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DBUILD_SHARED_LIBS=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"],
         stdout=subprocess.DEVNULL)
    _run(["cmake", "--build", root() / "build", "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
         stdout=subprocess.DEVNULL)
    return bin_dir


def convert(hf_dir: Path, name: str, types=("Q8_0", "Q4_0", "Q4_K_M")) -> dict:
    """{type: gguf path} for an HF folder: f32 by convert_hf_to_gguf.py, the rest by llama-quantize."""
    out_dir = root() / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f"{name}-F32.gguf"
    if not f32.exists():
        import importlib.util
        if importlib.util.find_spec("sentencepiece") is None:
            # convert_hf_to_gguf.py tries a SentencePiece vocabulary first and
            # only an ImportError-free miss falls through to tokenizer.json.
            raise RuntimeError("llama.cpp's convert_hf_to_gguf.py needs the sentencepiece package: "
                               "pip install sentencepiece (make bench-llm installs it)")
        src = source()
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        tmp = f32.with_suffix(".tmp")
        _run([sys.executable, src / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", tmp],
             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(tmp, f32)
    paths = {"F32": f32}
    for t in types:
        p = out_dir / f"{name}-{t}.gguf"
        if not p.exists():
            _run([build() / "llama-quantize", f32, p.with_suffix(".tmp"), t], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
            os.replace(p.with_suffix(".tmp"), p)
        paths[t] = p
    return paths


def env_without_wait_policy() -> dict:
    """The environment without OMP_WAIT_POLICY: for llama.cpp's tools, and the base
    of bench_llm's workers (which set it per variant). llama.cpp's OpenMP threads
    meet at a barrier after every op, and PASSIVE (which lowbit's runs set for
    torch) put them to sleep there: SmolLM2 Q4_0 decoded at 57-59 tokens/s on 2 threads
    against 174-179 on 1 (Zen 4, 2026-12-05)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    return env


def bench(gguf: Path, threads: int, n_prompt: int = 512, n_gen: int = 128, reps: int = 3) -> dict:
    """{"pp": tokens/s, "tg": tokens/s} from llama-bench."""
    r = _run([build() / "llama-bench", "-m", gguf, "-p", n_prompt, "-n", n_gen, "-t", threads, "-r", reps,
              "-o", "csv"], capture_output=True, text=True, env=env_without_wait_policy())
    out = {}
    for row in csv.DictReader(io.StringIO(r.stdout)):
        key = "pp" if int(row["n_prompt"]) else "tg"
        out[key] = float(row["avg_ts"])
    return out


def perplexity(gguf: Path, text_file: Path, threads: int, chunks: int) -> float:
    r = _run([build() / "llama-perplexity", "-m", gguf, "-f", text_file, "-c", 512, "-t", threads,
              "--chunks", chunks], capture_output=True, text=True, env=env_without_wait_policy())
    for line in reversed((r.stdout + r.stderr).splitlines()):
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    raise RuntimeError(f"llama-perplexity printed no final estimate for {gguf}")
