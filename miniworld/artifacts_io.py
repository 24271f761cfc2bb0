"""Finding and loading the committed mini-world artifacts (base, experts, scorers)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import ARTIFACTS
from .lora_files import CKPT_PREFIXES



class MissingArtifacts(RuntimeError):
    pass


def manifest(root: Path = ARTIFACTS) -> dict:
    path = root / "manifest.json"
    if not path.exists():
        raise MissingArtifacts(f"no mini world at {root}: run `diffgraph miniworld build`")
    return json.loads(path.read_text())


def expert_entry(slug: str, root: Path = ARTIFACTS) -> dict:
    for entry in manifest(root)["experts"]:
        if entry["slug"] == slug:
            return entry
    raise KeyError(f"no mini-world expert named {slug!r}")


def expert_file(slug: str, root: Path = ARTIFACTS) -> Path:
    return root / expert_entry(slug, root)["file"]


def load_pipeline(root: Path = ARTIFACTS, device: str = "cpu"):
    from .models import load_base_pipeline

    return load_base_pipeline(root / manifest(root)["base"], device)


def split_single_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A single-file checkpoint -> {"unet": sd, "vae": sd, "text_encoder": sd}."""
    tensors = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {p.rstrip("."): {} for p in CKPT_PREFIXES}
    for key, value in tensors.items():
        prefix = next((p for p in CKPT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{path.name}: unexpected tensor {key!r} in a single-file checkpoint")
        parts[prefix.rstrip(".")][key[len(prefix):]] = value
    return parts


@lru_cache(maxsize=2)
def load_scorers(root: Path = ARTIFACTS):
    from .scorers import MetricSuite

    return MetricSuite.load(root / manifest(root)["scorers"])
