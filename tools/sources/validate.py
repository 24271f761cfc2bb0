"""Admission checks for a downloaded safetensors file, reading its header and bits, never
loading its tensors: the download store runs them before a file enters the store.

The header must be well formed (:func:`diffgraph.safetensors_header.read_header`). A
well-formed file can still hold NaN or Inf weights (a diverged training run, or a file made to
poison every merge it enters: one NaN in a LoRA delta turns the merged model's images black).
:func:`check_finite` streams the data section once, reading each floating-point tensor's bits
(the exponent field, so no float conversion is needed) and refuses the file at the first
non-finite value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffgraph.safetensors_header import MAX_HEADER_BYTES, Header, InvalidHeader, looks_like_safetensors, read_header

from .errors import InvalidSafetensors


def validate_safetensors(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Return the header of ``path`` if the file is well formed; raise InvalidSafetensors
    (one line, naming the problem) otherwise."""
    try:
        return read_header(path, max_header_bytes=max_header_bytes)
    except InvalidHeader as exc:
        raise InvalidSafetensors(str(exc)) from None


# Non-finite values by their bits: (unsigned view, mask, value under the mask meaning NaN/Inf).
# IEEE formats are NaN or Inf when the exponent field is all ones; float8 e4m3fn has no Inf and
# one NaN pattern per sign (S.1111.111); e8m0 has one NaN (0xFF); F4/F6 and integers have neither.
_NONFINITE = {
    "F16": (np.uint16, 0x7C00, 0x7C00), "BF16": (np.uint16, 0x7F80, 0x7F80),
    "F32": (np.uint32, 0x7F800000, 0x7F800000), "C64": (np.uint32, 0x7F800000, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000),
    "F8_E5M2": (np.uint8, 0x7C, 0x7C), "F8_E4M3": (np.uint8, 0x7F, 0x7F), "F8_E8M0": (np.uint8, 0xFF, 0xFF),
}
_CHUNK = 8 << 20


def check_finite(path: str | Path, header: Header | None = None) -> None:
    """Raise InvalidSafetensors (one line) if any floating-point tensor of a well-formed file
    holds a NaN or an Inf. Reads the data section once, in chunks, without loading tensors."""
    path = Path(path)
    header = header or validate_safetensors(path)
    with open(path, "rb") as f:
        start = header.data_start
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            rule = _NONFINITE.get(info["dtype"])
            begin, end = info["data_offsets"]
            if rule is None or begin == end:
                continue
            view, mask, bad = rule
            step = _CHUNK - _CHUNK % np.dtype(view).itemsize
            f.seek(start + begin)
            count, at = 0, begin
            while at < end:
                raw = f.read(min(step, end - at))
                if not raw:
                    raise InvalidSafetensors(f"{path.name}: not a valid safetensors file: tensor {name!r} is truncated")
                bits = np.frombuffer(raw, dtype=view)
                count += int(np.count_nonzero((bits & view(mask)) == view(bad)))
                at += len(raw)
            if count:
                raise InvalidSafetensors(f"{path.name}: tensor {name!r} ({info['dtype']}) holds {count} NaN/Inf "
                                         "values; refusing non-finite weights")


__all__ = ["Header", "check_finite", "looks_like_safetensors", "validate_safetensors"]
