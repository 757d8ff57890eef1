"""QuantLinear: an nn.Linear whose weight is stored packed for lowbit's kernels."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import _C, ops  # noqa: F401  (ops registers torch.ops.lowbit)

from ..arrays import QArray, quantize_array
from ..config import QuantConfig, resolve_method, storage_bits
from ..matmul import KSTEP, PackedWeights, dequantize_packed, pack_weights
from .fake_quantize import fake_quantize_per_token


def _eager_inference(x: torch.Tensor, bias) -> bool:
    """True outside tracing/compilation when no gradient is needed and x is a plain CPU tensor."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not torch._C._is_torch_function_mode_enabled() and not torch.jit.is_tracing()


# safetensors dtype names of the stored layout (io.expected_packed_shapes) -> torch.
_TORCH_DTYPES = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "I8": torch.int8,
                 "I32": torch.int32}

_warned_int2 = False
_checked_threads = False


def _check_thread_policy() -> None:
    """Warn once when torch's OpenMP workers will fight lowbit's pool for the cores.

    After each parallel op, libgomp's workers spin-wait (OMP_WAIT_POLICY unset =
    active for a while); lowbit's own workers then wait for a core. Measured on
    SmolLM2 int4 with 2 threads: decoding 19 -> 34 tokens/s and prompt processing
    202 -> 388 tokens/s with OMP_WAIT_POLICY=PASSIVE (set before torch is imported)."""
    global _checked_threads
    _checked_threads = True
    import os
    if torch.get_num_threads() > 1 and _C.get_num_threads() > 1 and \
            os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        warnings.warn("lowbit: torch's OpenMP threads spin between ops and take the cores lowbit's kernels run on "
                      "(about 2x slower decoding). Set OMP_WAIT_POLICY=PASSIVE in the environment before torch "
                      "is imported, or call torch.set_num_threads(1) when lowbit layers do most of the work.",
                      stacklevel=4)


