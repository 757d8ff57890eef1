"""How float inputs cross into the kernels: dtype flags and bfloat16 views."""
from __future__ import annotations

import numpy as np

F32, F16, BF16 = 0, 1, 2
FLAG_OF = {"float32": F32, "float16": F16, "bfloat16": BF16}
_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
            "half": "float16", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
    """Canonical name ("float32", "float16", "bfloat16") of a dtype-like value."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in FLAG_OF:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name


def float_input(x, name: str = "x", input_dtype=None) -> tuple[np.ndarray, str]:
    """Validate a float array argument; returns (array for the kernel, dtype name).

    bfloat16 arrives either as an ml_dtypes/torch-style ``bfloat16`` NumPy dtype
    or as a uint16 array with ``input_dtype="bfloat16"``; both become uint16 views.
    """
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
            x = np.asarray(x)
            if x.dtype.kind in "iub" and input_dtype is None:
                x = x.astype(np.float32)
        else:
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if input_dtype is not None and dtype_name(input_dtype) == "bfloat16":
        if x.dtype != np.uint16:
            raise TypeError(f"{name}: input_dtype='bfloat16' needs a uint16 view, got {x.dtype}")
        return x, "bfloat16"
    if x.dtype.name == "bfloat16":
        return x.view(np.uint16), "bfloat16"
    if x.dtype == np.float32:
        return x, "float32"
    if x.dtype == np.float16:
        return x, "float16"
    raise TypeError(f"{name} must have dtype float32, float16 or bfloat16 "
                    f"(bfloat16 as a uint16 view with input_dtype='bfloat16'), got {x.dtype}")


def contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, same shape: np.ascontiguousarray turns 0-d arrays into 1-d."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(a.shape)


def rows_view(x: np.ndarray) -> np.ndarray:
    """[..., K] -> [R, K] without copying when the last axis is contiguous."""
    if x.ndim == 1:
        x = x.reshape(1, -1)
    elif x.ndim > 2:
        x = x.reshape(-1, x.shape[-1])  # copies only when it must
    if x.shape[1] > 1 and x.strides[1] != x.itemsize:
        x = np.ascontiguousarray(x)
    if x.shape[0] > 1 and (x.strides[0] < 0 or x.strides[0] % x.itemsize):
        x = np.ascontiguousarray(x)
    return x
