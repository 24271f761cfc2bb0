"""What a GCA pass may write to a store, captured per expert, and the assertions the
bad-input and crash tests make with it: a hostile expert ends refused with a one-line reason and
nothing that belongs to any other expert changes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.store import GraphStore


@dataclass
class Snapshot:
    """Everything a pass may write, per expert: catalog row (timestamps included), calibration
    edges, vector (metadata and embedding); plus reference prompts and stored blobs."""

    rows: dict[str, dict]
    prompts: list[tuple[int, str]]
    edges: dict[str, list[tuple]]
    vectors: dict[str, tuple]
    blobs: set[str]


def snapshot(home: Path) -> Snapshot:
    with GraphStore.open(home) as store:
        rows = {r.id: r.to_dict() for r in store.catalog.list_experts()}
        prompts = [(p.id, p.text) for p in store.catalog.reference_prompts()]
        edges: dict[str, list[tuple]] = {}
        for e in store.catalog.calibration():
            edges.setdefault(e.expert_id, []).append((e.prompt_id, tuple(e.scores), tuple(e.metric_names), e.seed))
        entries = store.vectors.entries()
        ids = [e.expert_id for e in entries]
        assert len(ids) == len(set(ids)), f"an expert has two vectors: {sorted(ids)}"
        embeddings = store.vectors.get_embeddings(ids)
        vectors = {e.expert_id: (e, v.tobytes()) for e, v in zip(entries, embeddings)}
    blobs = {p.relative_to(home).as_posix() for p in (home / "blobs").rglob("*") if p.is_file()} \
        if (home / "blobs").exists() else set()
    return Snapshot(rows, prompts, edges, vectors, blobs)


def assert_only(before: Snapshot, after: Snapshot, *expert_ids: str) -> None:
    """Nothing in the store changed except what belongs to ``expert_ids``: every other expert's
    catalog row, calibration edges and vector (metadata and embedding) are as they were."""
    mine = set(expert_ids)
    assert set(after.rows) == set(before.rows) | mine
    for other in set(before.rows) - mine:
        assert after.rows[other] == before.rows[other], f"{other}'s catalog row changed"
        assert after.edges.get(other) == before.edges.get(other), f"{other}'s calibration edges changed"
        assert after.vectors.get(other) == before.vectors.get(other), f"{other}'s vector changed"
    assert set(after.vectors) - mine == set(before.vectors) - mine
    assert set(after.edges) - mine == set(before.edges) - mine
    assert after.prompts == before.prompts
    assert before.blobs <= after.blobs
    own = {f["sha256"] for i in mine for f in after.rows[i]["files"]}
    assert all(Path(b).name in own for b in after.blobs - before.blobs), "a blob that is not the experts'"
    assert not [b for b in after.blobs if b.endswith(".partial")]


def assert_refused(row: dict, status: str, *needles: str) -> None:
    """Rejected/failed with a one-line reason naming the cause, and never described or calibrated."""
    reason = row["status_reason"] or ""
    assert row["status"] == status, f"{row['id']}: {row['status']} ({reason})"
    assert reason and "\n" not in reason and len(reason) <= 300, reason
    for needle in needles:
        assert needle.lower() in reason.lower(), f"{needle!r} not in {reason!r}"


def store_is_clean(home: Path) -> bool:
    """Catalog and Chroma agree (what `diffgraph graph reconcile --dry-run` checks)."""
    with GraphStore.open(home) as store:
        return reconcile(store, repair=False)["clean"]
