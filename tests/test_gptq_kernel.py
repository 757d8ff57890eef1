"""GPTQ's column loop (csrc/lowbit/gptq.cc) against its NumPy spec
(reference.gptq_columns) on every compiled target and thread count, bit for bit;
torch-free, so it runs under ASan too."""
import numpy as np
import pytest

import lowbit
from lowbit import _C, reference


def block_case(rng, b, rows, ngroups, sym, bits):
    x = rng.standard_normal((4 * b, b)) * np.exp(rng.uniform(-1, 1, b))
    h = x.T @ x / len(x) + 0.01 * np.eye(b)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.copy()  # upper factor of H^-1
    wt = rng.standard_normal((b, rows)) * np.exp(rng.uniform(-2, 2, rows))
    qmax = (1 << (bits - 1)) - 1 if sym else (1 << bits) - 1
    qmin = -(1 << (bits - 1)) if sym else 0
    amax = np.abs(wt).max(0)
    scales = np.tile((amax / (qmax + 1)).astype(np.float32), (ngroups, 1))
    scales *= rng.uniform(0.7, 1.3, scales.shape).astype(np.float32)
    scales[0, :3] = 0  # all-zero groups have scale 0: codes = zero point, error = w
    zps = None if sym else rng.integers(0, qmax + 1, scales.shape).astype(np.float32)
    groups = rng.integers(0, ngroups, b).astype(np.int32)
    return wt, hinv, np.ascontiguousarray(scales), zps, groups, qmin, qmax


T5 = np.array([-127, -105, -76, -56, -41, -28, -18, -9, 0, 8, 17, 27, 39, 53, 71, 96], np.int8)


@pytest.mark.parametrize("sym,bits,levels", [(True, 4, None), (False, 4, None), (True, 8, None), (True, 3, None),
                                             (False, 2, None), (True, 4, "t5"), (True, 4, "narrow")])
@pytest.mark.parametrize("b,rows,c0,c1", [(32, 96, 0, 32), (96, 1537, 0, 96), (64, 200, 5, 40), (7, 3, 0, 7)])
def test_gptq_columns_match_the_reference_bit_for_bit(target, rng, sym, bits, levels, b, rows, c0, c1):
    wt, hinv, scales, zps, groups, qmin, qmax = block_case(rng, b, rows, 3, sym, bits)
    table = {None: None, "t5": T5, "narrow": np.arange(-8, 8, dtype=np.int8) * 3}[levels]
    if table is not None:  # level scales: the table's ends span the group (t5: 127 units)
        scales /= np.float32(np.abs(table.astype(np.float32)).max() / 8)
    want_w, want_q, want_e = wt.copy(), np.zeros((b, rows), np.int32), np.zeros((b, rows))
    reference.gptq_columns(want_w, hinv, c0, c1, scales, zps, groups, qmin, qmax, want_q, want_e, table)
    old = lowbit.get_num_threads()
    try:
        for threads in (1, 2):
            lowbit.set_num_threads(threads)
            w, q, e = wt.copy(), np.zeros((b, rows), np.int32), np.zeros((b, rows))
            _C.gptq_columns(w, hinv, c0, c1, scales, zps, groups, qmin, qmax, q, e, table)
            np.testing.assert_array_equal(q[c0:c1], want_q[c0:c1])
            np.testing.assert_array_equal(e[c0:c1], want_e[c0:c1])
            np.testing.assert_array_equal(w, want_w)  # the later columns got the same updates
    finally:
        lowbit.set_num_threads(old)
    assert want_q[c0:c1].min() >= qmin and want_q[c0:c1].max() <= qmax
    if table is not None:  # each code is the level nearest to w / s, w as the loop saw it (later columns only change)
        for c in range(c0, c1):
            s = scales[groups[c]]
            t = want_w[c].astype(np.float32) * np.where(s == 0, 0, 1 / np.where(s == 0, 1, s)).astype(np.float32)
            dist = np.abs(t[:, None] - table.astype(np.float32)[None, :])
            assert np.all(dist[np.arange(rows), want_q[c] + 8] <= dist.min(1) + 1e-4)


def test_gptq_columns_reject_bad_buffers(rng):
    wt, hinv, scales, zps, groups, qmin, qmax = block_case(rng, 8, 16, 2, True, 4)
    q, e = np.zeros((8, 16), np.int32), np.zeros((8, 16))
    ok = dict(wt=wt, hinv=hinv, c0=0, c1=8, scales=scales, zps=None, groups=groups, qmin=qmin, qmax=qmax,
              codes=q, err=e)
    for change, exc, word in [
        (dict(wt=wt.astype(np.float32)), TypeError, "wt"),
        (dict(wt=np.asfortranarray(wt)), ValueError, "wt"),
        (dict(hinv=hinv[:4]), ValueError, "hinv"),
        (dict(c1=9), ValueError, "c0 <= c1"),
        (dict(c0=5, c1=4), ValueError, "c0 <= c1"),
        (dict(scales=scales[:, :8].copy()), ValueError, "scales"),
        (dict(zps=np.zeros((2, 3), np.float32)), ValueError, "zps"),
        (dict(groups=np.full(8, 2, np.int32)), ValueError, "groups"),
        (dict(groups=groups.astype(np.int64)), TypeError, "groups"),
        (dict(qmin=8, qmax=7), ValueError, "qmin"),
        (dict(codes=np.zeros((8, 15), np.int32)), ValueError, "codes"),
        (dict(err=np.zeros((8, 16), np.float32)), TypeError, "err"),
        (dict(levels=T5[::-1].copy()), ValueError, "levels"),
        (dict(levels=T5[:8].copy()), ValueError, "levels"),
        (dict(levels=T5.astype(np.int16)), TypeError, "levels"),
        (dict(levels=T5, zps=np.zeros((2, 16), np.float32)), ValueError, "levels"),
        (dict(levels=T5, qmin=-4, qmax=3), ValueError, "levels"),
    ]:
        with pytest.raises(exc, match=word):
            _C.gptq_columns(**{**ok, **change})
