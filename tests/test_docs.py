"""The examples in the public docstrings run and print what they claim."""
import doctest

import pytest

import lowbit.arrays
import lowbit.fake_quant
import lowbit.floats
import lowbit.runtime


@pytest.mark.parametrize("module", [lowbit.arrays, lowbit.floats, lowbit.fake_quant, lowbit.runtime],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_public_api_has_docstrings():
    for name in lowbit.__all__:
        assert getattr(lowbit, name).__doc__, name
