"""quant_method="lowbit" inside transformers: from_pretrained(quantization_config=
LowbitConfig(...)), save_pretrained, loading the pre-quantized folder, generate
and pipelines, on SmolLM2 (the packaged model, `make setup`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import lowbit
from lowbit.eval import material
from lowbit.integrations.transformers import LowbitConfig, LowbitHfQuantizer

IDS = torch.tensor([[1, 504, 3218, 314, 253, 1795, 10046, 3928, 28, 338]])


@pytest.fixture(scope="module")
def smollm2_path():
    return str(material.smollm2_dir())


@pytest.fixture(scope="module")
def quantized(smollm2_path, tmp_path_factory):
    """(model quantized while loading, its save_pretrained folder)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=LowbitConfig(bits=4))
    folder = tmp_path_factory.mktemp("smollm2-lowbit")
    model.save_pretrained(folder)
    return model, folder


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_config_is_frozen_json_and_validated():
    cfg = LowbitConfig(bits=4, group_size=64, symmetric=False, modules_to_not_convert=["mlp"])
    d = cfg.to_dict()
    assert d["quant_method"] == "lowbit" and json.loads(json.dumps(d)) == d
    again = LowbitConfig.from_dict(d)
    assert again.to_dict() == d
    with pytest.raises(AttributeError, match="frozen"):
        cfg.bits = 8
    for kwargs, exc, word in [(dict(bits=5), ValueError, "bits"), (dict(bits=True), ValueError, "bits"),
                              (dict(group_size=0), ValueError, "group_size"),
                              (dict(symmetric="no"), TypeError, "symmetric"),
                              (dict(activations=4), ValueError, "activations"),
                              (dict(method="gptq"), ValueError, "calibration_data"),
                              (dict(modules_to_not_convert="lm_head"), TypeError, "modules_to_not_convert")]:
        with pytest.raises(exc, match=word):
            LowbitConfig(**kwargs)


def test_quantize_while_loading_matches_lowbit_quantize(quantized, smollm2_path):
    model, _ = quantized
    layers = [m for m in model.modules() if isinstance(m, lowbit.nn.QuantLinear)]
    assert len(layers) == 210 and isinstance(model.lm_head, torch.nn.Linear)  # transformers' default skip
    assert model.config.quantization_config.layers["model.layers.0.mlp.down_proj"][:3] == [4, 128, True]
    float_model, _ = material.load_smollm2()
    lowbit.quantize(float_model, bits=4, exclude="lm_head", heads=None, embeddings=None, progress=False)
    assert torch.equal(logits(model), logits(float_model))


def test_save_pretrained_then_from_pretrained_is_bit_identical(quantized):
    model, folder = quantized
    config = json.loads((Path(folder) / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lowbit" and len(qc["layers"]) == 210
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    assert size < 0.5 * 513e6  # the float32 model is 513 MB; the float tied embedding stays
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(loaded.model.layers[3].mlp.up_proj, lowbit.nn.QuantLinear)
    assert torch.equal(logits(loaded), logits(model))
    out = loaded.generate(IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, model.generate(IDS, max_new_tokens=8, do_sample=False))


def test_pipeline_and_device_map_cpu(quantized):
    model, folder = quantized
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    tok = material.load_smollm2()[1]
    text = pipeline("text-generation", model=loaded, tokenizer=tok)("It is a truth universally", max_new_tokens=6,
                                                                    do_sample=False)[0]["generated_text"]
    assert text.startswith("It is a truth universally") and len(text) > len("It is a truth universally")


def test_other_devices_and_foreign_checkpoints_are_refused(smollm2_path, quantized):
    with pytest.raises(ValueError, match="CPU"):
        AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=LowbitConfig(bits=4),
                                             device_map="cuda")
    q = LowbitHfQuantizer(LowbitConfig(bits=4), pre_quantized=True)
    with pytest.raises(ValueError, match="layer table"):
        q.validate_environment(device_map=None)


@pytest.mark.parametrize("kwargs", [dict(bits=8, activations=8), dict(bits=4, group_size=32, symmetric=False,
                                                                       method="mse")])
def test_other_formats_round_trip(smollm2_path, tmp_path, kwargs):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=LowbitConfig(
        **kwargs, modules_to_not_convert=["model.layers.0.mlp"]))
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    q = model.model.layers[1].self_attn.q_proj
    assert q.config.bits == kwargs["bits"] and q.config.act_bits == kwargs.get("activations")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(logits(loaded), logits(model))


def test_registration_on_import(tmp_path):
    """import lowbit registers the method when transformers is already imported;
    LowbitConfig's import registers it otherwise."""
    env = dict(os.environ, PYTHONPATH=str(Path(lowbit.__file__).parents[1]))
    code = ("import transformers, torch, lowbit\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
            "assert 'lowbit' in M, sorted(M)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    code = ("import lowbit\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
            "assert 'lowbit' not in M\nlowbit.LowbitConfig\nassert 'lowbit' in M\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
