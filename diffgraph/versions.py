"""The library versions a result depends on: printed by ``diffgraph info`` and recorded in
every benchmark's JSON, so a figure says what it was measured with.

Versions are read from the installed distributions' metadata (no library is imported), and a
library that is absent is reported as ``None`` rather than guessed."""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "chromadb", "langgraph", "gradio", "safetensors")


def library_versions() -> dict[str, str | None]:
    """{"python": ..., "diffgraph": ..., then each of LIBRARIES}; torch keeps its build label
    (2.13.0+cpu), which says whether a figure came from the CPU or a CUDA build."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("diffgraph", *LIBRARIES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
