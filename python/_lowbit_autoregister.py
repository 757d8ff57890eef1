"""Makes ``quant_method="lowbit"`` known to transformers in every process where
lowbit is installed, without ``import lowbit`` first.

Why: a lowbit checkpoint (``save_pretrained`` of a lowbit model) records
``quant_method: "lowbit"`` in its config.json. transformers only knows third-
party methods after they are registered, and when one is not it logs a warning,
loads the model in float and random-initialises every quantized layer: a
colleague who loads a shared folder without knowing about ``import lowbit`` gets
garbage. lowbit-autoregister.pth (installed next to this module in
site-packages) imports this module at interpreter start-up; it puts one finder in
front of ``sys.meta_path`` that waits for the package ``transformers.quantizers``
and, right after that package has run, registers lowbit's config and quantizer.

Cost: this file's import (no numpy, no torch) and one string comparison per
import. Nothing of lowbit is imported until transformers' quantizers are.
``LOWBIT_AUTOREGISTER=0`` turns it off. A failure to register never breaks the
import of transformers: it warns once, and ``import lowbit`` still registers.
"""
import os
import sys

_TARGET = "transformers.quantizers"


class _RegisterAfterExec:
    """Wraps the loader of transformers.quantizers: runs it, then registers."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            import lowbit.integrations.transformers  # noqa: F401  (registers on import)
        except Exception as e:  # an incompatible transformers/torch must not break transformers
            import warnings
            warnings.warn(f"lowbit could not register quant_method='lowbit' with transformers ({e!r}); "
                          "lowbit checkpoints will not load", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._inner, name)


class _TransformersQuantizersFinder:
    """A meta path finder that only answers for transformers.quantizers, with the
    spec the other finders give, its loader wrapped."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is cls or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _RegisterAfterExec):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder in place (idempotent; a no-op with LOWBIT_AUTOREGISTER=0 or
    when transformers' quantizers are already imported: then lowbit's import registers)."""
    if os.environ.get("LOWBIT_AUTOREGISTER", "1") == "0" or _TARGET in sys.modules:
        return
    if _TransformersQuantizersFinder not in sys.meta_path:
        sys.meta_path.insert(0, _TransformersQuantizersFinder)


install()
