"""QAT vs PTQ on scikit-learn's digits (the data ships with scikit-learn).

    .venv/bin/python examples/qat_digits.py [--epochs 60] [--qat-epochs 20]

Trains a 64-256-256-10 MLP in float32, then compares, on the held-out 397
images: post-training quantization (RTN, GPTQ) at 4 and 2 bits, and QAT at 4
and 2 bits with fixed (min-max rule) and learnable (LSQ) scales, every Linear
layer quantized (group size 32), measured after lowbit.convert (the integer
model).
"""
from __future__ import annotations

import argparse
import copy

import torch

import lowbit


def data(seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x, y, perm[:1400], perm[1400:]


def train(model, x, y, idx, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--qat-epochs", type=int, default=20)
    args = p.parse_args()
    x, y, tr, te = data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    train(model, x, y, tr, args.epochs, 3e-3)
    every = dict(include=lambda name, mod: True, group_size=32)
    calib = [x[tr[i:i + 100]] for i in range(0, 400, 100)]
    rows = [("float32", "-", accuracy(model, x[te], y[te]))]
    for bits in (4, 2):
        for method in ("rtn", "gptq"):
            q = lowbit.quantize(copy.deepcopy(model), bits=bits, method=method, progress=False,
                                calibration_data=None if method == "rtn" else calib, **every)
            rows.append((f"PTQ {method}", bits, accuracy(q, x[te], y[te])))
        for learnable in (False, True):
            q = lowbit.prepare_qat(copy.deepcopy(model), bits=bits, learnable=learnable, **every)
            train(q, x, y, tr, args.qat_epochs, 1e-3)
            lowbit.convert(q)
            rows.append((f"QAT {'learnable (LSQ)' if learnable else 'fixed'} scales", bits, accuracy(q, x[te], y[te])))
    print("| model | bits | test accuracy % |\n|---|---|---|")
    for name, bits, acc in rows:
        print(f"| {name} | {bits} | {acc:.2f} |")


if __name__ == "__main__":
    main()
