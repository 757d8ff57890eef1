"""Causal language models run by lowbit itself: the native decoder (one C++ call
per generated token, on the quantized layers' tiles)."""
from .native import NativeDecoder

__all__ = ["NativeDecoder"]
