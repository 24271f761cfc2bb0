"""Export and import the universal graph in the paper's format.

A directory of four files:
- ``edges.npy``: int64 [2, E], COO edge index of ("expert", "calibrated_on", "reference_prompt");
  row 0 indexes ``manifest["experts"]``, row 1 indexes ``manifest["reference_prompts"]``;
- ``node_features.npz``: ``expert`` float32 [N, D] (one row per manifest expert; zeros where
  ``expert_has_embedding`` is False, i.e. the expert has no description yet) and
  ``reference_prompt`` float32 [M, D];
- ``edge_features.npz``: ``scores`` float64 [E, K] (float64 because that is what the catalog
  holds, so the round trip is exact) with columns ``manifest["metric_names"]``, and ``seed``
  int64 [E];
- ``manifest.json``: schema version, metric names, every expert row (descriptions and statuses
  included), the reference prompts, and the sha256 of each other file.

Created/updated timestamps and GCA runs are bookkeeping of one store and are not exported, so
export -> import -> export gives byte-identical files. The .npz files are written with fixed
zip timestamps for the same reason (numpy's savez stamps the current time). Every file is
written to a temporary name and renamed; the manifest comes last and import checks every hash
against it, so a half-written export is refused rather than half-read.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from ..text_embedding import DIM
from .catalog import ExpertRow, utcnow
from .store import GraphStore

FORMAT = "diffgraph-universal-graph"
FORMAT_VERSION = 1
EDGE_TYPE = ["expert", "calibrated_on", "reference_prompt"]
_EXCLUDED = ("created_at", "updated_at")
FILES = ("edges.npy", "node_features.npz", "edge_features.npz")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz that np.load reads, with fixed member timestamps so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(arrays[name]))
    return buf.getvalue()


def _manifest_text(manifest: dict) -> str:
    """The manifest as JSON with one line per expert and per reference prompt: readable and
    diffable, and written by json's C encoder (``indent=`` makes json fall back to its pure
    Python encoder, which took over a minute for 100k experts). Keys sorted: equal manifests
    give equal bytes."""
    def dumps(value) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)

    parts = []
    for key in sorted(manifest):
        value = manifest[key]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(f" {dumps(key)}: [\n  " + ",\n  ".join(dumps(v) for v in value) + "\n ]")
        else:
            parts.append(f" {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_graph(store: GraphStore, directory: Path) -> dict:
    """Write the whole graph (every expert, whatever its status) to ``directory``; returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    experts = store.catalog.list_experts()
    prompts = store.catalog.reference_prompts()
    edges = store.catalog.calibration_columns()

    metric_sets = {tuple(names) for names in edges["metric_names"]}
    if len(metric_sets) > 1:
        raise ValueError(f"calibration edges disagree on metric names {sorted(metric_sets)}; recalibrate first")
    metric_names = list(next(iter(metric_sets))) if metric_sets else []

    # Each partition is asked for its own experts only (the catalog knows where each vector
    # lives); asking every partition for every id costs one lookup per id and partition.
    by_partition: dict[tuple[str, str], list[str]] = {}
    for r in experts:
        if r.description_text:
            by_partition.setdefault((r.base_model, r.kind), []).append(r.id)
    vectors: dict[str, np.ndarray] = {}
    for partition, ids in by_partition.items():
        try:
            vectors.update(zip(ids, store.vectors.get_embeddings(ids, {partition})))
        except KeyError:  # drift (a vector in another partition): look everywhere, as reconcile would
            vectors.update(zip(ids, store.vectors.get_embeddings(ids)))
    dim = next(iter(vectors.values())).shape[0] if vectors else DIM
    expert_x = np.zeros((len(experts), dim), dtype=np.float32)
    for i, row in enumerate(experts):
        if row.id in vectors:
            expert_x[i] = vectors[row.id]
    expert_index = {r.id: i for i, r in enumerate(experts)}
    prompt_index = {p.id: i for i, p in enumerate(prompts)}

    files = {
        "edges.npy": _npy_bytes(np.array([[expert_index[e] for e in edges["expert_id"]],
                                          [prompt_index[p] for p in edges["prompt_id"]]],
                                         dtype=np.int64).reshape(2, -1)),
        "node_features.npz": _npz_bytes({
            "expert": expert_x,
            "expert_has_embedding": np.array([r.id in vectors for r in experts], dtype=bool),
            "reference_prompt": store.catalog.reference_prompt_embeddings([p.id for p in prompts]),
        }),
        "edge_features.npz": _npz_bytes({
            "scores": np.array(edges["scores"], dtype=np.float64).reshape(len(edges["seed"]), len(metric_names)),
            "seed": np.array(edges["seed"], dtype=np.int64),
        }),
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edge_type": EDGE_TYPE,
        "metric_names": metric_names,
        "experts": [{k: v for k, v in r.to_dict().items() if k not in _EXCLUDED} for r in experts],
        "reference_prompts": [{"id": p.id, "text": p.text} for p in prompts],
        "counts": {"experts": len(experts), "reference_prompts": len(prompts), "edges": len(edges["seed"])},
        "files": {name: _sha256(data) for name, data in files.items()},
    }
    for leftover in directory.glob(".*.tmp"):  # temporaries of an export killed mid-write
        if any(leftover.name.startswith(f".{name}.") for name in (*FILES, "manifest.json")):
            leftover.unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write_bytes(directory / name, data)
    atomic_write_bytes(directory / "manifest.json", _manifest_text(manifest).encode("utf-8"))
    return manifest


