"""Float format conversions: float32 <-> float16, bfloat16, fp8 (e4m3, e5m2).

All round to nearest even (Highway 1.0.3's own bf16 demotion truncates; these
do not). Special values follow ``csrc/lowbit/formats.h``.
"""
from __future__ import annotations

import numpy as np

from . import _C
from ._dtypes import contiguous, float_input

FORMATS = ("float16", "bfloat16", "e4m3", "e5m2")
_FP8_KIND = {"e4m3": 0, "e5m2": 1}


def _check_format(fmt) -> str:
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    f = fmt.lower().replace("float8_", "").replace("fn", "")
    if f in ("fp16", "half"):
        f = "float16"
    if f in ("bf16",):
        f = "bfloat16"
    if f not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return f


def encode_float(x, fmt: str, saturate: bool = True) -> np.ndarray:
    """Convert a float32 array to ``fmt``, rounding to nearest even.

    Returns float16 for "float16", uint16 bfloat16 bits for "bfloat16", uint8 codes
    for "e4m3" / "e5m2". ``saturate`` (fp8 only) maps finite overflow and +-inf to
    the largest finite value; otherwise e4m3 overflow is NaN and e5m2 overflow inf.

    >>> import numpy as np, lowbit
    >>> lowbit.encode_float(np.array([1.0, 448.0, 1e6], np.float32), "e4m3").tolist()
    [56, 126, 126]
    """
    fmt = _check_format(fmt)
    arr, dname = float_input(x, "x")
    if dname != "float32":
        raise TypeError(f"x must be float32, got {dname}")
    src = contiguous(arr)
    if fmt == "float16":
        out = np.empty(src.shape, np.float16)
        _C.f32_to_f16(src, out)
    elif fmt == "bfloat16":
        out = np.empty(src.shape, np.uint16)
        _C.f32_to_bf16(src, out)
    else:
        out = np.empty(src.shape, np.uint8)
        _C.f32_to_fp8(src, out, _FP8_KIND[fmt], bool(saturate))
    return out


def decode_float(codes, fmt: str) -> np.ndarray:
    """Convert ``fmt`` values (as returned by :func:`encode_float`) to float32, exactly.

    >>> import numpy as np, lowbit
    >>> lowbit.decode_float(np.array([56, 126], np.uint8), "e4m3").tolist()
    [1.0, 448.0]
    """
    fmt = _check_format(fmt)
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"codes must be a NumPy array, got {type(codes).__name__}")
    want = {"float16": np.float16, "bfloat16": np.uint16, "e4m3": np.uint8, "e5m2": np.uint8}[fmt]
    c = codes
    if fmt == "bfloat16" and c.dtype.name == "bfloat16":
        c = c.view(np.uint16)
    if c.dtype != want:
        raise TypeError(f"codes for {fmt} must have dtype {np.dtype(want).name}, got {codes.dtype}")
    c = contiguous(c)
    out = np.empty(c.shape, np.float32)
    if fmt == "float16":
        _C.f16_to_f32(c, out)
    elif fmt == "bfloat16":
        _C.bf16_to_f32(c, out)
    else:
        _C.fp8_to_f32(c, out, _FP8_KIND[fmt])
    return out
