"""Pieces the LLM path added, on small synthetic models: tied quantized
embeddings, int8 heads, the one-pass calibration, the eager fast path, the
thread-policy warning."""
import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.nn import QuantLinear, TiedQuantEmbedding


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (8, 64, True), (4, 32, True), (4, 64, False),
                                            (8, 32, False)])
def test_tied_embedding_gathers_the_heads_rows(bits, group, sym):
    torch.manual_seed(0)
    head = QuantLinear.from_linear(torch.nn.Linear(128, 37, bias=False), QuantConfig(bits, group, sym))
    emb = TiedQuantEmbedding(head)
    ids = torch.tensor([[0, 15, 16], [36, 17, 5]])
    ref = head.dequantized_weight()
    assert torch.equal(emb(ids), ref[ids])
    assert torch.equal(torch.compile(emb, fullgraph=True)(ids), emb(ids))
    assert not list(emb.state_dict()) and emb.nbytes == 0
    with pytest.raises(ValueError, match="ids must be in"):
        emb(torch.tensor([37]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="QuantLinear"):
        TiedQuantEmbedding(torch.nn.Linear(4, 4))


def tiny_llama(vocab=4096, tied=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_large_heads_and_tables_are_int8_by_default(tied, tmp_path):
    model = tiny_llama(tied=tied)  # 4096 x 256 = 2^20 weights: a "large" table
    ids = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    q = lowbit.quantize(copy.deepcopy(model), bits=8, group_size=None, progress=False)
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.config.label == "W8 g64 int8-scales"  # the default scales
    emb = q.model.embed_tokens
    assert isinstance(emb, TiedQuantEmbedding if tied else lowbit.nn.QuantEmbedding)
    with torch.no_grad():
        out = q(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1))
    assert cos.min() > 0.999
    s = lowbit.summary(q)
    assert any(r["name"] == "model.embed_tokens" for r in s["embeddings"])
    path = tmp_path / "m.safetensors"
    lowbit.save(q, path)
    loaded = lowbit.load(path, tiny_llama(tied=tied))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    if tied:
        assert loaded.model.embed_tokens.head is loaded.lm_head
        info = lowbit.read_info(path)
        assert info.layers["model.embed_tokens"] == dict(module="TiedQuantEmbedding", head="lm_head",
                                                         padding_idx=None, orig_dtype="float32")


def test_tied_metadata_is_validated(tmp_path):
    import json

    from lowbit.io import _parse_lowbit_meta
    q = lowbit.quantize(tiny_llama(), bits=8, progress=False)
    path = tmp_path / "m.safetensors"
    lowbit.save(q, path)
    info = lowbit.read_info(path)
    lb = json.loads(info.extra["lowbit"]) if "lowbit" in info.extra else None
    if lb is None:
        import struct
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        lb = json.loads(header["__metadata__"]["lowbit"])
    for field, value, message in (("head", "model.layers.0.mlp.missing", "head"), ("padding_idx", 10**6, "padding"),
                                  ("orig_dtype", "int8", "orig_dtype")):
        bad = copy.deepcopy(lb)
        bad["layers"]["model.embed_tokens"][field] = value
        with pytest.raises(lowbit.FormatError, match=message):
            _parse_lowbit_meta(str(path), json.dumps(bad), info.tensors)
    _parse_lowbit_meta(str(path), json.dumps(lb), info.tensors)  # the original passes


def test_one_pass_calibration_runs_the_model_once(monkeypatch):
    import lowbit.calibrate.ptq as ptq
    model = tiny_llama(vocab=512)
    batches = [torch.randint(0, 512, (4, 64)) for _ in range(8)]  # 2048 rows: more than any layer's inputs
    assert ptq.stack_batches(batches).shape == (32, 64)
    assert ptq.stack_batches([{"input_ids": b} for b in batches])["input_ids"].shape == (32, 64)
    assert ptq.stack_batches([batches[0], torch.randint(0, 512, (2, 16))]) is None
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    one = lowbit.quantize(copy.deepcopy(model), bits=4, group_size=64, method="gptq", calibration_data=batches,
                          progress=False, calibration_dtype=None)
    assert len(calls) == 1  # the copy keeps the hook: one forward for all 14 layers
    monkeypatch.setattr(ptq, "stack_batches", lambda data: None)  # the per-layer passes
    seq = lowbit.quantize(copy.deepcopy(model), bits=4, group_size=64, method="gptq", calibration_data=batches,
                          progress=False, calibration_dtype=None)
    assert len(calls) == 1 + 14 * len(batches)
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref = model(ids).logits
        e_one, e_seq = [(q(ids).logits - ref).pow(2).mean() for q in (one, seq)]
    # The same algorithm: only the float rounding of the Hessian sums differs (in a
    # float32 forward; in bfloat16 the earlier layers' outputs also round differently:
    # autocast's GEMM in one pass, the quantized layers in the per-layer passes).
    assert abs(e_one - e_seq) < 0.1 * e_seq
    same = sum(torch.equal(a.data, b.data) for a, b in zip(one.modules(), seq.modules())
               if isinstance(a, QuantLinear) and isinstance(b, QuantLinear))
    assert same >= 2  # at least the first layers (fed identical inputs) agree bit for bit


def test_eager_fast_path_equals_the_op():
    torch.manual_seed(0)
    for cfg in (QuantConfig(4, 32, True, None), QuantConfig(8, None, False, 8), QuantConfig(4, 64, True, 8)):
        layer = QuantLinear.from_linear(torch.nn.Linear(100 if cfg.bits == 8 else 128, 40), cfg)
        cfg = layer.config
        x = torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            fast = layer(x)
        op = torch.ops.lowbit.linear(x, layer.data, layer.scales, layer.offsets, layer.bias, layer.out_features,
                                     layer.in_features, cfg.bits, cfg.group_size or 0, cfg.act_bits or 0, 0.0)
        assert torch.equal(fast, op)
        # A replaced bias is picked up (the cached kernel views follow the buffers).
        layer.bias = torch.nn.Parameter(torch.ones(40))
        with torch.no_grad():
            again = layer(x)
        op2 = torch.ops.lowbit.linear(x, layer.data, layer.scales, layer.offsets, layer.bias, 40, layer.in_features,
                                      cfg.bits, cfg.group_size or 0, cfg.act_bits or 0, 0.0)
        assert torch.equal(again, op2) and not torch.equal(again, fast)
        with pytest.raises(ValueError, match="features"):
            layer(torch.randn(2, layer.in_features + 1))


def test_thread_policy_warning(monkeypatch):
    import lowbit.nn.quant_linear as ql
    monkeypatch.setattr(ql, "_checked_threads", False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(ql._C, "get_num_threads", lambda: 2)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantConfig(8, None))
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        with torch.no_grad():
            layer(torch.randn(1, 64))
    monkeypatch.setattr(ql, "_checked_threads", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            layer(torch.randn(1, 64))


@pytest.mark.parametrize("activations", [None, 8])
def test_fused_projections_compute_the_same(activations, tmp_path):
    from lowbit.nn import FusedMember
    model = tiny_llama(vocab=512)
    q = lowbit.quantize(model, bits=4, group_size=32, activations=activations, progress=False)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = q(ids).logits
    gen_ref = q.generate(ids[:1], max_new_tokens=6, do_sample=False)
    names = lowbit.fuse_projections(q)
    assert names == ["model.layers.0.self_attn.q_k_v_fused", "model.layers.0.mlp.gate_up_fused",
                     "model.layers.1.self_attn.q_k_v_fused", "model.layers.1.mlp.gate_up_fused"]
    assert isinstance(q.model.layers[0].self_attn.k_proj, FusedMember)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)
    assert torch.equal(q.generate(ids[:1], max_new_tokens=6, do_sample=False), gen_ref)
    with torch.inference_mode():  # inference tensors have no version counter
        assert torch.equal(q(ids).logits, ref)
    # Gradients reach the input through the fused call (adapters on a frozen base).
    x = torch.randn(1, 3, 256, requires_grad=True)
    q.model.layers[0].self_attn.v_proj(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lowbit.fuse_projections(q) == []  # nothing left to fuse
    with pytest.raises(ValueError, match="fused"):
        lowbit.save(q, tmp_path / "m.safetensors")
