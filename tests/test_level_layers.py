"""Layers on level tables (formats.h "level tables"): lowbit.quantize(levels=...),
the autograd op, save/load, fused projections and bad settings."""
import copy
import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit.levels import level_table

T5 = level_table("t5")


def test_level_layers_end_to_end(tmp_path, rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = model(x)
    lowbit.quantize(model, bits=4, levels="t5", progress=False)
    layer = model[0]
    assert layer.config.levels == "t5" and torch.equal(layer.levels, torch.from_numpy(T5))
    assert "t5-levels" in layer.config.label
    with torch.no_grad():
        got = model(x)
        ref_out = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(model[0](x), ref_out, rtol=1e-4, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    # The autograd path (torch.ops.lowbit.linear) computes the same.
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    torch.testing.assert_close(y.detach(), got, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    path = os.path.join(tmp_path, "m.safetensors")
    lowbit.save(model, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    loaded = lowbit.load(path, fresh)
    assert loaded[0].config.levels == "t5"
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


def test_level_layers_fuse(rng):
    from lowbit.nn.fused import fuse_projections

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(128, 64, bias=False) for _ in range(3))

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)

    torch.manual_seed(1)
    m = lowbit.quantize(Attn(), bits=4, levels="t5", progress=False)
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = m(x)
        assert fuse_projections(m)
        torch.testing.assert_close(m(x), want, rtol=0, atol=0)


def test_level_settings_bad_input():
    with pytest.raises(ValueError, match="levels must be one of"):
        lowbit.QuantConfig(levels="t7")
    with pytest.raises(ValueError, match="symmetric int4"):
        lowbit.QuantConfig(bits=8, levels="t5")
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="needs bits=4"):
        lowbit.quantize(lin, bits=8, levels="t5", progress=False)
    with pytest.raises(ValueError, match="levels must be 'auto', None or one of"):
        lowbit.quantize(lin, bits=4, levels="nf4", progress=False)


def test_gptq_on_the_level_table(tmp_path):
    """GPTQ's default int4 codes are on t5 (levels="auto"); the layer stores the
    table, runs it in the kernels, saves and loads; on correlated inputs it
    beats GPTQ on even codes and the data-free level search."""
    from lowbit.nn import QuantLinear
    torch.manual_seed(0)
    k = 256
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k))
    def inputs(n, seed):
        return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix) * scale
    model = torch.nn.Sequential(torch.nn.Linear(k, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():  # heavy-tailed weights, as trained ones are (t5's fit; uniform ones favour even codes)
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.distributions.StudentT(5.0).sample(layer.weight.shape) * 0.05)
    data = [inputs(256, i) for i in range(8)]
    x = inputs(512, 100)
    with torch.no_grad():
        want = model(x)
    def err(m):
        with torch.no_grad():
            return float((m(x) - want).pow(2).mean() / want.pow(2).mean())
    quantize = lambda **kw: lowbit.quantize(copy.deepcopy(model), bits=4, progress=False,
                                            include=lambda n, mod: True, **kw)
    lv = quantize(method="gptq", calibration_data=data)
    assert all(isinstance(m, QuantLinear) and m.config.levels == "t5" for m in (lv[0], lv[2]))
    assert np.array_equal(lv[0].levels.numpy(), lowbit.levels.level_table("t5"))
    even = quantize(method="gptq", calibration_data=data, levels=None)
    assert even[0].config.levels is None
    free = quantize()  # data-free on t5
    e_lv, e_even, e_free = err(lv), err(even), err(free)
    print(f"\nrelative output error: gptq t5 {e_lv:.5f}, gptq even {e_even:.5f}, data-free t5 {e_free:.5f}")
    assert e_lv < e_even and e_lv < 0.8 * e_free
    # The kernels compute with the table's dequantized weight.
    with torch.no_grad():
        torch.testing.assert_close(lv[0](x), x @ lv[0].dequantized_weight().T + lv[0].bias, rtol=1e-4,
                                   atol=1e-3 * float(want.abs().max()))
    path = tmp_path / "gptq_t5.safetensors"
    lowbit.save(lv, path)
    loaded = lowbit.load(path, copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), lv(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="symmetric codes and method"):
        quantize(method="gptq", calibration_data=data, levels="t5", symmetric=False)
    with pytest.raises(ValueError, match="needs bits=4"):
        quantize(method="awq", calibration_data=data, levels="t5")


def test_budgets_plan_int4_layers_on_the_level_table():
    """A bits budget with levels="t5" plans int4 candidates on the table: the
    planner compares the weights a level layer really holds (level_weights
    equals the layer's dequantized weight), and its int4 layers carry the
    table; levels="auto" keeps a budget on even codes."""
    from lowbit.calibrate.weights import level_weights
    from lowbit.nn import QuantLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(5.0).sample(lin.weight.shape) * 0.05)
    for scale_dtype in ("int8", "float16"):
        layer = QuantLinear.from_linear(lin, lowbit.QuantConfig(4, 32, levels="t5", scale_dtype=scale_dtype),
                                        method="mse")
        want = layer.dequantized_weight().numpy()
        got = level_weights(lin.weight, 32, T5, scale_dtype=scale_dtype)
        np.testing.assert_array_equal(got, want)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(4)])
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.distributions.StudentT(5.0).sample(m.weight.shape) * 0.05)
    every = lambda n, mod: True
    planned = lowbit.quantize(copy.deepcopy(model), bits=4.6, progress=False, include=every, levels="t5")
    int4 = [m for m in planned if m.config.bits == 4]
    assert int4 and all(m.config.levels == "t5" for m in int4)
    assert lowbit.summary(planned)["bits_per_weight"] <= 4.6 + 1e-6
    even = lowbit.quantize(copy.deepcopy(model), bits=4.6, progress=False, include=every)
    assert all(m.config.levels is None for m in even)
    x = torch.randn(256, 128)
    with torch.no_grad():
        ref = model(x)
        err = [float((q(x) - ref).pow(2).mean() / ref.pow(2).mean()) for q in (planned, even)]
    assert err[0] < err[1], err
