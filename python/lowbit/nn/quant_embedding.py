"""QuantEmbedding: an nn.Embedding whose table is stored as packed int8/int4 rows."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.lowbit)
from ..arrays import quantize_array


class QuantEmbedding(nn.Module):
    """Looks rows up in a quantized table: gathers the packed rows of the ids
    (formats.h row layout: one row = one embedding vector), then dequantizes
    only those with the Highway kernel (lowbit::dequantize).

    A vocabulary table is mostly read a few rows at a time, so it pays in size
    (MiniLM's 30522 x 384 word table: 46.9 MB float32 -> 11.8 MB int8) at
    negligible cost. The table is frozen (no gradient).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: Optional[int] = None,
                 symmetric: bool = True, padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
        if group_size is not None and (group_size <= 0 or embedding_dim % group_size):
            raise ValueError(f"group_size {group_size} does not divide embedding_dim={embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.padding_idx, self.orig_dtype = padding_idx, dtype
        groups = 1 if group_size is None else embedding_dim // group_size
        self.register_buffer("packed", torch.zeros(num_embeddings, (embedding_dim * bits + 7) // 8,
                                                   dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(num_embeddings, groups))
        self.register_buffer("zero_points", None if symmetric else torch.zeros(num_embeddings, groups,
                                                                                dtype=torch.uint8))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int = 8, group_size: Optional[int] = None,
                       symmetric: bool = True) -> "QuantEmbedding":
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"emb must be an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients are not supported")
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric, emb.padding_idx, w.dtype)
        q = quantize_array(w.float().cpu().numpy(), bits=bits, group_size=group_size, symmetric=symmetric)
        mod.packed = torch.from_numpy(q.packed)
        mod.scales = torch.from_numpy(q.scales)
        mod.zero_points = None if q.zero_points is None else torch.from_numpy(q.zero_points)
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.packed.index_select(0, flat)
        scales = self.scales.index_select(0, flat)
        zps = self.zero_points.index_select(0, flat) if self.zero_points is not None else \
            torch.empty(0, dtype=torch.uint8)
        out = torch.ops.lowbit.dequantize(rows, scales, zps, self.embedding_dim, self.bits, self.group_size or 0,
                                          self.symmetric, self.orig_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4 * self.scales.numel() + \
            (0 if self.zero_points is None else self.zero_points.numel())

    @property
    def label(self) -> str:
        g = "per-row" if self.group_size is None else f"g{self.group_size}"
        return f"E{self.bits} {g}{'' if self.symmetric else ' asym'}"

    def dequantized_weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.label}"
