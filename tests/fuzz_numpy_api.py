"""Random calls of lowbit's public NumPy API: the fuzzer behind tests/test_fuzz.py.

    python tests/fuzz_numpy_api.py SEED CALLS LOG

Each call draws a function and arguments from pools of valid and invalid values
(dtypes, shapes, strides, NaN/inf, empty and 0-d arrays, out-of-range
parameters). A call must return a well-formed result or raise TypeError /
ValueError with a short message; anything else (another exception, a long
message, a wrong shape) is printed as a finding. A crash kills the process:
LOG holds the call that was running (written and flushed before each call).
Exit status: 0 clean, 1 findings.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback

import numpy as np

import lowbit

MAX_MESSAGE = 400  # characters: a message that names the argument, not a dump of it

SHAPES = [(), (0,), (1,), (7,), (32,), (3, 5), (2, 0), (0, 64), (4, 64), (2, 3, 32), (16, 128), (5, 96)]
FLOAT_DTYPES = ["float32", "float16", "bfloat16"]
OTHER_DTYPES = ["float64", "uint16", "uint8", "int8", "int32", "int64", "bool", "complex64", "object"]


class Fuzzer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    # Values ----------------------------------------------------------------
    def floats(self, shape, dtype="float32") -> np.ndarray:
        r = self.rng
        x = np.asarray(r.standard_normal(shape) * np.exp(r.uniform(-20, 20)))
        kind = r.integers(8)
        flat = x.reshape(-1)
        if flat.size and kind == 0:
            flat[r.integers(flat.size)] = np.nan
        elif flat.size and kind == 1:
            flat[r.integers(flat.size)] = self.pick([np.inf, -np.inf])
        elif kind == 2:
            x[...] = 0.0
        elif kind == 3:
            x *= 1e-42  # denormals (float32) / zeros (float16)
        elif kind == 4:
            x = np.clip(x * 1e38, -3.4e38, 3.4e38)
        x = x.astype(np.float32)
        if dtype == "float16":
            with np.errstate(over="ignore"):
                return x.astype(np.float16)
        if dtype == "bfloat16":
            import ml_dtypes
            return x.astype(ml_dtypes.bfloat16)
        return x

    def layout(self, a: np.ndarray) -> np.ndarray:
        """The same values in another memory layout (strided, reversed, transposed)."""
        k = self.rng.integers(5)
        if a.ndim == 0 or k == 0:
            return a
        if k == 1:
            big = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
            big[..., ::2] = a
            return big[..., ::2]
        if k == 2:
            return a[::-1]
        if k == 3 and a.ndim >= 2:
            return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        return a

    def array(self, float_only=False):
        shape = self.pick(SHAPES)
        if float_only or self.rng.random() < 0.75:
            return self.layout(self.floats(shape, self.pick(FLOAT_DTYPES)))
        choice = self.rng.integers(6)
        if choice == 0:
            return self.floats(shape).tolist()
        if choice == 1:
            return self.pick([None, 3.5, "x", b"\x00", object()])
        dtype = self.pick(OTHER_DTYPES)
        if dtype == "object":
            return np.array([object()] * max(1, int(np.prod(shape))), dtype=object)
        with np.errstate(all="ignore"):
            return self.floats(shape).astype(dtype)

    def bits(self):
        return self.pick([2, 4, 8, 8, 4, 3, 0, -1, 16, True, 4.0, "4", None, np.int64(4)])

    def group(self):
        return self.pick([None, None, "tensor", 32, 64, 96, 1, 2, 3, 8, 0, -32, 1 << 40, True, "x", 32.0,
                          np.int32(32)])

    def integer(self):
        return self.pick([-128, 127, 0, 15, -8, 7, 255, -(1 << 31), (1 << 31) - 1, 1 << 31, -(1 << 31) - 1,
                          1 << 63, 1 << 70, 3.0, True, None, np.int64(5), "1"])

    def scale(self, n=None):
        options = [0.1, 1e-3, 0.0, -0.1, np.nan, np.inf, 1e-45, 3e38, "a", None, [0.5, 0.25],
                   np.float64(0.2)]
        if n is not None:
            options += [np.full(n, 0.05, np.float32), np.full(n + 1, 0.05, np.float32),
                        np.full((n, 1), 0.05, np.float64)]
        return self.pick(options)

    # Calls -------------------------------------------------------------------
    def call(self):
        """(description, thunk, check of the result)."""
        name = self.pick(["quantize", "quantize", "dequantize", "encode", "decode", "fake", "fake_backward",
                          "pack", "matmul", "matmul", "threads", "read_info", "sqnr", "forged", "forged"])
        return getattr(self, "c_" + name)()

    def c_quantize(self):
        x = self.array()
        kw = dict(bits=self.bits(), group_size=self.group(), symmetric=self.pick([True, False]))
        r = self.rng.random()
        if r < 0.15:
            kw["method"] = self.pick(["mse", "rtn", "MSE", 3])
            kw["search_steps"] = self.pick([9, 0, 64, 65, -1, 2.5])
        elif r < 0.3:
            kw["scale"] = self.scale()
            kw["zero_point"] = self.pick([None, 0, 3, -1, 300, 0.5, np.uint8(8)])
        if self.rng.random() < 0.1:
            kw["input_dtype"] = self.pick(["bfloat16", "float32", "int4", 7])

        def check(q):
            assert isinstance(q, lowbit.QArray)
            assert q.shape == np.shape(x), (q.shape, np.shape(x))
            d = q.dequantize()
            assert d.shape == np.shape(x)
            if "scale" not in kw and np.all(np.isfinite(np.asarray(x, np.float32))):
                assert np.all(np.isfinite(d)), "finite input gave a non-finite dequantized value"
        return f"quantize_array({_desc(x)}, {kw})", lambda: lowbit.quantize_array(x, **kw), check

    def c_dequantize(self):
        x = self.floats(self.pick([(4, 64), (3, 32), (1, 32), (96,)]))
        x[~np.isfinite(x)] = 1.0
        q = lowbit.quantize_array(x, bits=self.pick([2, 4, 8]), group_size=self.pick([None, 32]))
        target = q if self.rng.random() < 0.8 else self.pick([x, None, "q"])
        dtype = self.pick(["float32", "float16", "bfloat16", np.float32, np.float64, "int8", None, "bf16"])
        kw = {}
        if self.rng.random() < 0.3:
            kw["out"] = self.pick([np.empty(x.shape, np.float32), np.empty(x.shape, np.float16),
                                   np.empty((1,), np.float32), np.empty(x.shape, np.float64), "out",
                                   np.empty(x.shape[::-1], np.float32)])

        def check(d):
            assert d.shape == x.shape
        return (f"dequantize_array(q{x.shape}, {dtype!r}, {list(kw)})",
                lambda: lowbit.dequantize_array(target, dtype, **kw), check)

    def c_encode(self):
        x = self.array()
        fmt = self.pick(["float16", "bfloat16", "e4m3", "e5m2", "bf16", "fp8", None, 3])
        sat = self.pick([True, False])

        def check(c):
            assert c.shape == np.shape(x), (c.shape, np.shape(x))
        return f"encode_float({_desc(x)}, {fmt!r}, {sat})", lambda: lowbit.encode_float(x, fmt, sat), check

    def c_decode(self):
        shape = self.pick(SHAPES)
        dtype = self.pick(["uint8", "uint16", "float16", "float32", "int8"])
        c = self.layout(self.rng.integers(0, 255, size=shape).astype(dtype))
        fmt = self.pick(["float16", "bfloat16", "e4m3", "e5m2", "x"])

        def check(y):
            assert y.shape == c.shape and y.dtype == np.float32
        return f"decode_float({_desc(c)}, {fmt!r})", lambda: lowbit.decode_float(c, fmt), check

    def _fake_args(self):
        x = self.array(float_only=self.rng.random() < 0.7)
        if isinstance(x, np.ndarray) and x.dtype.name == "bfloat16":
            x = x.astype(np.float32)
        mode = self.rng.integers(3)
        axis = group = None
        n = 1
        if mode == 1:
            axis = self.pick([0, -1, 1, 5, None, 1.0])
            if isinstance(x, np.ndarray) and isinstance(axis, int) and -x.ndim <= axis < x.ndim:
                n = x.shape[axis]
        elif mode == 2:
            group = self.pick([32, 1, 7, 0, -1, 2.0])
            if isinstance(x, np.ndarray) and x.ndim and isinstance(group, int) and group > 0:
                n = x.size // group
        scale = self.scale(n)
        zp = self.pick([0, 1, -3, 1 << 31, 1 << 40, 0.5, 2.0, np.zeros(n, np.int64), np.zeros(n + 2, np.int32), "z"])
        qmin, qmax = self.integer(), self.integer()
        if self.rng.random() < 0.5:
            qmin, qmax = self.pick([(-128, 127), (0, 15), (-8, 7), (0, 255)])
        return x, scale, zp, qmin, qmax, axis, group

    def c_fake(self):
        x, scale, zp, qmin, qmax, axis, group = self._fake_args()
        mask = self.pick([True, False])

        def check(r):
            out = r[0] if mask else r
            assert out.shape == np.shape(x), (out.shape, np.shape(x))
            if mask:
                assert r[1].shape == np.shape(x)
        return (f"fake_quantize_array({_desc(x)}, {_desc(scale)}, {_desc(zp)}, {qmin!r}, {qmax!r}, axis={axis!r}, "
                f"group_size={group!r}, return_mask={mask})",
                lambda: lowbit.fake_quantize_array(x, scale, zp, qmin, qmax, axis=axis, group_size=group,
                                                   return_mask=mask), check)

    def c_fake_backward(self):
        x, scale, zp, qmin, qmax, axis, group = self._fake_args()
        grad = self.pick([np.ones(np.shape(x), np.float32), np.ones((3,), np.float32), None])
        lsq = self.pick([True, False])

        def check(r):
            dx = r[0] if lsq else r
            assert dx.shape == np.shape(x)
        return (f"fake_quantize_backward_array({_desc(x)}, grad, {_desc(scale)}, {_desc(zp)}, {qmin!r}, {qmax!r}, "
                f"axis={axis!r}, group_size={group!r}, lsq={lsq})",
                lambda: lowbit.fake_quantize_backward_array(x, grad, scale, zp, qmin, qmax, axis=axis,
                                                            group_size=group, lsq=lsq), check)

    def _weights(self):
        shape = self.pick([(16, 64), (5, 96), (33, 32), (1, 256), (8,), (2, 4, 32), (16, 36)])
        x = self.floats(shape)
        x[~np.isfinite(x)] = 1.0
        return lowbit.quantize_array(x, bits=self.pick([2, 4, 8]), group_size=self.pick([None, 32, "tensor"]),
                                     symmetric=self.pick([True, False]))

    def c_pack(self):
        try:
            q = self._weights()
        except ValueError:
            q = self.pick([None, np.zeros((4, 4), np.float32)])
        return f"pack_weights({q!r})", lambda: lowbit.pack_weights(q), lambda pw: None

    def c_matmul(self):
        try:
            q = self._weights()
        except ValueError:
            q = None
        if q is not None and self.rng.random() < 0.5:
            try:
                q = lowbit.pack_weights(q)
            except ValueError:
                pass
        k = q.shape[-1] if q is not None else 64
        n = q.shape[0] if q is not None else 16
        m = self.pick([1, 3, 0, 17])
        x = self.layout(self.floats((m, k) if self.rng.random() < 0.8 else self.pick([(k,), (m, k + 1), (2, 2, k)]),
                                    self.pick(FLOAT_DTYPES)))
        kw = dict(act_bits=self.pick([None, 8, 8, 4, True, 8.0]))
        if self.rng.random() < 0.3:
            kw["bias"] = self.pick([np.zeros(n, np.float32), np.zeros(n + 1, np.float32), np.zeros(n), [0.0] * n])
        if self.rng.random() < 0.2:
            kw["act_scale"] = self.pick([0.1, 0.0, -1.0, np.nan, 1e39, "s"])

        def check(y):
            assert y.shape == (x.shape[:-1] + (n,)), (y.shape, x.shape, n)
            if np.all(np.isfinite(x.astype(np.float32))) and np.all(np.abs(x.astype(np.float32)) < 1e30):
                assert not np.isnan(y).any(), "finite input gave NaN"
        return f"matmul({_desc(x)}, {q!r}, {kw})", lambda: lowbit.matmul(x, q, **kw), check

    def c_forged(self):
        """A QArray or PackedWeights built by hand with one field inconsistent."""
        import dataclasses
        try:
            q = self._weights()
        except ValueError:  # e.g. a group that does not divide K
            q = lowbit.quantize_array(np.ones((16, 64), np.float32), bits=4, group_size=32)
        target = q
        if len(q.shape) == 2 and q.bits in (4, 8) and q.group_size != "tensor" and self.rng.random() < 0.5:
            target = lowbit.pack_weights(q)
        fields = [f.name for f in dataclasses.fields(target)]
        name = self.pick(fields)
        old = getattr(target, name)
        if isinstance(old, np.ndarray):
            new = self.pick([old[:-1] if old.ndim and len(old) > 1 else old[:0], old.astype(np.float64),
                             old.reshape(-1), np.zeros((3, 3), old.dtype), old[..., ::2], None])
        else:
            new = self.pick([None, 0, -1, 3, 7, (1 << 40,), (4, 64), "tensor", 64, 5, True, (0, 0), "float64"])
        op = self.pick(["dequantize", "codes", "matmul", "matmul8", "pack", "repr", "nbytes"])

        def run():
            from lowbit.matmul import dequantize_packed
            forged = dataclasses.replace(target, **{name: new})  # may refuse: that is a clean outcome
            if op == "dequantize":
                return lowbit.dequantize_array(forged) if isinstance(forged, lowbit.QArray) else \
                    dequantize_packed(forged)
            if op == "codes":
                return forged.codes() if isinstance(forged, lowbit.QArray) else None
            if op in ("matmul", "matmul8"):
                k = forged.shape[-1]
                return lowbit.matmul(np.ones((2, k), np.float32), forged, act_bits=8 if op == "matmul8" else None)
            if op == "pack":
                return lowbit.pack_weights(forged)
            return repr(forged) if op == "repr" else forged.nbytes
        return f"{op} on {type(target).__name__} with {name}={_desc(new)}", run, lambda r: None

    def c_threads(self):
        n = self.pick([1, 2, 0, -1, 64, 1 << 40, None, 1.5, np.int64(2), True])
        old = lowbit.get_num_threads()

        def run():
            try:
                lowbit.set_num_threads(n)
                lowbit.quantize_array(np.ones((64, 64), np.float32), bits=4, group_size=32)
            finally:
                lowbit.set_num_threads(old)
        return f"set_num_threads({n!r})", run, lambda r: None

    def c_read_info(self):
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        size = self.pick([0, 3, 8, 100])
        data = bytearray(self.rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
        if size >= 8 and self.rng.random() < 0.5:  # a plausible header length with junk after it
            data[:8] = int(size - 8).to_bytes(8, "little")
        os.write(fd, bytes(data))
        os.close(fd)

        def run():
            try:
                return lowbit.read_info(path)
            finally:
                os.unlink(path)
        return f"read_info(<{size} random bytes>)", run, lambda r: None

    def c_sqnr(self):
        a = self.floats(self.pick([(8,), (0,), ()]))
        b = self.pick([a, a * 0.5, np.zeros(3, np.float32)])
        return f"sqnr_db({_desc(a)}, {_desc(b)})", lambda: lowbit.sqnr_db(a, b), lambda r: float(r)


def _desc(v) -> str:
    if isinstance(v, np.ndarray):
        return f"array({v.dtype}, {v.shape}, strides={v.strides})"
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


def run(seed: int, calls: int, log_path: str) -> int:
    fuzz = Fuzzer(seed)
    findings = 0
    np.seterr(all="ignore")
    with open(log_path, "w") as log:
        for i in range(calls):
            desc, thunk, check = fuzz.call()
            log.seek(0)
            log.write(f"seed {seed} call {i}: {desc}\n")
            log.truncate()
            log.flush()
            try:
                result = thunk()
            except (TypeError, ValueError) as e:
                if len(str(e)) > MAX_MESSAGE or not str(e):
                    findings += 1
                    print(f"FINDING {desc}: {type(e).__name__} message of {len(str(e))} chars: {str(e)[:200]!r}")
                continue
            except Exception as e:  # noqa: BLE001 - anything else is a finding
                findings += 1
                print(f"FINDING {desc}: {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc(limit=3)
                continue
            try:
                check(result)
            except Exception as e:  # noqa: BLE001
                findings += 1
                print(f"FINDING {desc}: bad result: {type(e).__name__} {str(e)[:200]}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
