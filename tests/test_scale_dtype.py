"""Narrow scales (formats.h "scale dtype": float16, int8 codes with row scales):
quantize_array rounds the scales before choosing codes, every layer type and
method stores them in fewer bytes, the files and folders that hold them load back
bit for bit, and the defaults (int4 g16 int8 codes, method "auto") hold."""
import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit import reference as ref
from lowbit.calibrate import weights as W
from lowbit.config import QuantConfig
from lowbit.matmul import dequantize_packed
from lowbit.nn import QuantLinear


def _weights(rng, n=48, k=256):
    # Rows of very different magnitude: scales from 1e-4 to 1e2.
    return (rng.standard_normal((n, k)) * np.exp(rng.uniform(-7, 5, (n, 1)))).astype(np.float32)


@pytest.mark.parametrize("scale_dtype", ["float16", "int8"])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, True), (4, 64, False), (8, None, True),
                                            (2, 32, True), (8, "tensor", False)])
def test_quantize_array_matches_its_spec(target, rng, bits, group, sym, scale_dtype):
    w = _weights(rng)
    q = lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    packed, scales, zps = ref.quantize(w, bits, group, sym, scale_dtype=scale_dtype)
    np.testing.assert_array_equal(q.scales.reshape(-1), scales.reshape(-1))
    np.testing.assert_array_equal(q.packed, packed)
    if not sym:
        np.testing.assert_array_equal(q.zero_points.reshape(-1), zps.reshape(-1))
    if scale_dtype == "float16":
        assert np.array_equal(q.scales, q.scales.astype(np.float16).astype(np.float32))  # representable
    if not sym:  # the codes are the nearest under the stored scales: requantizing with them changes nothing
        again = lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=sym, scale=q.scales,
                                      zero_point=q.zero_points)
        np.testing.assert_array_equal(again.packed, q.packed)


@pytest.mark.parametrize("scale_dtype,slack", [("float16", 1.01), ("int8", 1.05)])
def test_narrow_scale_error_is_close_to_float32(rng, scale_dtype, slack):
    # Rows of one magnitude (LLM-like): a float16 scale moves by <= 2^-11, an int8
    # code by <= 1/254 of the row's largest scale.
    w = rng.standard_normal((64, 512)).astype(np.float32)
    for method in ("rtn", "mse"):
        e32 = np.square(lowbit.quantize_array(w, bits=4, group_size=16, method=method).dequantize() - w).sum()
        en = np.square(lowbit.quantize_array(w, bits=4, group_size=16, method=method,
                                             scale_dtype=scale_dtype).dequantize() - w).sum()
        assert en <= slack * e32


def test_extreme_scales(rng):
    w = rng.standard_normal((4, 64)).astype(np.float32)
    tiny = w * 1e-9                                 # range-rule scales below float16's smallest step
    q = lowbit.quantize_array(tiny, bits=4, group_size=32, scale_dtype="float16")
    assert np.all(np.abs(q.scales) == np.float32(2.0 ** -24))
    assert np.abs(q.dequantize() - tiny).max() <= 8 * 2.0 ** -24
    zero = np.zeros((2, 64), np.float32)
    assert np.all(lowbit.quantize_array(zero, bits=4, group_size=32, scale_dtype="float16").scales == 0)
    with pytest.raises(ValueError, match="float16"):
        lowbit.quantize_array(w * 1e6, bits=4, group_size=32, scale_dtype="float16")
    with pytest.raises(ValueError, match="scale_dtype"):
        lowbit.quantize_array(w, bits=4, scale_dtype="half")
    out = lowbit.quantize_array(w, bits=4, group_size=32)
    lowbit.quantize_array(w * 2, bits=4, group_size=32, scale_dtype="float16", out=out)
    np.testing.assert_array_equal(out.packed, lowbit.quantize_array(w * 2, bits=4, group_size=32,
                                                                    scale_dtype="float16").packed)