def read_export(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and arrays of an export, after checking format and every file's sha256."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory} is not a {FORMAT} v{FORMAT_VERSION} export")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        # only our own file names: a manifest must not make import read ../../anything or /dev/zero
        raise ValueError(f"{directory}: the manifest must list exactly {', '.join(FILES)}")
    arrays: dict[str, np.ndarray] = {}
    for name, digest in files.items():
        data = (directory / name).read_bytes()
        if _sha256(data) != digest:
            raise ValueError(f"{directory / name} does not match the sha256 in the manifest")
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays[name.removesuffix(".npy")] = loaded
        else:
            arrays.update({key: loaded[key] for key in loaded.files})
    return manifest, arrays


def import_graph(directory: Path, home: Path, *, db_url: str | None = None, chroma_url: str | None = None) -> dict:
    """Load an export into an empty store at ``home``; returns the manifest's counts.

    The catalog is written in one transaction, then the vectors; should the process die in
    between, ``reconcile`` re-embeds the missing vectors from the imported descriptions."""
    manifest, arrays = read_export(directory)
    store = GraphStore.open(home, db_url=db_url, chroma_url=chroma_url)
    try:
        if store.catalog.list_experts() or store.catalog.reference_prompts() or store.vectors.count():
            raise ValueError(f"{home} already holds a graph; import needs an empty store")
        names = manifest["metric_names"]
        now = utcnow()
        rows = [ExpertRow.from_dict({**e, "created_at": now, "updated_at": now}) for e in manifest["experts"]]
        prompt_ids = [p["id"] for p in manifest["reference_prompts"]]
        with store.catalog.transaction():
            for row in rows:
                store.catalog.restore_expert(row)
            for p, vector in zip(manifest["reference_prompts"], arrays["reference_prompt"]):
                store.catalog.restore_reference_prompt(p["id"], p["text"], vector)
            for (ei, pi), scores, seed in zip(arrays["edges"].T.tolist(), arrays["scores"].tolist(),
                                              arrays["seed"].tolist()):
                store.catalog.put_calibration(rows[ei].id, prompt_ids[pi], scores, names, seed)
        store.vectors.upsert_many((row.id, vector, row.kind, row.base_model, row.status, row.description_text)
                                  for row, vector, has in zip(rows, arrays["expert"], arrays["expert_has_embedding"])
                                  if has)
        return dict(manifest["counts"])
    finally:
        store.close()
