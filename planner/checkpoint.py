"""Planner checkpoints: a directory with the weights (model.safetensors) and a JSON schema
(planner.json) saying what graph the weights expect.

Weights alone would be misread silently by a graph with other metrics, another metric order,
other normalisation or another embedding model, so the JSON records all of it: embedding
model and dimension, metric names with their mean/std, the node and edge feature columns,
the layer type and sizes, and how the planner was trained. Nothing in it counts or names
experts, so experts added after training need nothing new here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file, save_file

from .features import FeatureSchema
from .model import VGAEPlanner

FORMAT = "diffgraph-planner"
VERSION = 1
WEIGHTS = "model.safetensors"
SCHEMA = "planner.json"


def save_planner(planner: VGAEPlanner, directory: str | Path) -> Path:
    """Write the weights, then the JSON that describes them (so a reader never finds a schema
    for weights not yet written). Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in planner.state_dict().items()}, directory / WEIGHTS,
              metadata={"format": FORMAT})
    schema = {"format": FORMAT, "version": VERSION, "features": planner.schema.to_dict(),
              "model": planner.config, "training": planner.training_info}
    (directory / SCHEMA).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
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
    planner.load_state_dict(load_file(directory / WEIGHTS))
    planner.training_info = meta.get("training", {})
    return planner.eval()
