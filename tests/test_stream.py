"""Weight streaming: lowbit.load(path, model, stream=True, max_resident_bytes=...)
keeps the tiles memory-mapped, prefetches ahead, releases behind; results equal
the fully loaded model's and the mapped weight bytes stay under the budget."""
import os

import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit import stream
from lowbit.nn import QuantLinear

LAYERS, WIDTH = 12, 512


def stack():
    torch.manual_seed(1)
    mods = []
    for _ in range(LAYERS):
        mods += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = stack()
    for i in range(0, 2 * LAYERS, 2):
        m[i] = QuantLinear.from_linear(m[i], QuantConfig(8, None) if i % 4 else QuantConfig(4, 128, act_bits=8))
    path = tmp_path_factory.mktemp("stream") / "stack.safetensors"
    lowbit.save(m, path)
    return m, path


def layer_bytes(path):
    info = lowbit.read_info(path)
    return [sum(info.tensors[f"{n}.{p}"].nbytes for p in ("data", "scales") if f"{n}.{p}" in info.tensors)
            for n in info.layers]


def test_streamed_output_equals_loaded_and_stays_under_budget(saved):
    m, path = saved
    sizes = layer_bytes(path)
    budget = 3 * (max(sizes) + 2 * stream.EDGE)
    model = lowbit.load(path, stack(), stream=True, max_resident_bytes=budget, prefetch=4)
    streamer = model._lowbit_streamer
    assert [len(streamer.window(i)) for i in range(LAYERS)] == [3] * LAYERS
    peaks = []

    def measure(mod, args, out):
        streamer.sync()  # every queued prefetch done: the fullest the mapping gets
        peaks.append(streamer.resident_bytes())

    hooks = [model[i].register_forward_hook(measure) for i in range(0, 2 * LAYERS, 2)]
    x = torch.randn(4, WIDTH)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), m(x))
    for h in hooks:
        h.remove()
    print(f"\nstreamed: budget {budget} B, peak mapped {max(peaks)} B, stats {streamer.stats}")
    assert max(peaks) <= budget
    assert max(peaks) >= 2 * min(sizes)           # the prefetch really mapped pages ahead
    assert streamer.stats["misses"] == 1          # only the very first layer ran without a prefetch
    streamer.release_all()
    assert streamer.resident_bytes() <= (LAYERS + 2) * 4096  # at most the pages two neighbours share


def test_without_budget_prefetch_depth_bounds_the_window(saved):
    _, path = saved
    model = lowbit.load(path, stack(), stream=True, prefetch=0)
    assert model._lowbit_streamer.window(5) == [5]
    model = lowbit.load(path, stack(), stream=True, prefetch=2)
    assert model._lowbit_streamer.window(LAYERS - 1) == [LAYERS - 1, 0, 1]  # the next token starts over


def test_cold_pages_and_out_of_order_calls_give_identical_results(saved):
    m, path = saved
    model = lowbit.load(path, stack(), stream=True, max_resident_bytes=2 * (max(layer_bytes(path)) + 2 * stream.EDGE))
    model._lowbit_streamer.release_all()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the file from the page cache
    finally:
        os.close(fd)
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(x), m(x))
        # Layers called out of order (reverse, and one reused twice) re-centre the window.
        y_ref, y = x, x
        for i in [10, 4, 4, 0, 22, 8]:
            y_ref, y = torch.relu(m[i](y_ref)), torch.relu(model[i](y))
        assert torch.equal(y, y_ref)


def test_budget_below_one_layer_is_refused(saved):
    _, path = saved
    with pytest.raises(ValueError, match="smaller than the largest layer"):
        lowbit.load(path, stack(), stream=True, max_resident_bytes=1000)
    with pytest.raises(ValueError, match="only applies with stream=True"):
        lowbit.load(path, stack(), max_resident_bytes=10**9)
    with pytest.raises(ValueError, match="prefetch"):
        lowbit.load(path, stack(), stream=True, prefetch=-1)


def test_streaming_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(model, bits=4, group_size=64, progress=False)
    path = __import__("tempfile").mkdtemp() + "/llama.safetensors"
    lowbit.save(model, path)
    skeleton = transformers.LlamaForCausalLM(cfg).eval()
    streamed = lowbit.load(path, skeleton, stream=True, max_resident_bytes=4 * 2**20, prefetch=3)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    assert streamed._lowbit_streamer.stats["calls"] == 3 * 7
