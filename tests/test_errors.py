"""Bad input gets a ValueError/TypeError naming the argument, never a crash;
random input gets a correct result or a clean exception."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
from lowbit import _C
from lowbit import reference as ref

X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(x=X.astype(np.int64) * 1j), TypeError, "x"),
    (dict(x=X.astype(np.float64)), TypeError, "x"),
    (dict(x="abc"), TypeError, "x"),
    (dict(x=np.zeros((0, 4), np.float32)), ValueError, "empty"),
    (dict(x=np.float32(1.0).reshape(())), ValueError, "dimension"),
    (dict(x=X, bits=3), ValueError, "bits"),
    (dict(x=X, bits=4.0), TypeError, "bits"),
    (dict(x=X, bits=True), TypeError, "bits"),
    (dict(x=X, group_size=5), ValueError, "group_size"),
    (dict(x=X, group_size=0), ValueError, "group_size"),
    (dict(x=X, group_size=-32), ValueError, "group_size"),
    (dict(x=X, group_size=2.0), TypeError, "group_size"),
    (dict(x=X, group_size="rows"), TypeError, "group_size"),
    (dict(x=X, symmetric="yes"), TypeError, "symmetric"),
    (dict(x=X, scale=0.0), ValueError, "scale"),
    (dict(x=X, scale=-1.0), ValueError, "scale"),
    (dict(x=X, scale=np.inf), ValueError, "scale"),
    (dict(x=X, scale=np.ones(3, np.float32)), ValueError, "scale"),
    (dict(x=X, scale="a"), TypeError, "scale"),
    (dict(x=X, symmetric=False, scale=0.1), ValueError, "zero_point"),
    (dict(x=X, symmetric=False, scale=0.1, zero_point=300), ValueError, "zero_point"),
    (dict(x=X, symmetric=False, scale=0.1, zero_point=1.5), TypeError, "zero_point"),
    (dict(x=X, zero_point=3), ValueError, "zero_point"),
    (dict(x=np.array([[1.0, np.nan]], np.float32)), ValueError, "NaN"),
    (dict(x=np.array([[1.0, np.nan]], np.float32), scale=0.1), ValueError, "NaN"),
    (dict(x=np.arange(4, dtype=np.int32).view(np.uint16), input_dtype="float64"), TypeError, "dtype"),
    (dict(x=X, input_dtype="bfloat16"), TypeError, "uint16"),
])
def test_quantize_array_rejects(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        lowbit.quantize_array(**kwargs)


def test_dequantize_rejects():
    with pytest.raises(TypeError, match="QArray"):
        lowbit.dequantize_array(X)
    q = lowbit.quantize_array(X)
    with pytest.raises(TypeError, match="dtype"):
        lowbit.dequantize_array(q, np.int8)


def test_native_layer_validates_buffers():
    """The pybind11 layer re-checks everything (outputs noconvert, shapes, writability)."""
    x = X
    scales = np.empty(2, np.float32)
    packed = np.empty((2, 16), np.uint8)
    with pytest.raises(TypeError, match="scales"):
        _C.quantize_rows(x, 0, 4, 32, True, False, False, scales.astype(np.float64), None, packed)
    with pytest.raises(ValueError, match="packed"):
        _C.quantize_rows(x, 0, 4, 32, True, False, False, scales, None, np.empty((2, 15), np.uint8))
    ro = np.empty((2, 16), np.uint8)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        _C.quantize_rows(x, 0, 4, 32, True, False, False, scales, None, ro)
    with pytest.raises(ValueError, match="contiguous"):
        _C.quantize_rows(x, 0, 4, 32, True, False, False, np.empty(4, np.float32)[::2], None, packed)
    with pytest.raises(ValueError, match="contiguous"):
        _C.dequantize_rows(packed, 32, 4, 32, True, False, scales, None, np.empty((2, 64), np.float32)[:, ::2], 0)
    with pytest.raises(ValueError, match="group_size"):
        _C.quantize_rows(x, 0, 4, 5, True, False, False, scales, None, packed)
    with pytest.raises(ValueError, match="bits"):
        _C.quantize_rows(x, 0, 3, 32, True, False, False, scales, None, packed)
    with pytest.raises(ValueError, match="zero_point"):
        _C.quantize_rows(x, 0, 4, 32, False, False, False, scales, None, packed)
    with pytest.raises(TypeError, match="x"):
        _C.quantize_rows(x, 1, 4, 32, True, False, False, scales, None, packed)   # flag says f16
    with pytest.raises(ValueError, match="dtype flag"):
        _C.quantize_rows(x, 7, 4, 32, True, False, False, scales, None, packed)
    with pytest.raises(ValueError, match="out"):
        _C.f32_to_f16(np.ones(4, np.float32), np.empty(3, np.float16))
    with pytest.raises(ValueError, match="num_threads"):
        _C.set_num_threads(0)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: lowbit.fake_quantize_array(X.astype(np.float64), 0.1, 0, -8, 7), TypeError, "x"),
    (lambda: lowbit.fake_quantize_array(X, 0.0, 0, -8, 7), ValueError, "scale"),
    (lambda: lowbit.fake_quantize_array(X, 0.1, 0, 7, -8), ValueError, "quant_min"),
    (lambda: lowbit.fake_quantize_array(X, 0.1, 0, -8.0, 7), TypeError, "quant_min"),
    (lambda: lowbit.fake_quantize_array(X, [0.1, 0.2, 0.3], 0, -8, 7, axis=0), ValueError, "scale"),
    (lambda: lowbit.fake_quantize_array(X, 0.1, 0, -8, 7, axis=2), ValueError, "axis"),
    (lambda: lowbit.fake_quantize_array(X, 0.1, 0, -8, 7, group_size=5), ValueError, "group_size"),
    (lambda: lowbit.fake_quantize_array(X, 0.1, 0.5, -8, 7), TypeError, "zero_point"),
    (lambda: lowbit.fake_quantize_backward_array(X, X[:1], 0.1, 0, -8, 7), TypeError, "grad"),
    (lambda: lowbit.encode_float(X, "e3m4"), ValueError, "fmt"),
    (lambda: lowbit.encode_float(X.astype(np.float64), "e4m3"), TypeError, "x"),
    (lambda: lowbit.decode_float(X, "e4m3"), TypeError, "codes"),
    (lambda: lowbit.set_num_threads(0), ValueError, "n"),
    (lambda: lowbit.set_num_threads(1.5), TypeError, "n"),
])
def test_other_entry_points_reject(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
    elements=st.floats(allow_nan=True, allow_infinity=True, width=16) | st.just(0.0),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=float_arrays, bits=st.sampled_from([1, 2, 3, 4, 8, 16]),
       group=st.sampled_from([None, "tensor", 1, 2, 3, 4, 8, 32, 0, -1]), sym=st.booleans())
def test_random_input_gives_result_or_clean_error(x, bits, group, sym):
    try:
        q = lowbit.quantize_array(x, bits=bits, group_size=group, symmetric=sym)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    # Accepted: then it must equal the reference exactly.
    dname = "float16" if x.dtype == np.float16 else "float32"
    packed, scales, zps = ref.quantize(x, bits, group, sym, dtype=dname)
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.scales.reshape(-1), scales.reshape(-1))
    deq = lowbit.dequantize_array(q)
    assert deq.shape == x.shape
    np.testing.assert_array_equal(deq, ref.dequantize(packed, x.shape, bits, group, sym, scales, zps))


# ---- what the fuzzer (tests/fuzz_numpy_api.py) found, pinned down one by one

@pytest.mark.parametrize("call", [
    lambda x: lowbit.encode_float(x, "float16"),
    lambda x: lowbit.encode_float(x, "e4m3"),
    lambda x: lowbit.decode_float(lowbit.encode_float(x, "bfloat16"), "bfloat16"),
    lambda x: lowbit.fake_quantize_array(x, 0.1, 0, -8, 7),
    lambda x: lowbit.fake_quantize_array(x, 0.1, 0, -8, 7, return_mask=True)[1],
    lambda x: lowbit.fake_quantize_backward_array(x, np.ones_like(x), 0.1, 0, -8, 7),
], ids=["f16", "e4m3", "bf16", "fake", "mask", "backward"])
def test_zero_d_input_keeps_its_shape(call):
    x = np.array(0.37, np.float32)
    y = call(x)
    assert y.shape == ()
    vector = call(x.reshape(1))
    assert vector.shape == (1,) and y.item() == vector.item()


@pytest.mark.parametrize("qmin,qmax,word", [(-(1 << 31) - 1, 0, "quant_min"), (0, 1 << 31, "quant_max"),
                                             (0, 1 << 63, "quant_max")])
def test_fake_quant_range_outside_int32_is_a_short_error(qmin, qmax, word):
    for fn in (lambda: lowbit.fake_quantize_array(X, 0.1, 0, qmin, qmax),
               lambda: lowbit.fake_quantize_backward_array(X, X, 0.1, 0, qmin, qmax)):
        with pytest.raises(ValueError, match=word) as e:
            fn()
        assert len(str(e.value)) < 200


def test_fake_quant_zero_point_outside_int32_is_refused_not_wrapped():
    with pytest.raises(ValueError, match="zero_point"):
        lowbit.fake_quantize_array(X, 0.1, 1 << 32, -8, 7)  # astype(int32) would make it 0


def test_asymmetric_grid_beyond_float32_is_refused():
    x = np.array([[3.3e38, -3.3e38, 1.0, 2.0]], np.float32)
    with pytest.raises(ValueError, match="symmetric=True"):
        lowbit.quantize_array(x, bits=4, symmetric=False)
    q = lowbit.quantize_array(x, bits=4)  # the symmetric grid stays inside float32
    assert np.all(np.isfinite(q.dequantize()))
    with pytest.raises(ValueError, match="scale"):
        lowbit.quantize_array(x, bits=8, scale=3e38)


@pytest.mark.parametrize("field,value,exc", [
    ("packed", np.zeros((2, 3), np.uint8), ValueError), ("packed", None, TypeError),
    ("scales", np.ones((2, 1), np.float64), TypeError), ("scales", np.ones((2, 2), np.float32), ValueError),
    ("zero_points", np.zeros((2, 1), np.uint8), ValueError), ("shape", [2, 32], TypeError),
    ("shape", (2, 33), ValueError), ("bits", 3, ValueError), ("group_size", 5, ValueError),
    ("symmetric", "yes", TypeError), ("dtype", "float64", ValueError),
])
def test_hand_built_qarray_names_the_bad_field(field, value, exc):
    import dataclasses
    q = lowbit.quantize_array(X, bits=4)
    with pytest.raises(exc, match=field):
        dataclasses.replace(q, **{field: value})


@pytest.mark.parametrize("field,value,exc", [
    ("data", np.zeros(3, np.uint8), ValueError), ("scales", np.ones((1, 1, 16), np.float64), TypeError),
    ("offsets", np.zeros((1, 1, 16), np.int32), ValueError), ("shape", (2, 64), ValueError),
    ("shape", (2,), TypeError), ("bits", 2, ValueError), ("group_size", 12, ValueError),
    ("symmetric", 1, TypeError),
])
def test_hand_built_packed_weights_name_the_bad_field(field, value, exc):
    import dataclasses
    pw = lowbit.pack_weights(lowbit.quantize_array(X, bits=4))
    with pytest.raises(exc, match=field):
        dataclasses.replace(pw, **{field: value})
