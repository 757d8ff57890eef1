"""lowbit: small and fast low-bit neural networks on the CPU.

NumPy layer (needs only NumPy): :func:`quantize_array`, :func:`dequantize_array`,
:class:`QArray`, float-format conversions, fake quantization, threads and the
dispatched SIMD target. The kernels are Google Highway SIMD code chosen at run
time for the CPU.
"""
from .arrays import QArray, dequantize_array, quantize_array, sqnr_db
from .fake_quant import fake_quantize_array, fake_quantize_backward_array
from .floats import decode_float, encode_float
from .io import FormatError, read_info
from .matmul import PackedWeights, matmul, pack_weights
from .runtime import cpu_target, get_num_threads, set_num_threads

from ._version import __version__

# The PyTorch layer loads on first use, so NumPy-only users never import torch.
_TORCH_API = {
    "quantize": ("api", "quantize"),
    "summary": ("api", "summary"),
    "QuantConfig": ("config", "QuantConfig"),
    "nn": ("nn", None),
    "ops": ("ops", None),
    "fake_quantize": ("torch_api", "fake_quantize"),
    "Calibrator": ("calibrate", "Calibrator"),
    "calibrate": ("calibrate", None),  # the package, callable as the function
    "prepare_qat": ("qat", "prepare_qat"),
    "convert": ("qat", "convert"),
    "save": ("io", "save"),
    "load": ("io", "load"),
    "eval": ("eval", None),
    "fuse_projections": ("nn", "fuse_projections"),
    "llm": ("llm", None),
    "NativeDecoder": ("llm", "NativeDecoder"),
    # transformers' quantization_config; importing it registers quant_method="lowbit".
    "LowbitConfig": ("integrations.transformers", "LowbitConfig"),
}


def __getattr__(name):
    if name in _TORCH_API:
        import importlib
        module, attr = _TORCH_API[name]
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name not in ("torch", "transformers"):
                raise
            if e.name == "torch":
                raise ImportError(f"lowbit.{name} needs PyTorch: pip install 'lowbit[torch]' "
                                  "(the NumPy API works without it)") from e
            raise ImportError(f"lowbit.{name} needs transformers: pip install transformers") from e
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def _register_with_transformers_if_loaded() -> None:
    # transformers only knows quant_method="lowbit" once it is registered; when it
    # is already imported, do it now (cheap), else LowbitConfig's import does it.
    import sys
    if "transformers" in sys.modules and "torch" in sys.modules:
        try:
            from .integrations import transformers as _hf  # noqa: F401
        except ImportError:  # an incompatible transformers: lowbit.LowbitConfig says why
            pass


_register_with_transformers_if_loaded()

__all__ = [
    "QArray", "quantize_array", "dequantize_array", "sqnr_db",
    "encode_float", "decode_float",
    "PackedWeights", "pack_weights", "matmul",
    "fake_quantize_array", "fake_quantize_backward_array",
    "cpu_target", "get_num_threads", "set_num_threads",
    "read_info", "FormatError",
]
