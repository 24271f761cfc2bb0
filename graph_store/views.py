"""The activated subgraph: what the planner sees for one user prompt.

Node types:
- "user_prompt": one node, x = the prompt's embedding;
- "expert": the selected experts in the order given, x = their description embeddings;
- "reference_prompt": the prompts those experts were calibrated on (their one-hop
  neighbours), sorted by id, x = the prompt embeddings.

Edge types:
- ("expert", "calibrated_on", "reference_prompt"), edge_attr = the score vectors (float32,
  columns in ``data.metric_names`` order), and its reverse "rev_calibrated_on";
- ("user_prompt", "asks", "expert") from the prompt to every expert, without weights (the
  planner predicts them), and its reverse "rev_asks".
Reverse types follow torch_geometric's ToUndirected naming, so message passing reaches every
node type. An expert without calibration edges (added after training) is still a node.

Plain attributes: ``expert_ids`` and ``expert_kinds`` (node order), ``reference_prompt_ids``,
``metric_names``.

This runs per prompt, so it costs one catalog query for the rows, one for the edges, one
Chroma get per partition involved, and reads reference prompt embeddings from a cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch_geometric.data import HeteroData

if TYPE_CHECKING:
    from .store import GraphStore


def _edge_scores(edges, metric_names: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Score matrix (E, M). Without ``metric_names`` every edge must share one metric list;
    with it, columns are picked by name, so a planner trained on that order always gets it."""
    if metric_names is None:
        names = {tuple(e.metric_names) for e in edges}
        if len(names) > 1:
            raise ValueError(f"calibration edges disagree on metric names {sorted(names)}; "
                             "pass metric_names= to pick columns, or recalibrate")
        metric_names = list(next(iter(names))) if names else []
        rows = [e.scores for e in edges]
    else:
        rows = []
        for e in edges:
            index = {name: i for i, name in enumerate(e.metric_names)}
            missing = [m for m in metric_names if m not in index]
            if missing:
                raise ValueError(f"edge {e.expert_id} -> {e.prompt_id} has no scores for {missing}")
            rows.append([e.scores[index[m]] for m in metric_names])
    return list(metric_names), np.asarray(rows, dtype=np.float32).reshape(len(edges), len(metric_names))


def activated_subgraph(store: "GraphStore", expert_ids: list[str], prompt,
                       metric_names: list[str] | None = None) -> HeteroData:
    """Build the subgraph of ``expert_ids`` for ``prompt`` (text, or its embedding)."""
    expert_ids = list(expert_ids)
    if len(set(expert_ids)) != len(expert_ids):
        raise ValueError("expert ids must be distinct")
    rows = store.catalog.get_many(expert_ids)
    expert_x = store.vectors.get_embeddings(expert_ids, {(r.base_model, r.kind) for r in rows})
    if isinstance(prompt, str):
        prompt_x = np.asarray(store.embed([prompt]), dtype=np.float32)
    else:
        prompt_x = np.asarray(prompt, dtype=np.float32).reshape(1, -1)

    edges = store.catalog.calibration(expert_ids)
    metric_names, scores = _edge_scores(edges, metric_names)
    prompt_ids = sorted({e.prompt_id for e in edges})
    ref_x = store.catalog.reference_prompt_embeddings(prompt_ids)
    expert_index = {eid: i for i, eid in enumerate(expert_ids)}
    prompt_index = {pid: i for i, pid in enumerate(prompt_ids)}
    calibrated = torch.tensor([[expert_index[e.expert_id] for e in edges],
                               [prompt_index[e.prompt_id] for e in edges]], dtype=torch.long).reshape(2, -1)
    asks = torch.stack([torch.zeros(len(expert_ids), dtype=torch.long), torch.arange(len(expert_ids))])
    edge_attr = torch.from_numpy(scores)

    data = HeteroData()
    data["user_prompt"].x = torch.from_numpy(prompt_x)
    data["expert"].x = torch.from_numpy(expert_x)
    data["reference_prompt"].x = torch.from_numpy(ref_x)
    data["expert", "calibrated_on", "reference_prompt"].edge_index = calibrated
    data["expert", "calibrated_on", "reference_prompt"].edge_attr = edge_attr
    data["reference_prompt", "rev_calibrated_on", "expert"].edge_index = calibrated.flip(0)
    data["reference_prompt", "rev_calibrated_on", "expert"].edge_attr = edge_attr
    data["user_prompt", "asks", "expert"].edge_index = asks
    data["expert", "rev_asks", "user_prompt"].edge_index = asks.flip(0)
    data.expert_ids = expert_ids
    data.expert_kinds = [r.kind for r in rows]
    data.reference_prompt_ids = prompt_ids
    data.metric_names = metric_names
    return data
