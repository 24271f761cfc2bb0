"""Planner checkpoints: a directory with the weights (model.safetensors) and a JSON schema
(planner.json) saying what graph the weights expect.

Weights alone would be misread silently by a graph with other metrics, another metric order,
other normalisation or another embedding model, so the JSON records all of it: embedding
model and dimension, metric names with their mean/std, the node and edge feature columns,
the layer type and sizes, and how the planner was trained. Nothing in it counts or names
experts, so experts added after training need nothing new here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from safetensors.torch import load, save

from diffgraph.files import atomic_write_bytes, atomic_write_text

from .features import FeatureSchema
from .model import VGAEPlanner

FORMAT = "diffgraph-planner"
VERSION = 1
WEIGHTS = "model.safetensors"
SCHEMA = "planner.json"


def save_planner(planner: VGAEPlanner, directory: str | Path) -> Path:
    """Write the weights, then the JSON that describes them, each to a temporary name renamed
    into place (a crash never leaves half a file under the real name). The JSON records the
    weights' sha256, so weights that a crash left beside an older JSON are refused on load
    rather than read with the wrong schema. Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = save({k: v.detach().contiguous() for k, v in planner.state_dict().items()}, metadata={"format": FORMAT})
    atomic_write_bytes(directory / WEIGHTS, weights)
    schema = {"format": FORMAT, "version": VERSION, "features": planner.schema.to_dict(),
              "model": planner.config, "training": planner.training_info,
              "weights_sha256": hashlib.sha256(weights).hexdigest()}
    atomic_write_text(directory / SCHEMA, json.dumps(schema, indent=2, sort_keys=True) + "\n")
    return directory


def load_planner(directory: str | Path, metric_names: Sequence[str] | None = None) -> VGAEPlanner:
    """The planner saved in ``directory``, in eval mode. With ``metric_names`` (the graph's),
    a planner trained on other metrics is refused here rather than at the first prompt."""
    directory = Path(directory)
    meta = json.loads((directory / SCHEMA).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{directory / SCHEMA} is not a {FORMAT} v{VERSION} checkpoint")
    schema = FeatureSchema.from_dict(meta["features"])
    if metric_names is not None:
        schema.check_metrics(metric_names)
    model = dict(meta["model"])
    if model.pop("layer") != "TransformerConv":
        raise ValueError(f"{directory} holds a planner with another layer type than this code builds")
    planner = VGAEPlanner(schema, **model)
    data = (directory / WEIGHTS).read_bytes()
    if meta.get("weights_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise ValueError(f"{directory / WEIGHTS} is not the file {SCHEMA} describes (sha256 differs; "
                         "an interrupted save?); train or copy the planner again")
    planner.load_state_dict(load(data))
    planner.training_info = meta.get("training", {})
    return planner.eval()