def test_config_and_layer(rng):
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantConfig(4, 32, scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="2-bit"):
        QuantConfig(2, 32, scale_dtype="float16")
    lin = torch.nn.Linear(512, 96)
    q16 = QuantLinear.from_linear(lin, QuantConfig(4, 32, scale_dtype="float16"))
    q32 = QuantLinear.from_linear(lin, QuantConfig(4, 32))
    assert q16.scales.dtype == torch.float16 and "f16-scales" in q16.config.label
    assert q16.nbytes - lin.bias.numel() * 4 == 96 * 512 * 4.5 / 8
    assert q32.nbytes - q16.nbytes == q16.scales.numel() * 2
    x = torch.randn(5, 512)
    expect = x @ q16.dequantized_weight().T + lin.bias
    torch.testing.assert_close(q16(x), expect, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(q16(x), q32(x), rtol=0.02, atol=0.02 * float(q32(x).abs().max()))
    x.requires_grad_(True)
    q16(x).sum().backward()                          # the input gradient reads float16 scales too
    torch.testing.assert_close(x.grad, q16.dequantized_weight().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256),
                               torch.nn.GELU(), torch.nn.Linear(256, 128))


@pytest.mark.parametrize("scale_dtype,group", [("float16", 32), ("int8", 16)])
@pytest.mark.parametrize("method", ["rtn", "mse", "gptq", "awq"])
def test_every_method_stores_the_scales_it_chose_codes_for(method, scale_dtype, group, monkeypatch):
    model = _mlp()
    data = [torch.randn(16, 256) for _ in range(4)]
    kw = dict(calibration_data=data) if method in ("gptq", "awq") else {}
    made = {}  # the algorithm's own output, before it becomes tiles
    real = QuantLinear.from_quantized.__func__
    monkeypatch.setattr(QuantLinear, "from_quantized", classmethod(
        lambda cls, q, *a, **k: made.setdefault(id(q), (q, real(cls, q, *a, **k)))[1]))
    lowbit.quantize(model, bits=4, group_size=group, method=method, scale_dtype=scale_dtype, progress=False, **kw)
    s = lowbit.summary(model)
    assert all(("f16-scales" if scale_dtype == "float16" else "int8-scales") in r["config"] for r in s["layers"])
    layers = [m for m in model if isinstance(m, QuantLinear)]
    extra = sum(32 * m.in_features for m in layers if m.input_scale is not None)  # AWQ: + input scales
    extra += sum(8 * m.levels.numel() for m in layers if m.levels is not None)  # data-free int4: the level table
    scale_bits = {"float16": 16 / group, "int8": None}[scale_dtype]
    weights = sum(m.in_features * m.out_features for m in layers)
    if scale_bits is None:
        scale_bits = sum(m.out_features * (8 * m.in_features / group + 32) for m in layers) / weights
    assert s["bits_per_weight"] == pytest.approx(4 + scale_bits + extra / weights)
    for mod in layers:
        assert mod.scales.dtype == getattr(torch, scale_dtype)
    # Calibrated layers: the tiles hold exactly what the algorithm computed
    # (its codes were chosen under the rounded scales; packing loses nothing).
    for q, mod in made.values():
        w = q.dequantize()
        got = torch.from_numpy(dequantize_packed(mod.packed()))  # without AWQ's input scale
        assert torch.equal(got, w)
    assert bool(made) == (method in ("gptq", "awq"))


