"""Issue 9/11 (default quality): group sizes that do not divide a layer's inputs,
the error-minimising data-free scale search."""
import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.config import QuantConfig, fit_group
from lowbit.nn import QuantLinear


@pytest.mark.parametrize("k,asked,multiple,want", [
    (576, 128, 8, 96),     # SmolLM2's hidden size: the largest divisor not above 128
    (1536, 128, 8, 128),   # divides: kept
    (576, 64, 8, 64),
    (1000, 128, 8, 200),   # no divisor in [64, 128]: the smallest above, up to 2x
    (776, 128, 8, None),   # 8 x 97: no divisor near 128 -> one scale per row
    (100, 128, 8, None),   # group >= in_features: per row
    (576, 100, 8, 96),     # asked for a non-multiple of the k-step
    (384, 96, 4, 96),
    (4, 128, 4, None),
    (576, None, 8, None),
])
def test_fit_group(k, asked, multiple, want):
    got = fit_group(asked, k, multiple)
    assert got == want
    if got is not None:
        assert k % got == 0 and got % multiple == 0


def test_non_dividing_group_uses_the_nearest_divisor_and_says_so(capfd):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.ReLU(), torch.nn.Linear(192, 776))
    x = torch.randn(3, 576)
    q = lowbit.quantize(copy.deepcopy(model), bits=4, group_size=128, method="rtn", scale_dtype="float32")
    err = capfd.readouterr().err
    assert "group_size=128 does not divide in_features=576: groups of 96 in 1 layer" in err
    assert "in_features=192: groups of 96" in err
    assert q[0].config.group_size == 96 and q[0].config.label == "W4 g96"
    assert q[2].config.group_size == 96  # 192 / 96
    # Per-group numerics, checked against the NumPy reference quantizer at group 96.
    ref = lowbit.quantize_array(model[0].weight.detach().numpy(), bits=4, group_size=96)
    np.testing.assert_array_equal(q[0].dequantized_weight().numpy(), lowbit.dequantize_array(ref))
    with torch.no_grad():
        y = q[0](x)
        expect = x @ torch.from_numpy(lowbit.dequantize_array(ref)).T + model[0].bias
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4)
    table = lowbit.summary(q)
    assert table["layers"][0]["config"] == "W4 g96"


def test_group_with_no_divisor_near_it_is_reported_as_per_row(capfd):
    model = torch.nn.Sequential(torch.nn.Linear(776, 64))
    q = lowbit.quantize(model, bits=4, group_size=128)
    assert q[0].config.group_size is None
    assert "in_features=776: one scale per row" in capfd.readouterr().err


def test_qat_uses_the_same_fitted_group():
    model = torch.nn.Sequential(torch.nn.Linear(576, 64))
    m = lowbit.prepare_qat(model, bits=4, group_size=128)
    fq = [mod for mod in m.modules() if hasattr(mod, "group_size")]
    assert fq and all(mod.group_size == 96 for mod in fq)
    c = lowbit.convert(m)
    assert c[0].config.group_size == 96


def test_fitted_group_round_trips_through_storage(tmp_path):
    torch.manual_seed(1)
    q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(576, 80)), bits=4, group_size=128, progress=False)
    path = tmp_path / "m.safetensors"
    lowbit.save(q, path)
    back = lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(576, 80)))
    x = torch.randn(2, 576)
    assert back[0].config.group_size == 96
    assert torch.equal(back[0](x), q[0](x))


# ---------------------------------------------------------------------------
# method="mse" at model level (the kernel and array tests: test_scale_search.py)

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantize_method_mse_lowers_the_output_error(bits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    x = torch.randn(64, 256)
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for method in ("rtn", "mse"):
            # Evenly spaced codes for both (mse alone would put int4 on a level table).
            q = lowbit.quantize(copy.deepcopy(model), bits=bits, group_size=64, method=method, progress=False,
                                levels=None)
            assert isinstance(q[0], QuantLinear) and q[0].config.group_size == 64
            errs[method] = float(((q(x) - ref) ** 2).mean())
    assert errs["mse"] < errs["rtn"]


def test_method_mse_needs_no_data_and_saves(tmp_path):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    q = lowbit.quantize(model, bits=4, group_size=32, method="mse", progress=False)
    path = tmp_path / "m.safetensors"
    lowbit.save(q, path)
    back = lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(128, 64)))
    x = torch.randn(3, 128)
    assert torch.equal(back(x), q(x))


# ---------------------------------------------------------------------------
# Data-free mixed precision: a bits budget without calibration data

@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_data_free_budget(method):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(6)]
    with torch.no_grad():  # two layers with outliers: the weight error is where int8 pays
        layers[1].weight[:, :4] *= 40
        layers[4].weight[:8] *= 25
    model = torch.nn.Sequential(*layers)
    x = torch.randn(32, 256)
    with torch.no_grad():
        ref = model(x)
    q4 = lowbit.quantize(copy.deepcopy(model), bits=4, group_size=64, method=method, progress=False)
    # int4 g64 costs 4.5 b/w, int8 per row 8.125: 5.2 pays for one int8 layer of six
    mixed = lowbit.quantize(copy.deepcopy(model), bits=5.2, group_size=64, method=method, progress=False)
    s = lowbit.summary(mixed)
    assert s["bits_per_weight"] <= 5.2 + 1e-9
    bits = [m.config.bits for m in mixed if isinstance(m, QuantLinear)]
    assert bits.count(8) == 1 and bits[1] == 8  # the layer with input-channel outliers
    with torch.no_grad():
        assert float(((mixed(x) - ref) ** 2).mean()) < float(((q4(x) - ref) ** 2).mean())
