"""Level tables: 16 unevenly spaced int4 levels (formats.h "level tables").

Weights inside a group are bell-shaped, so 16 evenly spaced levels spend as
many codes on the rare tails as near zero. A table of 16 signed int8 levels,
dense near 0 and sparse at the ends, lowers the error at the same 4 bits per
code; the kernels look the levels up (one byte shuffle or table permute per
vector of codes), so the speed stays that of int4.

Table "t5" was fitted here (not taken from another project) by Lloyd's
algorithm with a per-group scale search, on groups of 16 draws of a Student t
distribution with 5 degrees of freedom (heavier tails than a normal, as trained
weights have), each group's sign flipped so its largest-magnitude value is
negative (the scale rule maps it to the most negative level, as the even grid's
symmetric rule does): alternate (1) the error-minimising scale of every group
and its nearest levels, (2) every level set to the least-squares mean of the
values it received; normalise to L[0] = -127 and round. 200,000 groups, 80
rounds. Fits to a normal distribution ("n" below, not offered) and to t with 4
or 8 degrees of freedom were measured beside it (Emma, 8 windows, SmolLM2,
int4 g16 int8 scale codes, ratio to float32 perplexity; all-MiniLM-L6-v2 mean
cosine / nearest-neighbour agreement on 240 sentences):

    even int4 grid      1.145   0.9799 / 0.908
    normal fit          1.143   0.9866 / 0.912
    t4 fit              1.122   0.9864 / 0.900
    t5 fit ("t5")       1.104   0.9871 / 0.896
    t8 fit              1.125   0.9857 / 0.900
"""
from __future__ import annotations

import numpy as np

LEVEL_TABLES = {
    "t5": (-127, -105, -76, -56, -41, -28, -18, -9, 0, 8, 17, 27, 39, 53, 71, 96),
}


def level_table(name: str) -> np.ndarray:
    """The int8 [16] levels of a named table (see LEVEL_TABLES)."""
    if name not in LEVEL_TABLES:
        raise ValueError(f"levels must be one of {sorted(LEVEL_TABLES)} or None, got {name!r}")
    return np.array(LEVEL_TABLES[name], np.int8)
