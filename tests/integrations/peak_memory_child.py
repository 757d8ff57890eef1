"""Loads a model folder in a fresh process and prints the peak growth of its
anonymous memory (RssAnon, sampled every 2 ms), the bytes the model's tensors
hold, and the resident growth at the end (VmRSS: the memory-mapped checkpoint's
pages included, which is where a float model's weights live).

    python peak_memory_child.py FOLDER float|lowbit
"""
import gc
import sys
import threading
import time

import torch

import lowbit
from transformers import AutoConfig, AutoModelForCausalLM


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def anon() -> int:
    return status("RssAnon")


folder, mode = sys.argv[1], sys.argv[2]
# Warm up the loader's own code (imports are not weights).
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, num_hidden_layers=1))
gc.collect()
base, rss0, peak, done = anon(), status("VmRSS"), [0], [False]


def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)


thread = threading.Thread(target=sample)
thread.start()
kwargs = {} if mode == "float" else dict(quantization_config=lowbit.LowbitConfig(bits=4))
model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
with torch.no_grad():  # touch every tensor, as running the model does (mapped pages become memory)
    total = sum(float(t.float().sum()) for t in model.state_dict().values() if t.numel())
done[0] = True
thread.join()
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
# peak: anonymous growth (held by the process); resident: all pages now, the
# mapped checkpoint included (a float model reads its weights from the mapping).
print(f"peak {max(peak[0], anon()) - base} held {held} resident {status('VmRSS') - rss0}")
