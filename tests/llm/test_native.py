"""lowbit.NativeDecoder against transformers' own forward and generate on the
same quantized model: tiny random Llama / Qwen2 models in every supported
layer format, and the real SmolLM2 with the default call."""
import copy

import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear

transformers = pytest.importorskip("transformers")


def tiny(kind="llama", tied=True, layers=2, **extra):
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=tied, **extra)
    cfg = transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)
    torch.manual_seed(0)
    model = (transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM)(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mixed-up norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()


FORMATS = {
    "default int4": dict(bits=4),
    "int4 t5 levels": dict(bits=4, levels="t5"),
    "int4 even grid": dict(bits=4, levels=None),
    "W4A8 t5 levels": dict(bits=4, activations=8, levels="t5"),
    "int8 per row": dict(bits=8, group_size=None),
    "W4A8": dict(bits=4, activations=8),
    "int4 g32 asym float32 rtn": dict(bits=4, group_size=32, symmetric=False, method="rtn", scale_dtype="float32"),
    "float head": dict(bits=4, heads=None),
    "int3 g16": dict(bits=3),
    "W3A8 asym": dict(bits=3, activations=8, symmetric=False, group_size=32, scale_dtype="float32"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_equal_transformers_forward(fmt, target):
    model = lowbit.quantize(tiny(), progress=False, **FORMATS[fmt])
    if fmt == "float head":
        assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(model, ids)
    dec = lowbit.NativeDecoder(model, prefill_chunk=16)  # 3 chunks
    out = dec.logits(ids)
    tol = 3e-3 if "A8" in fmt else 2e-4  # int8 activation codes may round the other way
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    # Token by token after a prefix: the same logits through the cache.
    dec.reset()
    steps = [dec(ids[:30])] + [dec(ids[i:i + 1]) for i in range(30, 37)]
    assert (torch.stack(steps) - ref[29:]).abs().max() <= tol * ref.abs().max()
    assert dec.position == 37


def test_fused_awq_qwen2_untied():
    model = tiny("qwen2", tied=False)  # q/k/v biases, separate head
    ids = torch.randint(0, 512, (25,), generator=torch.Generator().manual_seed(2))
    q = lowbit.quantize(copy.deepcopy(model), bits=4, progress=False)
    with torch.no_grad():  # an AWQ-style input scale on one projection
        layer = q.model.layers[1].mlp.down_proj
        layer.input_scale = torch.linspace(0.5, 2.0, layer.in_features)
    assert q.model.layers[0].self_attn.q_proj.bias is not None
    lowbit.fuse_projections(q)
    ref = hf_logits(q, ids)
    out = lowbit.NativeDecoder(q).logits(ids)
    assert (out - ref).abs().max() <= 2e-4 * ref.abs().max()


def test_generate_matches_transformers_greedy():
    model = lowbit.quantize(tiny(layers=3), bits=4, progress=False)
    prompt = torch.tensor([[1, 17, 300, 42, 7]])
    with torch.inference_mode():
        ref = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    dec = lowbit.NativeDecoder(model)
    out = dec.generate(prompt, max_new_tokens=24, min_new_tokens=24)
    assert out.dtype == torch.int64 and out.shape == ref.shape
    # Greedy paths agree unless two logits tie to float noise: check by teacher forcing.
    logits = hf_logits(model, out[0])
    for i in range(prompt.shape[1], out.shape[1]):
        top2 = torch.topk(logits[i - 1], 2).values
        if out[0, i] != ref[0, i]:
            assert top2[0] - top2[1] < 1e-3, (i, top2)
            break
        assert int(torch.argmax(logits[i - 1])) == int(out[0, i]) or top2[0] - top2[1] < 1e-3


def test_sampling_eos_and_streamer():
    model = lowbit.quantize(tiny(), bits=4, progress=False)
    dec = lowbit.NativeDecoder(model)
    prompt = torch.tensor([3, 4, 5])
    a = dec.generate(prompt, 12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                     generator=torch.Generator().manual_seed(5))
    b = dec.generate(prompt, 12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (1, 15)
    greedy = dec.generate(prompt, 12)
    assert torch.equal(dec.generate(prompt, 12, do_sample=True, top_k=1), greedy)
    stop = int(greedy[0, 5])  # the third new token as end-of-sequence: stops there
    assert torch.equal(dec.generate(prompt, 12, eos_token_id=[stop]), greedy[:, :6])
    assert dec.generate(prompt, 12, eos_token_id=stop, min_new_tokens=12).shape == (1, 15)
    assert torch.equal(dec.generate(prompt, 0), prompt[None])

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, t):
            self.parts.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = dec.generate(prompt, 4, streamer=s)
    assert s.ended and sum(s.parts, []) == out[0].tolist() and s.parts[0] == prompt.tolist()


def test_unsupported_models_and_bad_input_raise():
    model = tiny()
    with pytest.raises(ValueError, match="float nn.Linear: quantize the model first"):
        lowbit.NativeDecoder(model)
    with pytest.raises(ValueError, match="int2"):
        lowbit.NativeDecoder(lowbit.quantize(tiny(), bits=2, group_size=32, progress=False))
    with pytest.raises(TypeError, match="nn.Module"):
        lowbit.NativeDecoder("model")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        lowbit.NativeDecoder(bert)
    sliding = tiny("qwen2", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window"):
        lowbit.NativeDecoder(lowbit.quantize(sliding, bits=4, progress=False))
    dec = lowbit.NativeDecoder(lowbit.quantize(model, bits=4, progress=False))
    with pytest.raises(ValueError, match="batch size 1"):
        dec(torch.zeros((2, 3), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"in \[0, 512\)"):
        dec(torch.tensor([512]))
    with pytest.raises(ValueError, match="integer"):
        dec(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([1, 2], -1)
    with pytest.raises(ValueError, match="temperature"):
        dec.generate([1, 2], 3, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        dec.generate([1, 2], 3, top_p=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        lowbit.NativeDecoder(model, prefill_chunk=0)
    with pytest.raises(ValueError, match="position"):
        dec.reset(-1)


def test_smollm2_default_call_decodes_like_transformers():
    from lowbit.eval.material import load_smollm2
    base, tok = load_smollm2()
    model = lowbit.quantize(base, bits=4, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    dec = lowbit.NativeDecoder(model)
    ids = tok("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    ref = hf_logits(model, ids[0])
    assert (dec.logits(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
    with torch.inference_mode():
        hf = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                            pad_token_id=tok.eos_token_id)
    assert torch.equal(dec.generate(ids, 16, min_new_tokens=16), hf)


def test_speed_helpers_and_demo_measure_the_native_decoder():
    from lowbit.eval import llm_demo
    from lowbit.eval.material import load_smollm2
    from lowbit.eval.speed import generate, generation_speed, prompt_speed
    import io
    base, tok = load_smollm2()
    model = lowbit.quantize(base, bits=4, progress=False)
    dec = lowbit.NativeDecoder(model)
    pp = prompt_speed(dec, 24, repeats=1)
    tg, text = generation_speed(dec, tok, 6, repeats=1, return_text=True)
    assert pp.tokens == 24 and pp.tokens_per_s > 0 and tg.tokens == 6 and tg.tokens_per_s > 0
    new, _ = generate(dec, tok, n_gen=6)
    hf, _ = generate(model, tok, n_gen=6)
    assert torch.equal(new, hf) and text == tok.decode(hf, skip_special_tokens=True)
    buf = io.StringIO()
    rows = llm_demo.run(out=buf, windows=1, n_prompt=16, n_gen=4,
                        variants=(llm_demo.Variant("float32 (torch)"),
                                  llm_demo.Variant("lowbit int4 (default call)", quantize=dict(bits=4))))
    assert rows[0]["native_tg_tokens_per_s"] is None and rows[1]["native_tg_tokens_per_s"] > 0
    assert "native tg" in buf.getvalue() and rows[1]["ppl_ratio"] > 1.0
