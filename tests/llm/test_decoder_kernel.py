"""The native decoder (csrc/lowbit/decoder.h) against a NumPy implementation of
the same layer arithmetic, on every compiled Highway target, without torch (so
it also runs under ASan). The projections go through lowbit.matmul, which
test_matmul.py checks against the reference; what is checked here is the rest:
RMSNorm, RoPE, causal GQA attention over the cache, SiLU gating, residuals, the
cache growth and truncation, chunked prefill, and argument checks."""
import sys

import numpy as np
import pytest

import lowbit
from lowbit import _C

HID, HEADS, KVH, D, INTER, VOCAB = 64, 4, 2, 16, 96, 80


def make_weights(rng, bits=4, group=16, act_bits=None, scale_dtype="float32", symmetric=True, bias=False,
                 input_scale=False, fused=False):
    def q(n, k):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        return lowbit.pack_weights(lowbit.quantize_array(w, bits=bits, group_size=group, symmetric=symmetric,
                                                         scale_dtype=scale_dtype), scale_dtype)

    def spec(pw, col):
        n, k = pw.shape
        b = rng.standard_normal(n).astype(np.float32) * 0.1 if bias else None
        s = rng.uniform(0.5, 2.0, k).astype(np.float32) if input_scale else None
        return dict(bits=pw.bits, n=n, k=k, group=pw._group, data=pw.data, scales=pw.scales.reshape(-1),
                    offsets=pw._offsets_flat, row_scales=pw.row_scales, bias=b, input_scale=s,
                    act_bits=act_bits or 0, act_scale=0.0, col=col, pw=pw)

    layers = []
    for _ in range(2):
        if fused:
            qkv = [spec(q((HEADS + 2 * KVH) * D, HID), 0)]
            gu = [spec(q(2 * INTER, HID), 0)]
        else:
            qkv = [spec(q(HEADS * D, HID), 0), spec(q(KVH * D, HID), HEADS * D),
                   spec(q(KVH * D, HID), (HEADS + KVH) * D)]
            gu = [spec(q(INTER, HID), 0), spec(q(INTER, HID), INTER)]
        layers.append(dict(attn_norm=rng.uniform(0.5, 1.5, HID).astype(np.float32),
                           mlp_norm=rng.uniform(0.5, 1.5, HID).astype(np.float32),
                           qkv=qkv, o=[spec(q(HID, HEADS * D), 0)], gate_up=gu, down=[spec(q(HID, INTER), 0)]))
    head = spec(q(VOCAB, HID), 0)
    head["input_scale"], head["bias"] = None, None
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, D, 2, dtype=np.float32) / D)).astype(np.float32)
    return dict(layers=layers, norm=rng.uniform(0.5, 1.5, HID).astype(np.float32), head=head, inv_freq=inv_freq)


def kernel_spec(s):
    return {k: v for k, v in s.items() if k != "pw"}


def build(w):
    dec = _C.Decoder(hidden=HID, heads=HEADS, kv_heads=KVH, head_dim=D, intermediate=INTER, eps=1e-5,
                     attn_scale=D ** -0.5, rope_scale=1.0, inv_freq=w["inv_freq"])
    for l in w["layers"]:
        dec.add_layer(l["attn_norm"], l["mlp_norm"], *[[kernel_spec(s) for s in l[n]] for n in
                                                        ("qkv", "o", "gate_up", "down")])
    dec.set_final(w["norm"], kernel_spec(w["head"]))
    return dec


def project(x, specs):
    outs = []
    for s in specs:
        xi = x * s["input_scale"] if s["input_scale"] is not None else x
        outs.append(lowbit.matmul(np.ascontiguousarray(xi, np.float32), s["pw"], bias=s["bias"],
                                  act_bits=s["act_bits"] or None).astype(np.float64))
    return np.concatenate(outs, axis=1)


def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w


