"""Matmul kernels against a float64 reference with a rigorous error bound derived
from the inputs, on every compiled target (and with VNNI off on AVX-512)."""
import warnings

import numpy as np
import pytest

import lowbit
from lowbit import _C
from lowbit import reference as ref

FORMATS = [  # bits, group, symmetric
    (8, None, True), (8, None, False), (8, 64, True),
    (4, None, True), (4, 32, True), (4, 128, True), (4, 32, False), (4, 128, False),
]


from conftest import TARGETS  # noqa: E402
from lowbit.runtime import only_target  # noqa: E402

# Every compiled target with its default run-time paths; on AVX-512 with VNNI or
# AVX512_BF16 also with both switched off (the int16 multiply-add dot and the
# decode-loop weight-only GEMV).
_VNNI = bool(_C.cpu_features().get("avx512vnni"))
_BF16 = bool(_C.cpu_features().get("avx512bf16"))
_FAST = "+".join(name for name, on in (("vnni", _VNNI), ("bf16", _BF16)) if on)
PATHS = [(mask, name, _FAST if name == "AVX3" and _FAST else "portable") for mask, name in TARGETS]
PATHS += [(mask, name, "portable") for mask, name in TARGETS if name == "AVX3" and _FAST]


@pytest.fixture(params=PATHS, ids=[f"{name}-{path}" for _, name, path in PATHS])
def dot_path(request):
    mask, name, path = request.param
    _C.set_vnni_enabled("vnni" in path)
    _C.set_bf16_gemv_enabled("bf16" in path)
    try:
        with only_target(mask):
            assert _C.vnni_active() == ("vnni" in path)
            assert _C.bf16_gemv_active() == ("bf16" in path)
            yield path
    finally:
        _C.set_vnni_enabled(True)
        _C.set_bf16_gemv_enabled(True)


def bf16_gemv(m, act_bits, zero_points):
    """Whether lowbit.matmul of m rows takes the bfloat16-dot GEMV (its bound
    carries the activation split: reference.matmul(..., bf16_split=True))."""
    return _C.bf16_gemv_active() and m < 4 and not act_bits and zero_points is None


def check(x, q, group, act_bits):
    pw = lowbit.pack_weights(q)
    y = lowbit.matmul(x, pw, act_bits=act_bits)
    r, bound = ref.matmul(x, q.codes(), q.scales if q.group_size != "tensor" else
                          np.repeat(q.scales, q.shape[0]), q.zero_points, group, act_bits,
                          bf16_split=bf16_gemv(x.shape[0], act_bits, q.zero_points))
    assert y.shape == r.shape and y.dtype == np.float32
    err = np.abs(y - r)
    assert np.all(err <= bound), f"max err {err.max()} vs bound {bound[err > bound].min()}"
    return y


@pytest.mark.parametrize("act_bits", [None, 8], ids=["w_only", "a8"])
@pytest.mark.parametrize("bits,group,sym", FORMATS, ids=[f"int{b}-{g}-{'s' if s else 'a'}" for b, g, s in FORMATS])
@pytest.mark.parametrize("m", [1, 2, 7, 64, 257])
def test_matches_reference(dot_path, rng, m, bits, group, sym, act_bits):
    n, k = 37, 256
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    q = lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=sym)
    check(x, q, group, act_bits)


@pytest.mark.parametrize("k", [1, 3, 13, 100, 1000])
@pytest.mark.parametrize("bits", [8, 4])
def test_k_tails_per_row(target, rng, k, bits):
    w = rng.standard_normal((17, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=bits)
    for act_bits in (None, 8):
        check(x, q, None, act_bits)


def test_special_activations(target, rng):
    w = rng.standard_normal((40, 64)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=4, group_size=32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1] = 0.0                               # all-zero row -> zeros
    x[2, 5] = np.inf                         # saturates in the int8 path
    y = lowbit.matmul(x, lowbit.pack_weights(q), act_bits=8)
    assert np.all(y[1] == 0) and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="NaN"):
        lowbit.matmul(np.full((1, 64), np.nan, np.float32), lowbit.pack_weights(q), act_bits=8)


