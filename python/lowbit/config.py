"""Quantization settings as one frozen value (passed around instead of long
argument lists)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .matmul import KSTEP

# int8 / int4 layers live in the matmul kernels' tiles; int2 layers in the packed
# row layout (no int2 matmul kernel yet: dequantize + float matmul, warned once).
LAYER_BITS = (8, 4, 2)
GROUP_MULTIPLE = {**KSTEP, 2: 4}


def storage_bits(code_bits: int) -> int:
    """The layer format holding codes of this width: 3-bit codes go in int4 tiles."""
    return 2 if code_bits == 2 else 4 if code_bits <= 4 else 8


@dataclass(frozen=True)
class QuantConfig:
    """How one Linear layer is quantized.

    bits: weight bits (8 or 4). group_size: elements per scale along the input
    dimension (None: one scale per output row). symmetric: signed codes without a
    zero point. act_bits: None (float activations, weight-only) or 8 (per-token
    int8 activations and integer kernels).
    """

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    act_bits: Optional[int] = None
    code_bits: Optional[int] = None  # codes narrower than the tiles (3 or 2 bits in int4 tiles)

    def __post_init__(self):
        if self.bits not in LAYER_BITS:
            raise ValueError(f"bits must be 8, 4 or 2 for layers, got {self.bits}")
        if self.bits == 2 and not self.symmetric:
            raise ValueError("2-bit layers are symmetric")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"activations must be None or 8, got {self.act_bits!r}")
        if self.code_bits is not None and (self.code_bits not in (2, 3, 4, 8) or self.code_bits > self.bits):
            raise ValueError(f"code_bits must be 2, 3, 4 or 8 and at most bits={self.bits}, got {self.code_bits!r}")

    def for_features(self, in_features: int) -> "QuantConfig":
        """This config, or per-row scales when the group size does not fit in_features."""
        g = self.group_size
        if g is not None and (g >= in_features or in_features % g or g % GROUP_MULTIPLE[self.bits]):
            g = None
        return QuantConfig(self.bits, g, self.symmetric, self.act_bits, self.code_bits)

    @property
    def label(self) -> str:
        cb = self.code_bits or self.bits
        w = f"W{cb}" + ("A8" if self.act_bits == 8 else "") + (f"(int{self.bits})" if cb != self.bits else "")
        g = "per-row" if self.group_size is None else f"g{self.group_size}"
        return f"{w} {g}{'' if self.symmetric else ' asym'}"
