"""A safetensors file's header, read and checked without reading its tensors: the one parser
of the format in DiffGraph (downloads, the merge's reader, the mini world's hub and builder).

safetensors is the format we accept because loading it executes nothing, but a hostile or
damaged file can still lie in its header (offsets past the end, overlapping tensors, a
multi-gigabyte "header"), and loaders differ in how they cope. A header that passes
:func:`read_header` tiles its data section exactly, so readers may trust every offset. The
rules are the format's own (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from diffgraph.errors import DiffGraphError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class Header:
    """A checked header: tensor name -> {"dtype", "shape", "data_offsets"} (in file order), the
    free-form ``__metadata__`` (string to string), and where the data section starts (the
    tensors' offsets count from there)."""

    tensors: dict[str, dict]
    metadata: dict[str, str]
    data_start: int


class InvalidHeader(DiffGraphError, ValueError):
    """A file that is not a well-formed safetensors file (one line, naming the problem, which
    ``problem`` holds alone)."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


class _Invalid(Exception):
    pass


def read_header(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """The header of ``path`` if the file is well formed; InvalidHeader otherwise."""
    path = Path(path)
    try:
        return _check(path, max_header_bytes)
    except _Invalid as exc:
        raise InvalidHeader(f"{path.name}: not a valid safetensors file: {exc}", str(exc)) from None


def _raw_header(f: BinaryIO, size: int, max_header_bytes: int) -> bytes:
    """The header's bytes (JSON, space-padded) of an open file of ``size`` bytes, positioned at
    its start."""
    if size < 8:
        raise _Invalid(f"{size} bytes is too short to hold a header")
    (n,) = struct.unpack("<Q", f.read(8))
    if not 2 <= n <= max_header_bytes:
        raise _Invalid(f"header length {n} is not sane (limit {max_header_bytes})")
    if n > size - 8:
        raise _Invalid(f"header length {n} exceeds the file ({size} bytes; truncated?)")
    return f.read(n)


def looks_like_safetensors(path: str | Path) -> bool:
    """A cheap sniff (sane length prefix, then '{'), to tell safetensors from pickle content."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES and head[8:] == b"{"


def _check(path: Path, max_header_bytes: int) -> Header:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = _raw_header(f, size, max_header_bytes)
    header = _parse(raw)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Invalid("__metadata__ must map strings to strings")
    _check_layout(header, data_bytes=size - 8 - len(raw))
    return Header(header, metadata, 8 + len(raw))


def _parse(raw: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise _Invalid(f"duplicate key {key!r}")
            seen[key] = value
        return seen

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("header is not UTF-8") from None
    if not text.startswith("{"):
        raise _Invalid("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(header, dict):
        raise _Invalid("header is not a JSON object")
    return header


def _check_layout(tensors: dict, data_bytes: int) -> None:
    """Each tensor's byte range matches its dtype and shape; together the ranges tile the data
    section exactly: no overlap, no gap, nothing past the end, nothing trailing."""
    spans = []
    for name, info in tensors.items():
        begin, end = _tensor_span(name, info)
        if end > data_bytes:
            raise _Invalid(f"tensor {name!r} ends at data byte {end} but the file holds {data_bytes} (truncated?)")
        spans.append((begin, end, name))
    expected, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < expected:
            raise _Invalid(f"tensors {previous!r} and {name!r} overlap")
        if begin > expected:
            raise _Invalid(f"{begin - expected} unaccounted bytes before tensor {name!r}")
        expected, previous = end, name
    if expected != data_bytes:
        raise _Invalid(f"{data_bytes - expected} trailing bytes after the last tensor")


def _tensor_span(name: str, info) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _Invalid(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _Invalid(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Invalid(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise _Invalid(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise _Invalid(f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes "
                       f"but its offsets span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