def _warn_int2_once() -> None:
    global _warned_int2
    if not _warned_int2:
        warnings.warn("lowbit: int2 layers run as dequantize (Highway kernel) + float matmul; there is no "
                      "int2 matmul kernel yet, so they save memory, not time", stacklevel=3)
        _warned_int2 = True


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W held as int8/int4 tiles (formats.h), or
    as packed int2 rows (dequantized per call: smaller, not faster).

    The weight is frozen; the input gradient flows (so adapters can train on a
    quantized base), and the bias stays a trainable float parameter.
    Build one with :meth:`from_linear` or ``lowbit.quantize(model)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig = QuantConfig(), dtype: torch.dtype = torch.float32,
                 has_input_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config.for_features(in_features)
        self.register_buffer("data", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(0, dtype=getattr(torch, self.config.scale_dtype)))
        # Zero points exist only for asymmetric codes; an empty placeholder keeps the
        # state-dict keys fixed by the config (lowbit.load fills it).
        self.register_buffer("offsets", None if self.config.symmetric else torch.empty(0, dtype=torch.int32))
        # int8 scale codes come with one float32 scale per row (formats.h "scale dtype").
        self.register_buffer("row_scales", torch.empty(0) if self.config.scale_dtype == "int8" else None)
        # A level table's 16 int8 levels (formats.h "level tables"; lowbit.load fills them).
        self.register_buffer("levels", None if self.config.levels is None else torch.zeros(16, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.orig_dtype = dtype
        # Static int8 activation scale from calibration (W8A8/W4A8 static); 0: dynamic.
        self.act_scale = 0.0
        # AWQ-style per-input-channel multiplier (x * input_scale feeds the kernels).
        self.register_buffer("input_scale", torch.ones(in_features) if has_input_scale else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig = QuantConfig(), method: str = "rtn",
                    importance=None) -> "QuantLinear":
        """The layer quantized data-free: method "rtn" (range rule), "mse"
        (error-minimising scale search; see lowbit.quantize_array) or "auto"
        (config.resolve_method: mse up to 4 bits, rtn for 8). importance: per-input
        weights of the search's squared error (used where the method is "mse")."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, config, dtype=w.dtype)
        c = mod.config
        resolved = resolve_method(method, c.bits)
        if c.levels is not None:  # the level search gives packed codes, packed with the table
            from ..levels import level_table
            from ..calibrate.weights import mse_levels
            if resolved != "mse":
                raise ValueError(f"levels={c.levels!r} layers are quantized with method 'mse' or 'auto', "
                                 f"not {method!r}")
            table = level_table(c.levels)
            packed, scales = mse_levels(w, c.group_size, table, scale_dtype=c.scale_dtype, importance=importance)
            mod._store(QArray(packed, scales, None, (linear.out_features, linear.in_features), 4, c.group_size,
                              True), table)
            mod._copy_bias(linear.bias)
            return mod
        if c.bits == 3:  # no 3-bit QArray: the layer algorithms give the codes
            from ..calibrate.weights import mse, rtn
            q = mse(w, 3, c.group_size, c.symmetric, scale_dtype=c.scale_dtype, importance=importance) \
                if resolved == "mse" else rtn(w, 3, c.group_size, c.symmetric, scale_dtype=c.scale_dtype)
            return cls.from_quantized(q, linear.bias, c, dtype=w.dtype)
        mod._store(quantize_array(w.float().cpu().numpy(), bits=c.bits, group_size=c.group_size,
                                  symmetric=c.symmetric, method=resolved, scale_dtype=c.scale_dtype,
                                  importance=importance if resolved == "mse" else None))
        mod._copy_bias(linear.bias)
        return mod

    def _store(self, q: QArray, levels: Optional[np.ndarray] = None) -> None:
        """Hold q's codes in this layer's format: packed rows for int2, tiles otherwise
        (int3 tiles from an int4 QArray whose codes fit 3 bits; levels: the level
        table of a levels layer)."""
        if self.config.bits == 2:
            self.data, self.scales = torch.from_numpy(q.packed), torch.from_numpy(q.scales)
            return
        if (levels is None) != (self.config.levels is None):
            raise ValueError(f"a {self.config.label} layer needs " +
                             ("its level table" if levels is None else "no level table"))
        pw = pack_weights(q, self.config.scale_dtype, bits=self.config.bits, levels=levels)
        self.levels = None if pw.levels is None else torch.from_numpy(pw.levels.copy())
        self.data = torch.from_numpy(pw.data)
        self.scales = torch.from_numpy(pw.scales)
        self.offsets = None if pw.offsets is None else torch.from_numpy(pw.offsets)
        self.row_scales = None if pw.row_scales is None else torch.from_numpy(pw.row_scales)

    def _copy_bias(self, bias: Optional[torch.Tensor]) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().to(self.orig_dtype), requires_grad=bias.requires_grad)

    @classmethod
    def from_quantized(cls, q, bias: Optional[torch.Tensor] = None, config: Optional[QuantConfig] = None,
                       dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """A layer from the output of a weight algorithm (lowbit.calibrate.weights:
        codes, scales, zero points, optional input scale). 3-bit codes go into
        int3 tiles, 4-bit codes into int4 tiles, 8-bit codes into int8 tiles (and
        narrower codes into a given config's wider tiles)."""
        n, k = q.codes.shape
        storage = storage_bits(q.bits)
        cfg = config or QuantConfig(storage, q.group_size, q.zero_points is None)
        # Or wider tiles that say the codes' width (int4 tiles with code_bits=3: files before int3 tiles).
        wider = cfg.bits in (4, 8) and cfg.code_bits == q.bits < cfg.bits
        if (cfg.bits != storage and not wider) or cfg.group_size != q.group_size or \
                cfg.symmetric != (q.zero_points is None):
            raise ValueError(f"config {cfg.label} does not match the quantized weight "
                             f"(int{q.bits} codes, group {q.group_size})")
        mod = cls(k, n, bias is not None, cfg, dtype=dtype, has_input_scale=q.input_scale is not None)
        # Narrower signed codes (3 bits in int4) are valid codes of their storage as they are.
        if q.zero_points is not None and q.bits < cfg.bits:
            raise ValueError("asymmetric codes narrower than their storage are not supported")
        from ..reference import pack
        held = 4 if cfg.bits == 3 else cfg.bits  # int3 tiles are packed from an int4 QArray
        mod._store(QArray(pack(q.codes.numpy().astype(np.int32), held), q.scales.numpy().astype(np.float32),
                          None if q.zero_points is None else q.zero_points.numpy().astype(np.uint8), (n, k),
                          held, q.group_size, q.zero_points is None), levels=getattr(q, "levels", None))
        mod._copy_bias(bias)
        if q.input_scale is not None:
            mod.input_scale = q.input_scale.float().clone()
        return mod

    def _tile_shapes(self) -> dict:
        """part -> (torch dtype, shape) of this layer's tensors in the stored layout
        (tiled-v1, or packed rows for int2; io.expected_packed_shapes)."""
        from ..io import expected_packed_shapes
        c = self.config
        want = expected_packed_shapes(dict(out_features=self.out_features, in_features=self.in_features,
                                           bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                                           scale_dtype=c.scale_dtype))
        return {part: (_TORCH_DTYPES[dt], shape) for part, (dt, shape) in want.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh layer holds empty placeholders: take the tiles' shapes from the
        # state dict (their sizes are checked against the tiled layout first).
        for part, (dtype, shape) in self._tile_shapes().items():
            t = state_dict.get(prefix + part)
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{prefix + part}: expected {dtype} {list(shape)} for {self.config.label} "
                                 f"[{self.out_features}x{self.in_features}], got {t.dtype} {list(t.shape)}")
            if getattr(self, part).shape != t.shape:
                setattr(self, part, torch.empty(shape, dtype=dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        c = self.config
        if c.bits == 2:
            return self._forward_int2(x)
        if _eager_inference(x, self.bias):
            return self._forward_eager(x)
        return torch.ops.lowbit.linear(x, self.data, self.scales, self.offsets, self.bias, self.out_features,
                                       self.in_features, c.bits, c.group_size or 0, c.act_bits or 0, self.act_scale,
                                       self.row_scales, self.levels)

    def _kernel_args(self) -> tuple:
        """NumPy views of the tiles (and bias) for the kernels, rebuilt only when a
        buffer is replaced (load, .to(), _store): building them costs ~10 us a call,
        more than a 576x576 int4 GEMV."""
        key = (self.data.data_ptr(), self.scales.data_ptr(),
               None if self.offsets is None else self.offsets.data_ptr(),
               None if self.bias is None else (self.bias.data_ptr(), self.bias.dtype),
               None if self.row_scales is None else self.row_scales.data_ptr(),
               None if self.levels is None else self.levels.data_ptr())
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            c = self.config
            k = self.in_features
            group = k if c.group_size in (None, k) else c.group_size
            bias = None if self.bias is None else ops._np(self.bias.detach().float())
            if bias is not None and self.bias.dtype != torch.float32:
                key = None  # a converted copy: rebuild every call (its values may change)
            kp = (k + KSTEP[c.bits] - 1) // KSTEP[c.bits] * KSTEP[c.bits]
            cached = (key, ops._np(self.data), ops._np(self.scales).reshape(-1),
                      None if self.offsets is None else ops._np(self.offsets).reshape(-1), group, bias, kp,
                      None if self.row_scales is None else ops._np(self.row_scales),
                      None if self.levels is None else ops._np(self.levels))
            self.__dict__["_kernel_cache"] = cached
        return cached

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Inference without autograd or tracing: the kernel call with the fewest
        steps in between (decode runs ~200 of these per token on a small LM)."""
        if not _checked_threads:
            _check_thread_policy()
        _, data, scales, offsets, group, bias, kp, row_scales, levels = self._kernel_args()
        c, n, k = self.config, self.out_features, self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features, the layer expects {k}")
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        m = x2.shape[0]
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            if c.act_bits == 8:
                x2 = x2.contiguous()
                if not _C.matmul_quant_act(x2.numpy(), c.bits, n, k, group, data, scales, offsets, out.numpy(),
                                           bias, float(np.float32(self.act_scale)), row_scales, levels):
                    raise ValueError("x contains NaN")
            else:
                if kp != k:  # the kernels read whole k-steps: zero-pad the columns
                    x2 = torch.nn.functional.pad(x2, (0, kp - k))
                _C.matmul_float_act(x2.contiguous().numpy(), c.bits, n, k, group, data, scales, offsets,
                                    out.numpy(), bias, row_scales, levels)
        out = out if x.dtype == torch.float32 else out.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)

    def _int2_weight(self) -> torch.Tensor:
        return torch.ops.lowbit.dequantize(self.data, self.scales, torch.empty(0, dtype=torch.uint8),
                                           self.in_features, 2, self.config.group_size or 0, True, torch.float32)

    def _forward_int2(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            _warn_int2_once()
        if self.config.act_bits == 8:  # the int8 activation codes the kernels would use
            x = fake_quantize_per_token(x.float(), self.act_scale).to(x.dtype)
        return nn.functional.linear(x, self._int2_weight().to(x.dtype), self.bias)

    def packed(self) -> PackedWeights:
        c = self.config
        if c.bits == 2:
            raise ValueError("int2 layers are stored as packed rows, not matmul tiles")
        return PackedWeights(self.data.numpy(), self.scales.numpy(),
                             None if self.offsets is None else self.offsets.numpy(),
                             (self.out_features, self.in_features), c.bits, c.group_size, self.offsets is None,
                             None if self.row_scales is None else self.row_scales.numpy(),
                             None if self.levels is None else self.levels.numpy())

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (the name other quantized layers use: peft finds a
        wrapped layer's device through it)."""
        return self.data

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] this layer computes with (input scale folded in)."""
        w = self._int2_weight() if self.config.bits == 2 else torch.from_numpy(dequantize_packed(self.packed()))
        return w if self.input_scale is None else w * self.input_scale

    @property
    def nbytes(self) -> int:
        n = self.data.numel() + self.scales.numel() * self.scales.element_size() + \
            (0 if self.offsets is None else 4 * self.offsets.numel()) + \
            (0 if self.row_scales is None else 4 * self.row_scales.numel()) + \
            (0 if self.levels is None else self.levels.numel())
        n += 0 if self.input_scale is None else 4 * self.input_scale.numel()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @property
    def kernel(self) -> str:
        """Which kernel runs: e.g. 'W4A8 int8-dot (VNNI)' or 'W4 weight-only fp32-FMA'."""
        c = self.config
        if c.bits == 2:
            return "W2 dequantize + float matmul (no int2 kernel)"
        if c.act_bits == 8:
            return f"W{c.bits}A8{' static' if self.act_scale else ''} int8-dot ({'VNNI' if _C.vnni_active() else 'int16 madd'})"
        if c.symmetric and _C.bf16_gemv_active():  # the GEMV of 1-3 rows (csrc/lowbit/gemv_bf16-inl.h)
            return f"W{c.bits} weight-only fp32-FMA (1-3 rows: bf16x2-dot, AVX512_BF16)"
        return f"W{c.bits} weight-only fp32-FMA"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self.config.label}" + (f", act_scale={self.act_scale:.4g}" if self.act_scale else "")
