"""Data-free input importances (lowbit.calibrate.importance) and the default
method that uses them: the estimate against simulation, where it applies, and
that it lowers the output error on SmolLM2's real activations."""
import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear
from lowbit.calibrate.importance import data_free_importance, gated_mlp_importance, mean_square_of_activation, \
    row_mean_squares


@pytest.mark.parametrize("kind,act", [("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu)])
def test_mean_square_of_activation_against_sampling(kind, act):
    gen = torch.Generator().manual_seed(0)
    var = torch.tensor([1e-4, 0.01, 1.0, 9.0, 400.0], dtype=torch.float64)
    z = torch.randn(400_000, generator=gen, dtype=torch.float64)
    want = torch.stack([(act(z * v.sqrt()) ** 2).mean() for v in var])
    got = mean_square_of_activation(var, kind)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0)


def test_gated_mlp_importance_against_simulation():
    """E[(act(gate x) * up x)_j^2] for x = g * (independent unit normals)."""
    gen = torch.Generator().manual_seed(1)
    k, n = 256, 48
    rows = torch.exp(torch.empty(n, 1).uniform_(-2, 1, generator=gen))  # row scales: mean squares over decades
    gate = torch.randn(n, k, generator=gen) * rows / k ** 0.5
    up = torch.randn(n, k, generator=gen) * torch.exp(torch.empty(n, 1).uniform_(-1, 1, generator=gen)) / k ** 0.5
    g = torch.exp(torch.empty(k).uniform_(-0.5, 0.5, generator=gen))
    x = torch.randn(200_000, k, generator=gen) * g
    y = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    sim = (y.double() ** 2).mean(0)
    est = torch.from_numpy(gated_mlp_importance(row_mean_squares(gate * g), row_mean_squares(up * g), "silu")).double()
    assert est.shape == (n,) and abs(float(est.mean()) - 1) < 1e-6
    rel = (est / (sim / sim.mean()) - 1).abs()
    # gate and up rows share x, so they correlate by ~1/sqrt(K), which the estimate ignores
    assert float(rel.median()) < 0.05 and float(rel.max()) < 0.2, rel
    assert float(sim.max() / sim.min()) > 100  # the spread the search is told about


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # uneven rows, as trained models have
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(torch.exp(torch.empty(128, 1).uniform_(-2, 1)))
            layer.post_attention_layernorm.weight.copy_(torch.exp(torch.empty(64).uniform_(-0.5, 0.5)))
    return model


def test_default_weighs_only_the_down_projections():
    model = _tiny_llama()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    imp = data_free_importance(model, targets)
    assert sorted(imp) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(v.shape == (128,) and v.dtype == np.float32 and np.all(v >= 1) for v in imp.values())
    auto = lowbit.quantize(copy.deepcopy(model), bits=4, progress=False)
    mse = lowbit.quantize(copy.deepcopy(model), bits=4, method="mse", progress=False)
    differ = []
    for name, _ in targets:
        a, b = auto.get_submodule(name), mse.get_submodule(name)
        if not isinstance(a, QuantLinear):  # k/v_proj: fewer than 4096 weights stay in float
            continue
        if not (torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)):
            differ.append(name)
    assert sorted(differ) == sorted(imp)
    # "mse" stays the plain search: the same as quantizing the weight on its own.
    lin = model.model.layers[0].mlp.down_proj
    plain = QuantLinear.from_linear(lin, mse.model.layers[0].mlp.down_proj.config, method="mse")
    assert torch.equal(plain.data, mse.model.layers[0].mlp.down_proj.data)
    # The budget path weighs the same layers' errors, and has int4 at half the
    # group (g8) between g16 and int8 per row.
    mixed = lowbit.quantize(copy.deepcopy(model), bits=5.2, progress=False)
    groups = {m.config.group_size for m in mixed.modules() if isinstance(m, QuantLinear) and m.config.bits == 4}
    assert 8 in groups, groups


def test_importance_lowers_smollm2_down_projection_output_error():
    """On real activations (the float model on 512 tokens of Emma), the weighted
    search leaves less output error ||X (W - Q)^T||^2 in SmolLM2's down projections
    than the plain one: in total (the layers with massive activations, where the
    errors are largest, gain most) and on average over layers."""
    from lowbit.eval import material
    from lowbit.eval.perplexity import tokenize
    model, tok = material.load_smollm2()
    ids = torch.tensor(tokenize(tok, material.austen(material.EVALUATION_NOVEL))[:512])[None]
    targets = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    imp = data_free_importance(model, targets)
    assert len(imp) == len(targets) == 30
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0][0].detach().clone()))
             for n, m in targets]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    better, total, ratios = 0, np.zeros(2), []
    for name, mod in targets:
        w = mod.weight.detach().float().numpy()
        x = inputs[name].double()
        errs = []
        for c in (None, imp[name]):
            q = lowbit.quantize_array(w, bits=4, group_size=16, method="mse", scale_dtype="int8", importance=c)
            d = torch.from_numpy(lowbit.dequantize_array(q) - w).double()
            errs.append(float((x @ d.T).pow(2).sum()))
        total += errs
        ratios.append(errs[1] / errs[0])
        better += errs[1] < errs[0]
    print(f"total {total[1] / total[0]:.3f}, mean {np.mean(ratios):.3f}, better in {better} of 30")
    assert total[1] < 0.85 * total[0], total
    assert np.mean(ratios) < 0.985, ratios
    assert better >= 10, better
