"""scikit-learn's digits (shipped with the package) and a small MLP trained on it."""
import torch


def load(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x, y, perm[:1400], perm[1400:]


def mlp(width: int = 256) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def train(model, x, y, idx, epochs: int, lr: float = 3e-3, batch: int = 100, step=None):
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=g)]
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            if step is not None:
                step(model, opt, x[b], y[b])
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100
