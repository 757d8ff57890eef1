"""SmolLM2-135M end to end: perplexity with llama.cpp's protocol, the default
int4 call (int8 tied head), save / load, generation."""
import copy
import math

import pytest
import torch

import lowbit
from lowbit.eval import material, perplexity
from lowbit.eval.perplexity import tokenize

WINDOWS = 6


@pytest.fixture(scope="module")
def smollm2():
    model, tok = material.load_smollm2()
    ids = tokenize(tok, material.austen(material.EVALUATION_NOVEL))
    return model, tok, ids


@pytest.fixture(scope="module")
def fp32_ppl(smollm2):
    model, _, ids = smollm2
    return perplexity(model, None, ids, max_windows=WINDOWS, progress=False).ppl


@pytest.fixture(scope="module")
def q4_0_bar(smollm2, fp32_ppl):
    """(float32 perplexity, ratio of lowbit's rendering of llama.cpp Q4_0: int4 g32
    round to nearest, float16 scales, 4.5 b/w) on WINDOWS windows of Emma."""
    model, _, ids = smollm2
    fp32 = fp32_ppl
    q = lowbit.quantize(copy.deepcopy(model), bits=4, group_size=32, method="rtn", scale_dtype="float16",
                        progress=False)
    return fp32, perplexity(q, None, ids, max_windows=WINDOWS, progress=False).ppl / fp32


def direct_perplexity(model, ids, context, windows):
    """The protocol written out plainly: full logits, one window at a time."""
    nll, count = 0.0, 0
    first = context // 2
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(ids[w * context:(w + 1) * context])[None]
            logits = model(input_ids=x).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(logits[first:-1], x[0, first + 1:], reduction="sum"))
            count += context - first - 1
    return math.exp(nll / count), count


def test_float32_perplexity_reproduces_and_matches_the_protocol(smollm2):
    model, tok, ids = smollm2
    a = perplexity(model, tok, material.austen(material.EVALUATION_NOVEL), max_windows=WINDOWS, progress=False)
    b = perplexity(model, None, ids, max_windows=WINDOWS, batch_size=2, progress=False)
    assert a.windows == WINDOWS and a.scored_tokens == WINDOWS * 255 and a.context == 512
    assert abs(a.ppl - b.ppl) <= 1e-4 * a.ppl
    ref, count = direct_perplexity(model, ids, 512, WINDOWS)
    assert count == a.scored_tokens
    assert abs(a.ppl - ref) <= 1e-4 * ref
    assert 10 < a.ppl < 60 and a.stderr > 0
    assert len(a.window_nll) == WINDOWS and float(a) == a.ppl
    # max_tokens bounds the text: 3 windows' worth of tokens gives 3 windows.
    assert perplexity(model, None, ids, max_tokens=3 * 512 + 100, progress=False).windows == 3


def test_perplexity_rejects_bad_arguments(smollm2):
    model, tok, ids = smollm2
    with pytest.raises(ValueError, match="context"):
        perplexity(model, tok, "some text", context=511)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "far too short", progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, None, ids, max_windows=0)
    with pytest.raises(TypeError, match="tokenizer"):
        perplexity(model, None, "a string needs a tokenizer")


def test_int8_perplexity_within_half_a_percent(smollm2, fp32_ppl):
    # int8 in groups of 64 (8.5 bits/weight: llama.cpp Q8_0's size), head included.
    model, tok, ids = smollm2
    fp32 = fp32_ppl
    q = lowbit.quantize(copy.deepcopy(model), bits=8, group_size=64, progress=False)
    int8 = perplexity(q, None, ids, max_windows=WINDOWS, progress=False).ppl
    assert abs(int8 / fp32 - 1) < 0.005, (fp32, int8)


def test_default_int4_ties_the_int8_head_and_round_trips(smollm2, tmp_path):
    from lowbit.nn import QuantLinear, TiedQuantEmbedding
    model, tok, ids = smollm2
    q = lowbit.quantize(copy.deepcopy(model), bits=4, progress=False)
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.config.bits == 8 and q.lm_head.config.group_size == 64
    emb = q.model.embed_tokens
    assert isinstance(emb, TiedQuantEmbedding) and emb.head is q.lm_head
    some = torch.tensor([0, 1, 15, 16, 17, 12345, 49151])
    assert torch.equal(emb(some), q.lm_head.dequantized_weight()[some])
    # One copy of the table: the state dict holds the head's tiles and no float table.
    sd = q.state_dict()
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in sd)
    s = lowbit.summary(q)
    assert s["model_bytes"] < 0.25 * sum(p.numel() * 4 for p in model.parameters())
    path = tmp_path / "smollm2-int4.safetensors"
    size = lowbit.save(q, path)
    assert size < 110 * 2**20  # float32 is 513 MiB
    skeleton = type(model)(model.config)
    loaded = lowbit.load(path, skeleton).eval()
    assert isinstance(loaded.model.embed_tokens, TiedQuantEmbedding)
    assert loaded.model.embed_tokens.head is loaded.lm_head
    x = torch.tensor(ids[:64])[None]
    with torch.no_grad():
        assert torch.equal(q(x).logits, loaded(x).logits)
    from lowbit.eval.speed import generate
    a, _ = generate(q, tok, n_gen=12)
    b, _ = generate(loaded, tok, n_gen=12)
    assert torch.equal(a, b) and a.numel() == 12
    assert len(tok.decode(a).strip()) > 0
    # heads=None keeps the tied float table (the earlier behaviour).
    f = lowbit.quantize(copy.deepcopy(model), bits=4, heads=None, progress=False)
    assert type(f.lm_head) is torch.nn.Linear and f.lm_head.weight is f.model.embed_tokens.weight
    with pytest.raises(ValueError, match="heads"):
        lowbit.quantize(copy.deepcopy(model), bits=4, heads=3, progress=False)


