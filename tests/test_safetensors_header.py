"""The one safetensors header parser, against generated files: whatever the bytes, it answers
a Header or a one-line InvalidHeader, and a header it accepts is one the safetensors library
reads the same way (names, dtypes, shapes, bytes of every tensor)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save

from diffgraph.safetensors_header import Header, InvalidHeader, read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]

tensors = st.dictionaries(
    st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    min_size=1, max_size=5)  # save({}, metadata={}) writes a broken header in safetensors 0.8
metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3)


def _file_bytes(spec: dict, meta: dict | None) -> bytes:
    made = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    return save(made, metadata=meta)


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "length", "header-json"]))
    if kind == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if kind == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    victim = draw(st.sampled_from(sorted(header))) if header else None
    if victim is not None and victim != "__metadata__":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[victim][field] = draw(st.sampled_from(["F64", "X9", [1, 2], [-1], [0, 10**12], None, [True, 1], 3.5]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def _write(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


def _library_view(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape()), f.get_tensor(k).numel())
                    for k in f.keys()}
    except Exception:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors, metadata, st.data())
def test_any_bytes_give_a_header_or_one_line_refusal_and_accepted_headers_agree_with_the_library(spec, meta, data):
    raw = _file_bytes(spec, meta)
    if data.draw(st.booleans()):
        raw = _mutate(raw, data.draw)
    path = _write(raw)
    try:
        try:
            header = read_header(path)
        except InvalidHeader as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"{path.name}: not a valid safetensors file: ")
            return
        assert isinstance(header, Header)
        library = _library_view(path)
        assert library is not None, "accepted a file the safetensors library cannot read"
        assert set(library) == set(header.tensors)
        for name, info in header.tensors.items():
            begin, end = info["data_offsets"]
            assert header.data_start + end <= len(raw)
            assert library[name][1] == info["shape"]
        assert header.metadata == (meta or {}) or raw != _file_bytes(spec, meta)
    finally:
        path.unlink()


@given(tensors, metadata)
def test_well_formed_files_are_read_exactly(spec, meta):
    raw = _file_bytes(spec, meta)
    path = _write(raw)
    try:
        header = read_header(path)
    finally:
        path.unlink()
    assert set(header.tensors) == set(spec) and header.metadata == (meta or {})
    n = struct.unpack("<Q", raw[:8])[0]
    assert header.data_start == 8 + n


@pytest.mark.parametrize("raw, problem", [
    (b"", "too short"), (struct.pack("<Q", 1) + b"{", "not sane"), (struct.pack("<Q", 50) + b"{}", "exceeds the file"),
    (struct.pack("<Q", 2) + b"[]", "does not start with '{'"),
    (struct.pack("<Q", 16) + b'{"a":1, "a":2}  ', "duplicate key"),
])
def test_named_problems(raw, problem, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(InvalidHeader, match=problem):
        read_header(path)
