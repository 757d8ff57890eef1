"""Quantized storage: ``lowbit.save(model, path)`` / ``lowbit.load(path, model)``.

Files are safetensors (readable by the ``safetensors`` package, never pickle)
with lowbit's own description in the header and the kernels' packed layout as
the tensor bytes, so a loaded (or memory-mapped, ``stream=True``) layer runs
without repacking.

Byte layout of a lowbit file (all integers little-endian):

  [0, 8)            u64 N: length of the JSON header
  [8, 8 + N)        JSON header, padded with spaces so 8 + N is a multiple of 64
  [8 + N, end)      tensor bytes, back to back (safetensors allows no holes):
                    first every int8/int4 QuantLinear's tiles in module order
                    (``data``, ``offsets``, ``row_scales`` and float32
                    ``scales``: each a multiple of 64 bytes by construction of
                    the tiled layout, so each starts 64-byte aligned in the
                    file and in an mmap of it), then the float16 / int8
                    ``scales`` (multiples of 32 / 16 bytes), then the 16-byte
                    level tables (``levels``), then the int2
                    layers (packed rows + scales, adjacent per layer), then the
                    remaining tensors (biases, norms, embeddings, ...).

The header maps each tensor name (the model's state-dict key) to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data start) and holds ``"__metadata__": {"format": "pt", "lowbit": <JSON>}``
where the lowbit JSON is::

  {"format_version": 1, "layout": "tiled-v1", "writer": "lowbit <version>",
   "layers": {"<module name>": {"module": "QuantLinear", "in_features", "out_features",
              "bits" (8, 4, 3: tiled-v1 tiles; 2: formats.h packed rows), "code_bits" (<= bits), "group_size" (null = per row), "symmetric", "act_bits",
              "orig_dtype", "bias", "act_scale" (0: dynamic activations),
              "scale_dtype" (only when not float32: "float16", the tiles' scales are F16;
              "int8", they are I8 codes with F32 "row_scales", formats.h),
              "levels" (only for int4 codes on a level table: its name, e.g. "t5"; the
              16 int8 levels are the layer's I8 tensor "levels", formats.h "level tables")}},
   "aliases": {"<key>": "<key it shares storage with>"},
   "crc32": {"<tensor name>": crc32 of its bytes}}

``tiled-v1`` is documented byte by byte in ``csrc/lowbit/formats.h``.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .arrays import SCALE_DTYPES
from .config import GROUP_MULTIPLE
from .matmul import KSTEP, TILE_ROWS, tile_bytes

FORMAT_VERSION = 1
LAYOUT = "tiled-v1"
ALIGN = 64
# A header larger than this is not a lowbit file (a 1000-layer model needs ~1 MiB).
MAX_HEADER_BYTES = 64 << 20

# safetensors dtype names -> (NumPy dtype used to view the bytes, torch dtype name)
_DTYPES = {
    "F64": (np.float64, "float64"), "F32": (np.float32, "float32"), "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"), "I64": (np.int64, "int64"), "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"), "I8": (np.int8, "int8"), "U8": (np.uint8, "uint8"), "BOOL": (np.bool_, "bool"),
}
_TORCH_TO_ST = {v[1]: k for k, v in _DTYPES.items()}


class FormatError(ValueError):
    """The file is not a valid lowbit file (truncated, corrupted or hostile)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str           # safetensors name, e.g. "U8"
    shape: tuple
    begin: int           # offset in the file (not relative to the data start)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileInfo:
    """What a lowbit file holds, from its header alone (see :func:`read_info`)."""

    path: str
    file_size: int
    data_start: int
    tensors: dict          # name -> TensorEntry, in file order
    layers: dict           # module name -> layer metadata dict
    aliases: dict
    crc32: dict
    writer: str
    extra: dict            # the header's other __metadata__ pairs (str -> str)

    @property
    def linear_layers(self) -> dict:
        """The QuantLinear entries of ``layers`` (module name -> metadata)."""
        return {n: m for n, m in self.layers.items() if m.get("module") == "QuantLinear"}

    @property
    def embedding_layers(self) -> dict:
        return {n: m for n, m in self.layers.items() if m.get("module") == "QuantEmbedding"}

    @property
    def tied_layers(self) -> dict:
        return {n: m for n, m in self.layers.items() if m.get("module") == "TiedQuantEmbedding"}

    @property
    def packed_bytes(self) -> int:
        """Bytes of the QuantLinear tiles (data, scales, offsets)."""
        return sum(self.tensors[f"{name}.{part}"].nbytes for name, meta in self.linear_layers.items()
                   for part in expected_packed_shapes(meta))