def test_int4_quality_against_the_q4_0_rule(smollm2, q4_0_bar):
    """Issue 9/11's goals on the real model, at test size (6 windows of Emma):
    lowbit's rendering of llama.cpp Q4_0 (int4 g32 round to nearest, float16
    scales: 4.5 b/w) is the bar. The default call (4.55 b/w, int4 codes on the
    level table t5) keeps at most half of its perplexity increase (the stretch
    goal), and less than evenly spaced int4 codes of the same size; GPTQ on 8
    calibration windows at most a third, on t5 (its default) no worse than on
    evenly spaced codes. Measured (Zen 4): Q4_0 rule 1.267, default 1.100, evenly
    spaced 1.160 (32 windows: 1.091 and 1.133), GPTQ on even codes 1.061 (in
    column order 1.097), on t5 1.058. These 6 windows understate t5's gain: on
    32 windows 1.061 -> 1.041 (8 calibration windows), 1.059 -> 1.029 (32); the
    gain is checked on synthetic layers in tests/test_level_layers.py."""
    from lowbit.eval.llm_demo import calibration_batches
    model, tok, ids = smollm2

    def ratio_to_float(q):
        return perplexity(q, None, ids, max_windows=WINDOWS, progress=False).ppl / fp32

    fp32, q4_0 = q4_0_bar
    default = ratio_to_float(lowbit.quantize(copy.deepcopy(model), bits=4, progress=False))
    even = ratio_to_float(lowbit.quantize(copy.deepcopy(model), bits=4, levels=None, progress=False))
    print(f"\nQ4_0 rule {q4_0:.4f}, default {default:.4f}, evenly spaced {even:.4f}")
    gptq, gptq_even = (ratio_to_float(lowbit.quantize(copy.deepcopy(model), bits=4, method="gptq", progress=False,
                                                      calibration_data=calibration_batches(tok, 8), levels=lv))
                       for lv in ("auto", None))
    print(f"GPTQ on t5 {gptq:.4f}, on evenly spaced codes {gptq_even:.4f}")
    assert 1.1 < q4_0 < 1.5, q4_0
    assert default - 1 <= 0.5 * (q4_0 - 1), (default, q4_0)
    assert default < even - 0.02, (default, even)
    assert even - 1 <= 0.75 * (q4_0 - 1), (even, q4_0)
    assert gptq - 1 <= (q4_0 - 1) / 3, (gptq, q4_0)
    assert gptq <= gptq_even + 0.003, (gptq, gptq_even)


def test_data_free_budget_priors(smollm2, q4_0_bar, monkeypatch):
    """Issue 9/11's stretch goal, data-free at <= 4.6 b/w within half of Q4_0's
    perplexity increase: the bits=4.6 budget with its sensitivity priors
    (lowbit.calibrate.priors: value projections and the last block count 10x)
    against the same budget without them. Measured on 6 windows of Emma: Q4_0
    rule 1.267, without priors 1.179, with 1.150 (0.56 of Q4_0's increase; on
    32 windows 1.129 -> 1.104 against Q4_0 1.215: 0.48 of it)."""
    import lowbit.calibrate.priors as priors
    model, _, ids = smollm2
    fp32, q4_0 = q4_0_bar

    def ratio(q):
        planned = [r for r in lowbit.summary(q)["layers"] if r["name"] != "lm_head"]
        bits = 8 * sum(r["bytes_after"] for r in planned) / sum(r["shape"][0] * r["shape"][1] for r in planned)
        assert bits <= 4.6 + 1e-9
        return perplexity(q, None, ids, max_windows=WINDOWS, progress=False).ppl / fp32

    with_priors = ratio(lowbit.quantize(copy.deepcopy(model), bits=4.6, progress=False))
    monkeypatch.setattr(priors, "sensitivity_priors", lambda model, targets: {})
    without = ratio(lowbit.quantize(copy.deepcopy(model), bits=4.6, progress=False))
    assert with_priors - 1 <= 0.6 * (q4_0 - 1), (with_priors, q4_0)
    assert with_priors < without - 0.02, (with_priors, without)


def test_speed_helpers_measure(smollm2):
    from lowbit.eval.speed import first_sentence, generation_speed, prompt_speed
    model, tok, _ = smollm2
    pp = prompt_speed(model, 32, repeats=1)
    tg, text = generation_speed(model, tok, 4, repeats=1, return_text=True)
    assert pp.tokens == 32 and pp.tokens_per_s > 0 and tg.tokens == 4 and tg.tokens_per_s > 0
    assert isinstance(text, str)
    assert first_sentence("One two.  Three four. Five") == "One two."
    with pytest.raises(ValueError):
        prompt_speed(model, 0)
