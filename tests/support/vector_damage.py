"""Homes whose Chroma folder the fault tests damage, and the writer they kill.

A partition needs more than Chroma's sync threshold (1,000 vectors) before its HNSW index is
written to disk; below it the vectors live in chroma.sqlite3's log and the index files are
empty preallocations. So the template home holds ``LORAS`` LoRAs in one partition (an index
on disk, the files the damage shapes hit) and a few checkpoints in another.

Embeddings come from ``stand_in_embed``, a unit vector seeded by the text's hash: reconcile
re-embeds a whole store in these tests, again and again, and MiniLM's 8 s per 1,000 texts is
not what they test. The command-line test uses MiniLM itself.

Damage shapes are those Chroma's users report after a process died mid-flush or a disk went
bad (chroma #7090, #7238; MemPalace #1457, #1589): each names the file it hits.

Run as ``python -m support.vector_damage write HOME`` (tests/ on sys.path), it is the writer
the kill test SIGKILLs: descriptions rewritten one by one (GraphStore.register, catalog then
Chroma) and in batches (upsert_many, as reconcile and import write), forever.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import sys
from pathlib import Path

import numpy as np

from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.graph_store.store import GraphStore, vectors_path

LORAS = 1100
CHECKPOINTS = 12
DIM = 384


def stand_in_embed(texts: list[str]) -> np.ndarray:
    """One unit vector per text, a pure function of the text (so a rebuilt vector must equal the
    first one exactly)."""
    out = np.empty((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        out[row] = v / np.linalg.norm(v)
    return out


def description(expert_id: str, round_: int = 0) -> str:
    return f"{expert_id}: a LoRA that paints in its own style, revision {round_}"


def open_store(home: Path) -> GraphStore:
    store = GraphStore.open(home)
    store.embed = stand_in_embed
    return store


def build_home(home: Path) -> dict[str, str]:
    """The template: LORAS + CHECKPOINTS described experts; returns id -> description."""
    texts = {}
    with open_store(home) as store:
        for n in range(LORAS + CHECKPOINTS):
            kind, base = ("lora", "sd15") if n < LORAS else ("ckpt", "sdxl")
            files = [ExpertFile(name=f"e{n}.safetensors", url=f"http://hub/e{n}", sha256=f"{n:064x}", size=10)]
            store.catalog.upsert_expert(ExpertRecord(source="civitai", source_id=str(n), version="v1",
                                                     name=f"expert {n}", kind=kind, base_model=base, files=files))
        ids = [r.id for r in store.catalog.list_experts()]
        texts = {i: description(i) for i in ids}
        for i, text in texts.items():
            store.catalog.set_description(i, {"summary": text}, text, None)
            store.catalog.set_status(i, "active")
        vectors = stand_in_embed(list(texts.values()))
        rows = {r.id: r for r in store.catalog.list_experts()}
        store.vectors.upsert_many((i, v, rows[i].kind, rows[i].base_model, "active", texts[i])
                                  for i, v in zip(texts, vectors))
    return texts


def index_folder(home: Path) -> Path:
    """The LoRA partition's HNSW folder (the biggest segment folder)."""
    segments = [p for p in vectors_path(home).iterdir() if p.is_dir()]
    return max(segments, key=lambda p: sum(f.stat().st_size for f in p.iterdir()))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _impossible_count(path: Path) -> None:
    header = bytearray(path.read_bytes())
    header[12:20] = struct.pack("<Q", 2**60)  # cur_element_count after (int version, size_t offset, size_t max)
    path.write_bytes(bytes(header))


# name -> damage(home): the shapes reported in the wild
DAMAGE = {
    "truncated index data (interrupted flush)": lambda h: os.truncate(index_folder(h) / "data_level0.bin", 100_000),
    "index data overwritten": lambda h: overwrite(index_folder(h) / "data_level0.bin", 0,
                                                   np.random.default_rng(1).bytes(1_000_000)),
    # HNSW's level-0 element: 4 + 2M x 4 bytes of links (Chroma's M = 16), then the vector; two
    # bytes of the first vector's third component flipped keep it unit length to within 1e-3
    "bits of one stored vector flipped (bad disk)": lambda h: _flip(index_folder(h) / "data_level0.bin", 140, 2),
    "torn index metadata": lambda h: os.truncate(index_folder(h) / "index_metadata.pickle", 1000),
    "index metadata garbage": lambda h: (index_folder(h) / "index_metadata.pickle").write_bytes(
        np.random.default_rng(2).bytes(2000)),
    "header garbage": lambda h: (index_folder(h) / "header.bin").write_bytes(np.random.default_rng(3).bytes(100)),
    "impossible element count in header": lambda h: _impossible_count(index_folder(h) / "header.bin"),
    "segment folder lost": lambda h: [f.unlink() for f in index_folder(h).iterdir()],
    "sqlite truncated": lambda h: os.truncate(vectors_path(h) / "chroma.sqlite3", 50_000),
}


def catalog_dump(home: Path) -> list[str]:
    """The catalog's whole content as SQL, to show it unchanged."""
    with sqlite3.connect(home / "catalog.sqlite") as db:
        return list(db.iterdump())


def write_forever(home: Path) -> None:
    """Rewrite descriptions until killed: one at a time, then a batch of 300, round after round."""
    with open_store(home) as store:
        rows = [r for r in store.catalog.list_experts() if r.kind == "lora"]
        print("ready", flush=True)
        round_ = 0
        while True:
            round_ += 1
            for row in rows[:20]:
                text = description(row.id, round_)
                store.register(row.id, {"summary": text}, text, None)
            batch = rows[20 + (round_ * 300) % (len(rows) - 320):][:300]
            texts = [description(r.id, round_) for r in batch]
            for r, text in zip(batch, texts):
                store.catalog.set_description(r.id, {"summary": text}, text, None)
            store.vectors.upsert_many((r.id, v, r.kind, r.base_model, r.status, t)
                                      for r, v, t in zip(batch, stand_in_embed(texts), texts))
            print(f"round {round_}", flush=True)


if __name__ == "__main__" and sys.argv[1] == "write":
    write_forever(Path(sys.argv[2]))
