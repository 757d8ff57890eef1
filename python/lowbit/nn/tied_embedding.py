"""TiedQuantEmbedding: an input embedding that reads its rows from the output
head's quantized tiles, so a tied vocabulary table is stored once, quantized.

Language models with tied embeddings (SmolLM2, Llama 3.2 1B, Gemma) use one
[vocab, hidden] matrix twice: as the input table and as the output head. The
head is a QuantLinear (its tiles are the matmul kernels' layout, formats.h); this
module gathers the rows of the requested ids straight out of those tiles and
dequantizes them, bit for bit what ``head.dequantized_weight()[ids]`` gives.
It holds no tensors of its own (nothing extra in the state dict).

Tile layout read here (formats.h, "tiled-v1"): rows are grouped in tiles of 16;
a tile is a run of k-steps of 64 bytes, each holding 4 bytes (int8: 4 codes;
int4: 8 codes, low nibbles = codes 0-3, high nibbles = codes 4-7) for each of the
16 rows; codes are stored with a bias of 2^(bits-1) (symmetric) or with the
zero point in ``offsets`` [tiles, groups, 16]; scales are [tiles, groups, 16].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..matmul import KSTEP, TILE_ROWS


def gather_tile_rows(head, ids: torch.Tensor) -> torch.Tensor:
    """float32 [len(ids), in_features]: rows ``ids`` of a QuantLinear's weight."""
    c = head.config
    if c.bits not in (4, 8):
        raise ValueError("only int8 / int4 tiles can be gathered by row")
    k = head.in_features
    step = KSTEP[c.bits]
    kp = (k + step - 1) // step * step
    tiles = head.scales.shape[0]
    t, i = ids // TILE_ROWS, ids % TILE_ROWS
    blocks = head.data.view(tiles, kp // step, TILE_ROWS, 4)[t, :, i, :]          # [L, kp/step, 4]
    if c.bits == 4:
        blocks = torch.stack([blocks & 0x0F, blocks >> 4], dim=2)                  # [L, kp/8, 2, 4]
    codes = blocks.reshape(ids.numel(), kp).to(torch.int32)
    groups = head.scales.shape[1]
    if head.offsets is None:
        codes = codes - (1 << (c.bits - 1))
    else:
        codes = (codes.view(-1, groups, kp // groups) - head.offsets[t, :, i][:, :, None]).view(-1, kp)
    scales = head.scales[t, :, i].float()                                          # [L, groups]
    if head.row_scales is not None:  # int8 scale codes times the row's scale (exact)
        scales = scales * head.row_scales[ids][:, None]
    vals = codes.to(torch.float32).view(-1, groups, kp // groups) * scales[:, :, None]
    return vals.view(-1, kp)[:, :k]


class TiedQuantEmbedding(nn.Module):
    """An embedding whose table is the (quantized) output head's weight.

    The head is referenced, not registered as a submodule, so its tiles appear
    once in ``state_dict()`` (under the head's name) and are saved once.
    """

    def __init__(self, head, padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        from .quant_linear import QuantLinear
        if not isinstance(head, QuantLinear) or head.config.bits not in (4, 8):
            raise TypeError("head must be an int8 or int4 lowbit QuantLinear")
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.orig_dtype = padding_idx, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1).long()
        if not torch.compiler.is_compiling() and flat.numel() and \
                (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise ValueError(f"ids must be in [0, {self.num_embeddings}), got {int(flat.min())}..{int(flat.max())}")
        out = gather_tile_rows(self.head, flat)
        if self.orig_dtype != torch.float32:
            out = out.to(self.orig_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (what transformers reads for e.g. resizing checks)."""
        return self.head.dequantized_weight()

    @property
    def nbytes(self) -> int:
        return 0  # stored by the head

    @property
    def label(self) -> str:
        return f"tied to the {self.head.config.label} head"

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.label}"
