"""Shared benchmark method (DESIGN.md section 5): same run, same thread count,
ABAB alternation, median of per-pair time ratios."""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def abab(fa, fb, pairs: int = 20) -> tuple[float, float, float]:
    """(median time of a, median time of b, median of per-pair ratios a/b)."""
    fa(), fb()  # warm up: page in outputs, wake pools
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        a = timed(fa)
        b = timed(fb)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def ceilings_line() -> str:
    """Runs ../shared/tools/ceilings.cc when it is there (memory bandwidth and peaks)."""
    src = Path(__file__).resolve().parents[2] / "shared" / "tools" / "ceilings.cc"
    if not src.exists():
        return "ceilings: ../shared/tools/ceilings.cc not found"
    exe = Path(__file__).resolve().parent.parent / "build" / "ceilings"
    exe.parent.mkdir(exist_ok=True)
    try:
        if not exe.exists():
            subprocess.run(["g++", "-O2", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        return f"ceilings: could not run ({e})"


def write_section(readme: Path, marker: str, text: str) -> None:
    """Replace the block between <!-- marker --> and <!-- /marker --> in readme."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    old = readme.read_text() if readme.exists() else "# lowbit benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    readme.write_text(new)
