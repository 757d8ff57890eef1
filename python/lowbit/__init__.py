"""lowbit: small and fast low-bit neural networks on the CPU.

NumPy layer (needs only NumPy): :func:`quantize_array`, :func:`dequantize_array`,
:class:`QArray`, float-format conversions, fake quantization, threads and the
dispatched SIMD target. The kernels are Google Highway SIMD code chosen at run
time for the CPU.
"""
from .arrays import QArray, dequantize_array, quantize_array, sqnr_db
from .fake_quant import fake_quantize_array, fake_quantize_backward_array
from .floats import decode_float, encode_float
from .matmul import PackedWeights, matmul, pack_weights
from .runtime import cpu_target, get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "QArray", "quantize_array", "dequantize_array", "sqnr_db",
    "encode_float", "decode_float",
    "PackedWeights", "pack_weights", "matmul",
    "fake_quantize_array", "fake_quantize_backward_array",
    "cpu_target", "get_num_threads", "set_num_threads",
]
