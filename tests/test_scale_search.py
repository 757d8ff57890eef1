"""The error-minimising scale search (csrc/lowbit/scale_search.cc, method="mse")
against its NumPy reference on every target, and quantize_array(method="mse").
Torch-free: runs under ASan too."""
import numpy as np
import pytest

import lowbit


def _errors_for(x, scales, zps, bits, g, sym):
    from lowbit import reference
    groups = x.reshape(x.shape[0], -1, g)
    zp = np.zeros(scales.shape, np.int32) if sym else zps.astype(np.int32)
    codes = reference.quantize_codes(groups, scales, zp, bits, sym)
    d = (codes - zp[..., None]) * scales[..., None].astype(np.float64) - groups
    return (d * d).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 96), (4, 576), (8, 64), (2, 32), (3, 64)])
def test_search_kernel_matches_the_reference(target, rng, sym, bits, group):
    from lowbit import _C, reference
    x = (rng.standard_t(4, size=(48, 576)) * np.exp(rng.uniform(-4, 1, size=(48, 1)))).astype(np.float32)
    x[3, :group] = 0.0                       # a degenerate group
    x[5, 7] = np.inf                          # counts as 0 in the search
    s, z = _C.search_scales(x, bits, group, sym, 9)
    s = s.reshape(48, -1)
    z = None if sym else z.reshape(48, -1)
    rs, rz = reference.search_scales(x, bits, group, sym)
    xf = np.where(np.isfinite(x), x, 0).astype(np.float32)
    got = _errors_for(xf, s, z, bits, group, sym)
    want = _errors_for(xf, rs, None if sym else rz, bits, group, sym)
    # Same search; only float summation order differs, so near-ties may pick another
    # candidate of (almost) the same error.
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-30)
    assert abs(got.sum() - want.sum()) <= 1e-4 * want.sum()
    close = np.isclose(s, rs, rtol=1e-5, atol=0)
    assert close.mean() >= 0.85, f"only {close.mean():.2%} of scales agree with the reference"
    assert s[3, 0] == 0 and (sym or z[3, 0] == 0)
    # Never worse than the range rule, group by group.
    lo, hi = reference.group_range(xf.reshape(48, -1, group))
    s0, z0 = reference.choose_scale(lo, hi, bits, sym)
    rtn = _errors_for(xf, s0, None if sym else z0, bits, group, sym)
    assert np.all(got <= rtn * (1 + 1e-6) + 1e-30)
    assert got.sum() < 0.97 * rtn.sum()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_array_mse(rng, dtype, sym):
    from conftest import make_input
    from lowbit import reference
    x, x32, name = make_input(rng, (6, 4, 128), dtype)
    kw = dict(input_dtype="bfloat16") if name == "bfloat16" else {}
    q = lowbit.quantize_array(x, bits=4, group_size=32, symmetric=sym, method="mse", **kw)
    r = lowbit.quantize_array(x, bits=4, group_size=32, symmetric=sym, **kw)
    assert q.shape == r.shape and q.scales.shape == r.scales.shape and q.nbytes == r.nbytes
    # The codes are what the given-scale quantizer makes of these scales.
    s, z = reference.search_scales(x32, 4, 32, sym)
    codes = reference.quantize_codes(x32.reshape(-1, 4, 32), q.scales.reshape(-1, 4), 0 if sym else
                                     q.zero_points.reshape(-1, 4).astype(np.int32), 4, sym)
    assert np.array_equal(q.codes().reshape(-1, 4, 32), codes)
    e_mse = ((lowbit.dequantize_array(q) - x32) ** 2).sum()
    e_rtn = ((lowbit.dequantize_array(r) - x32) ** 2).sum()
    assert e_mse < e_rtn
    assert np.isclose(s.reshape(q.scales.shape), q.scales, rtol=1e-5).mean() > 0.85