def test_per_tensor_and_dtypes(rng):
    w = rng.standard_normal((20, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=8, group_size="tensor")
    check(x, q, None, 8)
    pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32))
    y32 = lowbit.matmul(x, pw)
    np.testing.assert_array_equal(lowbit.matmul(x.astype(np.float16), pw),
                                  lowbit.matmul(x.astype(np.float16).astype(np.float32), pw))
    xb = ref.encode_float(x, "bfloat16")
    np.testing.assert_array_equal(lowbit.matmul(xb, pw, input_dtype="bfloat16"),
                                  lowbit.matmul(ref.decode_float(xb, "bfloat16"), pw))
    np.testing.assert_array_equal(lowbit.matmul(x[0], pw), y32[0])          # 1-D x
    np.testing.assert_array_equal(lowbit.matmul(np.asfortranarray(x), pw), y32)


@pytest.mark.parametrize("m", [1, 3, 9], ids=["gemv1", "gemv3", "gemm9"])
def test_bit_identical_across_threads_and_runs(rng, m):
    w = rng.standard_normal((300, 512)).astype(np.float32)
    x = rng.standard_normal((m, 512)).astype(np.float32)
    pws = [lowbit.pack_weights(lowbit.quantize_array(w, bits=b, group_size=g)) for b, g in ((8, None), (4, 128))]
    pws.append(lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=16, scale_dtype="int8"), "int8"))
    old = lowbit.get_num_threads()
    try:
        for pw in pws:
            for act_bits in (None, 8):
                outs = []
                for t in (1, 2, 3, 1):
                    lowbit.set_num_threads(t)
                    outs.append(lowbit.matmul(x, pw, act_bits=act_bits))
                for o in outs[1:]:
                    np.testing.assert_array_equal(o, outs[0])
    finally:
        lowbit.set_num_threads(old)


def test_claimed_chunks_with_late_and_busy_workers(rng):
    # More threads than cores: workers wake late, often after the caller has
    # claimed every chunk of a call and moved on to the next one; a late worker
    # must claim nothing of a finished call and every index must run once.
    # Alternating shapes change the chunk count from call to call.
    shapes = [(300, 512, 1), (40, 64, 1), (1000, 256, 5), (16, 32, 2)]
    cases = []
    for n, k, m in shapes:
        pw = lowbit.pack_weights(lowbit.quantize_array(rng.standard_normal((n, k)).astype(np.float32), bits=4, group_size=32))
        cases.append((pw, rng.standard_normal((m, k)).astype(np.float32)))
    old = lowbit.get_num_threads()
    try:
        lowbit.set_num_threads(1)
        expect = [(lowbit.matmul(x, pw), lowbit.matmul(x, pw, act_bits=8)) for pw, x in cases]
        lowbit.set_num_threads(5)
        for i in range(200):
            (pw, x), (e_w, e_a) = cases[i % len(cases)], expect[i % len(cases)]
            np.testing.assert_array_equal(lowbit.matmul(x, pw), e_w)
            np.testing.assert_array_equal(lowbit.matmul(x, pw, act_bits=8), e_a)
    finally:
        lowbit.set_num_threads(old)


