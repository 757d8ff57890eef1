"""lowbit.Calibrator / lowbit.calibrate: observe the inputs of a model's Linear
layers over calibration data."""
from __future__ import annotations

from typing import Optional

import torch

from .data import batches, forward_all
from .observers import make_observer


def _linear_like(mod) -> bool:
    from ..nn import QuantLinear
    return type(mod) is torch.nn.Linear or isinstance(mod, QuantLinear)


def _observing(obs):
    def hook(module, args):
        obs(args[0])
    return hook


class Calibrator:
    """Context manager: while active, every selected layer's input goes through
    an observer (one per layer).

    >>> import torch, lowbit
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with lowbit.Calibrator(m, observer="minmax") as cal:
    ...     _ = m(torch.ones(3, 8))
    >>> sorted(cal.observers), float(cal.observers["0"].range()[1])
    (['0', '2'], 1.0)
    """

    def __init__(self, model: torch.nn.Module, observer="minmax", layers=None, **observer_kw):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if layers is None:
            layers = [n for n, m in model.named_modules() if _linear_like(m)]
        self.observers = {name: make_observer(observer, **observer_kw) for name in layers}
        self._hooks: list = []

    def __enter__(self) -> "Calibrator":
        for name, obs in self.observers.items():
            mod = self.model.get_submodule(name)
            self._hooks.append(mod.register_forward_pre_hook(_observing(obs)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def activation_scales(self) -> dict:
        """name -> static int8 activation scale (symmetric, codes [-127, 127])."""
        out = {}
        for name, obs in self.observers.items():
            if obs.count:
                scale, _ = obs.qparams()
                out[name] = float(scale)
        return out


def calibrate(model: torch.nn.Module, data, observer="minmax", max_batches: Optional[int] = 64,
              progress: bool = True, layers=None, **observer_kw) -> Calibrator:
    """Run up to ``max_batches`` batches of ``data`` through ``model`` (no grad)
    with a :class:`Calibrator` attached; returns it (observers filled).

    Batches may be tensors (``model(x)``), tuples/lists (``model(*b)``) or dicts
    (``model(**b)``, transformers style).
    """
    cal = Calibrator(model, observer, layers, **observer_kw)
    with cal:
        forward_all(model, batches(data, max_batches), progress)
    return cal