def test_quantize_array_mse_bad_input():
    x = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        lowbit.quantize_array(x, bits=4, group_size=32, method="hqq")
    with pytest.raises(ValueError, match="do not pass scale"):
        lowbit.quantize_array(x, bits=4, group_size=32, method="mse", scale=0.1)
    with pytest.raises(ValueError, match="search_steps"):
        lowbit.quantize_array(x, bits=4, group_size=32, method="mse", search_steps=-1)
    with pytest.raises(ValueError, match="search_steps"):
        lowbit.quantize_array(x, bits=4, group_size=32, method="mse", search_steps=1000)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lowbit.quantize_array(x, bits=4, group_size=32, method="mse")
    # one scale for the whole tensor is the range rule's (nothing to search per group)
    t = lowbit.quantize_array(np.arange(64, dtype=np.float32).reshape(2, 32), bits=8, group_size="tensor",
                              method="mse")
    assert t.scales.size == 1


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 16), (4, 96), (8, 64), (3, 32)])
def test_weighted_search_matches_the_reference(target, rng, sym, bits, group):
    """Per-column importances c weigh every sum of the search: kernel = reference on
    every target, never worse than the range rule in the weighted error, better
    than the unweighted search in it, and c = 1 gives the unweighted search bit for bit."""
    from lowbit import _C, reference
    x = (rng.standard_t(4, size=(40, 576)) * np.exp(rng.uniform(-3, 1, size=(40, 1)))).astype(np.float32)
    c = np.exp(rng.uniform(-4, 4, size=576)).astype(np.float32)  # mean squares over 3 decades
    c[:group // 2] = 0.0                      # dead inputs: their errors do not count
    s, z = _C.search_scales(x, bits, group, sym, 9, c)
    s = s.reshape(40, -1)
    z = None if sym else z.reshape(40, -1)
    rs, rz = reference.search_scales(x, bits, group, sym, importance=c)
    cg = c.reshape(1, -1, group).astype(np.float64)

    def weighted(scales, zps):
        groups = x.reshape(40, -1, group)
        zp = np.zeros(scales.shape, np.int32) if sym else zps.reshape(scales.shape).astype(np.int32)
        codes = reference.quantize_codes(groups, scales, zp, bits, sym)
        d = (codes - zp[..., None]) * scales[..., None].astype(np.float64) - groups
        return (cg * d * d).sum(-1)

    got, want = weighted(s, z), weighted(rs, None if sym else rz)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-30)
    assert np.isclose(s, rs, rtol=1e-5, atol=0).mean() >= 0.85
    lo, hi = reference.group_range(x.reshape(40, -1, group))
    s0, z0 = reference.choose_scale(lo, hi, bits, sym)
    assert np.all(got <= weighted(s0, None if sym else z0) * (1 + 1e-6) + 1e-30)
    us, uz = _C.search_scales(x, bits, group, sym, 9)
    assert got.sum() < weighted(us.reshape(40, -1), None if sym else uz).sum()
    ones_s, ones_z = _C.search_scales(x, bits, group, sym, 9, np.ones(576, np.float32))
    assert np.array_equal(ones_s, us) and (sym or np.array_equal(ones_z, uz))


def test_quantize_array_importance(rng):
    x = rng.standard_normal((8, 64)).astype(np.float32)
    c = np.exp(rng.uniform(-3, 3, size=64)).astype(np.float32)
    q = lowbit.quantize_array(x, bits=4, group_size=16, method="mse", importance=c, scale_dtype="int8")
    plain = lowbit.quantize_array(x, bits=4, group_size=16, method="mse", scale_dtype="int8")
    err = lambda a: float((c * (lowbit.dequantize_array(a) - x) ** 2).sum())  # noqa: E731
    assert err(q) < err(plain)
    same = lowbit.quantize_array(x, bits=4, group_size=16, method="mse", importance=np.ones(64), scale_dtype="int8")
    assert np.array_equal(same.packed, plain.packed) and np.array_equal(same.scales, plain.scales)
    for bad, match in [(c[:10], "one per column"), (-c, "one per column"), (np.full(64, np.nan), "one per column")]:
        with pytest.raises(ValueError, match=match):
            lowbit.quantize_array(x, bits=4, group_size=16, method="mse", importance=bad)
    with pytest.raises(ValueError, match="needs method='mse'"):
        lowbit.quantize_array(x, bits=4, group_size=16, importance=c)
    with pytest.raises(ValueError, match="importance"):
        from lowbit import _C
        _C.search_scales(x, 4, 16, True, 9, np.ones(63, np.float32))