def test_qarray_input_keeps_its_tiles(rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=4, group_size=32, symmetric=False)
    assert q.tiles_nbytes == 0
    expected = lowbit.matmul(x, lowbit.pack_weights(q))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(lowbit.matmul(x, q), expected)
    first = q._kept_tiles()
    assert q.tiles_nbytes == first.nbytes > 0
    np.testing.assert_array_equal(lowbit.matmul(x, q, act_bits=8), lowbit.matmul(x, first, act_bits=8))
    assert q._kept_tiles() is first  # built once
    with pytest.raises(ValueError, match="read-only"):
        q.packed[0, 0] ^= 1
    # Rewriting the QArray through out= drops the stale tiles.
    lowbit.quantize_array(-w, bits=4, group_size=32, symmetric=False, out=q)
    assert q.tiles_nbytes == 0 and q.packed.flags.writeable
    np.testing.assert_array_equal(lowbit.matmul(x, q), lowbit.matmul(x, lowbit.pack_weights(q)))
    np.testing.assert_allclose(lowbit.matmul(x, q), -expected, atol=1e-4)
    q.drop_tiles()
    assert q.tiles_nbytes == 0 and q.scales.flags.writeable and q.zero_points.flags.writeable


def test_qarray_tiles_leave_borrowed_read_only_arrays_alone(rng):
    q = lowbit.quantize_array(rng.standard_normal((16, 32)).astype(np.float32), bits=8)
    q.scales.flags.writeable = False  # e.g. a memory-mapped file
    lowbit.matmul(np.ones((1, 32), np.float32), q)
    q.drop_tiles()
    assert q.packed.flags.writeable and not q.scales.flags.writeable


@pytest.mark.parametrize("call,exc,word", [
    (lambda q, pw: lowbit.matmul(np.ones((2, 31), np.float32), pw), ValueError, "K=32"),
    (lambda q, pw: lowbit.matmul(np.ones((2, 32), np.float64), pw), TypeError, "x"),
    (lambda q, pw: lowbit.matmul(np.ones((2, 2, 32), np.float32), pw), ValueError, "x"),
    (lambda q, pw: lowbit.matmul(np.ones((2, 32), np.float32), pw, act_bits=4), ValueError, "act_bits"),
    (lambda q, pw: lowbit.matmul(np.ones((2, 32), np.float32), "w"), TypeError, "w"),
    (lambda q, pw: lowbit.pack_weights(lowbit.quantize_array(np.ones((4, 32), np.float32), bits=2)), ValueError, "bits"),
    (lambda q, pw: lowbit.pack_weights(lowbit.quantize_array(np.ones((4, 36), np.float32), bits=4, group_size=12)),
     ValueError, "multiple of 8"),
    (lambda q, pw: lowbit.pack_weights(lowbit.quantize_array(np.ones((2, 4, 32), np.float32), bits=8)), ValueError, "2-D"),
    (lambda q, pw: _C.matmul_float_act(np.ones((2, 32), np.float32), 4, 16, 32, 32, pw.data[:-1], pw.scales.reshape(-1),
                                       None, np.empty((2, 16), np.float32)), ValueError, "data"),
])
def test_bad_input(call, exc, word):
    q = lowbit.quantize_array(np.ones((16, 32), np.float32), bits=4, group_size=32)
    pw = lowbit.pack_weights(q)
    with pytest.raises(exc, match=word):
        call(q, pw)


def test_int32_overflow_bound_is_enforced():
    """Per-group int32 sums are exact for groups of up to 65536 codes
    (65536 * 255 * 127 < 2^31); longer per-row int8 rows are rejected, not wrapped."""
    k = 65536 + 8
    q = lowbit.quantize_array(np.ones((16, k), np.float32), bits=8)
    with pytest.raises(ValueError, match="65536"):
        lowbit.matmul(np.ones((1, k), np.float32), lowbit.pack_weights(q), act_bits=8)
    # The float path has no such limit.
    y = lowbit.matmul(np.ones((1, k), np.float32), lowbit.pack_weights(q))
    np.testing.assert_allclose(y, k, rtol=1e-4)


def test_threads_env_default(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import lowbit; print(lowbit.get_num_threads())"],
                         env={**__import__("os").environ, "LOWBIT_NUM_THREADS": "3"},
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_fused_bias_equals_adding_afterwards(dot_path, rng, m, act_bits):
    w = rng.standard_normal((37, 96)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    x = rng.standard_normal((m, 96)).astype(np.float32)
    pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32))
    np.testing.assert_array_equal(lowbit.matmul(x, pw, act_bits=act_bits, bias=b),
                                  lowbit.matmul(x, pw, act_bits=act_bits) + b)
    with pytest.raises(ValueError, match="bias"):
        lowbit.matmul(x, pw, bias=b[:-1])


