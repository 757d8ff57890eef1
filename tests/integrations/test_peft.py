"""LoRA adapters (peft) on a lowbit int4 SmolLM2: only the adapters train, the
frozen QuantLinear base passes input gradients, the loss drops on Austen text,
adapters save / load / merge into float layers."""
import time

import peft
import pytest
import torch

import lowbit
from lowbit.eval import material
from lowbit.integrations.peft import LoraQuantLinear, load_adapter, lora_config

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batch():
    tok = material.load_smollm2()[1]
    ids = tok(material.austen("emma")[:4000], return_tensors="pt")["input_ids"][0]
    return ids[:128][None]


def quantized_base():
    model, _ = material.load_smollm2()
    return lowbit.quantize(model, bits=4, progress=False)


def train(model, batch, steps=6, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses, (time.perf_counter() - t0) / steps


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_lora_trains_on_a_quantized_base_and_round_trips(batch, tmp_path):
    model = peft.get_peft_model(quantized_base(), lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
    wrapped = [m for m in model.modules() if isinstance(m, LoraQuantLinear)]
    assert len(wrapped) == 4 * 30 and all(isinstance(m.base_layer, lowbit.nn.QuantLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Gradients reach the first layer's adapters through 29 frozen quantized layers.
    model(input_ids=batch, labels=batch).loss.backward()
    # (B starts at zero, so it is B that gets the first gradient.)
    first = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    model.zero_grad()
    losses, step_s = train(model, batch)
    print(f"\nLoRA on int4 SmolLM2, 128 tokens: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {step_s:.2f} s/step")
    assert losses[-1] < 0.8 * losses[0]
    model.save_pretrained(tmp_path)
    reloaded = load_adapter(quantized_base(), tmp_path)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    merged = reloaded.merge_and_unload()
    layer = merged.model.layers[5].mlp.down_proj
    assert type(layer) is torch.nn.Linear
    assert torch.allclose(logits(merged, batch), logits(model, batch), atol=1e-3, rtol=1e-3)


def test_unmerge_restores_the_quantized_layer(batch):
    model = peft.get_peft_model(quantized_base(), lora_config(r=4, target_modules=["o_proj"],
                                                              init_lora_weights=False))
    before = logits(model, batch)
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    layer.merge()
    assert type(layer.base_layer) is torch.nn.Linear and layer.merged
    layer.unmerge()
    assert isinstance(layer.base_layer, lowbit.nn.QuantLinear) and not layer.merged
    assert torch.equal(logits(model, batch), before)


def test_dora_and_mixed_batches_are_refused(batch):
    with pytest.raises(ValueError, match="plain LoRA"):
        peft.get_peft_model(quantized_base(), lora_config(r=4, target_modules=["q_proj"], use_dora=True))
