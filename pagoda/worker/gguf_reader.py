"""A GGUF file's header, read in one pass that skips the vocabulary.

`gguf.GGUFReader` (the only reader the gguf package has) builds several numpy views per element
of every metadata array: for a 49k-token vocabulary with its merges that is ~2-9 s per file
opened, and it has no way to skip them. Start-up needs only the scalars, the tensor table and
where the data begins, so this walks the header with `struct` over a memory map, keeps scalars,
strings and numeric arrays, and for string arrays (tokens, merges) records only where they lie and
how many there are: `GGUFHeader.strings(key)` decodes one on demand. The vocabulary itself is read
only by the tokenizer conversion (transformers' GGUF code), whose result is cached.

Value and tensor types, block sizes and the magic number come from the gguf package.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType,
                            GGUFValueType)

_VERSIONS = (2, 3)
_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
           GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
           GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
           GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings left in the file: its length and where its first item is."""
    count: int
    offset: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]          # torch order (GGUF stores the fastest dimension first)
    type: GGMLQuantizationType
    offset: int                     # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of the stored bytes: rows of blocks for a quantized type (as gguf.quants wants)."""
        block, size = GGML_QUANT_SIZES[self.type]
        return (*self.shape[:-1], self.shape[-1] // block * size)


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]        # string arrays appear as StringArray
    tensors: list[GGUFTensor]
    data_offset: int
    _mm: Any = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    @property
    def quant_types(self) -> set[str]:
        """Names of the quantized tensor types (empty when every tensor is F32/F16/BF16)."""
        return {t.type.name for t in self.tensors if t.type not in FLOAT_TYPES}

    def memmap(self) -> np.ndarray:
        """The whole file as uint8, copy-on-write: views of it are writable (torch.from_numpy
        wants that) and nothing is ever written back; pages are read as tensors touch them."""
        if self._mm is None:
            self._mm = np.memmap(self.path, mode="c", dtype=np.uint8)
        return self._mm

    def release(self) -> None:
        """Drop the memory map (views already handed out keep it alive until they go)."""
        self._mm = None

    def tensor_bytes(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's stored bytes, shaped `t.row_shape`, as a view of the file."""
        return self.memmap()[t.offset:t.offset + t.nbytes].reshape(t.row_shape)

    def strings(self, key: str) -> list[str]:
        """Decode a string array the header walk skipped (e.g. tokenizer.ggml.tokens)."""
        ref = self.metadata[key]
        if not isinstance(ref, StringArray):
            raise TypeError(f"GGUF metadata {key!r} is not an array of strings")
        buf, pos, out = self.memmap(), ref.offset, []
        for _ in range(ref.count):
            s, pos = _string(buf, pos)
            out.append(s)
        return out


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"), pos + n


def _value(buf, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALAR:
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == GGUFValueType.STRING:
        return _string(buf, pos)
    if vtype == GGUFValueType.ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SCALAR:
            fmt = f"<{count}{_SCALAR[itype]}"
            return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
        if itype == GGUFValueType.STRING:
            start = pos
            for _ in range(count):  # only the lengths are read, to find the end
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
            return StringArray(count, start), pos
        items = []
        for _ in range(count):  # arrays of arrays: rare, small
            v, pos = _value(buf, pos, itype)
            items.append(v)
        return items, pos
    raise ValueError(f"unknown GGUF metadata value type {vtype}")


def check_magic(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4 or struct.unpack("<I", head)[0] != GGUF_MAGIC:
        raise ValueError(f"--model: {path!r} is not a GGUF file (bad magic)")


def read_header(path: str) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file (tens of milliseconds; no tensor data is read)."""
    mm = np.memmap(path, mode="c", dtype=np.uint8)
    buf = memoryview(mm)
    if len(mm) < 24 or struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
        raise ValueError(f"--model: {path!r} is not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in _VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"--model: {path!r} is GGUF version {version}{hint}; versions 2 and 3 are supported")
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _value(buf, pos + 4, vtype)
    if "general.architecture" not in meta:
        raise ValueError(f"--model: {path!r} has no general.architecture in its metadata")
    raw = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ttype, off = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        raw.append((name, tuple(reversed(dims)), ttype, off))
    align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_offset = -(-pos // align) * align
    tensors = []
    for name, shape, ttype, off in raw:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(f"--model: GGUF tensor {name} has unknown type {ttype}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) if shape else 1
        tensors.append(GGUFTensor(name, shape, qtype, data_offset + off, n // block * size))
    end = max((t.offset + t.nbytes for t in tensors), default=data_offset)
    if end > len(mm):
        raise ValueError(f"--model: {path!r} is truncated ({len(mm)} bytes, its tensors need {end})")
    del buf
    return GGUFHeader(path, version, meta, tensors, data_offset, mm)
