"""Giving freed memory back to the operating system between calibrated layers,
when memory is short.

Why: a calibration pass allocates and frees tens of MB per layer (a float64
copy of W, the Hessian and its factor, dequantized weights, activations) while
the small QuantLinear buffers it keeps land between them on glibc's heap. glibc
raises its mmap threshold after the first large free (up to 32 MB), so later
blocks of that size come from the heap, and freed heap memory is only returned
from the top: GPTQ of the 411 MB float32 Llama of tests/integrations left 783 MB
of freed-but-held anonymous memory (66 MB below the start after malloc_trim).
Under a memory cap that is an OOM kill; with a checkpoint larger than RAM,
swapping. ``malloc_trim(0)`` returns every free page of every arena.

It is not free: the pages come back zero-filled on the next allocation, ~10 s
of SmolLM2's 110 s GPTQ (32 x 512 tokens). So the trim runs only once the
process's anonymous memory passes half of what it may use (physical memory or
its cgroup's limit, whichever is lower): never on a roomy machine, after every
layer when memory is tight.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

_trim = None


def _malloc_trim():
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = libc.malloc_trim  # glibc only; musl has no malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                _trim = False
    return _trim


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def memory_limit_bytes() -> Optional[int]:
    """Physical memory or the process's memory cgroup limit (v1 or v2), the lower;
    None where /proc is not there."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":  # v2: one unified hierarchy
                    limits.append(_read_int(f"/sys/fs/cgroup{path}/memory.max"))
                elif "memory" in controllers.split(","):
                    limits.append(_read_int(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
    except (OSError, ValueError):
        pass
    limits = [v for v in limits if v]
    return min(limits) if limits else None


def anonymous_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class FreedMemoryReleaser:
    """Called after each layer: trims the C heap when anonymous memory is above
    ``fraction`` of the limit (read once, when the pass starts)."""

    def __init__(self, fraction: float = 0.5):
        limit = memory_limit_bytes() if _malloc_trim() else None
        forced = os.environ.get("LOWBIT_TRIM_MEMORY")  # "1": always, "0": never (tests, diagnosis)
        self.threshold = 0 if forced == "1" else None if forced == "0" or limit is None else fraction * limit

    def __call__(self) -> None:
        if self.threshold is None:
            return
        if self.threshold > 0:
            anon = anonymous_bytes()
            if anon is None or anon < self.threshold:
                return
        _malloc_trim()(0)
