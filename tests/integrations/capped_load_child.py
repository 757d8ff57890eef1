"""Joins a memory cgroup capped at CAP MiB, then loads FOLDER and prints a hash
of the logits for fixed tokens (the parent compares it with in-memory
quantization). Modes: "lowbit" (quantize while loading), "cli" (`lowbit
quantize FOLDER OUT`, the command line), "gptq" / "awq" (from_pretrained, then
lowbit.quantize with calibration data), "float-train" (float, weights written
as training would: the control that the cap is enforced).

    python capped_load_child.py FOLDER CAP_MIB MODE CGROUP_DIR v1|v2 [OUT]
"""
import gc
import hashlib
import os
import sys

import torch

import lowbit
from transformers import AutoConfig, AutoModelForCausalLM

folder, cap_mib, mode, cgroup, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
CALIBRATION = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def calibrated(model, method):
    return lowbit.quantize(model, bits=4, method=method, calibration_data=list(CALIBRATION.split(1)),
                           exclude="lm_head", heads=None, embeddings=None, progress=False)


# Warm up the loader's (and calibration's) code before joining: only the
# weights' memory is capped.
small = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, num_hidden_layers=1))
if mode in ("gptq", "awq"):
    calibrated(small, mode)
del small
gc.collect()
limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
with open(os.path.join(cgroup, limit_file), "w") as f:
    f.write(str(cap_mib << 20))
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
if mode == "cli":
    from lowbit import cli
    sys.exit(cli.main(["quantize", folder, sys.argv[6], "--bits", "4"]))
if mode == "lowbit":
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=lowbit.LowbitConfig(bits=4))
elif mode in ("gptq", "awq"):  # the float model memory-mapped, calibrated layer by layer
    model = calibrated(AutoModelForCausalLM.from_pretrained(folder), mode)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)  # a write: the mapped page becomes the process's own memory
ids = torch.arange(12)[None] % model.config.vocab_size
with torch.no_grad():
    print("logits", hashlib.sha256(model(ids).logits.numpy().tobytes()).hexdigest(), flush=True)