@pytest.mark.parametrize("bits,group,sym,n,k", [
    (4, None, True, 33, 128), (4, None, False, 5, 70), (4, 32, False, 33, 128), (4, 64, True, 16, 64),
    (8, None, False, 5, 70), (8, None, True, 33, 128), (8, 64, True, 16, 128), (8, 32, False, 7, 96)])
def test_dequantize_packed_matches_its_spec_and_the_qarray(rng, bits, group, sym, n, k):
    from lowbit import reference
    from lowbit.matmul import dequantize_packed
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=sym)
    pw = lowbit.pack_weights(q)
    got = dequantize_packed(pw)
    np.testing.assert_array_equal(got, reference.dequantize_tiled(pw))
    np.testing.assert_array_equal(got, q.dequantize())


# ------------------------------------------------ float16 scales (formats.h "scale dtype")
F16_FORMATS = [(4, 32, True), (4, 32, False), (4, 16, True), (4, None, True), (8, 64, True), (8, None, False)]


@pytest.mark.parametrize("scale_dtype", ["float16", "int8"])
@pytest.mark.parametrize("act_bits", [None, 8], ids=["w_only", "a8"])
@pytest.mark.parametrize("bits,group,sym", F16_FORMATS, ids=[f"int{b}-{g}-{'s' if s else 'a'}" for b, g, s in F16_FORMATS])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_narrow_scales_match_the_reference_and_float32_tiles(dot_path, rng, m, bits, group, sym, act_bits,
                                                             scale_dtype):
    # Every kernel path reads float16 scales and int8 scale codes (times the row
    # scale): the result must be the float32 tiles' result bit for bit (the
    # scales are the same values), and within the reference's bound.
    n, k = 37, 256
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 4, (n, 1)))).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    q = lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    pn = lowbit.pack_weights(q, scale_dtype=scale_dtype)
    assert pn.scales.dtype == np.dtype(scale_dtype) and pn.scale_dtype == scale_dtype
    assert (pn.row_scales is not None) == (scale_dtype == "int8")
    yn = lowbit.matmul(x, pn, act_bits=act_bits)
    np.testing.assert_array_equal(yn, lowbit.matmul(x, lowbit.pack_weights(q), act_bits=act_bits))
    r, bound = ref.matmul(x, q.codes(), q.scales, q.zero_points, group, act_bits,
                          bf16_split=bf16_gemv(m, act_bits, q.zero_points))
    assert np.all(np.abs(yn - r) <= bound)


def test_int8_scale_codes_layout(rng):
    from lowbit import reference
    from lowbit.arrays import int8_scale_codes
    from lowbit.matmul import dequantize_packed
    w = (rng.standard_normal((40, 576)) * np.exp(rng.uniform(-3, 3, (40, 36)).repeat(16, 1))).astype(np.float32)
    q = lowbit.quantize_array(w, bits=4, group_size=16, scale_dtype="int8")
    codes, d = int8_scale_codes(q.scales)
    assert np.abs(codes).max(axis=1).min() == 127                      # every row's largest group is code 127
    np.testing.assert_array_equal(codes.astype(np.float32) * d[:, None], q.scales)  # exact products
    p8 = lowbit.pack_weights(q, scale_dtype="int8")
    np.testing.assert_array_equal(p8.scales[0, :, 3], codes[3])         # tile 0, row 3: its codes by group
    np.testing.assert_array_equal(p8.row_scales[:40], d)
    assert np.all(p8.row_scales[40:] == 0) and np.all(p8.scales[2, :, 8:] == 0)  # padding rows
    np.testing.assert_array_equal(dequantize_packed(p8), reference.dequantize_tiled(p8))
    np.testing.assert_array_equal(dequantize_packed(p8), q.dequantize())
    # 4 + 8 / 16 + 32 / K bits per weight once the rows fill whole tiles.
    q48 = lowbit.quantize_array(w[:32], bits=4, group_size=16, scale_dtype="int8")
    assert lowbit.pack_weights(q48, scale_dtype="int8").bits_per_weight == 4 + 8 / 16 + 32 / 576
    with pytest.raises(ValueError, match="row_scales"):
        lowbit.PackedWeights(p8.data, p8.scales, None, p8.shape, 4, 16, True)
    with pytest.raises(ValueError, match="row_scales"):
        lowbit.matmul(np.ones((1, 576), np.float32), lowbit.PackedWeights._unchecked(
            p8.data, p8.scales, None, p8.shape, 4, 16, True))


