"""Data-free sensitivity priors of bit budgets (lowbit.calibrate.priors): which
layers get one, and that the planner then gives them the bits. The perplexity
they buy on SmolLM2 is checked in tests/eval/test_llm.py."""
import copy

import pytest
import torch

import lowbit
from lowbit.api import _select
from lowbit.calibrate import priors
from lowbit.nn import QuantLinear


def _tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # q, k, v, o all 128 x 128 (as many key/value heads as query heads): the
    # planner sees the same shapes and the same kind of error in each.
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


def test_repeated_blocks_finds_the_stack():
    names = ["0.model.encoder.layer.0.attention.self.value", "0.model.encoder.layer.1.attention.self.value",
             "0.model.encoder.layer.2.output.dense", "0.model.pooler.dense"]
    # The leading "0." (a sentence-transformers module list) holds one index only.
    assert priors.repeated_blocks(names) == {names[0]: 0, names[1]: 1, names[2]: 2}
    assert priors.repeated_blocks(["encoder.dense", "decoder.dense"]) == {}
    assert priors.repeated_blocks(["layers.0.fc"]) == {}  # one block is no stack


def test_priors_of_a_language_model_and_of_an_encoder():
    llama = _tiny_llama()
    targets, skipped = _select(llama, None, None)
    p = priors.sensitivity_priors(llama, targets)
    values = {f"model.layers.{i}.self_attn.v_proj" for i in range(4)}
    last = {n for n, _ in targets if n.startswith("model.layers.3.")}
    assert set(p) == values | last and len(last) == 7
    assert set(p.values()) == {priors.PRIOR}
    assert ("lm_head", "output head") in skipped  # the head itself is not a planned layer

    bert = _tiny_bert()  # no language-model head: the last block gets no prior, the values do
    targets, _ = _select(bert, None, None)
    p = priors.sensitivity_priors(bert, targets)
    assert set(p) == {f"encoder.layer.{i}.attention.self.value" for i in range(3)}

    plain = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    assert priors.sensitivity_priors(plain, [("0", plain[0]), ("2", plain[2])]) == {}


def test_scale_sensitivities():
    sens = {"a": {1: 0.5, 2: 0.25}, "b": {1: 1.0}}
    assert priors.scale_sensitivities(sens, {}) is sens
    assert priors.scale_sensitivities(sens, {"a": 10.0}) == {"a": {1: 5.0, 2: 2.5}, "b": {1: 1.0}}


def _cost(model, names):
    """Stored bits per weight of the named QuantLinear layers together."""
    rows = [r for r in lowbit.summary(model)["layers"] if r["name"] in names]
    assert len(rows) == len(names), names
    return 8 * sum(r["bytes_after"] for r in rows) / sum(r["shape"][0] * r["shape"][1] for r in rows)


def test_budget_gives_the_prior_layers_more_bits():
    model = _tiny_llama()
    auto = lowbit.quantize(copy.deepcopy(model), bits=5.0, progress=False)
    mse = lowbit.quantize(copy.deepcopy(model), bits=5.0, method="mse", progress=False)
    planned = [n for n, m in auto.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert _cost(auto, planned) <= 5.0 + 1e-9
    q_names = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    v_names = [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
    last = [n for n, m in auto.named_modules() if isinstance(m, QuantLinear) and n.startswith("model.layers.3.")]
    first = [n.replace("layers.3.", "layers.0.") for n in last]
    # Same shapes, errors of the same kind: with the priors (method="auto") the
    # values and the last block outbid their peers; the plain search's plan has
    # no such preference built in.
    assert _cost(auto, v_names) > _cost(auto, q_names) + 1.0
    assert _cost(auto, last) > _cost(auto, first) + 1.0
    assert _cost(auto, v_names) - _cost(auto, q_names) > _cost(mse, v_names) - _cost(mse, q_names)
