"""A GGUF file's header read as byte spans, fast: gguf-py's reader builds a Python object per
element of every array (SmolLM2's 49,152-token vocabulary: ~3.5 s), where copying a file only
needs to know where each field and tensor lies. Fields are kept as their raw bytes, decoded only
for the scalars and numeric arrays asked for; the layout is the GGUF specification (v2/v3, little
endian) that gguf-py's `GGUFReader` and `GGUFWriter` also implement."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class Field:
    key: str
    kind: int  # GGUF value type
    raw: bytes  # the value as stored (type tag and value, without the key)
    element: int | None = None  # ARRAY: the element type
    count: int = 1  # ARRAY: the number of elements

    def value(self) -> Any:
        """A scalar, a string, or a list of numbers (arrays of strings are not decoded)."""
        if self.kind == STRING:
            return self.raw[12:].decode("utf-8")
        if self.kind in _SCALARS:
            return struct.unpack_from("<" + _SCALARS[self.kind], self.raw, 4)[0]
        if self.kind == ARRAY and self.element in _SCALARS:
            return list(struct.unpack_from(f"<{self.count}{_SCALARS[self.element]}", self.raw, 16))
        raise ValueError(f"{self.key}: an array of {self.element} is not decoded")


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    kind: int  # GGML type
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: list[Tensor]
    alignment: int
    data_start: int

    def get(self, key: str) -> Any:
        return self.fields[key].value()


def read_header(path: Path) -> Header:
    """Every field and tensor of the GGUF file `path`, as spans (no tensor data is read)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", m, 4)
        pos = 24
        fields: dict[str, Field] = {}
        for _ in range(n_fields):
            key, pos = _string(m, pos)
            start = pos
            (kind,) = struct.unpack_from("<I", m, pos)
            element, count = None, 1
            if kind == ARRAY:
                element, count = struct.unpack_from("<IQ", m, pos + 4)
                pos = _skip_values(m, pos + 16, element, count)
            else:
                pos = _skip_values(m, pos + 4, kind, 1)
            fields[key] = Field(key, kind, bytes(m[start:pos]), element, count)
        tensors = []
        for _ in range(n_tensors):
            name, pos = _string(m, pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            kind, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            tensors.append(Tensor(name, tuple(dims), kind, offset, math.prod(dims) // block * size))
    alignment = fields["general.alignment"].value() if "general.alignment" in fields else 32
    return Header(Path(path), version, fields, tensors, alignment, _aligned(pos, alignment))


def encode_field(key: str, field: Field, value: Any = None) -> bytes:
    """A field's bytes (key included): as stored, or with a new scalar / numeric-array `value`."""
    raw = field.raw
    if value is not None:
        if field.kind in _SCALARS:
            raw = struct.pack("<I" + _SCALARS[field.kind], field.kind, value)
        elif field.kind == ARRAY and field.element in _SCALARS:
            raw = struct.pack(f"<IIQ{len(value)}{_SCALARS[field.element]}", ARRAY, field.element, len(value), *value)
        elif field.kind == STRING:
            data = value.encode("utf-8")
            raw = struct.pack("<IQ", STRING, len(data)) + data
        else:
            raise ValueError(f"{key}: cannot rewrite a field of type {field.kind}")
    return encode_string(key) + raw


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _string(m: Any, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", m, pos)
    return bytes(m[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _skip_values(m: Any, pos: int, kind: int, count: int) -> int:
    if kind in _SCALARS:
        return pos + count * struct.calcsize("<" + _SCALARS[kind])
    if kind == STRING:
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + length
        return pos
    if kind == ARRAY:  # nested arrays: rare, read element by element
        for _ in range(count):
            element, n = struct.unpack_from("<IQ", m, pos)
            pos = _skip_values(m, pos + 12, element, n)
        return pos
    raise ValueError(f"unknown GGUF value type {kind}")


def _aligned(pos: int, alignment: int) -> int:
    return pos + (-pos) % alignment