def reference_logits(w, x):
    """float64 forward of all rows of x [L, HID] from an empty cache."""
    n = x.shape[0]
    pos = np.arange(n)[:, None] * w["inv_freq"][None, :].astype(np.float64)
    cos, sin = np.cos(pos), np.sin(pos)

    def rope(v):  # v [n, heads, D], rotate-half pairs
        a, b = v[..., :D // 2], v[..., D // 2:]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    h = x.astype(np.float64)
    for l in w["layers"]:
        qkv = project(rms(h, l["attn_norm"]), l["qkv"])
        q = rope(qkv[:, :HEADS * D].reshape(n, HEADS, D))
        k = rope(qkv[:, HEADS * D:(HEADS + KVH) * D].reshape(n, KVH, D))
        v = qkv[:, (HEADS + KVH) * D:].reshape(n, KVH, D)
        att = np.empty((n, HEADS, D))
        for hd in range(HEADS):
            kv = hd // (HEADS // KVH)
            s = q[:, hd] @ k[:, kv].T * D ** -0.5
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            att[:, hd] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        h = h + project(att.reshape(n, -1), l["o"])
        gu = project(rms(h, l["mlp_norm"]), l["gate_up"])
        g, u = gu[:, :INTER], gu[:, INTER:]
        h = h + project(g / (1 + np.exp(-g)) * u, l["down"])
    return project(rms(h, w["norm"]), [w["head"]])


CASES = {
    "int4 g16": dict(),
    "int4 g16 int8-scales fused": dict(scale_dtype="int8", fused=True),
    "int8 per-row bias": dict(bits=8, group=None, bias=True),
    "W4A8 asym f16": dict(act_bits=8, symmetric=False, scale_dtype="float16"),
    "W8A8 awq": dict(bits=8, group=32, act_bits=8, input_scale=True),
}


@pytest.mark.parametrize("case", CASES)
def test_decoder_matches_the_numpy_forward(case, target, rng):
    w = make_weights(rng, **CASES[case])
    x = rng.standard_normal((21, HID)).astype(np.float32)
    ref = reference_logits(w, x)
    dec = build(w)
    hidden, logits = dec.forward(x, 21, True)
    tol = 2e-3 if CASES[case].get("act_bits") else 1e-4  # int8 activations: codes may round differently
    assert hidden.shape == (21, HID) and logits.shape == (21, VOCAB)
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err < tol, err
    assert dec.position == 21


def test_incremental_decoding_and_cache_growth_equal_one_pass(rng):
    w = make_weights(rng)
    n = 300  # the cache starts with 256 positions and must grow once
    x = rng.standard_normal((n, HID)).astype(np.float32)
    whole = build(w).forward(x, n, True)[1]
    dec = build(w)
    parts = [dec.forward(x[:100], 100, True)[1], dec.forward(x[100:257], 157, True)[1]]
    assert dec.cache_capacity == 512
    parts += [dec.forward(x[i:i + 1], 1, True)[1] for i in range(257, n)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-4 * np.abs(whole).max())
    # Truncate, then the same tokens again: the same logits.
    dec.truncate(200)
    again = dec.forward(x[200:203], 1, True)[1]
    np.testing.assert_allclose(again[0], whole[202], rtol=0, atol=1e-4 * np.abs(whole).max())
    assert dec.position == 203


def test_thread_count_does_not_change_results(rng):
    w = make_weights(rng)
    x = rng.standard_normal((40, HID)).astype(np.float32)
    before = lowbit.get_num_threads()
    try:
        lowbit.set_num_threads(1)
        one = build(w).forward(x, 40, True)[1]
        lowbit.set_num_threads(2)
        two = build(w).forward(x, 40, True)[1]
    finally:
        lowbit.set_num_threads(before)
    assert np.array_equal(one, two)


def test_bad_arguments_raise(rng):
    w = make_weights(rng)
    good = dict(hidden=HID, heads=HEADS, kv_heads=KVH, head_dim=D, intermediate=INTER, eps=1e-5,
                attn_scale=0.25, rope_scale=1.0, inv_freq=w["inv_freq"])
    for bad, match in ((dict(heads=3), "multiple of kv_heads"), (dict(head_dim=15), "inv_freq|even"),
                       (dict(inv_freq=w["inv_freq"][:3]), "inv_freq"), (dict(attn_scale=0.0), "attn_scale"),
                       (dict(eps=float("nan")), "eps")):
        with pytest.raises(ValueError, match=match):
            _C.Decoder(**{**good, **bad})
    dec = _C.Decoder(**good)
    l = w["layers"][0]
    specs = [[kernel_spec(s) for s in l[n]] for n in ("qkv", "o", "gate_up", "down")]
    with pytest.raises(ValueError, match="q/k/v"):
        dec.add_layer(l["attn_norm"], l["mlp_norm"], specs[0][:2], *specs[1:])
    with pytest.raises(ValueError, match="o_proj"):
        dec.add_layer(l["attn_norm"], l["mlp_norm"], specs[0], specs[2], specs[2], specs[3])
    with pytest.raises(ValueError, match="lacks 'data'"):
        dec.add_layer(l["attn_norm"], l["mlp_norm"], [{k: v for k, v in specs[0][0].items() if k != "data"}],
                      *specs[1:])
    with pytest.raises(ValueError, match="data must have"):
        dec.add_layer(l["attn_norm"], l["mlp_norm"], [dict(specs[0][0], data=specs[0][0]["data"][:-1])] +
                      specs[0][1:], *specs[1:])
    with pytest.raises(ValueError, match="attn_norm"):
        dec.add_layer(l["attn_norm"][:5], l["mlp_norm"], *specs)
    with pytest.raises(ValueError, match="no layers"):
        dec.forward(np.zeros((1, HID), np.float32), 1, False)
    dec.add_layer(l["attn_norm"], l["mlp_norm"], *specs)
    dec.set_final(w["norm"], None)
    with pytest.raises(ValueError, match="no quantized head"):
        dec.forward(np.zeros((1, HID), np.float32), 1, True)
    with pytest.raises(ValueError, match=r"\[tokens, 64\]"):
        dec.forward(np.zeros((1, HID + 1), np.float32), 1, False)
    with pytest.raises(TypeError, match="float32"):
        dec.forward(np.zeros((1, HID), np.float64), 1, False)
    with pytest.raises(ValueError, match="keep"):
        dec.forward(np.zeros((2, HID), np.float32), 3, False)
    hidden, logits = dec.forward(np.ones((2, HID), np.float32), 1, False)
    assert logits is None and hidden.shape == (1, HID) and np.isfinite(hidden).all()
    with pytest.raises(ValueError, match="past the cached"):
        dec.truncate(3)
    with pytest.raises(ValueError, match="before the first forward"):
        dec.add_layer(l["attn_norm"], l["mlp_norm"], *specs)


def test_nan_reaching_int8_activations_is_an_error(rng):
    w = make_weights(rng, act_bits=8)
    dec = build(w)
    x = np.ones((2, HID), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dec.forward(x, 1, True)
    assert dec.position == 0
    assert np.isfinite(dec.forward(np.ones((1, HID), np.float32), 1, True)[1]).all()


@pytest.mark.parametrize("shape", [(96, 6, 2, 32), (128, 3, 1, 64), (96, 3, 3, 48)],
                         ids=["d32-gqa3", "d64-gqa3", "d48-mha"])
def test_blocked_prefill_attention_matches_the_numpy_forward(shape, target, rng, monkeypatch):
    # Prompts of 4 rows and more take the blocked attention (keys transposed per
    # block of positions, 4 query rows per register block, values mixed 2
    # vectors at a time): head dims that fill whole vectors, part of one, and a
    # scalar tail; KV groups of 3 and 1; a prompt in two chunks (the second
    # starts at position 37, so its blocks begin mid-cache), then decoding.
    mod = sys.modules[__name__]
    for name, value in zip(("HID", "HEADS", "KVH", "D"), shape):
        monkeypatch.setattr(mod, name, value)
    w = make_weights(rng)
    n = 70
    x = rng.standard_normal((n, HID)).astype(np.float32)
    ref = reference_logits(w, x)
    dec = build(w)
    got = np.concatenate([dec.forward(x[:37], 37, True)[1], dec.forward(x[37:66], 29, True)[1]] +
                         [dec.forward(x[i:i + 1], 1, True)[1] for i in range(66, n)])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
