"""The safetensors format, read and written without decoding what need not be decoded.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range; padded to 8 bytes) and the tensors' raw bytes. Reading the header says where every
tensor lies, so kept tensors are copied byte range to byte range; computed ones are written
from memory. Only this module knows the layout and the dtype names.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import torch

from lm_eval_layers.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class RawBytes:
    """Where a tensor's bytes lie in a safetensors file: copyable without decoding."""

    path: Path
    start: int
    length: int


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (without `__metadata__`) and where its data starts;
    one clear error when the file is short, corrupt, truncated or uses an unknown dtype."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{path} is not a safetensors file (too short); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise UsageError(f"{path} is not a readable safetensors file (bad header length); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{path} has a corrupt safetensors header; re-download or re-save it") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        end = entry.get("data_offsets", [0, 0])[1]
        if data_start + end > size:
            raise UsageError(f"{path} is truncated (tensor {name} ends past the end of the file); re-download it")
        if entry.get("dtype") not in DTYPES:
            raise UsageError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
    return header, data_start


def read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def write_header(f: BinaryIO, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
    """The header for tensors (name, dtype, shape) whose bytes follow in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)


def write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def copy_bytes(f: BinaryIO, raw: RawBytes) -> None:
    """Append a tensor's bytes from another file: in the kernel where it can, else by reads."""
    f.flush()
    with raw.path.open("rb") as src:
        offset, left = raw.start, raw.length
        try:
            while left:
                n = os.copy_file_range(src.fileno(), f.fileno(), left, offset)
                if n == 0:
                    raise UsageError(f"{raw.path} ended early while copying; the file is truncated")
                offset += n
                left -= n
            f.seek(0, os.SEEK_END)
            return
        except (AttributeError, OSError):
            pass  # no copy_file_range (other OS or file system): plain reads
        src.seek(offset)
        while left:
            chunk = src.read(min(left, 64 << 20))
            if not chunk:
                raise UsageError(f"{raw.path} ended early while copying; the file is truncated")
            f.write(chunk)
            left -= len(chunk)
