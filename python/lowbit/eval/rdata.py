"""A small reader for R's lazy-load databases (``data/Rdata.rdb`` + ``Rdata.rdx``).

R packages ship their data sets this way; the Jane Austen novels of Debian's
``r-cran-janeaustenr`` are character vectors in one. Only what such data needs
is read: no environments with code, no byte code.

Layout (R's ``serialize.c`` and ``lazyload``):
  * ``Rdata.rdx`` is an RDS file: gzip of an R serialization of a named list
    ``variables`` -> integer (offset, length) pairs into the .rdb file (plus
    ``references`` and ``compressed``).
  * Each .rdb blob at ``offset`` is ``length`` bytes: a 4-byte big-endian size of
    the uncompressed data, then (compression type 1) a zlib stream; types 2/3
    add one byte ('2' bzip2, 'X' xz, 'Z' zlib) before the stream.
  * A serialization (format "X\\n", XDR: big-endian) is a header (version 2 or 3,
    writer and reader versions, for 3 a native-encoding string) and one item:
    a 32-bit flags word (type in the low 8 bits, bit 9 "has attributes", bit 10
    "has tag", gp levels in bits 12+) followed by the type's payload.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import Any, Dict

# SEXP types (Rinternals.h) and the serializer's special codes (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = 9, 10, 13, 14, 15, 16, 19, 20, 24
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 255, 254, 253, 252, 251, 250
NAMESPACESXP, PACKAGESXP, PERSISTSXP = 249, 248, 247
NA_INTEGER = -2 ** 31


class RObject:
    """A value with R attributes (names, class, ...)."""

    def __init__(self, value, attributes):
        self.value, self.attributes = value, attributes

    def __repr__(self):
        return f"RObject({type(self.value).__name__}, attributes={list(self.attributes)})"


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("R serialization ends early")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        if n < 0:
            raise ValueError(f"bad R vector length {n}")
        return n

    def header(self) -> None:
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"only XDR R serializations are supported, got format {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.bytes(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def attributes(self, flags: int) -> Dict[str, Any]:
        if not flags & (1 << 9):
            return {}
        pairs = self.item()
        return dict(pairs) if isinstance(pairs, list) else {}

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind in (NILVALUE_SXP, NILSXP):
            return None
        if kind in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == PERSISTSXP:
            self.item()  # a persistent name: lazy-load references (environments); not needed for data
            self.refs.append(None)
            return None
        if kind in (NAMESPACESXP, PACKAGESXP):
            self.item()
            self.refs.append(None)
            return None
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == ENVSXP:
            self.int()  # locked
            slot = len(self.refs)
            self.refs.append(None)
            self.item(), self.item(), self.item(), self.item()  # enclosure, frame, hash table, attributes
            return self.refs[slot]
        if kind in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, ATTRLISTSXP, ATTRLANGSXP, 17):
            # A pairlist, read iteratively along its CDR chain: [(tag, value), ...].
            out = []
            while True:
                if flags & (1 << 9):
                    self.item()
                tag = self.item() if flags & (1 << 10) else None
                out.append((tag, self.item()))
                flags = self.int()
                kind = flags & 0xFF
                if kind not in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP):
                    self.pos -= 4
                    self.item()  # the terminating CDR (usually NULL)
                    return out
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.bytes(n)
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            value = list(struct.unpack(f">{n}i", self.bytes(4 * n)))
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        elif kind == CPLXSXP:
            n = self.length()
            d = struct.unpack(f">{2 * n}d", self.bytes(16 * n))
            value = [complex(d[i], d[i + 1]) for i in range(0, 2 * n, 2)]
        elif kind == RAWSXP:
            value = self.bytes(self.length())
        elif kind == STRSXP:
            value = [self.item() for _ in range(self.length())]
        elif kind in (VECSXP, EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        elif kind == ALTREP_SXP:
            info, state, attr = self.item(), self.item(), self.item()
            return _altrep(info, state)
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        attrs = self.attributes(flags)
        return RObject(value, attrs) if attrs else value


def _altrep(info, state):
    # compact integer/real sequences (row names of data frames): state is (n, start, step).
    cls = info[0][1] if isinstance(info, list) and info else None
    if cls in ("compact_intseq", "compact_realseq") and isinstance(state, list) and len(state) == 3:
        n, start, step = int(state[0]), state[1], state[2]
        return [start + i * step for i in range(n)]
    if cls == "wrap_string" or cls == "deferred_string":
        return state[0] if isinstance(state, list) else state
    return state


def unserialize(data: bytes) -> Any:
    r = _Reader(data)
    r.header()
    return r.item()


def named(obj) -> Dict[str, Any]:
    """A named R list as a dict (names from its attributes)."""
    if not isinstance(obj, RObject) or "names" not in obj.attributes:
        raise ValueError("expected a named R list")
    return dict(zip(obj.attributes["names"], obj.value))


def _decompress(blob: bytes) -> bytes:
    if len(blob) < 5:
        raise ValueError("lazy-load blob too short")
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = body[:1]
    if kind == b"Z":
        out = zlib.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != size:
        raise ValueError(f"lazy-load blob decompressed to {len(out)} bytes, its header says {size}")
    return out


def read_lazyload(rdb_path: str) -> Dict[str, Any]:
    """Every variable of an R lazy-load database (``X.rdb`` with ``X.rdx`` beside it)."""
    if not rdb_path.endswith(".rdb"):
        raise ValueError(f"rdb_path must name a .rdb file, got {rdb_path!r}")
    with open(rdb_path[:-4] + ".rdx", "rb") as f:
        raw = f.read()
    index = named(unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _decompress(raw)))
    out = {}
    with open(rdb_path, "rb") as f:
        for name, (offset, length) in named(index["variables"]).items():
            f.seek(offset)
            out[name] = unserialize(_decompress(f.read(length)))
    return out