def test_float16_scales_dequantize_and_size(rng):
    from lowbit import reference
    from lowbit.matmul import dequantize_packed
    w = rng.standard_normal((64, 512)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=4, group_size=32, scale_dtype="float16")
    p16 = lowbit.pack_weights(q, scale_dtype="float16")
    assert p16.bits_per_weight == 4.5                                    # llama.cpp Q4_0's size
    assert lowbit.pack_weights(q).bits_per_weight == 5.0
    got = dequantize_packed(p16)
    np.testing.assert_array_equal(got, reference.dequantize_tiled(p16))
    np.testing.assert_array_equal(got, q.dequantize())
    # float32 scales packed as float16 round to nearest (the codes stay).
    q32 = lowbit.quantize_array(w, bits=4, group_size=32)
    r = lowbit.pack_weights(q32, scale_dtype="float16")
    np.testing.assert_array_equal(r.scales, lowbit.pack_weights(q32).scales.astype(np.float16))
    with pytest.raises(ValueError, match="scale_dtype"):
        lowbit.pack_weights(q, scale_dtype="bfloat16")
    with pytest.raises(TypeError, match="scales"):  # a hand-built PackedWeights with other scales
        lowbit.PackedWeights(p16.data, p16.scales.astype(np.float64), None, p16.shape, 4, 32, True)


SHUFFLE_FORMATS = [  # bits, group, scale dtype: every scale dtype the GEMV reads
    (4, 16, "int8"), (4, 32, "float16"), (4, None, "float32"), (4, 128, "float32"),
    (8, None, "float32"), (8, 64, "int8"), (8, 32, "float16"),
]


def with_and_without_shuffle(x, pw):
    """lowbit.matmul(x, pw) with the byte-shuffle GEMV enabled, then disabled."""
    try:
        _C.set_shuffle_gemv_enabled(True)
        fast = lowbit.matmul(x, pw)
        _C.set_shuffle_gemv_enabled(False)
        return fast, lowbit.matmul(x, pw)
    finally:
        _C.set_shuffle_gemv_enabled(True)


@pytest.fixture
def shuffle_off():
    def switch(on):
        _C.set_shuffle_gemv_enabled(on)
    yield switch
    _C.set_shuffle_gemv_enabled(True)


@pytest.mark.parametrize("bits,group,scale_dtype", SHUFFLE_FORMATS,
                         ids=[f"int{b}-{g}-{d}" for b, g, d in SHUFFLE_FORMATS])
