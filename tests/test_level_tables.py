"""Level tables (formats.h "level tables"): symmetric int4 codes that index 16
uneven int8 levels. Kernels on every compiled target and run-time path against
the float64 reference (with the level values as the integer codes), the NumPy
statement of the layout, the level search and codes, bad input (no torch: these
run under ASan too; layers and files: test_level_layers.py)."""
import numpy as np
import pytest

import lowbit
from lowbit import _C
from lowbit import reference as ref
from lowbit.arrays import QArray
from lowbit.levels import LEVEL_TABLES, level_table
from lowbit.matmul import dequantize_packed

from test_matmul import bf16_gemv, dot_path, with_and_without_shuffle  # noqa: F401  (fixture)

T5 = level_table("t5")
FORMATS = [(None, "float32"), (16, "int8"), (32, "float16"), (8, "float32")]  # group, scale dtype


def level_qarray(rng, n, k, group, scale_dtype="float32"):
    """Random symmetric int4 codes (every index 0..15) and scales as the dtype stores them."""
    g = k if group is None else group
    codes = rng.integers(-8, 8, (n, k))
    scales = (rng.uniform(0.5, 2.0, (n, k // g)) * np.exp(rng.uniform(-3, 3, (n, 1)))).astype(np.float32)
    if scale_dtype == "float16":
        scales = ref.round_scales_f16(scales)
    elif scale_dtype == "int8":
        scales = ref.round_scales_int8(scales)
    return QArray(ref.pack(codes.astype(np.int32), 4), scales, None, (n, k), 4, group, True)


@pytest.mark.parametrize("group,scale_dtype", FORMATS, ids=[f"{g}-{d}" for g, d in FORMATS])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9, 64])
def test_levels_match_the_reference(dot_path, rng, m, group, scale_dtype):  # noqa: F811
    n, k = 37, 288
    q = level_qarray(rng, n, k, group, scale_dtype)
    pw = lowbit.pack_weights(q, scale_dtype, levels=T5)
    values = T5.astype(np.int32)[q.codes() + 8]     # the integers the codes stand for
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    for act_bits in (None, 8):
        y = lowbit.matmul(x, pw, act_bits=act_bits, bias=bias)
        r, bound = ref.matmul(x, values, q.scales, None, group or k, act_bits,
                              bf16_split=bf16_gemv(m, act_bits, None))
        assert np.all(np.abs(y - (r + bias)) <= bound + 1e-6 * np.abs(bias)), act_bits


@pytest.mark.parametrize("k", [8, 13, 100, 1000])
def test_levels_k_tails(dot_path, rng, k):  # noqa: F811
    q = level_qarray(rng, 21, k, None)
    pw = lowbit.pack_weights(q, levels=T5)
    values = T5.astype(np.int32)[q.codes() + 8]
    x = rng.standard_normal((3, k)).astype(np.float32)
    for m in (1, 3):
        for act_bits in (None, 8):
            r, bound = ref.matmul(x[:m], values, q.scales, None, k, act_bits, bf16_split=bf16_gemv(m, act_bits, None))
            assert np.all(np.abs(lowbit.matmul(x[:m], pw, act_bits=act_bits) - r) <= bound)


def test_levels_skip_the_shuffle_gemv(target, rng):
    # The byte-shuffle GEMV below AVX-512 decodes evenly spaced codes only: with a
    # level table the decode loop runs whether it is enabled or not.
    q = level_qarray(rng, 100, 576, 16, "int8")
    pw = lowbit.pack_weights(q, "int8", levels=T5)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    np.testing.assert_array_equal(*with_and_without_shuffle(x, pw))


@pytest.mark.parametrize("group,scale_dtype", FORMATS, ids=[f"{g}-{d}" for g, d in FORMATS])
def test_levels_dequantize_matches_the_numpy_layout(rng, group, scale_dtype):
    q = level_qarray(rng, 33, 96, group, scale_dtype)
    pw = lowbit.pack_weights(q, scale_dtype, levels=T5)
    got = dequantize_packed(pw)
    np.testing.assert_array_equal(got, ref.dequantize_tiled(pw))
    g = 96 if group is None else group
    s = np.repeat(q.scales.reshape(33, -1).astype(np.float32), g, axis=1)
    np.testing.assert_array_equal(got, T5.astype(np.float32)[q.codes() + 8] * s)


def test_formats_h_example():
    # Table t5, codes u = [0, 8, 15] (q = u - 8) with scale 0.01: [-1.27, 0, 0.96].
    q = QArray(ref.pack(np.array([[-8, 0, 7, 0, 0, 0, 0, 0]], np.int32), 4), np.full((1, 1), 0.01, np.float32),
               None, (1, 8), 4, None, True)
    got = dequantize_packed(lowbit.pack_weights(q, levels=T5))[0, :3]
    np.testing.assert_array_equal(got, np.float32([-127, 0, 96]) * np.float32(0.01))


@pytest.mark.parametrize("group", [16, 64])
def test_level_search_and_codes(target, rng, group):
    w = (rng.standard_t(5, (48, 256)) * 0.02).astype(np.float32)
    s = _C.search_level_scales(w, T5, group, 9, None)
    codes = _C.level_codes(w, T5, group, s)
    np.testing.assert_array_equal(codes, ref.level_codes(w, T5, group, s))
    sg = np.repeat(s.reshape(48, -1), group, axis=1)
    err = ((T5.astype(np.float32)[codes] * sg - w) ** 2).reshape(48, -1, group).sum(-1)
    # Never worse than the range rule (largest magnitude to L[0]) it starts from.
    wg = w.reshape(48, -1, group)
    m = np.take_along_axis(wg, np.abs(wg).argmax(-1)[..., None], -1)[..., 0]
    s0 = (m / np.float32(-127)).astype(np.float32)
    c0 = ref.level_codes(w, T5, group, s0)
    err0 = ((T5.astype(np.float32)[c0] * np.repeat(s0, group, axis=1) - w) ** 2).reshape(48, -1, group).sum(-1)
    assert np.all(err <= err0 * (1 + 1e-5) + 1e-12)
    # And on heavy-tailed groups better than even int4 with its own search.
    q = lowbit.quantize_array(w, bits=4, group_size=group, method="mse")
    even = ((lowbit.dequantize_array(q) - w) ** 2).sum()
    assert err.sum() < 0.9 * even


def test_level_search_weighted_and_degenerate(rng):
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[1, :16] = 0                                           # an all-zero group: scale 0
    imp = np.ones(64, np.float32)
    np.testing.assert_array_equal(_C.search_level_scales(w, T5, 16, 9, imp), _C.search_level_scales(w, T5, 16, 9))
    s = _C.search_level_scales(w, T5, 16, 9)
    assert s[4] == 0 and np.all(s[np.arange(16) != 4] != 0)
    assert np.all(_C.level_codes(w, T5, 16, s)[1, :16] == 8)   # level 0 of t5


def test_levels_bad_input(rng):
    q = lowbit.quantize_array(rng.standard_normal((16, 64)).astype(np.float32), bits=4)
    with pytest.raises(ValueError, match="int8 array of 16"):
        lowbit.pack_weights(q, levels=T5.astype(np.int16))
    with pytest.raises(ValueError, match="int8 array of 16"):
        lowbit.pack_weights(q, levels=T5[:8])
    with pytest.raises(ValueError, match="increasing"):
        lowbit.pack_weights(q, levels=T5[::-1].copy())
    with pytest.raises(ValueError, match="symmetric int4"):
        lowbit.pack_weights(lowbit.quantize_array(rng.standard_normal((16, 64)).astype(np.float32), bits=8),
                            levels=T5)
    with pytest.raises(ValueError, match="symmetric int4"):
        lowbit.pack_weights(lowbit.quantize_array(rng.standard_normal((16, 64)).astype(np.float32), bits=4,
                                                  symmetric=False), levels=T5)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="increasing"):
        _C.search_level_scales(w, np.zeros(16, np.int8), 16, 9)
    with pytest.raises(ValueError, match="group_size"):
        _C.level_codes(w, T5, 24, np.ones(8, np.float32))
    assert set(LEVEL_TABLES) == {"t5"}
