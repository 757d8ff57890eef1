"""The PyTorch layer: ops (opcheck on every op), QuantLinear, lowbit.quantize,
torch.compile / torch.export, thread safety, gradients."""
import copy
import threading

import numpy as np
import pytest
import torch

import lowbit
from lowbit import reference as ref
from lowbit.nn import QuantLinear

torch.manual_seed(0)


def linear_args(n=48, k=64, bits=4, group=32, sym=True, act_bits=0, bias=True, x_shape=(3, 64)):
    w = torch.randn(n, k)
    lin = torch.nn.Linear(k, n, bias=bias)
    lin.weight.data = w
    q = QuantLinear.from_linear(lin, lowbit.QuantConfig(bits, group, sym, act_bits or None))
    x = torch.randn(*x_shape)
    return (x, q.data, q.scales, q.offsets, q.bias, n, k, bits, q.config.group_size or 0, act_bits)


def op_samples():
    """(op, args) covering contiguous, strided, empty and varied-shape inputs."""
    x = torch.randn(6, 64)
    yield "quantize", (x, 4, 32, True)
    yield "quantize", (x[:, ::2], 8, 0, False)                     # strided
    yield "quantize", (torch.randn(2, 3, 64).to(torch.bfloat16), 4, 16, True)
    yield "quantize", (torch.empty(0, 64), 4, 32, True)            # empty
    p, s, z = torch.ops.lowbit.quantize(x, 4, 32, False)
    yield "dequantize", (p, s, z, 64, 4, 32, False, torch.float32)
    p, s, z = torch.ops.lowbit.quantize(x, 8, 0, True)
    yield "dequantize", (p, s, z, 64, 8, 0, True, torch.bfloat16)
    yield "dequantize", (p[:0], s[:0], z, 64, 8, 0, True, torch.float32)
    yield "linear", linear_args()
    yield "linear", linear_args(bits=8, group=None, act_bits=8, x_shape=(2, 5, 64))
    yield "linear", linear_args(sym=False, bias=False, x_shape=(0, 64))
    a = list(linear_args(x_shape=(4, 128)))
    a[0] = a[0][:, ::2]                                                 # strided activations
    yield "linear", tuple(a)
    g = torch.randn(3, 48)
    _, d, s, o, _, n, k, bits, gs, _ = linear_args()
    yield "linear_grad_input", (g, d, s, o, n, k, bits, gs)
    yield "fake_quantize", (torch.randn(5, 7), torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), -8, 7, None)
    yield "fake_quantize", (torch.randn(4, 6).t(), torch.rand(6) + 0.05, torch.zeros(6, dtype=torch.int32), 0, 15, 0)
    yield "fake_quantize", (torch.empty(0, 3), torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), -8, 7, None)
    xg = torch.randn(5, 7)
    yield "fake_quantize_grad", (torch.randn(5, 7), xg, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), -8, 7, None)
    yield "fake_quantize", (torch.randn(3, 64), torch.rand(6) + 0.05, torch.zeros(6, dtype=torch.int32), -8, 7, None, 32)
    yield "linear", linear_args(bits=8, group=None, act_bits=8) + (0.02,)            # static activation scale
    yield "fake_quantize_learnable", (torch.randn(5, 7, requires_grad=True), torch.tensor([0.1], requires_grad=True),
                                      torch.tensor([0.4], requires_grad=True), -8, 7, None, 0, 0.5)
    yield "fake_quantize_learnable", (torch.randn(4, 6, requires_grad=True), (torch.rand(4) + 0.05).requires_grad_(),
                                      torch.zeros(4, requires_grad=True), 0, 15, 0, 0, 1.0)
    yield "fake_quantize_learnable_grad", (torch.randn(2, 32), torch.randn(2, 32), torch.rand(4) + 0.05,
                                           torch.zeros(4), -8, 7, None, 16, 1.0)


SAMPLES = list(op_samples())


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAMPLES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.lowbit, name).default, args)


def test_every_op_is_checked():
    import lowbit.ops  # noqa: F401
    registered = {name for name in dir(torch.ops.lowbit) if not name.startswith("_")
                  and isinstance(getattr(torch.ops.lowbit, name), torch._ops.OpOverloadPacket)}
    assert registered == {n for n, _ in SAMPLES}


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, 0), (4, 128, False, 0), (8, None, True, 8),
                                                (4, 128, True, 8)])
