import numpy as np
import pytest

import lowbit
from lowbit.runtime import available_targets, only_target

TARGETS = available_targets()


@pytest.fixture(params=TARGETS, ids=[name for _, name in TARGETS])
def target(request):
    """Runs the test once per compiled Highway target this CPU can execute."""
    mask, name = request.param
    with only_target(mask):
        yield name


def to_bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (via the reference)."""
    from lowbit import reference
    return reference.encode_float(x32, "bfloat16")


def make_input(rng, shape, dtype):
    """(kernel input, its float32 value, dtype name) with varied magnitudes."""
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, size=shape[:-1] + (1,)))).astype(np.float32)
    if dtype == "float16":
        xh = x.astype(np.float16)
        return xh, xh.astype(np.float32), "float16"
    if dtype == "bfloat16":
        b = to_bf16_bits(x)
        return b, (b.astype(np.uint32) << 16).view(np.float32), "bfloat16"
    return x, x, "float32"


@pytest.fixture
def rng(request):
    # A seed per test id: reproducible, different across tests.
    import zlib
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config):
    return [f"lowbit: dispatch {lowbit.cpu_target()}; targets tested: "
            + ", ".join(name for _, name in TARGETS) + f"; threads {lowbit.get_num_threads()}"]
