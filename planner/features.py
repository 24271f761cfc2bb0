"""From the activated subgraph (a HeteroData view) to the one graph the encoder eats.

The view keeps node and edge types apart; the encoder wants one node matrix and one edge
list, with the types written into the features so that one set of weights serves every
type. Node order is fixed: the user prompt (node 0), the experts in the view's order, then
the reference prompts.

Node features, ``schema.node_columns``:
    [MiniLM embedding (384) | node type one-hot (3) | expert kind one-hot, ckpt/lora (2)]
The kind matters because the merger treats the two kinds differently (a softmax within each
kind), so the same skill is worth a different coefficient on a checkpoint and on a LoRA.

Edge features, ``schema.edge_columns``, one layout for every edge kind:
    [edge kind one-hot (3) | metric z-scores (M) | cosine similarity, z-scored per edge kind (1)]
- calibrated_on, expert <-> reference prompt r: the calibration scores, z-scored per metric
  with statistics fitted once on the training graph and stored in the checkpoint (raw
  metrics live on unrelated scales, e.g. CLIP ~0.3 and aesthetic ~5), and cos(prompt, r);
- similar_to, user prompt <-> every reference prompt r: cos(prompt, r);
- asks, user prompt <-> every expert: cos(prompt, expert description), the retrieval signal.
Columns an edge kind does not use are zero. Every edge is present in both directions.

Why the cosines are z-scored too (per edge kind, statistics fitted on the training subgraphs):
MiniLM cosines between a prompt and an expert description sit in a narrow band (about
0.3-0.6 in the mini world), and what separates an expert the prompt asked for from a marginal
one is a difference of about 0.1 in that band, beside z-scores of order 1. Raw, that
difference needs large first-layer weights before the reward can act on it, which REINFORCE's
few hundred noisy steps do not reach; z-scored, it is a unit-scale input from the first step.

Why the similar_to edges: a calibration score says how well an expert rendered one reference
prompt, which only matters for a user prompt that resembles it. With the prompt linked to
every reference, two hops bring each expert its scores on the references, each reference
already carrying its similarity to the user prompt (hop 1: prompt -> reference; hop 2:
reference -> expert, the edge holding that expert's scores there). An attention layer can
then weight each expert's scores by how close their reference is to what the user asked,
which neither the description embedding nor an average score over all references expresses.

Why the calibration edge also carries cos(prompt, r): the two-hop route alone makes the
attention learn a product of two learned quantities before any reward signal gets through,
and on the synthetic task of tests/test_planner.py REINFORCE rarely found it in 200 steps:
with seeds 0-7, 1 of 8 runs met the test's criteria (reward up, error halved on training and
on held-out prompts) without the cosine on the calibration edge, 8 of 8 with it. The
subgraph is built per prompt anyway, so "how relevant is this measurement to this prompt" is
a property of the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch_geometric.data import Data, HeteroData

from ..graph_store.views import activated_subgraph
from ..text_embedding import DIM

if TYPE_CHECKING:
    from ..graph_store.store import GraphStore

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
NODE_TYPES = ("user_prompt", "expert", "reference_prompt")
KINDS = ("ckpt", "lora")
EDGE_KINDS = ("calibrated_on", "similar_to", "asks")
CALIBRATED = ("expert", "calibrated_on", "reference_prompt")


class SchemaMismatch(ValueError):
    """A graph does not fit the feature schema a planner was trained with."""


@dataclass(frozen=True)
class FeatureSchema:
    """Everything featurisation needs besides the graph; saved in the checkpoint, so a loaded
    planner reads a graph exactly as it did in training."""

    metric_names: tuple[str, ...]
    metric_mean: tuple[float, ...]
    metric_std: tuple[float, ...]
    embedding_model: str = EMBEDDING_MODEL
    embedding_dim: int = DIM
    cosine_mean: tuple[float, ...] = (0.0,) * len(EDGE_KINDS)  # per edge kind, EDGE_KINDS' order
    cosine_std: tuple[float, ...] = (1.0,) * len(EDGE_KINDS)

    @classmethod
    def fit(cls, graphs: Sequence[HeteroData], embedding_model: str = EMBEDDING_MODEL) -> "FeatureSchema":
        """Metric names and per-metric mean/std of the calibration edges in ``graphs``, each
        edge counted once however many graphs hold it (statistics of the universal graph, not
        of how often the selection picks an expert)."""
        names = {tuple(g.metric_names) for g in graphs if g[CALIBRATED].edge_index.numel()}
        if len(names) != 1:
            raise SchemaMismatch(f"need calibration edges with one list of metric names, found {sorted(names)}")
        edges: dict[tuple[str, int], torch.Tensor] = {}
        for g in graphs:
            src, dst = g[CALIBRATED].edge_index
            for e, r, scores in zip(src.tolist(), dst.tolist(), g[CALIBRATED].edge_attr):
                edges[(g.expert_ids[e], g.reference_prompt_ids[r])] = scores
        scores = torch.stack(list(edges.values())).double()
        dims = {g["user_prompt"].x.shape[1] for g in graphs}
        if len(dims) != 1:
            raise SchemaMismatch(f"graphs disagree on the embedding dimension: {sorted(dims)}")
        cosines = [torch.cat(c).double() for c in zip(*(_cosines(g) for g in graphs))]
        return cls(next(iter(names)), tuple(scores.mean(dim=0).tolist()), tuple(_std(scores).tolist()),
                   embedding_model, dims.pop(), tuple(float(c.mean()) for c in cosines),
                   tuple(float(_std(c)) for c in cosines))

    @property
    def node_columns(self) -> list[str]:
        return ([f"embedding[{self.embedding_dim}]"] + [f"type={t}" for t in NODE_TYPES]
                + [f"kind={k}" for k in KINDS])

    @property
    def edge_columns(self) -> list[str]:
        return [f"edge={k}" for k in EDGE_KINDS] + [f"metric={m}" for m in self.metric_names] + ["cosine"]

    @property
    def node_dim(self) -> int:
        return self.embedding_dim + len(NODE_TYPES) + len(KINDS)

    @property
    def edge_dim(self) -> int:
        return len(EDGE_KINDS) + len(self.metric_names) + 1

    def to_dict(self) -> dict:
        return {"embedding_model": self.embedding_model, "embedding_dim": self.embedding_dim,
                "metric_names": list(self.metric_names), "metric_mean": list(self.metric_mean),
                "metric_std": list(self.metric_std), "cosine_mean": list(self.cosine_mean),
                "cosine_std": list(self.cosine_std), "node_columns": self.node_columns,
                "edge_columns": self.edge_columns}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSchema":
        """A checkpoint written before the cosines were z-scored has no cosine statistics and
        was trained on raw cosines, which the defaults (mean 0, std 1) reproduce."""
        schema = cls(tuple(d["metric_names"]), tuple(d["metric_mean"]), tuple(d["metric_std"]),
                     d["embedding_model"], int(d["embedding_dim"]),
                     tuple(d.get("cosine_mean", cls.cosine_mean)), tuple(d.get("cosine_std", cls.cosine_std)))
        if d.get("node_columns", schema.node_columns) != schema.node_columns or \
                d.get("edge_columns", schema.edge_columns) != schema.edge_columns:
            raise SchemaMismatch("the checkpoint was written with another feature layout than this code builds")
        return schema

    def check_metrics(self, metric_names: Sequence[str]) -> None:
        if tuple(metric_names) != self.metric_names:
            raise SchemaMismatch(f"the planner was trained on metrics {list(self.metric_names)} but the graph has "
                                 f"{list(metric_names)}; recalibrate, or train a planner on these metrics")


def activated_view(store: "GraphStore", expert_ids: list[str], prompt,
                   schema: FeatureSchema | None = None) -> HeteroData:
    """graph_store's view of ``expert_ids`` for ``prompt`` (text or embedding), its score
    columns in the schema's metric order when a schema is given."""
    metric_names = None if schema is None else list(schema.metric_names)
    return activated_subgraph(store, expert_ids, prompt, metric_names=metric_names)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _std(values: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation, 1 where a column is constant (it carries no signal)."""
    std = values.std(dim=0, unbiased=False)
    return torch.where(std > 1e-8, std, torch.ones_like(std))


def _cosines(data: HeteroData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw cosine column of each edge kind, in EDGE_KINDS' order: cos(prompt, r) per
    calibration edge, cos(prompt, r) per reference, cos(prompt, expert description) per expert."""
    x_p, x_e, x_r = (data[t].x.float() for t in NODE_TYPES)
    sim = _cosine(x_p, x_r)[0]
    return sim[data[CALIBRATED].edge_index[1]], sim, _cosine(x_p, x_e)[0]


def _one_hot(index: int | torch.Tensor, n: int, rows: int) -> torch.Tensor:
    index = torch.full((rows,), index) if isinstance(index, int) else index
    return F.one_hot(index.long(), n).float()


def _block(kind: str, src: torch.Tensor, dst: torch.Tensor, scores: torch.Tensor, cosine: torch.Tensor,
           schema: FeatureSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges src -> dst of one kind and their features [kind one-hot | scores | z-scored cosine]."""
    k = EDGE_KINDS.index(kind)
    kind_columns = _one_hot(k, len(EDGE_KINDS), src.shape[0])
    z = (cosine - schema.cosine_mean[k]) / schema.cosine_std[k]
    return torch.stack([src, dst]), torch.cat([kind_columns, scores, z.reshape(-1, 1)], dim=1)


def featurise(data: HeteroData, schema: FeatureSchema) -> Data:
    """One homogeneous graph: ``x``, ``edge_index``, ``edge_attr`` as the module docstring lays
    out, plus ``prompt_index`` (the user prompt node), ``expert_index`` (the expert nodes, in
    the view's order) and ``expert_prompt_index`` (each expert's user prompt node). Attributes
    named *index are shifted by torch_geometric's batching, so a Batch of these decodes
    correctly."""
    x_p, x_e, x_r = (data[t].x.float() for t in NODE_TYPES)
    if x_p.shape[1] != schema.embedding_dim:
        raise SchemaMismatch(f"node embeddings are {x_p.shape[1]}-d, the planner expects "
                             f"{schema.embedding_dim}-d ({schema.embedding_model})")
    n, r = x_e.shape[0], x_r.shape[0]
    unknown = sorted(set(data.expert_kinds) - set(KINDS))
    if unknown:
        raise SchemaMismatch(f"unknown expert kinds {unknown}; the planner knows {list(KINDS)}")
    kinds = torch.tensor([KINDS.index(k) for k in data.expert_kinds], dtype=torch.long)
    x = torch.cat([
        torch.cat([x_p, x_e, x_r]),
        torch.cat([_one_hot(i, len(NODE_TYPES), m) for i, m in enumerate((1, n, r))]),
        torch.cat([torch.zeros(1, len(KINDS)), _one_hot(kinds, len(KINDS), n), torch.zeros(r, len(KINDS))]),
    ], dim=1)

    cal_index = data[CALIBRATED].edge_index
    if cal_index.numel():
        schema.check_metrics(data.metric_names)
    m = len(schema.metric_names)
    scores = data[CALIBRATED].edge_attr.reshape(cal_index.shape[1], m).float()
    z = (scores - torch.tensor(schema.metric_mean)) / torch.tensor(schema.metric_std)
    experts, refs = torch.arange(1, n + 1), torch.arange(n + 1, n + r + 1)
    calibrated, similar, asks = _cosines(data)
    blocks = [_block("calibrated_on", experts[cal_index[0]], refs[cal_index[1]], z, calibrated, schema),
              _block("similar_to", torch.zeros_like(refs), refs, torch.zeros(r, m), similar, schema),
              _block("asks", torch.zeros_like(experts), experts, torch.zeros(n, m), asks, schema)]
    edge_index = torch.cat([e for e, _ in blocks], dim=1)
    edge_attr = torch.cat([a for _, a in blocks])
    return Data(x=x, edge_index=torch.cat([edge_index, edge_index.flip(0)], dim=1),
                edge_attr=torch.cat([edge_attr, edge_attr]), prompt_index=torch.zeros(1, dtype=torch.long),
                expert_index=experts, expert_prompt_index=torch.zeros_like(experts), num_nodes=1 + n + r)
