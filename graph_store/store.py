"""GraphStore: the catalog and the vectors of one DiffGraph home, opened together.

Writes that touch both stores go through here, always catalog first, then Chroma. The catalog
is the truth and Chroma a derived copy, so a crash between the two leaves Chroma behind the
catalog (a missing, stale or mislabelled vector), which ``reconcile`` repairs from the catalog
alone. The other order could leave a vector whose description exists nowhere else.

Writes that touch only the catalog (calibration edges, files, runs) go to ``store.catalog``.
Policy: every expert with a description has a vector, whatever its status; the status is in
the vector's metadata and retrieval asks for "active". Keeping non-active vectors lets a failed
expert come back without re-embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..settings import Settings, get_settings
from ..text_embedding import embed
from .catalog import Catalog
from .reconcile import reconcile
from .records import ExpertRecord
from .vectors import VectorStore, partition_name


def vectors_path(home: Path) -> Path:
    """The embedded Chroma folder of a home (when no Chroma server is configured)."""
    return Path(home) / "chroma"


def default_embed(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2, imported on first use so that opening a store stays cheap."""

    return embed(texts)


@dataclass
class GraphStore:
    home: Path
    catalog: Catalog
    vectors: VectorStore
    embed: Callable[[list[str]], np.ndarray] = field(default=default_embed)

    @classmethod
    def open(cls, home: Path, *, db_url: str | None = None, chroma_url: str | None = None) -> "GraphStore":
        """The store of ``home``: catalog at home/catalog.sqlite and vectors at home/chroma, unless a
        catalog URL or a Chroma server URL is given."""
        home = Path(home)
        catalog = Catalog.open(db_url or home / "catalog.sqlite")
        vectors = VectorStore.open(path=None if chroma_url else vectors_path(home), url=chroma_url)
        store = cls(home=home, catalog=catalog, vectors=vectors)
        if catalog.migrated:  # the catalog's base names changed: move the vectors to their partitions now
            reconcile(store, repair=True)
        return store

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "GraphStore":
        """The store DIFFGRAPH_HOME / DIFFGRAPH_DB_URL / DIFFGRAPH_CHROMA_URL point at."""
        s = settings or get_settings()
        return cls.open(s.home, db_url=s.db_url, chroma_url=s.chroma_url)

    def close(self) -> None:
        self.catalog.close()
        self.vectors.close()

    def __enter__(self) -> "GraphStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upsert_expert(self, record: ExpertRecord) -> str:
        """Catalog upsert (see Catalog.upsert_expert), then bring an existing vector's status and
        partition in line: a new version goes back to pending and may change base model or kind."""
        outcome = self.catalog.upsert_expert(record)
        if outcome in ("replaced", "updated"):
            row = self.catalog.get(record.id)
            entries = self.vectors.entries([record.id])
            target = partition_name(row.base_model, row.kind)
            if entries and all(e.collection != target for e in entries):
                vector = self.vectors.get_embeddings([record.id])[0]
                self.vectors.upsert(row.id, vector, row.kind, row.base_model, row.status, row.description_text)
            elif entries:
                self.vectors.set_status(record.id, row.status)
        return outcome

    def register(self, expert_id: str, description: dict, description_text: str, page_sha256: str | None,
                 embedding: np.ndarray | None = None) -> None:
        """Store the skill description in the catalog, then its embedding in Chroma (computed from
        ``description_text`` unless given), labelled with the expert's current status."""
        self.catalog.set_description(expert_id, description, description_text, page_sha256)
        row = self.catalog.get(expert_id)
        vector = self.embed([description_text])[0] if embedding is None else embedding
        self.vectors.upsert(expert_id, vector, row.kind, row.base_model, row.status, description_text)

    def set_status(self, expert_id: str, status: str, reason: str | None = None) -> None:
        """Catalog status (with reason), then the vector's status metadata if it has a vector."""
        self.catalog.set_status(expert_id, status, reason)
        self.vectors.set_status(expert_id, status)

    def retry(self, expert_ids: list[str] | None = None) -> list[str]:
        """Failed and rejected experts back to pending (Catalog.retry), their vectors' status too."""
        done = self.catalog.retry(expert_ids)
        for expert_id in done:
            self.vectors.set_status(expert_id, "pending")
        return done

    def set_reference_prompts(self, texts: list[str]) -> list[int]:
        """Store the reference set (see Catalog.set_reference_prompts), embedding only the prompts
        not stored yet, so that an agent may call this on every pass at no cost."""
        texts = list(texts)
        known = {p.text for p in self.catalog.reference_prompts()}
        new = [t for t in dict.fromkeys(texts) if t not in known]
        embeddings = dict(zip(new, self.embed(new))) if new else {}
        return self.catalog.set_reference_prompts(texts, embeddings)