def test_calibrated_weights_round_before_coding():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    x = torch.randn(256, 128)
    h = x.T @ x / x.shape[0]
    for q in (W.rtn(w, 4, 32, scale_dtype="float16"), W.gptq(w, h, 4, 32, scale_dtype="float16"),
              W.mse(w, 4, 32, scale_dtype="float16")):
        assert torch.equal(q.scales, q.scales.half().float())
    for q in (W.rtn(w, 4, 16, scale_dtype="int8"), W.gptq(w, h, 4, 16, scale_dtype="int8"),
              W.mse(w, 4, 16, scale_dtype="int8")):  # already in the int8 format: rounding again changes nothing
        assert torch.equal(q.scales, torch.from_numpy(ref.round_scales_int8(q.scales.numpy())))
    # RTN under the rounded scales is exactly the nearest code.
    q = W.rtn(w, 4, 32, scale_dtype="float16")
    wg = w.reshape(32, 4, 32)
    codes = torch.clamp(torch.round(wg / q.scales[..., None]), -8, 7).to(torch.int32)
    assert torch.equal(q.codes.reshape(32, 4, 32), codes)


def test_budget_counts_float16_scales(rng):
    model = _mlp()
    lowbit.quantize(model, bits=5.0, group_size=32, scale_dtype="float16", progress=False)
    s = lowbit.summary(model)
    assert 4.5 < s["bits_per_weight"] <= 5.0 + 1e-9
    assert any("W8" in r["config"] for r in s["layers"])  # 4.5 b/w at int4 leaves room for int8 somewhere


@pytest.mark.parametrize("scale_dtype", ["float16", "int8"])
def test_save_load_and_stream_round_trip(tmp_path, scale_dtype):
    model = _mlp()
    lowbit.quantize(model, bits=4, group_size=16, scale_dtype=scale_dtype, progress=False)
    x = torch.randn(3, 256)
    expect = model(x)
    path = tmp_path / "m.safetensors"
    lowbit.save(model, path)
    for stream in (False, True):
        again = lowbit.load(path, _mlp(), stream=stream)
        assert again[0].scales.dtype == getattr(torch, scale_dtype)
        assert torch.equal(again(x), expect)
    info = lowbit.io.read_info(path)
    assert info.linear_layers["0"]["scale_dtype"] == scale_dtype
    assert info.tensors["0.scales"].dtype == {"float16": "F16", "int8": "I8"}[scale_dtype]
    # The 64-byte-multiple tensors come first, so each starts aligned.
    assert all(t.begin % 64 == 0 for n, t in info.tensors.items() if n.endswith((".data", ".row_scales")))


def test_a_budget_between_int4_formats_mixes_them_without_int2():
    # Default g16 int8 codes cost 4 + 0.5 + 32 / K; a 4.4 budget sits between that
    # and g64 (4.125 + 32 / K): int4 at two or more of the budget's groups (g64,
    # g16, g8: here g64 and g8 win over g16), never int2.
    model = _mlp()
    lowbit.quantize(model, bits=4.4, progress=False)
    s = lowbit.summary(model)
    configs = {r["config"] for r in s["layers"]}
    assert s["bits_per_weight"] <= 4.4 + 1e-9
    assert not any(c.startswith("W2") for c in configs), configs
    assert "W4 g64 int8-scales" in configs and len(configs) >= 2, configs
    assert configs <= {"W4 g64 int8-scales", "W4 g16 int8-scales", "W4 g8 int8-scales"}, configs


def test_default_method_is_mse_for_int4_and_rtn_for_int8():
    model = _mlp()
    for bits, method in ((4, "mse"), (8, "rtn")):
        q = lowbit.quantize(copy.deepcopy(model), bits=bits, progress=False)
        for i in (0, 2, 4):
            expect = QuantLinear.from_linear(model[i], QuantConfig(bits, 16, scale_dtype="int8",
                                                                   levels="t5" if bits == 4 else None), method=method)
            assert torch.equal(q[i].dequantized_weight(), expect.dequantized_weight()), (bits, i)
    other = QuantLinear.from_linear(model[0], QuantConfig(4, 16, scale_dtype="int8"), method="rtn")
    assert not torch.equal(other.dequantized_weight(), lowbit.quantize(copy.deepcopy(model), bits=4,
                                                                       progress=False)[0].dequantized_weight())