def test_quant_linear_matches_reference(bits, group, sym, act):
    k, n = 256, 40
    lin = torch.nn.Linear(k, n)
    ql = QuantLinear.from_linear(lin, lowbit.QuantConfig(bits, group, sym, act or None))
    x = torch.randn(7, k)
    y = ql(x)
    q = lowbit.quantize_array(lin.weight.detach().numpy(), bits=bits, group_size=group, symmetric=sym)
    r, bound = ref.matmul(x.numpy(), q.codes(), q.scales, q.zero_points, group, act or None)
    r = r + lin.bias.detach().numpy().astype(np.float64)
    assert np.all(np.abs(y.detach().numpy() - r) <= bound + 1e-6)
    np.testing.assert_allclose(ql.dequantized_weight().numpy(), lowbit.dequantize_array(q), rtol=0, atol=0)


def test_bf16_model_and_input_gradient():
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    ql = QuantLinear.from_linear(lin, lowbit.QuantConfig(8, None))
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = ql(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 32)
    xf = torch.randn(4, 64, requires_grad=True)
    qf = QuantLinear.from_linear(torch.nn.Linear(64, 32), lowbit.QuantConfig(4, 32))
    qf(xf).square().sum().backward()
    w = qf.dequantized_weight()
    expect = 2 * (xf.detach() @ w.T + qf.bias.detach()) @ w
    torch.testing.assert_close(xf.grad, expect, rtol=1e-4, atol=1e-4)
    assert qf.bias.grad is not None


def test_quantize_model_selection_and_summary(capsys):
    m = torch.nn.Sequential()
    m.add_module("fc1", torch.nn.Linear(256, 512))
    m.add_module("act", torch.nn.ReLU())
    m.add_module("fc2", torch.nn.Linear(512, 256))
    m.add_module("tiny", torch.nn.Linear(256, 8))
    m.add_module("classifier", torch.nn.Linear(8, 1000))
    x = torch.randn(5, 256)
    ref_out = m(x)
    lowbit.quantize(m, bits=8, group_size=None)
    assert isinstance(m.fc1, QuantLinear) and isinstance(m.fc2, QuantLinear)
    assert type(m.tiny) is torch.nn.Linear and type(m.classifier) is torch.nn.Linear
    assert "classifier (output head)" in capsys.readouterr().err
    torch.testing.assert_close(m(x), ref_out, rtol=0.05, atol=0.05)
    s = lowbit.summary(m)
    assert [r["name"] for r in s["layers"]] == ["fc1", "fc2"]
    assert 8.0 < s["bits_per_weight"] < 8.2
    m2 = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    lowbit.quantize(m2, include=r"^1$", progress=False)
    assert type(m2[0]) is torch.nn.Linear and isinstance(m2[1], QuantLinear)
    with pytest.raises(ValueError, match="method"):
        lowbit.quantize(m2, method="gptq-xl")
    with pytest.raises(ValueError, match="bits"):
        lowbit.quantize(torch.nn.Linear(128, 128), bits=5)


def test_compile_fullgraph_and_export():
    # ReLU, not GELU: inductor fuses GELU with other rounding; lowbit ops must match exactly.
    m = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    lowbit.quantize(m, bits=4, group_size=64, activations=8, progress=False)
    x = torch.randn(4, 128)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), eager, rtol=0, atol=0)


def test_threads_share_one_model():
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    lowbit.quantize(m, bits=4, activations=8, progress=False)
    xs = [torch.randn(3, 256) for _ in range(8)]
    expect = [m(x) for x in xs]
    got = [None] * 8

    def work(i):
        for _ in range(20):
            got[i] = m(xs[i])

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_fake_quantize_matches_torch():
    x = torch.randn(64, 33) * 3
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), 1e30, -1e30])
    x.requires_grad_(True)
    y = lowbit.fake_quantize(x, 0.05, 3, 0, 255)
    y.sum().backward()
    xt = x.detach().clone().requires_grad_(True)
    yt = torch.fake_quantize_per_tensor_affine(xt, 0.05, 3, 0, 255)
    yt.sum().backward()
    torch.testing.assert_close(y, yt, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xt.grad, rtol=0, atol=0)


def test_module_imports_do_not_shadow_api_functions():
    import importlib
    for name in ("api", "matmul", "ops", "torch_api", "config", "nn"):
        importlib.import_module(f"lowbit.{name}")
    assert callable(lowbit.quantize) and callable(lowbit.matmul) and callable(lowbit.summary)


