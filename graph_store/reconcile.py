"""Find and repair drift between the catalog (the truth) and Chroma (a derived copy).

The invariant (see store.py): every expert with a description text has exactly one vector, in
the partition of its (base_model, kind), whose metadata carries the catalog's status and the
hash of the catalog's description text; there are no other vectors. Drift, by kind:

- missing:   a described expert has no vector in its partition        -> embed and store
- stale:     its vector embeds another text (hash differs)            -> re-embed from description_text
- misplaced: a vector sits in another partition (kind/base changed)   -> move it (re-embed if stale too)
- stray:     a vector whose id is not a described expert in the catalog -> delete
- status:    status (or kind/base_model) metadata differs from the catalog -> update metadata

Everything is derived from one listing of each store, embeddings are computed in one batch,
and after a repair a second call finds nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .vectors import description_sha256, partition_name

if TYPE_CHECKING:
    from .store import GraphStore

DRIFT_KINDS = ("missing", "stale", "misplaced", "stray", "status")


def reconcile(store: "GraphStore", *, repair: bool = True) -> dict:
    """Compare catalog and Chroma; repair unless ``repair`` is False. Returns a report:
    ``{"experts": n described, "vectors": n stored, <drift kind>: [ids], "clean": bool,
    "repaired": bool}``."""
    described = {row.id: row for row in store.catalog.list_experts() if row.description_text}
    entries = store.vectors.entries()
    report: dict = {"experts": len(described), "vectors": len(entries), **{k: [] for k in DRIFT_KINDS}}

    in_place = {}  # expert id -> its entry in the right partition
    misplaced = set()  # entries of described experts in a wrong partition
    for entry in entries:
        row = described.get(entry.expert_id)
        if row is None:
            report["stray"].append(entry.expert_id)
        elif entry.collection == partition_name(row.base_model, row.kind):
            in_place[entry.expert_id] = entry
        else:
            misplaced.add(entry)
            report["misplaced"].append(entry.expert_id)

    to_embed, to_move, to_label = [], [], []
    copies: dict[str, list] = {}
    for e in misplaced:
        copies.setdefault(e.expert_id, []).append(e)
    moved = {i: found[0] for i, found in copies.items() if len(found) == 1}  # else: which copy? re-embed
    for expert_id, row in described.items():
        want = description_sha256(row.description_text)
        entry = in_place.get(expert_id)
        if entry is None:
            source = moved.get(expert_id)
            if source is not None and source.description_sha256 == want:
                to_move.append(expert_id)
            else:
                to_embed.append(expert_id)
                report["stale" if expert_id in copies else "missing"].append(expert_id)
        elif entry.description_sha256 != want:
            to_embed.append(expert_id)
            report["stale"].append(expert_id)
        elif (entry.status, entry.kind, entry.base_model) != (row.status, row.kind, row.base_model):
            to_label.append(expert_id)
            report["status"].append(expert_id)

    for key in DRIFT_KINDS:
        report[key] = sorted(set(report[key]))
    report["clean"] = not any(report[k] for k in DRIFT_KINDS)
    report["repaired"] = False
    if not repair or report["clean"]:
        return report

    vectors = store.vectors
    # Fetch what moves before deleting the wrong copies; everything else is rewritten in place.
    new_vectors = dict(zip(to_move, vectors.get_embeddings(to_move))) if to_move else {}
    vectors.remove(e for e in entries if e.expert_id not in described or e in misplaced)
    if to_embed:
        new_vectors.update(zip(to_embed, store.embed([described[i].description_text for i in to_embed])))
    if to_label:
        new_vectors.update(zip(to_label, vectors.get_embeddings(to_label)))
    vectors.upsert_many((i, vector, described[i].kind, described[i].base_model, described[i].status,
                         described[i].description_text) for i, vector in new_vectors.items())
    report["repaired"] = True
    return report
