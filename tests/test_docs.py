"""The examples in the public docstrings run and print what they claim."""
import doctest

import pytest

import importlib

import lowbit

# By module path: lowbit.matmul is also the function's name.
MODULES = [importlib.import_module(f"lowbit.{name}") for name in
           ("arrays", "floats", "fake_quant", "runtime", "matmul", "api", "torch_api", "io", "qat", "calibrate.calibrator")]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_public_api_has_docstrings():
    for name in lowbit.__all__:
        assert getattr(lowbit, name).__doc__, name