@pytest.mark.parametrize("n,k", [(37, 256), (100, 576), (16, 8)])
def test_shuffle_gemv_is_bit_identical_to_the_decode_loop(target, rng, shuffle_off, bits, group, scale_dtype, n, k):
    # Below AVX-512 the weight-only GEMV decodes symmetric codes by byte shuffle
    # (codes land as q * 2^28 / q * 2^24, scaled back exactly): it must give the
    # generic decode loop's floats bit for bit, and stay within the reference bound.
    if group is not None and k % group:
        group = None
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 3, (n, 1)))).astype(np.float32)
    x = (rng.standard_normal((3, k)) * np.exp(rng.uniform(-20, 20, (3, 1)))).astype(np.float32)
    q = lowbit.quantize_array(w, bits=bits, group_size=group, scale_dtype=scale_dtype)
    pw = lowbit.pack_weights(q, scale_dtype=scale_dtype)
    for m in (1, 2, 3):
        shuffle_off(True)
        fast = lowbit.matmul(x[:m], pw)
        shuffle_off(False)
        slow = lowbit.matmul(x[:m], pw)
        np.testing.assert_array_equal(fast, slow)
        r, bound = ref.matmul(x[:m], q.codes(), q.scales, None, group, None, bf16_split=bf16_gemv(m, None, None))
        assert np.all(np.abs(fast - r) <= bound)


