"""Description embeddings in Chroma, one collection per (base model, kind).

Why partitions: every retrieval asks for experts of one base model and one kind (top-K1
checkpoints, top-K2 LoRAs per attribute), and a Chroma ``where`` filter is slow at scale
(measured at 100k vectors: ~180 ms against ~3 ms unfiltered; at 10k in one partition: 24 ms
against 1.3 ms). So the partition is the collection, and the remaining filter, status, is
avoided in the common case by over-fetching and filtering in Python (see ``query``).

Why a refusing embedding function: Chroma embeds documents itself when a call carries no
embeddings, and its default embedder downloads an ONNX model. We always pass embeddings, so
any attempt to embed is a bug; ``RefuseToEmbed`` turns it into an error and counts it.

Space: inner product on unit vectors (= cosine). Chroma's "cosine" space renormalises the
vectors it stores, so ``get`` would not return what we put in and exported graphs would not
round-trip bit for bit; with "ip" it does, and ``upsert`` checks the vectors are unit length.

Metadata per vector: kind, base_model, status (mirrors the catalog), description_sha256 (the
hash of the document it embeds, so reconcile can tell a stale embedding from a current one) and
vector_sha256 (the hash of the vector's float32 bytes as stored: a bit flipped in Chroma's index
files leaves a vector unit length to within any tolerance, so only its hash shows the damage;
see ``read_back``). Vectors written before the hash existed carry none and are checked for unit
length only.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

import chromadb
import numpy as np
from chromadb.api.types import EmbeddingFunction
from chromadb.config import Settings
from chromadb.errors import InternalError
from chromadb.utils.embedding_functions import register_embedding_function

from ..errors import DiffGraphError, one_line
from ..families import base_family
from ..text_embedding import DIM

PREFIX = "experts__"
_PAGE = 5000  # rows per Chroma get when listing a whole partition
_BATCH = 1000  # vectors per Chroma upsert (its limit is about 5000)


class VectorsUnreadable(DiffGraphError):
    """Chroma's files cannot be read back (damage after a crash or a bad disk): the catalog still
    holds every description, and `diffgraph graph reconcile` rebuilds the vectors from it."""


@contextmanager
def _reading():
    """Chroma's internal read errors, as one line that says what repairs them."""
    try:
        yield
    except InternalError as exc:
        raise VectorsUnreadable(f"the vector store cannot be read ({one_line(exc, 160)}); run `diffgraph graph "
                                "reconcile` to rebuild it from the catalog") from exc


class ChromaEmbeddingRefused(RuntimeError):
    """Chroma was asked to embed text: some call reached it without embeddings."""


@register_embedding_function
class RefuseToEmbed(EmbeddingFunction):
    """The embedding function of every DiffGraph collection: raises instead of embedding.

    Registered under its name so that a collection's persisted configuration resolves to it in
    any DiffGraph process. ``attempts`` counts refusals (tests assert it stays 0)."""

    attempts = 0

    def __init__(self) -> None:
        pass

    def __call__(self, input):  # noqa: A002 (Chroma's parameter name)
        RefuseToEmbed.attempts += 1
        raise ChromaEmbeddingRefused(f"Chroma tried to embed {len(input)} inputs; DiffGraph always passes "
                                     "its own embeddings (diffgraph.text_embedding.embed)")

    @staticmethod
    def name() -> str:
        return "diffgraph_refuse_to_embed"

    @staticmethod
    def build_from_config(config: dict) -> "RefuseToEmbed":
        return RefuseToEmbed()

    def get_config(self) -> dict:
        return {}

    def default_space(self) -> str:
        return "ip"


def description_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def vector_sha256(vector: np.ndarray) -> str:
    """The hash of a vector's little-endian float32 bytes (Chroma's "ip" space returns them
    bit for bit)."""
    return hashlib.sha256(np.asarray(vector, dtype="<f4").tobytes()).hexdigest()


def partition_name(base_model: str, kind: str) -> str:
    """A valid Chroma collection name for (base family, kind): a readable slug plus a hash of the
    family name. A base is named by its family (diffgraph.families.base_family), so "SD 1.5"
    and "sd-1.5" share the sd15 collection; names that slug alike but are different (unknown)
    bases never do."""
    base_model = base_family(base_model)
    slug = re.sub(r"[^a-z0-9]+", "-", base_model.lower()).strip("-")[:48] or "base"
    digest = hashlib.sha256(base_model.encode("utf-8")).hexdigest()[:8]
    return f"{PREFIX}{slug}__{kind}__{digest}"


@dataclass(frozen=True)
class VectorEntry:
    """One stored vector: where it is and what its metadata says."""

    expert_id: str
    collection: str
    kind: str
    base_model: str
    status: str
    description_sha256: str


def _client(path: Path | None, url: str | None):
    settings = Settings(anonymized_telemetry=False)
    if url:
        parsed = urlparse(url)
        ssl = parsed.scheme == "https"
        return chromadb.HttpClient(host=parsed.hostname or "localhost", port=parsed.port or (443 if ssl else 8000),
                                   ssl=ssl, settings=settings)
    if path is None:
        raise ValueError("give a Chroma path or URL")
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=settings)


