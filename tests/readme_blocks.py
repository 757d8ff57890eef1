"""Runs every ```python block of README.md in order in this interpreter, in one
namespace, as a reader pasting them into a notebook would (tests/test_readme.py).

    python tests/readme_blocks.py README.md

Prints "block N (line L): ok in S s" per block; on an error, the block's number,
its README line and the traceback, exit status 1.
"""
from __future__ import annotations

import re
import sys
import time
import traceback


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python fence."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def main(path: str) -> int:
    text = open(path, encoding="utf-8").read()
    namespace: dict = {"__name__": "__main__"}
    for i, (line, code) in enumerate(python_blocks(text), 1):
        t0 = time.perf_counter()
        try:
            exec(compile(code, f"{path}:block{i}(line {line})", "exec"), namespace)
        except BaseException:  # noqa: BLE001 - report any failure with its place
            print(f"block {i} (line {line}) FAILED:\n{code}", flush=True)
            traceback.print_exc()
            return 1
        print(f"block {i} (line {line}): ok in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
