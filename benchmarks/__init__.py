"""DiffGraph benchmarks: scripts that print figures and write them to benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

from diffgraph.versions import library_versions


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON with the library versions it ran on (key "versions"), the one
    way every benchmark saves its figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "versions": library_versions()}, indent=1) + "\n")
    return path
