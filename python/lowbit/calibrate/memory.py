"""Giving freed memory back to the operating system between calibrated layers.

Why: a calibration pass allocates and frees tens of MB per layer (a float64
copy of W, the Hessian and its factor, dequantized weights) while the small
QuantLinear buffers it keeps land between them on glibc's heap. glibc raises its
mmap threshold after the first large free (up to 32 MB), so later blocks of
that size come from the heap, and freed heap memory is only returned from the
top: quantizing the 411 MB float32 Llama of tests/integrations with GPTQ left
783 MB of freed-but-held anonymous memory (66 MB below the start after
malloc_trim). Under a memory cap that is an OOM kill; with a checkpoint larger
than RAM, swapping. ``malloc_trim(0)`` returns every free page of every arena
(madvise), about a millisecond a call here, once per layer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

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


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim:
        trim(0)
