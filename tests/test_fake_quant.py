"""Fake quantization kernels: reference on every target, and torch itself."""
import numpy as np
import pytest

import lowbit
from lowbit import reference as ref


def boundary_inputs(rng, shape, scale):
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(scale) * 6
    flat = x.reshape(-1)
    # Exact ties (k + 0.5) * scale and the codes right at qmin / qmax.
    k = rng.integers(-140, 140, size=flat.size // 4)
    flat[: k.size] = ((k + 0.5) * np.float32(scale)).astype(np.float32)
    return x


@pytest.mark.parametrize("qmin,qmax,zp", [(-128, 127, 0), (0, 255, 128), (-8, 7, 0), (0, 15, 3), (0, 3, 1)])
def test_per_tensor_matches_reference(target, rng, qmin, qmax, zp):
    for n in (1, 7, 33, 4097):
        x = boundary_inputs(rng, (n,), 0.05)
        x[0] = np.inf if n > 1 else x[0]
        out, mask = lowbit.fake_quantize_array(x, 0.05, zp, qmin, qmax, return_mask=True)
        np.testing.assert_array_equal(out, ref.fake_quantize(x, 0.05, zp, qmin, qmax))
        np.testing.assert_array_equal(mask, ref.fake_quantize_mask(x, 0.05, zp, qmin, qmax))
        g = rng.standard_normal(n).astype(np.float32)
        np.testing.assert_array_equal(lowbit.fake_quantize_backward_array(x, g, 0.05, zp, qmin, qmax),
                                      np.where(mask, g, 0))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_and_group_match_reference(target, rng, axis):
    x = boundary_inputs(rng, (6, 5, 34), 0.1)
    c = x.shape[axis]
    s = rng.uniform(0.01, 0.2, c).astype(np.float32)
    z = rng.integers(0, 16, c).astype(np.int32)
    out = lowbit.fake_quantize_array(x, s, z, 0, 15, axis=axis)
    np.testing.assert_array_equal(out, ref.fake_quantize(x, s, z, 0, 15, axis=axis))
    sg = rng.uniform(0.01, 0.2, x.size // 17).astype(np.float32)
    zg = np.zeros(sg.size, np.int32)
    out, mask = lowbit.fake_quantize_array(x, sg, zg, -8, 7, group_size=17, return_mask=True)
    np.testing.assert_array_equal(out, ref.fake_quantize(x, sg, zg, -8, 7, group_size=17))
    np.testing.assert_array_equal(mask, ref.fake_quantize_mask(x, sg, zg, -8, 7, group_size=17))


def test_matches_torch_fake_quantize(rng):
    torch = pytest.importorskip("torch", reason="torch is the oracle here")
    x = boundary_inputs(rng, (64, 130), 0.02)
    x[:, -4:] = [np.inf, -np.inf, 1e30, -1e30]   # saturate like torch
    t = torch.from_numpy(x).requires_grad_(True)
    y = torch.fake_quantize_per_tensor_affine(t, 0.02, 3, 0, 255)
    y.backward(torch.ones_like(y))
    out, mask = lowbit.fake_quantize_array(x, 0.02, 3, 0, 255, return_mask=True)
    np.testing.assert_array_equal(out, y.detach().numpy())
    np.testing.assert_array_equal(mask.astype(np.float32), t.grad.numpy())

    s = rng.uniform(0.005, 0.05, 64).astype(np.float32)
    z = rng.integers(-2, 3, 64).astype(np.int32)
    t = torch.from_numpy(x).requires_grad_(True)
    y = torch.fake_quantize_per_channel_affine(t, torch.from_numpy(s), torch.from_numpy(z), 0, -8, 7)
    y.backward(torch.ones_like(y))
    out, mask = lowbit.fake_quantize_array(x, s, z, -8, 7, axis=0, return_mask=True)
    # torch's per-channel CPU kernel casts x/scale to int64 before clamping, so
    # |x/scale| >= 2^63 (and inf) lands on quant_min there; lowbit saturates as the
    # per-tensor op does. Compare everywhere else.
    sane = np.abs(x / s[:, None]) < 2.0 ** 62
    assert (~sane).sum() == 4 * 64
    np.testing.assert_array_equal(out[sane], y.detach().numpy()[sane])
    np.testing.assert_array_equal(mask.astype(np.float32)[sane], t.grad.numpy()[sane])
    np.testing.assert_array_equal(out[:, -4], (7 - z).astype(np.float32) * s)          # +inf -> qmax
    np.testing.assert_array_equal(out[:, -3], (-8 - z).astype(np.float32) * s)         # -inf -> qmin


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        lowbit.fake_quantize_array(np.array([1.0, np.nan], np.float32), 0.1, 0, -8, 7)


@pytest.mark.parametrize("layout", [dict(), dict(axis=0), dict(axis=-1), dict(group_size=35)])
def test_lsq_sums_match_reference(target, rng, layout):
    # 3 x 70000 elements: runs longer than one 64 Ki piece are summed across pieces.
    x = boundary_inputs(rng, (3, 5, 14000), 0.05).reshape(3, 70000)
    x[0, 0], x[1, 1] = np.inf, -np.inf
    g = rng.standard_normal(x.shape).astype(np.float32)
    if "axis" in layout:
        c = x.shape[layout["axis"]]
    elif "group_size" in layout:
        c = x.size // 35
    else:
        c = 1
    s = rng.uniform(0.02, 0.1, c).astype(np.float32)
    z = rng.integers(-2, 3, c).astype(np.int32)
    dx, ds, dz = lowbit.fake_quantize_backward_array(x, g, s, z, -8, 7, lsq=True, **layout)
    np.testing.assert_array_equal(dx, np.where(ref.fake_quantize_mask(x, s, z, -8, 7, **layout), g, 0))
    rds, rdz = ref.fake_quantize_lsq(x, g, s, z, -8, 7, **layout)
    scale_of = np.abs(g).reshape(-1).sum() / c + 1
    np.testing.assert_allclose(ds, rds, rtol=1e-5, atol=1e-5 * scale_of)
    np.testing.assert_allclose(dz, rdz, rtol=1e-5, atol=1e-5 * scale_of)
