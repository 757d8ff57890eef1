"""The dtype of the calibration forward (lowbit.quantize(calibration_dtype=)):
matmuls and attention in bfloat16 under torch's CPU autocast, the statistics
taken from it (Hessians, ranges, samples, sensitivities) in float32/float64.
GPTQ's time and perplexity on SmolLM2 with it are in README "Default quality"."""
import copy

import pytest
import torch

import lowbit
from lowbit.api import _select
from lowbit.calibrate import data as calib_data
from lowbit.calibrate import weights as calib_weights
from lowbit.nn import QuantLinear


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _batches(n=8, rows=4, tokens=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, tokens), generator=g) for _ in range(n)]


def _recorded_input_dtypes(monkeypatch):
    """dtypes of the inputs LayerStats.add sees, and whether autocast was on there."""
    seen = []
    add = calib_weights.LayerStats.add

    def recording_add(self, x):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return add(self, x)
    monkeypatch.setattr(calib_weights.LayerStats, "add", recording_add)
    return seen


def _logit_error(model, ref):
    ids = _batches(1, rows=2, tokens=32, seed=99)[0]
    with torch.no_grad():
        want = ref(ids).logits
        return float((model(ids).logits - want).pow(2).mean() / want.pow(2).mean())


def test_resolution_of_the_setting(monkeypatch):
    model = _tiny_llama()
    targets, _ = _select(model, None, None)
    resolve = calib_data.resolve_calibration_dtype
    assert resolve(None, targets) is None
    assert resolve("bfloat16", targets) is torch.bfloat16
    monkeypatch.setattr(calib_data, "native_bf16", lambda: True)
    assert resolve("auto", targets) is torch.bfloat16
    bf16_targets, _ = _select(copy.deepcopy(model).to(torch.bfloat16), None, None)
    assert resolve("auto", bf16_targets) is None  # a bfloat16 model runs as it is
    monkeypatch.setattr(calib_data, "native_bf16", lambda: False)  # emulated bf16 GEMMs: slower
    assert resolve("auto", targets) is None
    for bad in ("float16", "fp32", torch.bfloat16, 16):
        with pytest.raises(ValueError, match="calibration_dtype"):
            resolve(bad, targets)
    with pytest.raises(ValueError, match="calibration_dtype"):
        lowbit.quantize(copy.deepcopy(model), method="gptq", calibration_data=_batches(), progress=False,
                        calibration_dtype="half")


@pytest.mark.parametrize("stacked", [True, False])
def test_gptq_with_a_bfloat16_forward_matches_the_float32_one(monkeypatch, stacked):
    import lowbit.calibrate.ptq as ptq
    if not stacked:  # the per-layer passes of batches that do not stack
        monkeypatch.setattr(ptq, "stack_batches", lambda data: None)
    model = _tiny_llama()
    seen = _recorded_input_dtypes(monkeypatch)
    runs = {}
    for dtype in (None, "bfloat16"):
        seen.clear()
        runs[dtype] = lowbit.quantize(copy.deepcopy(model), bits=4, method="gptq", calibration_data=_batches(),
                                      progress=False, calibration_dtype=dtype)
        dtypes = {d for d, _ in seen}
        assert not any(on for _, on in seen)  # statistics never under autocast
        if dtype is None:
            assert dtypes == {torch.float32}
        else:  # the first layers' inputs come from float32 norms; later ones from bf16 GEMMs
            assert torch.bfloat16 in dtypes
    assert not torch.is_autocast_enabled("cpu")
    for q in runs.values():
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 14
        assert all(m.weight.dtype == torch.float32 for m in q.modules() if isinstance(m, torch.nn.Embedding))
    e32, e16 = (_logit_error(runs[d], model) for d in (None, "bfloat16"))
    rtn = lowbit.quantize(copy.deepcopy(model), bits=4, method="rtn", levels=None, progress=False)
    e_rtn = _logit_error(rtn, model)
    # The bfloat16 forward changes the Hessians by its rounding only.
    print(f"\nrelative logit error: gptq float32 forward {e32:.5f}, bfloat16 forward {e16:.5f}, rtn {e_rtn:.5f}")
    assert e16 < 1.25 * e32 and e16 < e_rtn, (e32, e16, e_rtn)


def test_static_w4a8_and_data_budgets_with_a_bfloat16_forward(monkeypatch):
    model = _tiny_llama()
    seen = _recorded_input_dtypes(monkeypatch)
    q = lowbit.quantize(copy.deepcopy(model), bits=4, activations=8, method="gptq", calibration_data=_batches(),
                        progress=False, calibration_dtype="bfloat16")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.act_scale > 0 for m in layers)
    assert torch.bfloat16 in {d for d, _ in seen}
    assert _logit_error(q, model) < 0.05
    # A budget measured on the data: its sensitivities come from float32 products.
    plans = {}
    for dtype in (None, "bfloat16"):
        m = lowbit.quantize(copy.deepcopy(model), bits=5.0, calibration_data=_batches(), progress=False,
                            calibration_dtype=dtype)
        plans[dtype] = lowbit.summary(m)["bits_per_weight"]
        assert plans[dtype] <= 5.0 + 1e-6
    assert abs(plans[None] - plans["bfloat16"]) < 0.5
