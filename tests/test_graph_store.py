"""graph_store on real SQLite and real Chroma in tmp_path; embeddings from the real MiniLM model."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
from rich.console import Console
from support.servers import chroma_server

from diffgraph.graph_store.catalog import Catalog, redact, sqlite_path
from diffgraph.graph_store.export import export_graph, import_graph
from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.graph_store.status import graph_status, render_status
from diffgraph.graph_store.store import GraphStore
from diffgraph.graph_store.vectors import (
    ChromaEmbeddingRefused,
    RefuseToEmbed,
    VectorStore,
    partition_name,
)
from diffgraph.graph_store.views import activated_subgraph

METRICS = ["clip", "aesthetic"]
EXPORT_FILES = ("edges.npy", "node_features.npz", "edge_features.npz", "manifest.json")


@pytest.fixture(autouse=True)
def chroma_never_embeds():
    """Chroma must never embed anything itself (its default embedder would download a model)."""
    before = RefuseToEmbed.attempts
    yield
    assert RefuseToEmbed.attempts == before


def record(source_id: str, kind: str = "lora", base: str = "sd15", version: str = "v1", **kw) -> ExpertRecord:
    files = [ExpertFile(name=f"{source_id}.safetensors", url=f"http://hub/{source_id}", sha256="ab" * 32, size=10)]
    return ExpertRecord(source="civitai", source_id=source_id, version=version, name=f"expert {source_id}",
                        kind=kind, base_model=base, files=files, **kw)


def describe(text: str) -> dict:
    return {"summary": text, "skills": [text], "visual_attributes": [text.split()[0]]}


@pytest.fixture
def store(tmp_path):
    with GraphStore.open(tmp_path / "home") as s:
        yield s


# id -> (kind, base model, description, final status)
EXPERTS = {
    "1": ("lora", "sd15", "watercolor painting style with soft washes", "active"),
    "2": ("lora", "sd15", "pixel art, 8-bit video game sprites", "active"),
    "3": ("lora", "sd15", "watercolor landscapes and loose brushwork", "failed"),
    "4": ("ckpt", "sd15", "photorealistic portraits of people", "active"),
    "5": ("lora", "sdxl", "watercolor illustration", "active"),
}
PROMPTS = ["a red fox in the snow", "a castle on a hill at sunset", "a bowl of fruit on a table"]
# expert source id -> [(prompt index, scores)]
EDGES = {"1": [(0, [0.31, 5.5]), (1, [0.27, 6.0])], "2": [(1, [0.22, 4.0]), (2, [0.25, 4.5])], "4": [(0, [0.3, 6.5])]}


@pytest.fixture
def graph(store):
    """Five described experts (one failed, one on another base) plus a pending one without a
    description, three reference prompts, five calibration edges and one finished run."""
    for sid, (kind, base, _, _) in EXPERTS.items():
        store.upsert_expert(record(sid, kind, base))
    store.upsert_expert(record("6"))
    vectors = store.embed([d for _, _, d, _ in EXPERTS.values()])
    for (sid, (_, _, text, status)), vector in zip(EXPERTS.items(), vectors):
        store.register(f"civitai:{sid}", describe(text), text, page_sha256="cd" * 32, embedding=vector)
        store.set_status(f"civitai:{sid}", status, "render failed:\n  out of memory" if status == "failed" else None)
    prompt_ids = store.set_reference_prompts(PROMPTS)
    for sid, edges in EDGES.items():
        for index, scores in edges:
            store.catalog.put_calibration(f"civitai:{sid}", prompt_ids[index], scores, METRICS, seed=1234 + index)
    run = store.catalog.start_run("miniworld")
    store.catalog.finish_run(run, "ok", {"new": 6})
    return store


def test_catalog_is_wal_with_foreign_keys_and_parses_urls(tmp_path):
    catalog = Catalog.open(f"sqlite:///{tmp_path}/c.sqlite")
    assert catalog._query("PRAGMA journal_mode")[0][0] == "wal"
    assert catalog._query("PRAGMA foreign_keys")[0][0] == 1
    catalog.close()
    assert sqlite_path("sqlite:////abs/c.sqlite").as_posix() == "/abs/c.sqlite"
    assert sqlite_path("rel/c.sqlite").as_posix() == "rel/c.sqlite"
    with pytest.raises(ValueError, match="is a PostgreSQL URL"):  # Catalog.open takes those (test_postgres_catalog.py)
        sqlite_path("postgresql://localhost/diffgraph")
    with pytest.raises(ValueError, match="unsupported catalog URL"):
        Catalog.open("mysql://localhost/diffgraph")
    assert redact("postgresql://dg:s3cret@db:5432/diffgraph") == "postgresql://dg:***@db:5432/diffgraph"
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
        Catalog.open(tmp_path / "c.sqlite").put_calibration("nobody", 1, [1.0], ["m"], 0)


def test_upsert_inserts_updates_and_a_new_version_replaces_its_predecessor(graph):
    catalog = graph.catalog
    assert graph.upsert_expert(record("1")) == "unchanged"
    before = catalog.get("civitai:1")
    catalog.set_files("civitai:1", [ExpertFile(**{**before.files[0].__dict__, "local_path": "/cas/ab"})])
    # a re-crawl of the same version keeps the local path and changes nothing else
    assert graph.upsert_expert(record("1")) == "unchanged"
    assert graph.upsert_expert(record("1", tags=["paint"])) == "updated"
    row = catalog.get("civitai:1")
    assert row.tags == ["paint"] and row.files[0].local_path == "/cas/ab" and row.status == "active"
    assert len(catalog.calibration(["civitai:1"])) == 2

    assert graph.upsert_expert(record("1", version="v2")) == "replaced"
    row = catalog.get("civitai:1")
    assert (row.version, row.status, row.attempts, row.files[0].local_path) == ("v2", "pending", 0, None)
    assert row.description_text == before.description_text  # kept: the agent compares page hashes
    assert catalog.calibration(["civitai:1"]) == []
    assert len(catalog.calibration()) == 3  # other experts' edges untouched
    assert [e.status for e in graph.vectors.entries(["civitai:1"])] == ["pending"]

    # a new version on another base model moves the vector to that partition
    assert graph.upsert_expert(record("1", base="sdxl", version="v3")) == "replaced"
    (entry,) = graph.vectors.entries(["civitai:1"])
    assert entry.collection == partition_name("sdxl", "lora") and entry.base_model == "sdxl"
    assert reconcile(graph)["clean"]

    assert catalog.get("civitai:2").description["subjects"] == []  # missing fields are filled in
    with pytest.raises(ValueError, match="unknown description fields"):
        graph.register("civitai:2", {"skills": ["x"], "rating": "10/10"}, "x", None)
    with pytest.raises(ValueError, match="list of strings"):
        graph.register("civitai:2", {"skills": "x"}, "x", None)


def test_status_changes_reach_catalog_and_vectors(graph):
    row = graph.catalog.get("civitai:3")
    assert (row.status, row.status_reason, row.attempts) == ("failed", "render failed: out of memory", 1)
    graph.set_status("civitai:3", "failed", "again")
    assert graph.catalog.get("civitai:3").attempts == 2
    graph.set_status("civitai:3", "active")
    assert graph.catalog.get("civitai:3").status_reason is None
    assert graph.vectors.entries(["civitai:3"])[0].status == "active"
    graph.set_status("civitai:6", "rejected", "pickle-only checkpoint")  # no vector: catalog only
    assert graph.vectors.entries(["civitai:6"]) == []
    with pytest.raises(ValueError):
        graph.set_status("civitai:1", "archived")
    with pytest.raises(KeyError):
        graph.set_status("civitai:404", "active")
    assert [r.id for r in graph.catalog.list_experts(status="active", kind="lora", base_model="sd15")] == \
        ["civitai:1", "civitai:2", "civitai:3"]


def test_queries_return_only_active_experts_of_the_partition(graph):
    query = graph.embed(["a watercolor painting"])[0]
    hits = graph.vectors.query(query, "lora", "sd15", k=5)
    assert [h[0] for h in hits] == ["civitai:1", "civitai:2"]  # failed civitai:3 and sdxl civitai:5 left out
    assert hits[0][1] > hits[1][1] and hits[0][2]["status"] == "active"
    assert {h[0] for h in graph.vectors.query(query, "lora", "sd15", k=5, status=None)} == \
        {"civitai:1", "civitai:2", "civitai:3"}
    assert [h[0] for h in graph.vectors.query(query, "ckpt", "sd15", k=5)] == ["civitai:4"]
    assert [h[0] for h in graph.vectors.query(query, "lora", "sdxl", k=5)] == ["civitai:5"]
    assert graph.vectors.query(query, "lora", "flux", k=5) == []
    # one family, however it is spelled; names of unknown bases that slug alike stay apart
    assert partition_name("SD 1.5", "lora") == partition_name("sd-v1-5", "lora") == partition_name("sd15", "lora")
    assert [h[0] for h in graph.vectors.query(query, "lora", "SD 1.5", k=5)] == ["civitai:1", "civitai:2"]
    assert partition_name("Hunyuan 1", "lora") != partition_name("hunyuan-1", "lora")


def test_query_falls_back_to_a_filter_when_inactive_neighbours_crowd_out(tmp_path):
    vectors = VectorStore.open(tmp_path / "chroma")
    rng = np.random.default_rng(0)
    query = np.zeros(384, dtype=np.float32)
    query[0] = 1.0
    for i in range(20):  # 20 removed experts right next to the query ...
        v = query + 0.05 * rng.standard_normal(384).astype(np.float32)
        vectors.upsert(f"x:{i}", v / np.linalg.norm(v), "lora", "b", "removed", f"d{i}")
    far = -query  # ... and the only active one as far as it gets
    vectors.upsert("x:active", far, "lora", "b", "active", "far")
    assert [h[0] for h in vectors.query(query, "lora", "b", k=1)] == ["x:active"]
    with pytest.raises(ValueError, match="unit length"):
        vectors.upsert("x:big", 2 * query, "lora", "b", "active", "big")
    vectors.close()


def test_reference_prompts_keep_ids_and_drop_edges_of_removed_prompts(graph):
    old = {p.text: p.id for p in graph.catalog.reference_prompts()}
    embed = graph.embed
    graph.embed = lambda texts: pytest.fail(f"re-embedded known prompts {texts}")
    assert graph.set_reference_prompts(PROMPTS) == list(old.values())  # same set: no work, no change
    graph.embed = embed
    ids = graph.set_reference_prompts(PROMPTS[1:] + ["a lighthouse in a storm"])
    assert ids == [old[PROMPTS[1]], old[PROMPTS[2]], max(old.values()) + 1]
    assert {e.prompt_id for e in graph.catalog.calibration()} == {old[PROMPTS[1]], old[PROMPTS[2]]}
    matrix = graph.catalog.reference_prompt_embeddings(ids)
    assert matrix.shape == (3, 384)
    np.testing.assert_allclose(matrix[2], graph.embed(["a lighthouse in a storm"])[0], atol=1e-6)  # batching jitters ~1e-7


def test_reconcile_finds_and_repairs_injected_drift(graph):
    assert reconcile(graph)["clean"]
    vectors = graph.vectors
    vectors.delete("civitai:2")  # missing
    ghost = graph.embed(["a ghost"])[0]
    vectors.upsert("civitai:ghost", ghost, "lora", "sd15", "active", "a ghost")  # stray
    vectors.upsert("civitai:6", ghost, "lora", "sd15", "active", "a ghost")  # vector but no description: stray
    vectors.set_status("civitai:4", "active")
    vectors.set_status("civitai:3", "active")  # flipped status (catalog says failed)
    graph.catalog.set_description("civitai:1", describe("oil"), "oil painting, thick impasto", None)  # stale
    graph.catalog.upsert_expert(record("5", base="sd15"))  # catalog moved it to sd15: misplaced

    dry = reconcile(graph, repair=False)
    assert (dry["missing"], dry["stray"], dry["status"], dry["stale"], dry["misplaced"]) == \
        (["civitai:2"], ["civitai:6", "civitai:ghost"], ["civitai:3"], ["civitai:1"], ["civitai:5"])
    assert not dry["clean"] and not dry["repaired"]
    assert reconcile(graph, repair=False) == dry  # a dry run changes nothing

    assert reconcile(graph)["repaired"]
    again = reconcile(graph)
    assert again["clean"] and again["experts"] == again["vectors"] == 5
    np.testing.assert_allclose(vectors.get_embeddings(["civitai:1"])[0],
                               graph.embed(["oil painting, thick impasto"])[0], atol=1e-6)
    query = graph.embed(["a watercolor painting"])[0]
    assert {h[0] for h in vectors.query(query, "lora", "sd15", k=10)} == {"civitai:1", "civitai:2", "civitai:5"}
    assert vectors.query(query, "lora", "sdxl", k=10) == []


def test_activated_subgraph(graph):
    ids = ["civitai:4", "civitai:1", "civitai:2", "civitai:5"]
    data = activated_subgraph(graph, ids, "a fox painted in watercolor")
    data.validate()
    assert data.expert_ids == ids and data.expert_kinds == ["ckpt", "lora", "lora", "lora"]
    assert data.metric_names == METRICS
    prompts = {p.text: p.id for p in graph.catalog.reference_prompts()}
    assert data.reference_prompt_ids == sorted(prompts.values())
    assert data["user_prompt"].x.shape == (1, 384)
    np.testing.assert_array_equal(data["expert"].x.numpy(), graph.vectors.get_embeddings(ids))
    np.testing.assert_array_equal(data["reference_prompt"].x.numpy(),
                                  graph.catalog.reference_prompt_embeddings(data.reference_prompt_ids))
    store_edges = data["expert", "calibrated_on", "reference_prompt"]
    got = {(ids[int(e)], data.reference_prompt_ids[int(p)]): attr.tolist()
           for e, p, attr in zip(store_edges.edge_index[0], store_edges.edge_index[1], store_edges.edge_attr)}
    want = {(f"civitai:{sid}", prompts[PROMPTS[i]]): np.float32(scores).tolist()
            for sid, edges in EDGES.items() for i, scores in edges}
    assert got == want  # civitai:5 has no edges yet and is still a node
    reverse = data["reference_prompt", "rev_calibrated_on", "expert"]
    assert reverse.edge_index.tolist() == store_edges.edge_index.flip(0).tolist()
    assert data["user_prompt", "asks", "expert"].edge_index.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3]]
    assert "edge_attr" not in data["user_prompt", "asks", "expert"]

    picked = activated_subgraph(graph, ids, data["user_prompt"].x[0].numpy(), metric_names=["aesthetic"])
    assert picked.metric_names == ["aesthetic"]
    assert picked["expert", "calibrated_on", "reference_prompt"].edge_attr[:, 0].tolist() == store_edges.edge_attr[:, 1].tolist()

    start = time.perf_counter()
    for _ in range(20):
        activated_subgraph(graph, ids, data["user_prompt"].x[0].numpy())
    assert (time.perf_counter() - start) / 20 < 0.25  # per-prompt path; typically a few ms


def test_export_import_round_trip_is_byte_identical(graph, tmp_path):
    first = tmp_path / "export1"
    manifest = export_graph(graph, first)
    assert manifest["counts"] == {"experts": 6, "reference_prompts": 3, "edges": 5}
    edges = np.load(first / "edges.npy")
    assert edges.dtype == np.int64 and edges.shape == (2, 5)
    with np.load(first / "node_features.npz") as nodes:
        assert nodes["expert"].shape == (6, 384) and nodes["expert_has_embedding"].tolist() == [True] * 5 + [False]

    assert import_graph(first, tmp_path / "home2") == manifest["counts"]
    with GraphStore.open(tmp_path / "home2") as copy:
        assert reconcile(copy)["clean"]
        export_graph(copy, tmp_path / "export2")
        strip = lambda row: {k: v for k, v in row.to_dict().items() if k not in ("created_at", "updated_at")}  # noqa: E731
        assert [strip(r) for r in copy.catalog.list_experts()] == [strip(r) for r in graph.catalog.list_experts()]
    for name in EXPORT_FILES:
        assert (first / name).read_bytes() == (tmp_path / "export2" / name).read_bytes(), name

    with pytest.raises(ValueError, match="empty store"):
        import_graph(first, tmp_path / "home2")
    manifest_path = tmp_path / "export2" / "manifest.json"
    tampered = json.loads(manifest_path.read_text())
    tampered["files"]["edges.npy"] = "0" * 64
    manifest_path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="sha256"):
        import_graph(tmp_path / "export2", tmp_path / "home3")


def test_graph_status_counts_and_renders(graph):
    status = graph_status(graph)
    assert status["experts"]["total"] == 6
    assert status["experts"]["by_status"] == {"pending": 1, "active": 4, "rejected": 0, "failed": 1, "removed": 0}
    parts = {(p["base_model"], p["kind"]): (p["active"], p["failed"], p["pending"], p["total"])
             for p in status["experts"]["by_partition"]}
    assert parts == {("sd15", "ckpt"): (1, 0, 0, 1), ("sd15", "lora"): (2, 1, 1, 4), ("sdxl", "lora"): (1, 0, 0, 1)}
    assert (status["reference_prompts"], status["calibration"], status["vectors"]) == \
        (3, {"edges": 5, "experts": 3}, 5)
    assert status["last_run"]["status"] == "ok" and status["last_run"]["counts"] == {"new": 6}
    assert status["failures"] == [{"id": "civitai:3", "name": "expert 3", "status": "failed",
                                   "reason": "render failed: out of memory", "attempts": 1,
                                   "quarantined": False}]  # 1 of MAX_ATTEMPTS: retried by the next pass
    json.dumps(status)  # the --json output
    console = Console(record=True, width=200)
    console.print(render_status(status))
    text = console.export_text()
    assert "render failed: out of memory" in text and "miniworld" in text


def test_chroma_refuses_to_embed(graph, tmp_path):
    col = graph.vectors._collection(partition_name("sd15", "lora"))
    assert isinstance(col._embedding_function, RefuseToEmbed)
    before = RefuseToEmbed.attempts
    with pytest.raises(ChromaEmbeddingRefused):
        col.query(query_texts=["a watercolor"], n_results=1)
    assert RefuseToEmbed.attempts == before + 1
    RefuseToEmbed.attempts = before  # this refusal was provoked on purpose; the autouse check stays strict


def test_chroma_server_through_http_client(tmp_path):
    """DIFFGRAPH_CHROMA_URL: the same store against a Chroma server on loopback (the `chroma run`
    server of the chromadb wheel, telemetry off: tests/support/servers.py)."""
    with chroma_server(tmp_path / "server") as (url, log), \
            GraphStore.open(tmp_path / "home", chroma_url=url) as store:
        store.upsert_expert(record("1"))
        store.upsert_expert(record("2", kind="ckpt"))
        for sid, text in (("1", "watercolor painting style"), ("2", "photorealistic portraits")):
            store.register(f"civitai:{sid}", describe(text), text, None)
            store.set_status(f"civitai:{sid}", "active")
        hits = store.vectors.query(store.embed(["watercolor painting style"])[0], "lora", "sd15", k=3)
        assert [h[0] for h in hits] == ["civitai:1"] and hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert [h[0] for h in store.vectors.query(store.embed(["a portrait"])[0], "ckpt", "sd15", k=3)] == ["civitai:2"]
        store.set_status("civitai:1", "failed", "x")
        assert store.vectors.query(store.embed(["watercolor"])[0], "lora", "sd15", k=3) == []
        assert reconcile(store)["clean"]
        assert "No telemetry is configured" in log.read_text(errors="replace")
    assert not (tmp_path / "home" / "chroma").exists()


def test_retrieval_search_and_status_keep_to_the_use_policy(store):
    """NSFW experts are retrieved only when the policy allows them, a licence term keeps only
    experts whose licence grants it (one that does not say counts as not granting), and the
    excluded ones never crowd the admitted out of the k nearest; graph status counts both."""
    from diffgraph.graph_store.records import UsePolicy
    from diffgraph.tools import select

    experts = {"sell": (1, {"allowCommercialUse": ["Image", "Sell"]}), "old-api": (1, {"allowCommercialUse": "Rent"}),
               "nsfw-1": (5, {"allowCommercialUse": ["Image"]}), "nsfw-2": (16, {}), "nsfw-3": (8, {}),
               "no-sale": (1, {"allowCommercialUse": []}), "openrail": (0, {"license": "creativeml-openrail-m"}),
               "nc": (0, {"license": "cc-by-nc-4.0"}), "flux-dev": (0, {"license": "flux-1-dev-non-commercial-license"}),
               "unknown": (0, {})}
    text = "watercolor painting style with soft washes"
    for i, (sid, (level, licence)) in enumerate(experts.items()):
        store.upsert_expert(record(sid, nsfw_level=level, license=licence))
        # the NSFW ones nearest to the query, so that a filter applied after the top k would leave nothing
        phrase = text if sid.startswith("nsfw") else f"{text}, variant {i} of a pixel-art sprite sheet"
        store.register(f"civitai:{sid}", describe(phrase), phrase, None)
        store.set_status(f"civitai:{sid}", "active")

    def found(policy) -> set[str]:
        return {p["id"].split(":", 1)[1] for p in select.retrieve(store, text, [text], "sd15", policy)}

    assert len(found(UsePolicy(nsfw=True))) == select.K2_LORA and found(UsePolicy(nsfw=True)) <= {"nsfw-1", "nsfw-2", "nsfw-3"}
    assert len(found(UsePolicy())) == select.K2_LORA and not any(s.startswith("nsfw") for s in found(UsePolicy()))
    assert found(UsePolicy.parse("commercial", "true")) <= {"sell", "old-api", "nsfw-1", "openrail"}
    assert found(UsePolicy.parse("commercial")) <= {"sell", "old-api", "openrail"}
    assert len(found(UsePolicy.parse("commercial"))) == select.K2_LORA
    assert graph_status(store)["use"] == {"nsfw": 3, "commercial": {"yes": 4, "no": 3, "unknown": 3}}
    with pytest.raises(ValueError, match="unknown licence term 'free'"):
        UsePolicy.parse("commercial,free")
