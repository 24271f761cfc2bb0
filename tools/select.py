"""Select: the experts worth merging for a prompt (paper Sec. 3.2, retrieve and review).

Retrieval asks the graph's vector partitions of one base model only, so an expert of another
base can never be chosen: the top K1 checkpoints by the prompt's summary, the top K2 LoRAs per
visual attribute. The review rules (what the offline brain applies and an LLM's answer is
checked against) live here too: a candidate is relevant if its description is very similar to
what it was retrieved for, or fairly similar and sharing a content word with it (so "white
background" does not pull in a navy-background expert just because both are about
backgrounds); of near-duplicates the better calibrated stays; at most one checkpoint and
MAX_LORAS LoRAs.
"""

from __future__ import annotations

import re
from typing import TypedDict

import numpy as np

from diffgraph.graph_store.records import UsePolicy
from diffgraph.graph_store.store import GraphStore

K1_CKPT = 3
K2_LORA = 2
SURE = 0.60
PLAUSIBLE = {"lora": 0.35, "ckpt": 0.30}  # the summary is longer than an attribute, so it matches less
REDUNDANT = 0.85  # two candidates this similar are near-duplicates: keep the better calibrated
MAX_LORAS = 4
GENERIC_WORDS = frozenset(
    "background backdrop light lighting image picture photo shape style color colour object scene subject "
    "the and with for lora checkpoint adapter full skills visual attributes trigger words".split())


class Pick(TypedDict):
    id: str
    kind: str
    similarity: float
    query: str  # the summary or attribute it was retrieved for
    reason: str


def retrieve(store: GraphStore, summary: str, attributes: list[str], base_model: str,
             policy: UsePolicy = UsePolicy()) -> list[Pick]:
    """Candidates of ``base_model`` that ``policy`` admits (NSFW ones only when it says so, only
    licences granting its terms), most similar first; a LoRA found for several attributes keeps
    its best match."""
    picks: dict[str, Pick] = {}
    admit = None if policy == UsePolicy(nsfw=True) else lambda ids: admitted_ids(store, ids, policy)
    summary_vector = np.asarray(store.embed([summary]), dtype=np.float32)[0]
    for expert_id, similarity, _ in store.vectors.query(summary_vector, kind="ckpt", base_model=base_model, k=K1_CKPT,
                                                        admit=admit):
        picks[expert_id] = Pick(id=expert_id, kind="ckpt", similarity=round(float(similarity), 4), query=summary,
                                reason=f"style matches the summary '{summary[:60]}'")
    if attributes:
        for attr, vector in zip(attributes, np.asarray(store.embed(attributes), dtype=np.float32)):
            for expert_id, similarity, _ in store.vectors.query(vector, kind="lora", base_model=base_model, k=K2_LORA,
                                                                admit=admit):
                similarity = round(float(similarity), 4)
                if expert_id not in picks or picks[expert_id]["similarity"] < similarity:
                    picks[expert_id] = Pick(id=expert_id, kind="lora", similarity=similarity, query=attr,
                                            reason=f"serves the attribute '{attr}'")
    return sorted(picks.values(), key=lambda p: -p["similarity"])


def admitted_ids(store: GraphStore, expert_ids: list[str], policy: UsePolicy) -> set[str]:
    """The experts among ``expert_ids`` that ``policy`` admits (by what the catalog holds)."""
    uses = store.catalog.uses(expert_ids)
    return {i for i, use in uses.items() if policy.refuses(*use) is None}


def description(store: GraphStore, expert_id: str) -> str:
    """What the graph says an expert does, cut for a review listing."""
    row = store.catalog.get(expert_id)
    return (row.description_text or row.name)[:300] if row else expert_id


def _stems(text: str, ignored: frozenset[str]) -> set[str]:
    return {w[:4] for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in ignored}


def relevant(store: GraphStore, pick: Pick, base_model: str) -> bool:
    """The relevance rule above. Words of the base model's name do not count as shared: every
    description of its experts names it."""
    if pick["similarity"] >= SURE:
        return True
    ignored = GENERIC_WORDS | set(re.findall(r"[a-z]+", base_model.lower()))
    return (pick["similarity"] >= PLAUSIBLE[pick["kind"]]
            and bool(_stems(pick["query"], ignored) & _stems(description(store, pick["id"]), ignored)))


def mean_calibration(store: GraphStore, expert_id: str) -> float:
    edges = store.catalog.calibration([expert_id])
    return float(np.mean([np.mean(e.scores) for e in edges])) if edges else 0.0


def prune(store: GraphStore, pool: list[Pick]) -> list[Pick]:
    """Near-duplicates pruned to the better calibrated one, then at most one checkpoint and
    MAX_LORAS LoRAs, most similar first."""
    if not pool:
        return []
    vectors = store.vectors.get_embeddings([c["id"] for c in pool])
    quality = [mean_calibration(store, c["id"]) for c in pool]
    keep: list[int] = []
    for i in sorted(range(len(pool)), key=lambda i: (-pool[i]["similarity"], pool[i]["id"])):
        twin = next((j for j in keep if float(vectors[i] @ vectors[j]) >= REDUNDANT), None)
        if twin is None:
            keep.append(i)
        elif quality[i] > quality[twin]:
            keep[keep.index(twin)] = i
    ckpts = [pool[i] for i in keep if pool[i]["kind"] == "ckpt"][:1]
    loras = [pool[i] for i in keep if pool[i]["kind"] == "lora"][:MAX_LORAS]
    return ckpts + loras


ABSENCE_WORDS = ("no", "not", "non", "without", "never", "zero", "free of", "lacking")
_ABSENCE = re.compile(rf"^\W*(?:{'|'.join(ABSENCE_WORDS)})\b", re.IGNORECASE)


def asks_for_absence(phrase: str) -> bool:
    """True for a phrase that asks for something to be absent ("no outline", "without blur",
    "not blurry"): it is no need, and retrieving for it would find the very expert that adds it."""
    return bool(_ABSENCE.match(phrase))


def valid_components(raw: list) -> list[dict]:
    """An LLM's decomposition reduced to well-formed {component, attributes} entries, bounded;
    what asks for an absence is dropped (``asks_for_absence``)."""
    out = []
    for item in raw[:12]:
        if not isinstance(item, dict):
            continue
        comp = str(item.get("component", "")).strip()[:80]
        if asks_for_absence(comp):
            continue
        attrs = [str(a).strip()[:60] for a in item.get("attributes", [])
                 if str(a).strip() and not asks_for_absence(str(a))][:6]
        if comp and attrs:
            out.append({"component": comp, "attributes": attrs})
    return out


def dedupe(picks: list[Pick]) -> list[Pick]:
    seen, out = set(), []
    for p in picks:
        if p["id"] not in seen:
            seen.add(p["id"])
            out.append(p)
    return out