class VectorStore:
    """Expert description embeddings, partitioned by (base_model, kind)."""

    def __init__(self, client):
        self.client = client
        self._ef = RefuseToEmbed()
        self._collections: dict[str, object] = {}

    @classmethod
    def open(cls, path: Path | None = None, url: str | None = None) -> "VectorStore":
        """An embedded store at ``path``, or a Chroma server at ``url`` (DIFFGRAPH_CHROMA_URL)."""
        return cls(_client(path, url))

    def close(self) -> None:
        self.client.close()

    # ---- partitions ----------------------------------------------------------------------------

    def _collection(self, name: str, base_model: str | None = None, kind: str | None = None):
        """The collection ``name``; created when base_model/kind are given, else None if absent."""
        if name in self._collections:
            return self._collections[name]
        if base_model is not None:
            col = self.client.get_or_create_collection(
                name, embedding_function=self._ef, configuration={"hnsw": {"space": "ip"}},
                metadata={"base_model": base_model, "kind": kind})
        elif name in self._partition_names():
            col = self.client.get_collection(name, embedding_function=self._ef)
        else:
            return None
        self._collections[name] = col
        return col

    def _partition_names(self) -> list[str]:
        # Asked each time (about 0.2 ms): another process may have created a partition.
        return sorted(c.name for c in self.client.list_collections() if c.name.startswith(PREFIX))

    def _partitions(self, names: Iterable[str] | None = None) -> list:
        wanted = self._partition_names() if names is None else names
        return [c for c in (self._collection(n) for n in wanted) if c is not None]

    # ---- writes --------------------------------------------------------------------------------

    def upsert(self, expert_id: str, embedding, kind: str, base_model: str, status: str, document: str) -> None:
        """Store the expert's vector in its partition and remove it from any other one (a new
        version may have changed the base model or kind)."""
        self.upsert_many([(expert_id, embedding, kind, base_model, status, document)])

    def upsert_many(self, items: Iterable[tuple]) -> None:
        """``upsert`` for many (expert_id, embedding, kind, base_model, status, document) tuples,
        batched per partition: Chroma charges ~18 ms per upsert call but ~1.3 ms per vector in a
        batch of 1000, which is what makes reconcile and import of large graphs bearable."""
        latest = {item[0]: item for item in items}
        groups: dict[tuple[str, str], list] = {}
        for expert_id, embedding, kind, base_model, status, document in latest.values():
            vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
            if abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
                raise ValueError(f"embedding of {expert_id} is not unit length (inner product is used as cosine)")
            metadata = {"kind": kind, "base_model": base_model, "status": status,
                        "description_sha256": description_sha256(document), "vector_sha256": vector_sha256(vector)}
            groups.setdefault((base_model, kind), []).append((expert_id, vector, metadata, document))
        for (base_model, kind), group in groups.items():
            col = self._collection(partition_name(base_model, kind), base_model, kind)
            for start in range(0, len(group), _BATCH):
                ids, vectors, metadatas, documents = zip(*group[start:start + _BATCH])
                col.upsert(ids=list(ids), embeddings=np.stack(vectors), metadatas=list(metadatas),
                           documents=list(documents))
        target = {i: partition_name(item[3], item[2]) for i, item in latest.items()}
        self.remove([e for e in self.entries(list(target)) if e.collection != target[e.expert_id]])

    def set_status(self, expert_id: str, status: str) -> bool:
        """Update the status metadata wherever the vector is; False when there is none."""
        entries = self.entries([expert_id])
        for entry in entries:
            self._collection(entry.collection).update(ids=[expert_id], metadatas=[{"status": status}])
        return bool(entries)

    def delete(self, expert_id: str) -> bool:
        """Delete the expert's vector from every partition; False when there was none."""
        entries = self.entries([expert_id])
        self.remove(entries)
        return bool(entries)

    def remove(self, entries: Iterable[VectorEntry]) -> None:
        """Delete exactly these stored vectors (an id may also live in another partition)."""
        by_collection: dict[str, list[str]] = {}
        for entry in entries:
            by_collection.setdefault(entry.collection, []).append(entry.expert_id)
        for name, ids in by_collection.items():
            self._collection(name).delete(ids=ids)

    # ---- reads ---------------------------------------------------------------------------------

    def query(self, embedding, kind: str, base_model: str, k: int, status: str | None = "active",
              admit: Callable[[list[str]], set[str]] | None = None) -> list[tuple[str, float, dict]]:
        """The k nearest experts of one partition: (id, cosine similarity, metadata), best first.

        Fetches 2k+8 neighbours without a filter and keeps those with the wanted status; only
        when that leaves fewer than k in a partition holding more does it pay for a ``where``
        query. Most experts are active, so the fast path almost always suffices. ``admit`` (ids
        -> the admitted ones: a use policy, which the catalog decides) filters before the k are
        taken, widening the search until k are admitted or the partition is exhausted, so that
        k excluded neighbours never hide the admitted ones behind them."""
        col = self._collection(partition_name(base_model, kind))
        if col is None or k <= 0:
            return []
        query = np.asarray(embedding, dtype=np.float32).reshape(1, -1)

        def nearest(n: int, where: dict | None) -> tuple[list, list]:
            result = col.query(query_embeddings=query, n_results=n, where=where, include=["metadatas", "distances"])
            hits = list(zip(result["ids"][0], result["distances"][0], result["metadatas"][0]))
            found = [h for h in hits if status is None or h[2]["status"] == status]
            if admit is not None:
                allowed = admit([h[0] for h in found])
                found = [h for h in found if h[0] in allowed]
            return hits, found

        fetch = 2 * k + 8
        with _reading():
            hits, found = nearest(fetch, None)
            if len(found) < k and len(hits) == fetch:  # crowded out: ask for the wanted status only
                where = {"status": status} if status is not None else None
                fetch = k if admit is None else fetch
                hits, found = nearest(fetch, where)
                while admit is not None and len(found) < k and len(hits) == fetch:
                    fetch *= 4
                    hits, found = nearest(fetch, where)
        return [(i, 1.0 - float(d), dict(m)) for i, d, m in found[:k]]

    def entries(self, expert_ids: list[str] | None = None) -> list[VectorEntry]:
        """Every stored vector (or those of ``expert_ids``) with its partition and metadata. An id
        found in two partitions appears twice: that is drift reconcile repairs."""
        found = []
        with _reading():
            for col in self._partitions():
                if expert_ids is not None:
                    pages = [col.get(ids=list(expert_ids), include=["metadatas"])] if expert_ids else []
                else:
                    pages = self._pages(col)
                for page in pages:
                    for i, m in zip(page["ids"], page["metadatas"]):
                        found.append(VectorEntry(i, col.name, m.get("kind", ""), m.get("base_model", ""),
                                                 m.get("status", ""), m.get("description_sha256", "")))
        return found

    @staticmethod
    def _pages(col):
        offset = 0
        while True:
            page = col.get(include=["metadatas"], limit=_PAGE, offset=offset)
            yield page
            if len(page["ids"]) < _PAGE:
                return
            offset += _PAGE

    def all_ids(self) -> set[str]:
        return {e.expert_id for e in self.entries()}

    def count(self) -> int:
        with _reading():
            return sum(col.count() for col in self._partitions())

    def read_back(self) -> int:
        """Read every partition end to end: its count, every vector, and one nearest-neighbour
        query, which is what loads its index (see vector_recovery). Raises what Chroma raises, or
        VectorsUnreadable when a vector comes back damaged (not finite, not unit length, or not
        the bytes its vector_sha256 metadata records, all of which ``upsert_many`` guarantees it
        was) or fewer vectors can be read than are counted. Returns the number of vectors read."""
        total = 0
        for col in self._partitions():
            n, read, sample = col.count(), 0, None
            while read < n:
                page = col.get(include=["embeddings", "metadatas"], limit=_PAGE, offset=read)
                if not page["ids"]:
                    break
                vectors = np.asarray(page["embeddings"], dtype=np.float32).reshape(len(page["ids"]), -1)
                norms = np.linalg.norm(vectors, axis=1)
                hashes = [(meta or {}).get("vector_sha256") for meta in page["metadatas"]]
                altered = np.array([want is not None and want != vector_sha256(v) for v, want in zip(vectors, hashes)])
                damaged = int((~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3) | altered).sum())
                if damaged:
                    raise VectorsUnreadable(f"{damaged} vectors of {col.name} came back damaged "
                                            "(not unit length or not the bytes stored)")
                read, sample = read + len(page["ids"]), vectors[:1]
            if read != n:
                raise VectorsUnreadable(f"{col.name} counts {n} vectors but only {read} can be read")
            if sample is not None:
                col.query(query_embeddings=sample, n_results=min(n, 10))
            total += n
        return total

    def get_embeddings(self, expert_ids: list[str],
                       partitions: Iterable[tuple[str, str]] | None = None) -> np.ndarray:
        """float32 matrix of the vectors of ``expert_ids``, in that order. ``partitions``, a set of
        (base_model, kind), limits the search to those collections (the subgraph view knows them
        from the catalog, which saves a round trip per other partition). KeyError names ids that
        have no vector."""
        ids = list(expert_ids)
        names = None if partitions is None else sorted({partition_name(b, k) for b, k in partitions})
        found: dict[str, np.ndarray] = {}
        for col in self._partitions(names):
            wanted = [i for i in ids if i not in found]
            if not wanted:
                break
            # in pages: one get with every id of a 100k export is one unbounded request (and
            # one unbounded HTTP body against a Chroma server)
            for start in range(0, len(wanted), _PAGE):
                with _reading():
                    got = col.get(ids=wanted[start:start + _PAGE], include=["embeddings"])
                for i, vector in zip(got["ids"], got["embeddings"]):
                    found[i] = np.asarray(vector, dtype=np.float32)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no vector in Chroma for {missing} (run `diffgraph graph reconcile`)")
        if not ids:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([found[i] for i in ids])
