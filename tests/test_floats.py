"""Float format conversions against the reference (every target) and against
independent oracles: NumPy's float16, torch's bfloat16 / float8 casts."""
import numpy as np
import pytest

import lowbit
from lowbit import reference as ref


def interesting_floats(rng, n=1 << 16):
    """Random bit patterns (every exponent) plus the boundaries of every format."""
    bits = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 65504, 65519.99, 65520, 448, 464, 480,
                         57344, 61439, 61440, 2 ** -14, 2 ** -24, 2 ** -25, 2 ** -25 * 1.0001, 2 ** -9,
                         2 ** -10, 2 ** -16, 2 ** -17, 3 * 2 ** -18, 1e-45, 3.4e38, 1.5, 2.5, 0.1],
                        np.float32)
    with np.errstate(over="ignore"):
        near = np.concatenate([specials * np.float32(1 + f) for f in (-1e-3, -2 ** -12, 2 ** -12, 1e-3)])
    # Midpoints between neighbouring float16 values: ties must round to even.
    h = np.arange(0, 0x7C00, 37, dtype=np.uint16).view(np.float16).astype(np.float32)
    mid = ((h[:-1].astype(np.float64) + np.nextafter(h[:-1], np.float32(np.inf)).astype(np.float64)) / 2)
    return np.concatenate([x, specials, -specials, near, -near, h, mid.astype(np.float32)]).astype(np.float32)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "e4m3", "e5m2"])
@pytest.mark.parametrize("saturate", [True, False])
def test_encode_matches_reference(target, rng, fmt, saturate):
    x = interesting_floats(rng)
    for n in (len(x), 1, 7, 33):   # tails of every length
        got = lowbit.encode_float(x[:n], fmt, saturate=saturate)
        want = ref.encode_float(x[:n], fmt, saturate=saturate and fmt in ("e4m3", "e5m2"))
        np.testing.assert_array_equal(got.view(want.dtype), want)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "e4m3", "e5m2"])
def test_decode_matches_reference_exhaustively(target, fmt):
    n = 256 if fmt in ("e4m3", "e5m2") else 65536
    codes = np.arange(n, dtype=np.uint16 if n > 256 else np.uint8)
    arg = codes.view(np.float16) if fmt == "float16" else codes
    got = lowbit.decode_float(arg, fmt)
    want = ref.decode_float(codes, fmt)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    # Every non-NaN code survives a round trip.
    back = lowbit.encode_float(got[~nan], fmt, saturate=False)
    np.testing.assert_array_equal(back.view(codes.dtype), codes[~nan])


def test_float16_matches_numpy(target, rng):
    x = interesting_floats(rng)
    got = lowbit.encode_float(x, "float16")
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(lowbit.decode_float(want, "float16"), want.astype(np.float32))


def test_bfloat16_and_fp8_match_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is the oracle for bf16/fp8 casts")
    x = interesting_floats(rng)
    t = torch.from_numpy(x)
    bf = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(lowbit.encode_float(x, "bfloat16"), bf)
    for fmt, tdt, top in (("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)):
        finite = x[np.abs(x) <= top]      # torch's cast does not saturate: compare in range
        want = torch.from_numpy(finite).to(tdt).view(torch.uint8).numpy()
        np.testing.assert_array_equal(lowbit.encode_float(finite, fmt), want)
        np.testing.assert_array_equal(lowbit.decode_float(want, fmt),
                                      torch.from_numpy(want).view(tdt).float().numpy())


def test_fp8_saturation_rules():
    x = np.array([1e6, -1e6, np.inf, -np.inf, np.nan], np.float32)
    assert lowbit.encode_float(x, "e4m3").tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7F]
    assert lowbit.encode_float(x, "e4m3", saturate=False)[:4].tolist() == [0x7F, 0xFF, 0x7F, 0xFF]
    assert lowbit.encode_float(x, "e5m2").tolist()[:4] == [0x7B, 0xFB, 0x7B, 0xFB]
    assert lowbit.encode_float(x, "e5m2", saturate=False).tolist()[:4] == [0x7C, 0xFC, 0x7C, 0xFC]
    assert np.isnan(lowbit.decode_float(lowbit.encode_float(x, "e5m2"), "e5m2")[4])


def test_bf16_rounds_to_nearest_even_not_truncate():
    # 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: even -> 1.0;
    # 1 + 3 * 2^-8 ties to 1.015625 (even mantissa); truncation would give 1.0078125.
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20], np.float32)
    assert lowbit.decode_float(lowbit.encode_float(x, "bfloat16"), "bfloat16").tolist() == \
        [1.0, 1.015625, 1.0078125]
