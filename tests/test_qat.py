"""QAT: the learnable fake-quant op vs torch, FakeQuantize / QATLinear,
prepare_qat / convert (same codes and scales), compile, state dicts, digits."""
import copy

import pytest
import torch

import lowbit
from lowbit.nn import FakeQuantize, QATLinear, QuantLinear

from _digits import accuracy, load, mlp, train


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 255), (-2, 1)])
def test_lsq_gradients_match_torch(axis, qrange):
    torch.manual_seed(0)
    x = torch.randn(24, 40) * 2
    # Saturating values (torch's learnable ops turn +inf into "below range" through an
    # int64 conversion; lowbit saturates it consistently, so infinities are left out).
    x[0, :4] = torch.tensor([3e4, -3e4, 1e6, -1e6])
    c = 1 if axis is None else x.shape[axis]
    s0, z0 = torch.rand(c) * 0.2 + 0.02, torch.rand(c) * 5 - 2.5 + (qrange[0] + qrange[1]) / 2
    dy = torch.randn_like(x)
    results = []
    for impl in ("torch", "lowbit"):
        xs, s, z = x.clone().requires_grad_(), s0.clone().requires_grad_(), z0.clone().requires_grad_()
        if impl == "lowbit":
            y = lowbit.fake_quantize(xs, s, z, *qrange, axis, grad_factor=0.3)
        elif axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(xs, s, z, *qrange, 0.3)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(xs, s, z, axis, *qrange, 0.3)
        y.backward(dy)
        results.append((y.detach(), xs.grad, s.grad, z.grad))
    (y1, dx1, ds1, dz1), (y2, dx2, ds2, dz2) = results
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    torch.testing.assert_close(ds2, ds1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz2, dz1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x = torch.randn(8, 33).to(dtype)
    y = lowbit.fake_quantize(x, 0.05, 3, -8, 7)
    ref = torch.fake_quantize_per_tensor_affine(x.float(), 0.05, 3, -8, 7).to(dtype)
    assert y.dtype == dtype and torch.equal(y, ref)


def test_group_wise_fake_quantize_matches_reference():
    x = torch.randn(4, 64)
    scales = torch.rand(16) + 0.05
    y = lowbit.fake_quantize(x, scales, torch.zeros(16, dtype=torch.int32), -8, 7, group_size=16)
    ref = torch.fake_quantize_per_channel_affine(x.reshape(16, 16), scales, torch.zeros(16, dtype=torch.int32),
                                                 0, -8, 7).reshape(4, 64)
    assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="not both"):
        lowbit.fake_quantize(x, scales, 0, -8, 7, axis=0, group_size=16)


def test_fake_quantize_module_switches():
    fq = FakeQuantize(8, "activation")
    x = torch.linspace(-2, 2, 101)
    y = fq(x)
    assert float(fq.scale) == pytest.approx(2 / 127) and not torch.equal(y, x)
    fq.enable_observer(False)
    fq(x * 10)
    assert float(fq.scale) == pytest.approx(2 / 127)   # frozen
    fq.enable_fake_quant(False)
    assert torch.equal(fq(x), x)
    with pytest.raises(ValueError, match="mode"):
        FakeQuantize(4, "sometimes")
    w = FakeQuantize(4, "weight", group_size=16)
    wt = torch.randn(8, 64)
    q = lowbit.quantize_array(wt.numpy(), bits=4, group_size=16)
    assert torch.equal(w(wt), torch.from_numpy(q.dequantize()))   # the same rule as lowbit.quantize


@pytest.mark.parametrize("acts", [None, 8])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, None), (2, 32)])
def test_convert_keeps_codes_and_scales(acts, bits, group):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    lowbit.prepare_qat(m, bits=bits, group_size=group, activations=acts, include=lambda n, mod: True)
    assert isinstance(m[0], QATLinear)
    train_steps(m, 3)
    x = torch.randn(16, 128)
    with torch.no_grad():
        y_qat = m(x)
        w_qat = [m[i].weight_fake_quant(m[i].weight) for i in (0, 2)]
    lowbit.convert(m)
    assert isinstance(m[0], QuantLinear)
    with torch.no_grad():
        y_int = m(x)
    for i, w in zip((0, 2), w_qat):
        assert torch.equal(m[i].dequantized_weight(), w)         # same codes x same scales
    if acts is None:
        assert torch.equal(y_int, y_qat)                          # weight-only: bit-identical here
    else:
        # W8A8: exact integer dot products, then float scales in another order.
        assert float((y_int - y_qat).abs().max()) <= 1e-5 * float(y_qat.abs().max()) + 1e-6


def train_steps(m, steps):
    opt = torch.optim.SGD(m.parameters(), 0.05)
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(8, m[0].in_features)).pow(2).mean().backward()
        opt.step()


def test_learnable_scales_train_and_state_dicts_round_trip(tmp_path):
    torch.manual_seed(0)
    m = lowbit.prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 64)), bits=4, group_size=16, learnable=True,
                           include=lambda n, mod: True)
    before = None
    for step in range(3):
        m(torch.randn(4, 64))  # initialise the scales on first call
        if before is None:
            before = m[0].weight_fake_quant.scale.detach().clone()
        train_steps(m, 1)
    assert m[0].weight_fake_quant.scale.grad is not None
    assert not torch.equal(before, m[0].weight_fake_quant.scale.detach())
    torch.save(m.state_dict(), tmp_path / "qat.pt")
    fresh = lowbit.prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 64)), bits=4, group_size=16, learnable=True,
                               include=lambda n, mod: True)
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_compiled_training_step_runs():
    torch.manual_seed(0)
    m = lowbit.prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)),
                           bits=4, group_size=16, activations=8, include=lambda n, mod: True)
    opt = torch.optim.Adam(m.parameters(), 1e-3)

    @torch.compile
    def step(x, y):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    x, y = torch.randn(16, 64), torch.randint(0, 8, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        losses.append(float(step(x, y)))
        opt.step()
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="digits ships with scikit-learn")
    x, y, tr, te = load()
    model = train(mlp(), x, y, tr, epochs=30)
    return model, x, y, tr, te


def test_digits_qat_beats_ptq(digits):
    model, x, y, tr, te = digits
    fp32 = accuracy(model, x[te], y[te])
    every = dict(include=lambda n, mod: True)
    table = {"fp32": fp32}
    for bits in (4, 2):
        ptq = lowbit.quantize(copy.deepcopy(model), bits=bits, group_size=32, progress=False, **every)
        table[f"PTQ {bits}"] = accuracy(ptq, x[te], y[te])
        for learnable in (False, True):
            qat = lowbit.prepare_qat(copy.deepcopy(model), bits=bits, group_size=32, learnable=learnable, **every)
            train(qat, x, y, tr, epochs=6, lr=1e-3)
            lowbit.convert(qat)
            table[f"QAT {bits}{' learnable' if learnable else ''}"] = accuracy(qat, x[te], y[te])
    print("\ndigits: " + ", ".join(f"{k} {v:.1f}%" for k, v in table.items()))
    assert table["QAT 2"] > table["PTQ 2"] and table["QAT 2 learnable"] > table["PTQ 2"]
    assert table["QAT 4"] >= fp32 - 1.5 and table["QAT 4 learnable"] >= fp32 - 1.5
