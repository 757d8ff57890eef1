"""The real material: R lazy-load reader (synthetic and the Austen package) and
the cached SmolLM2 folder."""
import gzip
import struct
import zlib

import pytest

from lowbit.eval import material, rdata


def _xdr_int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    b = s.encode()
    return _xdr_int(9 | (1 << 15)) + _xdr_int(len(b)) + b  # CHARSXP, UTF-8 flag in the gp levels


def _strsxp(items, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = _xdr_int(flags) + _xdr_int(len(items)) + b"".join(_charsxp(s) for s in items)
    if names:
        out += _pairlist_names(names)
    return out


def _pairlist_names(names):
    # attributes: a pairlist with tag "names" (SYMSXP) whose value is a STRSXP, then NILVALUE.
    return (_xdr_int(2 | (1 << 10)) + _xdr_int(1) + _charsxp("names") + _strsxp(names) + _xdr_int(254))


def _serialize(item, version=3):
    head = b"X\n" + _xdr_int(version) + _xdr_int(0x40200) + _xdr_int(0x30500)
    if version == 3:
        head += _xdr_int(5) + b"UTF-8"
    return head + item


def _blob(payload):
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


def test_reads_a_synthetic_lazyload_database(tmp_path):
    novel = _serialize(_strsxp(["CHAPTER 1", "", "It was a dark night."]))
    numbers = _serialize(_xdr_int(13) + _xdr_int(3) + b"".join(_xdr_int(v) for v in (1, -2, 3)))
    rdb = _blob(novel) + _blob(numbers)
    offsets = [(0, len(_blob(novel))), (len(_blob(novel)), len(_blob(numbers)))]
    variables = b"".join(_xdr_int(13) + _xdr_int(2) + _xdr_int(o) + _xdr_int(n) for o, n in offsets)
    vlist = _xdr_int(19 | (1 << 9)) + _xdr_int(2) + variables + _pairlist_names(["book", "nums"])
    index = _xdr_int(19 | (1 << 9)) + _xdr_int(1) + vlist + _pairlist_names(["variables"])
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index, version=2)))
    got = rdata.read_lazyload(str(tmp_path / "Rdata.rdb"))
    assert got == {"book": ["CHAPTER 1", "", "It was a dark night."], "nums": [1, -2, 3]}


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="XDR"):
        rdata.unserialize(b"A\n" + b"\0" * 16)
    with pytest.raises(ValueError, match="ends early"):
        rdata.unserialize(_serialize(_strsxp(["abc"]))[:-2])
    with pytest.raises(ValueError, match=".rdb"):
        rdata.read_lazyload(str(tmp_path / "x.txt"))
    bad = struct.pack(">I", 99) + zlib.compress(b"short")
    with pytest.raises(ValueError, match="decompressed"):
        rdata._decompress(bad)


def test_austen_novels():
    novels = {n: material.austen(n) for n in material.NOVELS}
    assert novels["emma"].startswith("EMMA\n")
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in novels["prideprejudice"]
    assert all(len(t) > 400_000 for t in novels.values())
    assert material.EVALUATION_NOVEL not in material.CALIBRATION_NOVELS
    with pytest.raises(ValueError, match="novel must be one of"):
        material.austen("ulysses")


def test_smollm2_folder_is_plain_float():
    import json
    cfg = json.loads((material.smollm2_dir() / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert material.smollm2_gguf().name == material.SMOLLM2_GGUF
