"""Quantization settings as one frozen value (passed around instead of long
argument lists)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .arrays import SCALE_DTYPES
from .matmul import KSTEP

# int8 / int4 / int3 layers live in the matmul kernels' tiles (int3: 3 bits per
# weight, formats.h "int3 tiles"); int2 layers in the packed row layout (no int2
# matmul kernel yet: dequantize + float matmul, warned once).
LAYER_BITS = (8, 4, 3, 2)
GROUP_MULTIPLE = {**KSTEP, 2: 4}
SCALE_LABEL = {"float32": "", "float16": " f16-scales", "int8": " int8-scales"}

# The default weight format of lowbit.quantize, LowbitConfig and `lowbit quantize`
# (issue 9/11): int4 groups of 16 whose scales are
# int8 codes under one float32 scale per row (4.5 + 32 / K bits/weight: 4.55 on
# SmolLM2's 576-wide layers), with the data-free error-minimising scale search.
# SmolLM2-135M on Emma (32 x 512, float32 27.612), same session: 1.145x float32,
# against llama.cpp Q4_0's 1.215x at 4.5 b/w; int4 g32 with float16 scales (4.5
# b/w, Q4_0's layout) 1.207x; the earlier default (g128 float32 scales, round to
# nearest: groups of 96 there, 4.31 b/w) 1.284x. The int4 weight-only GEMV runs at
# ~0.9x of g128's speed (AVX2, 8192 x 2048; more scale work per weight).
DEFAULT_GROUP = 16
DEFAULT_METHOD = "auto"  # mse for int4 layers, rtn for int8 (config.resolve_method)
DEFAULT_SCALE_DTYPE = "int8"
# int4 codes of a bits=4 call on the level table "t5" (api._resolve_levels;
# lowbit.levels) when its method is one of LEVEL_METHODS: same size and kernels as
# evenly spaced int4. SmolLM2-135M on Emma (32 x 512): data-free 1.091x float32
# perplexity against 1.133x evenly spaced (llama.cpp Q4_0 1.215x), GPTQ 1.029x
# against 1.059x; all-MiniLM-L6-v2 cosine 0.9863 against 0.9799.
DEFAULT_LEVELS = "auto"
# A budget (bits=4.6) keeps even codes under "auto": with t5 candidates its
# weight-space planner and priors chose worse plans at 4.6 b/w (SmolLM2 6 windows:
# priors 1.111x against 1.097x without them; 32 windows 1.100x, above the uniform
# default's 1.091x), though better ones at 5.6 (1.029x against 1.044x): opt in
# with levels="t5".
DEFAULT_TABLE = "t5"
LEVEL_METHODS = ("auto", "mse", "gptq")


def fit_group(group_size: Optional[int], in_features: int, multiple: int) -> Optional[int]:
    """The group size a layer with ``in_features`` inputs uses when asked for ``group_size``.

    A group that divides in_features (and is a multiple of the kernels' k-step)
    is kept. Otherwise the largest such divisor not above group_size is used (never
    coarser than asked: SmolLM2's 576 inputs at 128 get groups of 96), or, when that
    is below half of group_size, the smallest one up to twice group_size. Only when
    no divisor lies in [group_size / 2, 2 * group_size], or group_size >= in_features,
    is there one scale per row (None); api.quantize reports every change.
    """
    if group_size is None or group_size >= in_features:
        return None
    if in_features % group_size == 0 and group_size % multiple == 0:
        return group_size
    divisors = [d for d in range(multiple, in_features, multiple) if in_features % d == 0]
    below = [d for d in divisors if group_size / 2 <= d <= group_size]
    if below:
        return max(below)
    above = [d for d in divisors if group_size < d <= 2 * group_size]
    return min(above) if above else None


def resolve_method(method: str, bits: int) -> str:
    """The data-free method a layer of ``bits`` gets: "auto" is "mse" (the
    error-minimising scale search) up to 4 bits and "rtn" for 8 bits, where
    clipping the largest weights costs more than the finer grid gains (SmolLM2 int8
    per row, int8 scale codes, Emma, 8 windows: rtn 1.005x float32, mse 1.008x)."""
    if method != "auto":
        return method
    return "rtn" if bits == 8 else "mse"


def storage_bits(code_bits: int) -> int:
    """The layer format holding codes of this width: int3 tiles for 3-bit codes
    (before 2026-12-05 they sat in int4 tiles, which files of then still hold)."""
    return code_bits if code_bits in (2, 3) else 4 if code_bits <= 4 else 8


@dataclass(frozen=True)
class QuantConfig:
    """How one Linear layer is quantized.

    bits: weight bits of the tiles (8, 4 or 3; 2: packed rows). group_size: elements per scale along the input
    dimension (None: one scale per output row). symmetric: signed codes without a
    zero point. act_bits: None (float activations, weight-only) or 8 (per-token
    int8 activations and integer kernels). scale_dtype: "float32", "float16" or
    "int8" (int8/int4 tiles only; float16: half the scale bytes, int4 g32 at 4.5
    bits/weight; int8: codes times one float32 scale per row, int4 g16 at
    4.5 + 32 / K; the codes are chosen under the rounded scales). levels: None
    (evenly spaced codes) or the name of a level table (lowbit.levels, e.g.
    "t5"): symmetric int4 codes mean the table's 16 uneven levels.
    """

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    act_bits: Optional[int] = None
    code_bits: Optional[int] = None  # codes narrower than the tiles (3 or 2 bits in int4 tiles: older files)
    scale_dtype: str = "float32"
    levels: Optional[str] = None

    def __post_init__(self):
        if self.bits not in LAYER_BITS:
            raise ValueError(f"bits must be 8, 4, 3 or 2 for layers, got {self.bits}")
        if self.bits == 2 and not self.symmetric:
            raise ValueError("2-bit layers are symmetric")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"activations must be None or 8, got {self.act_bits!r}")
        if self.code_bits is not None and (self.code_bits not in (2, 3, 4, 8) or self.code_bits > self.bits):
            raise ValueError(f"code_bits must be 2, 3, 4 or 8 and at most bits={self.bits}, got {self.code_bits!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.bits == 2 and self.scale_dtype != "float32":
            raise ValueError("2-bit layers (packed rows) keep float32 scales")
        if self.levels is not None:
            from .levels import level_table
            level_table(self.levels)  # a known name
            if self.bits != 4 or not self.symmetric or self.code_bits not in (None, 4):
                raise ValueError("levels need symmetric int4 layers")

    def for_features(self, in_features: int) -> "QuantConfig":
        """This config with the group size fitted to in_features (see fit_group)."""
        g = fit_group(self.group_size, in_features, GROUP_MULTIPLE[self.bits])
        return QuantConfig(self.bits, g, self.symmetric, self.act_bits, self.code_bits, self.scale_dtype,
                           self.levels)

    @property
    def label(self) -> str:
        cb = self.code_bits or self.bits
        w = f"W{cb}" + ("A8" if self.act_bits == 8 else "") + (f"(int{self.bits})" if cb != self.bits else "")
        g = "per-row" if self.group_size is None else f"g{self.group_size}"
        lv = "" if self.levels is None else f" {self.levels}-levels"
        return f"{w} {g}{'' if self.symmetric else ' asym'}{SCALE_LABEL[self.scale_dtype]}{lv}"
