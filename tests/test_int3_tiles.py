"""int3 tiles (formats.h "int3 tiles"): 3-bit codes packed 3 bits per weight,
decoded into the int4 form by every kernel. Checked on every compiled target and
run-time path against the float64 reference, the NumPy statement of the layout,
and the int4 tiles of the same codes (the kernels then run the same arithmetic,
so the outputs must be equal bit for bit)."""
import numpy as np
import pytest

import lowbit
from lowbit import reference as ref
from lowbit.arrays import QArray
from lowbit.matmul import dequantize_packed

from test_matmul import bf16_gemv, dot_path, with_and_without_shuffle  # noqa: F401  (fixture)

FORMATS = [  # group, symmetric, scale dtype
    (None, True, "float32"), (16, True, "int8"), (32, True, "float16"), (8, True, "float32"),
    (None, False, "float32"), (32, False, "float32"), (16, False, "int8"),
]


def three_bit_qarray(rng, n, k, group, symmetric, scale_dtype="float32"):
    """An int4 QArray whose codes use the full 3-bit range (symmetric [-4, 3],
    or [0, 7] with zero points in [0, 7]), scales as the scale dtype stores them."""
    g = k if group is None else group
    codes = rng.integers(-4, 4, (n, k)) if symmetric else rng.integers(0, 8, (n, k))
    scales = (rng.uniform(0.5, 2.0, (n, k // g)) * np.exp(rng.uniform(-3, 3, (n, 1)))).astype(np.float32)
    if scale_dtype == "float16":
        scales = ref.round_scales_f16(scales)
    elif scale_dtype == "int8":
        scales = ref.round_scales_int8(scales)
    zps = None if symmetric else rng.integers(0, 8, (n, k // g)).astype(np.uint8)
    return QArray(ref.pack(codes.astype(np.int32), 4), scales, zps, (n, k), 4, group, symmetric)


@pytest.mark.parametrize("group,sym,scale_dtype", FORMATS, ids=[f"{g}-{'s' if s else 'a'}-{d}" for g, s, d in FORMATS])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9, 64])
def test_int3_matches_the_reference_and_the_int4_tiles(dot_path, rng, m, group, sym, scale_dtype):  # noqa: F811
    n, k = 37, 288  # 36 k-steps: 9 whole super-blocks
    q = three_bit_qarray(rng, n, k, group, sym, scale_dtype)
    p3 = lowbit.pack_weights(q, scale_dtype, bits=3)
    p4 = lowbit.pack_weights(q, scale_dtype)
    assert p3.bits == 3 and p3.data.nbytes * 4 == p4.data.nbytes * 3
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    for act_bits in (None, 8):
        y3 = lowbit.matmul(x, p3, act_bits=act_bits, bias=bias)
        np.testing.assert_array_equal(y3, lowbit.matmul(x, p4, act_bits=act_bits, bias=bias))
        r, bound = ref.matmul(x, q.codes(), q.scales, q.zero_points, group or k, act_bits,
                              bf16_split=bf16_gemv(m, act_bits, q.zero_points))
        assert np.all(np.abs(y3 - (r + bias)) <= bound + 1e-6 * np.abs(bias))


@pytest.mark.parametrize("k", [1, 8, 13, 40, 100, 1000])
def test_int3_k_tails(dot_path, rng, k):  # noqa: F811
    # K padded to whole k-steps, and the last super-block only partly used
    # (40 = 5 k-steps, 100 -> 13): the unused planes must read as zeros.
    q = three_bit_qarray(rng, 21, k, None, True)
    p3, p4 = lowbit.pack_weights(q, bits=3), lowbit.pack_weights(q)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for m in (1, 3):
        for act_bits in (None, 8):
            np.testing.assert_array_equal(lowbit.matmul(x[:m], p3, act_bits=act_bits),
                                          lowbit.matmul(x[:m], p4, act_bits=act_bits))


def test_int3_shuffle_gemv_equals_the_decode_loop(target, rng):
    # Below AVX-512 the weight-only GEMV decodes int3 by byte shuffle (codes land
    # as q * 2^29): bit for bit the generic loop's floats.
    q = three_bit_qarray(rng, 100, 576, 16, True, "int8")
    p3 = lowbit.pack_weights(q, "int8", bits=3)
    x = (rng.standard_normal((3, 576)) * np.exp(rng.uniform(-20, 20, (3, 1)))).astype(np.float32)
    np.testing.assert_array_equal(*with_and_without_shuffle(x, p3))


@pytest.mark.parametrize("group,sym,scale_dtype", FORMATS, ids=[f"{g}-{'s' if s else 'a'}-{d}" for g, s, d in FORMATS])
def test_int3_dequantize_matches_the_numpy_layout_and_the_codes(rng, group, sym, scale_dtype):
    q = three_bit_qarray(rng, 33, 96, group, sym, scale_dtype)
    p3 = lowbit.pack_weights(q, scale_dtype, bits=3)
    got = dequantize_packed(p3)
    np.testing.assert_array_equal(got, ref.dequantize_tiled(p3))
    np.testing.assert_array_equal(got, dequantize_packed(lowbit.pack_weights(q, scale_dtype)))


def test_int3_layout_bytes_of_the_formats_h_example():
    # One row with u = 0..7 in k = 0..7 (symmetric codes -4..3), the rest zero
    # codes (u = 4, as the 15 padding rows): plane 0 byte j = u[j] & 3 |
    # (u[4 + j] & 3) << 4; plane 2 byte j: bit 0 = u[j] >> 2 = 0, bit 4 =
    # u[4 + j] >> 2 = 1, and bits 1-3, 5-7 (k-steps 1..3, all u = 4) set.
    codes = np.zeros((1, 32), np.int32)
    codes[0, :8] = np.arange(8) - 4
    q = QArray(ref.pack(codes, 4), np.ones((1, 1), np.float32), None, (1, 32), 4, None, True)
    data = lowbit.pack_weights(q, bits=3).data
    assert data.size == 192
    for j in range(4):
        assert data[j] == (j & 3) | (((4 + j) & 3) << 4)
        assert data[128 + j] == 0xFE
    assert not data[4:128].any()                # every other u is 4: low bits 0
    assert (data[128 + 4:] == 0xFF).all()      # padding rows: bit 2 of all 8 codes


def test_int3_sizes_and_bits_per_weight(rng):
    # 576 inputs, groups of 16 with int8 scale codes: 3 + 0.5 + 32 / 576 b/w
    # (the int4 tiles of the same codes: 4 + 0.5 + 32 / 576).
    q = three_bit_qarray(rng, 64, 576, 16, True, "int8")
    p3 = lowbit.pack_weights(q, "int8", bits=3)
    assert p3.bits_per_weight == pytest.approx(3.5 + 32 / 576)
    assert lowbit.pack_weights(q, "int8").bits_per_weight == pytest.approx(4.5 + 32 / 576)


def test_int3_bad_input(rng):
    q4 = lowbit.quantize_array(rng.standard_normal((16, 64)).astype(np.float32), bits=4)
    with pytest.raises(ValueError, match=r"bits=3 needs codes in \[-4, 3\]"):
        lowbit.pack_weights(q4, bits=3)   # int4 codes reach -8
    q8 = lowbit.quantize_array(rng.standard_normal((16, 64)).astype(np.float32), bits=8)
    with pytest.raises(ValueError, match="bits must be None, 8"):
        lowbit.pack_weights(q8, bits=3)
    qa = three_bit_qarray(rng, 16, 64, 32, False)
    bad = QArray(qa.packed, qa.scales, np.full_like(qa.zero_points, 9), qa.shape, 4, 32, False)
    with pytest.raises(ValueError, match="zero points <= 7"):
        lowbit.pack_weights(bad, bits=3)
    p3 = lowbit.pack_weights(three_bit_qarray(rng, 16, 64, None, True), bits=3)
    with pytest.raises(ValueError):  # a short buffer never reaches the kernels
        type(p3)(p3.data[:-1], p3.scales, None, p3.shape, 3, None, True)