def out_of_range_rows(rng):
    """Weights [48, 64] and 3 rows of x: a huge value in row 0, inf in row 1."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[0, 3] = 3e37
    x[1, 60] = np.inf
    return rng.standard_normal((48, 64)).astype(np.float32), x


def test_shuffle_gemv_leaves_out_of_range_rows_to_the_decode_loop(target, rng, shuffle_off):
    # Rows with |x| > 2^64 or inf could overflow the scaled sums: they take the
    # generic loop (same results as with the shuffle path off), other rows do not.
    w, x = out_of_range_rows(rng)
    pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32))
    shuffle_off(True)
    fast = lowbit.matmul(x, pw)
    shuffle_off(False)
    slow = lowbit.matmul(x, pw)
    np.testing.assert_array_equal(fast, slow)
    assert np.all(np.isfinite(fast[0])) and np.abs(fast[0]).max() > 1e36


# ------------------------------------------------ bfloat16-dot GEMV (gemv_bf16-inl.h)
@pytest.fixture
def bf16_switch():
    yield _C.set_bf16_gemv_enabled
    _C.set_bf16_gemv_enabled(True)


BF16_FORMATS = [  # bits, group, scale dtype
    (4, 16, "int8"), (4, 32, "float16"), (4, None, "float32"), (4, 128, "float32"),
    (8, None, "float32"), (8, 64, "int8"), (8, 32, "float16"),
]


@pytest.mark.parametrize("bits,group,scale_dtype", BF16_FORMATS, ids=[f"int{b}-{g}-{d}" for b, g, d in BF16_FORMATS])
@pytest.mark.parametrize("n,k", [(37, 256), (100, 576), (16, 8), (70, 13)])
def test_bf16_gemv_matches_the_reference_and_the_decode_loop(target, rng, bf16_switch, bits, group, scale_dtype,
                                                             n, k):
    # The bfloat16-dot GEMV (AVX-512 with AVX512_BF16) against the float64
    # reference with the split's bound, and against the decode loop (bf16 off):
    # both within their bounds, so they differ by at most the sum of the two.
    # Other targets never take it: on and off are then the same floats.
    if group is not None and k % group:
        group = None
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 3, (n, 1)))).astype(np.float32)
    x = (rng.standard_normal((3, k)) * np.exp(rng.uniform(-20, 20, (3, 1)))).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q = lowbit.quantize_array(w, bits=bits, group_size=group, scale_dtype=scale_dtype)
    pw = lowbit.pack_weights(q, scale_dtype=scale_dtype)
    for m in (1, 2, 3):
        bf16_switch(True)
        active = _C.bf16_gemv_active()
        assert active == (target == "AVX3" and _BF16)
        fast = lowbit.matmul(x[:m], pw, bias=bias)
        bf16_switch(False)
        slow = lowbit.matmul(x[:m], pw, bias=bias)
        r, bound = ref.matmul(x[:m], q.codes(), q.scales, None, group, None, bf16_split=active)
        r = r + bias
        assert np.all(np.abs(fast - r) <= bound + 1e-6 * np.abs(bias))
        if not active:
            np.testing.assert_array_equal(fast, slow)


def test_bf16_gemv_split_keeps_16_bits(rng, bf16_switch):
    # x = 1 + 2^-8 + 2^-12 is 2^-8.1 away from its nearest bfloat16 (1 + 2^-7):
    # one bfloat16 part would be off by that much, the two parts of the split are
    # within 2^-16 (here exact: the rest, -(2^-8 - 2^-12), is a bfloat16).
    x = np.full((1, 64), 1 + 2.0 ** -8 + 2.0 ** -12, np.float32)
    one_part = ref.decode_float(ref.encode_float(x, "bfloat16"), "bfloat16")
    assert np.abs(one_part - x).max() > 2.0 ** -9
    w = rng.uniform(0.5, 1.0, (16, 64)).astype(np.float32)
    q = lowbit.quantize_array(w, bits=4, group_size=32)
    bf16_switch(True)
    y = lowbit.matmul(x, lowbit.pack_weights(q))
    exact = x[0].astype(np.float64) @ q.dequantize().astype(np.float64).T
    assert np.all(np.abs(y[0] - exact) <= 2.0 ** -16 * np.abs(exact))


def test_bf16_gemv_leaves_asymmetric_weights_and_out_of_range_rows_to_the_decode_loop(rng, bf16_switch):
    # Zero points are not in the permute tables, rows with inf or |x| > 2^64
    # could overflow a part, and values below 2^-60 could make denormals that
    # vdpbf16ps flushes: those take the decode loop (bf16 on == off, bit for
    # bit), while the in-range rows of the same call take the bfloat16 dots.
    w, x = out_of_range_rows(rng)
    asym = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32, symmetric=False))
    bf16_switch(True)
    a = lowbit.matmul(x[2:], asym)
    bf16_switch(False)
    np.testing.assert_array_equal(a, lowbit.matmul(x[2:], asym))
    sym = lowbit.pack_weights(lowbit.quantize_array(w, bits=4, group_size=32))
    bf16_switch(True)
    on = lowbit.matmul(x, sym)
    bf16_switch(False)
    off = lowbit.matmul(x, sym)
    np.testing.assert_array_equal(on[:2], off[:2])
    assert np.all(np.isfinite(on[0])) and np.abs(on[0]).max() > 1e36
    tiny = x[2:].copy()
    tiny[0, :32] *= np.float32(1e-30)   # 2^-99: parts would be denormal
    bf16_switch(True)
    t_on = lowbit.matmul(tiny, sym)
    bf16_switch(False)
    np.testing.assert_array_equal(t_on, lowbit.matmul(tiny, sym))
    r, bound = ref.matmul(x[2:], lowbit.quantize_array(w, bits=4, group_size=32).codes(),
                          lowbit.quantize_array(w, bits=4, group_size=32).scales, None, 32, None,
                          bf16_split=_C.bf16_gemv_active())
    assert np.all(np.abs(on[2:] - r) <= bound)


@pytest.mark.parametrize("bits,group,scale_dtype", [(4, 16, "int8"), (4, 64, "float32"), (8, None, "float32"),
                                                    (8, 64, "float16")])
def test_int_gemv_rows_equal_the_gemm_rows(dot_path, rng, bits, group, scale_dtype):
    # The integer GEMV (1-3 rows: tiles in order, dot chains split inside a tile)
    # and the GEMM (8-row blocks) sum the same integers exactly and apply the
    # same per-group epilogue in the same order: the rows agree bit for bit.
    w = rng.standard_normal((100, 576)).astype(np.float32)
    x = rng.standard_normal((16, 576)).astype(np.float32)
    pw = lowbit.pack_weights(lowbit.quantize_array(w, bits=bits, group_size=group, scale_dtype=scale_dtype),
                             scale_dtype)
    whole = lowbit.matmul(x, pw, act_bits=8)
    for m in (1, 2, 3):
        np.testing.assert_array_equal(lowbit.matmul(x[:m], pw, act_bits=8), whole[:m])