def test_numpy_layer_works_without_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, lowbit\n"
            "q = lowbit.quantize_array(np.ones((16, 32), np.float32), bits=4, group_size=32)\n"
            "assert lowbit.matmul(np.ones((1, 32), np.float32), lowbit.pack_weights(q)).shape == (1, 16)\n"
            "try:\n    lowbit.quantize\nexcept ImportError as e:\n    print('IMPORT_ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "IMPORT_ERROR lowbit.quantize needs PyTorch" in out.stdout


def test_state_dict_loads_into_a_fresh_quant_linear():
    from lowbit.config import QuantConfig
    for cfg in (QuantConfig(4, 32), QuantConfig(8, None, False, 8)):
        src = QuantLinear.from_linear(torch.nn.Linear(64, 40), cfg)
        fresh = QuantLinear(64, 40, True, cfg)
        fresh.load_state_dict(src.state_dict())
        x = torch.randn(3, 64)
        assert torch.equal(fresh(x), src(x))
    wrong = QuantLinear(64, 100, True, QuantConfig(4, 32))
    with pytest.raises(ValueError, match="expected"):
        wrong.load_state_dict(QuantLinear.from_linear(torch.nn.Linear(64, 40), QuantConfig(4, 32)).state_dict())


def test_quant_embedding():
    from lowbit.nn import QuantEmbedding
    emb = torch.nn.Embedding(300, 96)
    for bits, group, sym in [(8, None, True), (4, 32, False)]:
        q = QuantEmbedding.from_embedding(emb, bits, group, sym)
        ids = torch.randint(0, 300, (4, 5))
        ref = lowbit.dequantize_array(lowbit.quantize_array(emb.weight.detach().numpy(), bits=bits,
                                                            group_size=group, symmetric=sym))
        assert torch.equal(q(ids), torch.from_numpy(ref)[ids])
        assert torch.equal(torch.compile(q, fullgraph=True)(ids), q(ids))
    # A table tied to an output head stays float (quantizing it would store it twice).
    head = torch.nn.Linear(96, 300, bias=False)
    head.weight = emb.weight
    m = torch.nn.Sequential(emb, head)
    lowbit.quantize(m, bits=8, embeddings=8, progress=False, exclude="^1$")
    assert type(m[0]) is torch.nn.Embedding
    with pytest.raises(ValueError, match="embeddings"):
        lowbit.quantize(torch.nn.Sequential(torch.nn.Embedding(300, 96)), embeddings=3, progress=False)


def test_int3_layers_hold_3_bits_and_compute_as_int4_tiles_of_the_same_codes(tmp_path):
    # lowbit.quantize(bits=3) stores int3 tiles (formats.h): the same codes in
    # int4 tiles (QuantConfig(4, code_bits=3), the layout files before int3 hold)
    # give the same outputs bit for bit, at 4/3 of the bytes; both save and load.
    from lowbit.calibrate.weights import mse
    from lowbit.config import QuantConfig
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(576, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    q3 = lowbit.quantize(copy.deepcopy(model), bits=3, include=lambda n, m: True, progress=False)
    layer = q3[0]
    assert layer.config.bits == 3 and layer.data.numel() * 8 == 3 * 576 * 256
    summary = lowbit.summary(q3)
    assert summary["bits_per_weight"] < 3.6
    q = mse(model[0].weight.detach(), 3, 16, True, scale_dtype="int8")
    as_int4 = QuantLinear.from_quantized(q, model[0].bias, QuantConfig(4, 16, True, code_bits=3, scale_dtype="int8"))
    as_int3 = QuantLinear.from_quantized(q, model[0].bias, QuantConfig(3, 16, True, scale_dtype="int8"))
    assert torch.equal(as_int3.data, layer.data) and torch.equal(as_int3.scales, layer.scales)
    for rows in (1, 3, 8, 33):
        x = torch.randn(rows, 576)
        with torch.no_grad():
            assert torch.equal(as_int3(x), as_int4(x))
    assert torch.equal(as_int3.dequantized_weight(), as_int4.dequantized_weight())
    for name, mod in (("int3", as_int3), ("int4", as_int4)):
        path = tmp_path / f"{name}.safetensors"
        lowbit.save(torch.nn.Sequential(mod), path)
        back = lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(576, 256)))
        assert back[0].config == mod.config
        x = torch.randn(2, 576)
        with torch.no_grad():
            assert torch.equal(back[0](x), mod(x))