def expected_packed_shapes(meta: dict) -> dict:
    """The shapes and dtypes the tensors of one layer must have: tiled-v1 for int8 /
    int4 / int3, the packed row layout of formats.h for int2 (data [N, ceil(K / 4)])."""
    n, k, bits = meta["out_features"], meta["in_features"], meta["bits"]
    if bits == 2:
        groups = 1 if meta["group_size"] is None else k // meta["group_size"]
        return {"data": ("U8", (n, (k + 3) // 4)), "scales": ("F32", (n, groups))}
    step = KSTEP[bits]
    kp = (k + step - 1) // step * step
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    ngroups = 1 if meta["group_size"] is None else k // meta["group_size"]
    scale_dtype = meta.get("scale_dtype", "float32")
    sdt = {"float32": "F32", "float16": "F16", "int8": "I8"}[scale_dtype]
    shapes = {"data": ("U8", (tiles * tile_bytes(bits, kp),)), "scales": (sdt, (tiles, ngroups, TILE_ROWS))}
    if not meta["symmetric"]:
        shapes["offsets"] = ("I32", (tiles, ngroups, TILE_ROWS))
    if scale_dtype == "int8":  # the codes' per-row float32 scales
        shapes["row_scales"] = ("F32", (tiles * TILE_ROWS,))
    if meta.get("levels") is not None:  # formats.h "level tables"
        shapes["levels"] = ("I8", (16,))
    return shapes


# ---------------------------------------------------------------------------- save
def save(model, path, *, metadata: Optional[dict] = None) -> int:
    """Write a quantized model's tensors to ``path`` (safetensors + lowbit header).

    Every state-dict entry is stored (QuantLinear tiles as they sit in memory,
    other tensors as they are), so :func:`load` can rebuild the model into a
    skeleton of the float architecture. The write is atomic: the bytes go to a
    temporary file in the same folder, are fsync-ed, then renamed over ``path``;
    a save that dies midway leaves any previous file untouched.
    ``metadata``: extra str -> str pairs for the header (e.g. the model's name).
    Returns the file size in bytes.

    >>> import torch, lowbit, tempfile, os
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 64))
    >>> _ = lowbit.quantize(m, bits=4, progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> size = lowbit.save(m, path)
    >>> m2 = lowbit.load(path, torch.nn.Sequential(torch.nn.Linear(256, 64)))
    >>> x = torch.randn(3, 256)
    >>> bool(torch.equal(m(x), m2(x)))
    True
    """
    import torch

    from . import __version__
    from .nn import QuantLinear

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    layers = {}
    # Tiled QuantLinear tensors that are 64-byte multiples, then the float16 /
    # int8 scales (multiples of 32 / 16 bytes), then int2 rows; module order.
    first, narrow, tables, second = [], [], [], []
    from .nn import FusedProjection, QuantEmbedding, TiedQuantEmbedding
    if any(isinstance(m, FusedProjection) for m in model.modules()):
        raise ValueError("model has fused projections (lowbit.fuse_projections): save it before fusing, "
                         "and fuse again after lowbit.load")
    module_names = {id(m): n for n, m in model.named_modules()}
    for name, mod in model.named_modules():
        if isinstance(mod, TiedQuantEmbedding):
            if id(mod.head) not in module_names:
                raise ValueError(f"{name} is tied to a head that is not part of the model")
            layers[name] = dict(module="TiedQuantEmbedding", head=module_names[id(mod.head)],
                                padding_idx=mod.padding_idx, orig_dtype=str(mod.orig_dtype).replace("torch.", ""))
        if isinstance(mod, QuantEmbedding):
            layers[name] = dict(module="QuantEmbedding", num_embeddings=mod.num_embeddings,
                                embedding_dim=mod.embedding_dim, bits=mod.bits, group_size=mod.group_size,
                                symmetric=mod.symmetric, orig_dtype=str(mod.orig_dtype).replace("torch.", ""),
                                padding_idx=mod.padding_idx)
        if isinstance(mod, QuantLinear):
            c = mod.config
            layers[name] = dict(module="QuantLinear", in_features=mod.in_features, out_features=mod.out_features,
                                bits=c.bits, code_bits=c.code_bits or c.bits, group_size=c.group_size, symmetric=c.symmetric, act_bits=c.act_bits,
                                orig_dtype=str(mod.orig_dtype).replace("torch.", ""), bias=mod.bias is not None,
                                act_scale=float(mod.act_scale))
            if c.scale_dtype != "float32":  # only then: older readers refuse what they cannot run
                layers[name]["scale_dtype"] = c.scale_dtype
            if c.levels is not None:  # likewise
                layers[name]["levels"] = c.levels
            key = (lambda k: f"{name}.{k}") if name else (lambda k: k)
            if c.bits == 2:
                second.extend(key(k) for k in ("data", "scales"))
            else:
                first.extend(key(k) for k in ("data", "offsets", "row_scales"))
                (first if c.scale_dtype == "float32" else narrow).append(key("scales"))
                if c.levels is not None:
                    tables.append(key("levels"))
    state = model.state_dict()
    tensors, aliases, seen = {}, {}, {}
    for key, t in state.items():
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_quantized or t.layout != torch.strided:
            raise ValueError(f"tensor {key!r} has an unsupported layout/type ({t.layout}, {t.dtype})")
        dname = str(t.dtype).replace("torch.", "")
        if dname not in _TORCH_TO_ST:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which lowbit files do not store")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:  # tied weights: store once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t
    lead = first + narrow + tables + second
    order = [k for k in lead if k in tensors] + [k for k in tensors if k not in set(lead)]
    arrays = {k: _bytes_view(tensors[k]) for k in order}
    crcs = {k: zlib.crc32(arrays[k]) for k in order}
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": _TORCH_TO_ST[str(t.dtype).replace("torch.", "")], "shape": list(t.shape),
                     "data_offsets": [offset, offset + arrays[k].nbytes]}
        offset += arrays[k].nbytes
    lb = dict(format_version=FORMAT_VERSION, layout=LAYOUT, writer=f"lowbit {__version__}", layers=layers,
              aliases=aliases, crc32=crcs)
    meta = {"format": "pt", "lowbit": json.dumps(lb, separators=(",", ":"))}
    if metadata:
        meta.update({k: v for k, v in metadata.items() if k not in ("format", "lowbit")})
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)
    return _atomic_write(path, [struct.pack("<Q", len(blob)), blob] + [arrays[k] for k in order])


def _bytes_view(t) -> np.ndarray:
    """The tensor's bytes as a flat uint8 NumPy array (a view when contiguous)."""
    import torch
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.numpy().reshape(-1).view(np.uint8)


def _atomic_write(path: str, chunks) -> int:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(memoryview(c).cast("B") if isinstance(c, np.ndarray) else c)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return size


# ---------------------------------------------------------------------------- read + validate
def read_info(path) -> FileInfo:
    """Parse and validate a lowbit file's header (no tensor bytes are read).

    Raises :class:`FormatError` (a ValueError) naming what is wrong: size,
    header length, JSON, dtypes, shapes vs byte sizes, offsets outside the file,
    overlaps or holes, and lowbit's metadata (version, layout, bits, group size,
    tiled shapes of each layer).
    """
    path = os.fspath(path)
    header, data_start, size = read_header(path)
    return _parse_header(path, header, data_start, size)


def read_header(path) -> tuple:
    """(the JSON header of any safetensors file, where its tensor bytes start, the
    file's size): length and JSON checked, nothing else (read_info validates
    lowbit's own files further)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
            raise FormatError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    return header, 8 + n, size


def _parse_header(path: str, header: dict, data_start: int, size: int) -> FileInfo:
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or "lowbit" not in meta:
        raise FormatError(f"{path}: not a lowbit file (no lowbit metadata in the header; "
                          "plain safetensors files load with the safetensors package)")
    if not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ values must be strings")
    data_size = size - data_start
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor {name!r}: entry must have dtype, shape and data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in _DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**48 for d in shape) or len(shape) > 8:
            raise FormatError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise FormatError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        b, end = offs
        if not 0 <= b <= end <= data_size:
            raise FormatError(f"{path}: tensor {name!r}: bytes [{b}, {end}) lie outside the data "
                              f"({data_size} bytes; file truncated?)")
        count = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if count * np.dtype(_DTYPES[dt][0]).itemsize != end - b:
            raise FormatError(f"{path}: tensor {name!r}: shape {shape} {dt} needs "
                              f"{count * np.dtype(_DTYPES[dt][0]).itemsize} bytes, offsets give {end - b}")
        entries.append(TensorEntry(name, dt, tuple(shape), data_start + b, data_start + end))
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in entries:
        if t.begin != pos:
            raise FormatError(f"{path}: tensor {t.name!r} starts at {t.begin - data_start}, expected "
                              f"{pos - data_start} (overlapping or missing bytes)")
        pos = t.end
    if pos != size:
        raise FormatError(f"{path}: tensors end at byte {pos} but the file has {size} (truncated or extended)")
    tensors = {t.name: t for t in entries}
    lb = _parse_lowbit_meta(path, meta["lowbit"], tensors)
    return FileInfo(path, size, data_start, tensors, lb["layers"], lb["aliases"], lb["crc32"],
                    str(lb.get("writer", "?")), {k: v for k, v in meta.items() if k not in ("format", "lowbit")})


def _parse_lowbit_meta(path: str, text: str, tensors: dict) -> dict:
    try:
        lb = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: lowbit metadata is not valid JSON ({e})") from None
    if not isinstance(lb, dict):
        raise FormatError(f"{path}: lowbit metadata must be an object")
    ver = lb.get("format_version")
    if type(ver) is not int or ver < 1:
        raise FormatError(f"{path}: bad format_version {ver!r}")
    if ver > FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {ver} was written by a newer lowbit (this one reads "
                          f"up to {FORMAT_VERSION}); upgrade lowbit")
    if lb.get("layout") != LAYOUT:
        raise FormatError(f"{path}: unknown packed layout {lb.get('layout')!r} (expected {LAYOUT!r})")
    layers, aliases, crcs = lb.get("layers"), lb.get("aliases", {}), lb.get("crc32", {})
    if not isinstance(layers, dict) or not isinstance(aliases, dict) or not isinstance(crcs, dict):
        raise FormatError(f"{path}: layers, aliases and crc32 must be objects")
    for name, m in layers.items():
        _check_layer(path, name, m, tensors, layers)
    for a, target in aliases.items():
        if not isinstance(target, str) or target not in tensors or a in tensors:
            raise FormatError(f"{path}: alias {a!r} -> {target!r} does not name a stored tensor")
    for k, v in crcs.items():
        if k not in tensors or type(v) is not int or not 0 <= v < 2**32:
            raise FormatError(f"{path}: bad crc32 entry for {k!r}")
    return lb


_LAYER_FIELDS = {"module", "in_features", "out_features", "bits", "group_size", "symmetric", "act_bits",
                 "orig_dtype", "bias", "act_scale", "code_bits"}


_EMBEDDING_FIELDS = {"module", "num_embeddings", "embedding_dim", "bits", "group_size", "symmetric", "orig_dtype",
                     "padding_idx"}


def _check_embedding(where: str, name: str, m: dict, tensors: dict) -> None:
    if set(m) != _EMBEDDING_FIELDS:
        raise FormatError(f"{where}: metadata must have exactly the fields {sorted(_EMBEDDING_FIELDS)}")
    v, d, bits, g = m["num_embeddings"], m["embedding_dim"], m["bits"], m["group_size"]
    if not all(type(x) is int and 0 < x < 2**31 for x in (v, d)):
        raise FormatError(f"{where}: num_embeddings/embedding_dim must be positive ints")
    if type(bits) is not int or bits not in (2, 4, 8):
        raise FormatError(f"{where}: bits must be 8, 4 or 2")
    if g is not None and (type(g) is not int or g <= 0 or d % g):
        raise FormatError(f"{where}: group_size {g!r} does not divide embedding_dim={d}")
    if type(m["symmetric"]) is not bool:
        raise FormatError(f"{where}: symmetric must be a boolean")
    _check_padding_and_dtype(where, m, v)
    groups = 1 if g is None else d // g
    want = {"packed": ("U8", (v, (d * bits + 7) // 8)), "scales": ("F32", (v, groups))}
    if not m["symmetric"]:
        want["zero_points"] = ("U8", (v, groups))
    for part, (dt, shape) in want.items():
        t = tensors.get(f"{name}.{part}")
        if t is None or t.dtype != dt or t.shape != shape:
            raise FormatError(f"{where}: {name}.{part} must be {dt} {list(shape)}")


def _check_padding_and_dtype(where: str, m: dict, num_embeddings: int) -> None:
    p = m["padding_idx"]
    if p is not None and (type(p) is not int or not -num_embeddings <= p < num_embeddings):
        raise FormatError(f"{where}: padding_idx {p!r} out of range")
    if m["orig_dtype"] not in ("float32", "bfloat16", "float16"):
        raise FormatError(f"{where}: orig_dtype {m['orig_dtype']!r} is not a float dtype")


def _check_tied(where: str, m: dict, layers: dict) -> None:
    if set(m) != {"module", "head", "padding_idx", "orig_dtype"}:
        raise FormatError(f"{where}: metadata must have exactly the fields head, module, orig_dtype, padding_idx")
    head = layers.get(m["head"]) if isinstance(m["head"], str) else None
    if not isinstance(head, dict) or head.get("module") != "QuantLinear" or head.get("bits") not in (4, 8):
        raise FormatError(f"{where}: head {m['head']!r} is not an int8/int4 QuantLinear layer of the file")
    _check_padding_and_dtype(where, m, head["out_features"])


def _level_names() -> set:
    from .levels import LEVEL_TABLES
    return set(LEVEL_TABLES)


def _check_layer(path: str, name: str, m, tensors: dict, layers: Optional[dict] = None) -> None:
    where = f"{path}: layer {name!r}"
    if isinstance(m, dict) and m.get("module") == "QuantEmbedding" and name:
        return _check_embedding(where, name, m, tensors)
    if isinstance(m, dict) and m.get("module") == "TiedQuantEmbedding" and name:
        return _check_tied(where, m, layers or {})
    if not isinstance(m, dict) or set(m) - {"scale_dtype", "levels"} != _LAYER_FIELDS:
        raise FormatError(f"{where}: metadata must have exactly the fields {sorted(_LAYER_FIELDS)} "
                          f"(and optionally scale_dtype, levels)")
    if m.get("levels") is not None and (m.get("levels") not in _level_names() or m["bits"] != 4
                                        or m["symmetric"] is not True or m["code_bits"] != 4):
        raise FormatError(f"{where}: levels must name a level table ({sorted(_level_names())}) of a symmetric "
                          f"int4 layer, got {m.get('levels')!r}")
    if m.get("scale_dtype", "float32") not in SCALE_DTYPES or \
            (m.get("scale_dtype", "float32") != "float32" and m["bits"] == 2):
        raise FormatError(f"{where}: scale_dtype must be float32, or float16 / int8 for int8/int4/int3 layers")
    if m["module"] != "QuantLinear":
        raise FormatError(f"{where}: unknown module type {m['module']!r}")
    n, k = m["in_features"], m["out_features"]
    if not all(type(v) is int and 0 < v < 2**31 for v in (n, k)):
        raise FormatError(f"{where}: in_features/out_features must be positive ints")
    if type(m["bits"]) is not int or m["bits"] not in GROUP_MULTIPLE:
        raise FormatError(f"{where}: bits must be 8, 4, 3 or 2, got {m['bits']!r}")
    if m["bits"] == 2 and m["symmetric"] is not True:
        raise FormatError(f"{where}: 2-bit layers are symmetric")
    g = m["group_size"]
    if g is not None and (type(g) is not int or g <= 0 or m["in_features"] % g or g % GROUP_MULTIPLE[m["bits"]]
                          or g >= m["in_features"]):
        raise FormatError(f"{where}: group_size {g!r} does not fit in_features={m['in_features']}")
    if type(m["symmetric"]) is not bool or type(m["bias"]) is not bool or m["act_bits"] not in (None, 8):
        raise FormatError(f"{where}: symmetric/bias must be booleans and act_bits null or 8")
    if type(m["code_bits"]) is not int or m["code_bits"] not in (2, 3, 4, 8) or m["code_bits"] > m["bits"]:
        raise FormatError(f"{where}: code_bits must be 2, 3, 4 or 8 and at most bits")
    a = m["act_scale"]
    if type(a) not in (int, float) or not 0 <= a < 3e38 or (a and m["act_bits"] != 8):
        raise FormatError(f"{where}: act_scale must be 0 or a finite positive float with act_bits 8")
    if m["orig_dtype"] not in ("float32", "bfloat16", "float16"):
        raise FormatError(f"{where}: orig_dtype {m['orig_dtype']!r} is not a float dtype")
    prefix = f"{name}." if name else ""
    for part, (dt, shape) in expected_packed_shapes(m).items():
        t = tensors.get(prefix + part)
        if t is None:
            raise FormatError(f"{where}: tensor {prefix + part!r} is missing")
        if t.dtype != dt or t.shape != shape:
            raise FormatError(f"{where}: {prefix + part!r} is {t.dtype} {list(t.shape)}, the tiled layout "
                              f"needs {dt} {list(shape)}")
    t = tensors.get(prefix + "input_scale")
    if t is not None and (t.dtype != "F32" or t.shape != (m["in_features"],)):
        raise FormatError(f"{where}: input_scale must be F32 [{m['in_features']}]")
    if m["bias"]:
        t = tensors.get(prefix + "bias")
        if t is None or t.shape != (m["out_features"],) or _DTYPES[t.dtype][1] != m["orig_dtype"]:
            raise FormatError(f"{where}: bias must be {m['orig_dtype']} [{m['out_features']}]")


# ---------------------------------------------------------------------------- load
def _map_file(path: str):
    with open(path, "rb") as f:
        # ACCESS_COPY (MAP_PRIVATE): writable views without touching the file;
        # the kernels only read, so pages stay shared with the page cache.
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _view(mm, info: FileInfo, name: str) -> np.ndarray:
    t = info.tensors[name]
    np_dtype = _DTYPES[t.dtype][0]
    count = t.nbytes // np.dtype(np_dtype).itemsize
    return np.frombuffer(mm, dtype=np_dtype, count=count, offset=t.begin).reshape(t.shape)


def _to_torch(arr: np.ndarray, dt: str, copy: bool):
    import torch
    a = np.array(arr) if copy else arr
    t = torch.from_numpy(a)
    tname = _DTYPES[dt][1]
    if tname == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def _check_crc(info: FileInfo, name: str, arr: np.ndarray) -> None:
    crc = info.crc32.get(name)
    if crc is not None and zlib.crc32(arr.reshape(-1).view(np.uint8)) != crc:
        raise FormatError(f"{info.path}: tensor {name!r} fails its crc32 check (corrupted file)")


def _read_tensor(f, info: FileInfo, name: str) -> np.ndarray:
    """A tensor's bytes read into fresh memory (no mapping: resident once, not twice)."""
    t = info.tensors[name]
    np_dtype = _DTYPES[t.dtype][0]
    arr = np.empty(t.nbytes // np.dtype(np_dtype).itemsize, np_dtype)
    f.seek(t.begin)
    got = f.readinto(memoryview(arr.view(np.uint8)))
    if got != t.nbytes:
        raise FormatError(f"{info.path}: tensor {name!r} ends early (file changed while loading?)")
    return arr.reshape(t.shape)


def _tensors(info: FileInfo, verify: bool, mapped=frozenset(), mm=None) -> dict:
    """name -> torch tensor: names in ``mapped`` as views of ``mm``, the rest read."""
    out = {}
    with open(info.path, "rb") as f:
        for name, t in info.tensors.items():
            arr = _view(mm, info, name) if name in mapped else _read_tensor(f, info, name)
            if verify:
                _check_crc(info, name, arr)
            out[name] = _to_torch(arr, t.dtype, copy=False)
    for a, target in info.aliases.items():
        out[a] = out[target]
    return out


def load_state_dict(path, *, verify: bool = True) -> dict:
    """The file's tensors as a state dict (name -> torch.Tensor), aliases included."""
    return _tensors(read_info(path), verify)


def load(path, model=None, *, stream: bool = False, max_resident_bytes: Optional[int] = None,
         prefetch: int = 1, verify: Optional[bool] = None):
    """Load a file written by :func:`save`, or a folder written by ``save_pretrained``
    of a lowbit transformers model (``path`` a directory; not streamed).

    * ``model=None``: returns the state dict (name -> tensor), for inspection or
      custom rebuilding; :func:`read_info` gives the per-layer metadata.
    * ``model`` given: a skeleton of the saved model's architecture (e.g. the
      float model built from its config, on any device including ``meta``).
      Each layer the file describes (an nn.Linear or QuantLinear in the skeleton)
      becomes a QuantLinear with the file's tiles; every other parameter and
      buffer is loaded strictly (missing or unexpected keys raise). Returns the
      model, which computes exactly what the saved model computed.
    * ``stream=True`` (needs ``model``): QuantLinear tiles stay memory-mapped and
      are brought in layer by layer on a background thread (``prefetch`` layers
      ahead, as many as fit) while keeping the resident weight bytes under
      ``max_resident_bytes``; see :mod:`lowbit.stream`.
    ``verify`` checks every tensor's crc32 (default: on unless streaming, which
    would have to read the whole file up front).
    """
    import torch

    from .config import QuantConfig
    from .nn import QuantEmbedding, QuantLinear, TiedQuantEmbedding

    if os.path.isdir(os.fspath(path)):
        from .integrations import hf_folder
        if stream or max_resident_bytes is not None:
            raise ValueError(f"{path}: stream=True reads lowbit files (lowbit.save / lowbit quantize); a "
                             "save_pretrained folder loads whole (lowbit.load(folder, model) or from_pretrained)")
        if model is None:
            hf_folder.read_quantization_config(path)  # a lowbit folder, as read_info for files
            return hf_folder.state_dict(path)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        return hf_folder.load(path, model)
    if model is None:
        if stream:
            raise ValueError("stream=True needs model (the skeleton to stream into)")
        return load_state_dict(path, verify=True if verify is None else verify)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
    if max_resident_bytes is not None and not stream:
        raise ValueError("max_resident_bytes only applies with stream=True")
    info = read_info(path)
    if stream and not info.linear_layers:
        raise ValueError(f"{info.path}: no quantized layers to stream")
    verify = (not stream) if verify is None else verify
    mm = _map_file(info.path) if stream else None
    try:
        replacements = {}  # validated before the model is touched
        for name, m in info.layers.items():
            if not name:
                raise ValueError("the file's quantized layer is the model itself; pass a container")
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no module {name!r}, which the file quantizes") from None
            if m["module"] == "TiedQuantEmbedding":
                if not isinstance(old, (torch.nn.Embedding, TiedQuantEmbedding)):
                    raise ValueError(f"model.{name} must be an Embedding to be tied to {m['head']}, got {old!r}")
                continue  # built once the heads exist
            if m["module"] == "QuantEmbedding":
                if not isinstance(old, (torch.nn.Embedding, QuantEmbedding)) or \
                        (old.num_embeddings, old.embedding_dim) != (m["num_embeddings"], m["embedding_dim"]):
                    raise ValueError(f"model.{name} must be an Embedding({m['num_embeddings']}, "
                                     f"{m['embedding_dim']}) to take the file's table, got {old!r}")
                replacements[name] = QuantEmbedding(m["num_embeddings"], m["embedding_dim"], m["bits"],
                                                    m["group_size"], m["symmetric"], m["padding_idx"],
                                                    getattr(torch, m["orig_dtype"]))
                continue
            if not isinstance(old, (torch.nn.Linear, QuantLinear)) or \
                    (old.in_features, old.out_features) != (m["in_features"], m["out_features"]):
                raise ValueError(f"model.{name} must be a Linear({m['in_features']}, {m['out_features']}) "
                                 f"to take the file's layer, got {old!r}")
            cfg = QuantConfig(m["bits"], m["group_size"], m["symmetric"], m["act_bits"],
                              None if m["code_bits"] == m["bits"] else m["code_bits"],
                              m.get("scale_dtype", "float32"), m.get("levels"))
            replacements[name] = QuantLinear(m["in_features"], m["out_features"], m["bias"], cfg,
                                             dtype=getattr(torch, m["orig_dtype"]),
                                             has_input_scale=f"{name}.input_scale" in info.tensors)
            replacements[name].act_scale = float(m["act_scale"])
        packed = {f"{n}.{p}" for n, m in info.linear_layers.items() for p in expected_packed_shapes(m)}
        tied = set(info.tied_layers)
        expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in set(replacements) | tied}
        tied_weights = {id(model.get_submodule(n).weight) for n in tied
                        if isinstance(model.get_submodule(n), torch.nn.Embedding)}
        # A head tied to a replaced embedding shares its weight: that key goes with it.
        expected -= {f"{n}.weight" for n, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) and id(mod.weight) in tied_weights}
        expected |= {f"{n}.{k}" for n, mod in replacements.items() for k in mod.state_dict()}
        sd = _tensors(info, verify, packed if stream else frozenset(), mm)
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(f"{info.path} does not match the model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        for name, m in info.tied_layers.items():
            head = replacements.get(m["head"])
            if head is None:
                raise ValueError(f"{info.path}: {name} is tied to {m['head']}, which the file does not quantize")
            replacements[name] = TiedQuantEmbedding(head, m["padding_idx"], getattr(torch, m["orig_dtype"]))
        for name, new in replacements.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
        # Tiles go straight into the QuantLinear buffers (their placeholders are
        # empty, so load_state_dict would reject the shapes); the rest loads strictly.
        for name in info.linear_layers:
            mod = model.get_submodule(name)
            for part in expected_packed_shapes(info.layers[name]):
                setattr(mod, part, sd.pop(f"{name}.{part}"))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # assign onto meta tensors
            result = model.load_state_dict(sd, strict=False, assign=True)
        if result.missing_keys and set(result.missing_keys) - packed or result.unexpected_keys:
            raise ValueError(f"{info.path} does not match the model: missing {result.missing_keys[:8]}, "
                             f"unexpected {result.unexpected_keys[:8]}")
        _retie(model, info.aliases)
    except BaseException:
        if mm is not None:
            _close_quietly(mm)
        raise
    if stream:
        from .stream import WeightStreamer
        WeightStreamer.attach(model, mm, info, max_resident_bytes=max_resident_bytes, prefetch=prefetch)
    return model


def _retie(model, aliases: dict) -> None:
    """Make aliased parameters the same Parameter object again (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, params[target])


def hf_skeleton(path):
    """The float transformers model a file written by ``lowbit quantize`` came from
    (built from the config in its header, weights uninitialised), to pass to :func:`load`;
    for a save_pretrained folder of a lowbit model, its architecture with the
    parameters on the meta device.
    """
    if os.path.isdir(os.fspath(path)):  # a save_pretrained folder: parameters on meta
        from .integrations import hf_folder
        return hf_folder.skeleton(path)
    import torch
    import transformers
    info = read_info(path)
    if "hf_config" not in info.extra or "hf_class" not in info.extra:
        raise ValueError(f"{info.path} carries no transformers config (written by lowbit.save, not "
                         "lowbit quantize): build the model yourself and pass it to lowbit.load")
    cfg_dict = json.loads(info.extra["hf_config"])
    cls = transformers_model_class(info.extra["hf_class"])
    if cls is None:
        raise ValueError(f"{info.path}: unknown transformers class {info.extra['hf_class']!r}")
    config = transformers.AutoConfig.for_model(**cfg_dict)
    with torch.device("cpu"):
        return cls(config).eval()


def transformers_model_class(name):
    """transformers' PreTrainedModel subclass called ``name``, or None (a name read
    from a file is never trusted to be one)."""
    import transformers
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _close_quietly(mm) -> None:
    """Close a map unless views still point into it (then the GC closes it with them)."""
    try:
        mm.close()
    except BufferError:
        pass
