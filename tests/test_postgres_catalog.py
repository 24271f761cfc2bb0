"""The catalog on a real PostgreSQL server (DIFFGRAPH_DB_URL), and the whole store in the
shared-deployment shape: PostgreSQL catalog + Chroma server.

The server is started by the test run (tests/support/servers.py: Debian's PostgreSQL binaries,
a private cluster on a unix socket, run as an unprivileged user when the tests run as root).
Each test gets a fresh database whose default collation is ICU "en-US", as a database created
by an administrator typically has, so ordering that depended on the database's locale would
show here. Without server binaries the tests are skipped with the reason, except under CI
(CI=true), where .ci/run installs them and a skip would hide a broken install.
"""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import psycopg
import pytest

from diffgraph.graph_store.catalog import Catalog
from diffgraph.graph_store.export import export_graph, import_graph
from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.graph_store.status import graph_status
from diffgraph.graph_store.store import GraphStore
from diffgraph.graph_store.views import activated_subgraph
from diffgraph.settings import get_settings

from support.servers import ServerUnavailable, chroma_server, postgres_server


METRICS = ["clip", "aesthetic"]
EXPORT_FILES = ("edges.npy", "node_features.npz", "edge_features.npz", "manifest.json")
# Ids whose byte order (SQLite, COLLATE "C") differs from en-US order: B < Z < _q < a bytewise,
# _q < a < B < Z in en-US.
EXPERTS = {  # source id -> (kind, base model, description, final status)
    "a": ("lora", "sd15", "watercolor painting style with soft washes", "active"),
    "B": ("lora", "sd15", "pixel art, 8-bit video game sprites", "active"),
    "_q": ("lora", "sd15", "watercolor landscapes and loose brushwork", "failed"),
    "Z": ("ckpt", "sd15", "photorealistic portraits of people", "active"),
    "é": ("lora", "sdxl", "watercolor illustration", "active"),
}
PROMPTS = ["a red fox in the snow", "a castle on a hill at sunset", "a bowl of fruit on a table"]
EDGES = {"a": [(0, [0.31, 5.5]), (1, [0.27, 6.0])], "B": [(1, [0.22, 4.0]), (2, [0.25, 4.5])], "Z": [(0, [0.3, 6.5])]}


@pytest.fixture(scope="session")
def postgres_admin_url():
    try:
        with postgres_server() as url:
            yield url
    except ServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}")
        pytest.skip(f"PostgreSQL catalog tests need a server: {exc}")


@pytest.fixture
def pg_url(postgres_admin_url):
    """A fresh, empty database (default collation ICU en-US where the server supports ICU)."""
    name = f"dg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        try:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "
                          "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'")
        except psycopg.errors.Error:  # a server built without ICU
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
    yield postgres_admin_url.replace("/postgres?", f"/{name}?")
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def vectors_by_text():
    """MiniLM embeddings computed once, so that stores built from the same inputs hold the
    same vectors whatever the batch composition."""
    from diffgraph.text_embedding import embed

    texts = [d for _, _, d, _ in EXPERTS.values()] + PROMPTS + ["a watercolor painting", "oil painting, thick impasto"]
    return dict(zip(texts, embed(texts)))


def record(source_id: str, kind: str = "lora", base: str = "sd15", version: str = "v1", **kw) -> ExpertRecord:
    files = [ExpertFile(name=f"{source_id}.safetensors", url=f"http://hub/{source_id}", sha256="ab" * 32, size=10)]
    return ExpertRecord(source="civitai", source_id=source_id, version=version, name=f"expert {source_id}",
                        kind=kind, base_model=base, files=files, **kw)


def describe(text: str) -> dict:
    return {"summary": text, "skills": [text], "visual_attributes": [text.split()[0]]}


def build(store: GraphStore, vectors_by_text: dict) -> GraphStore:
    """The same graph as tests/test_graph_store.py's fixture: five described experts (one
    failed, one on another base), one pending without a description, three reference prompts,
    five calibration edges, one finished run."""
    store.embed = lambda texts: np.stack([vectors_by_text[t] for t in texts])
    for sid, (kind, base, _, _) in EXPERTS.items():
        assert store.upsert_expert(record(sid, kind, base)) == "inserted"
    store.upsert_expert(record("pending"))
    for sid, (_, _, text, status) in EXPERTS.items():
        store.register(f"civitai:{sid}", describe(text), text, page_sha256="cd" * 32)
        store.set_status(f"civitai:{sid}", status, "render failed:\n  out of memory" if status == "failed" else None)
    prompt_ids = store.set_reference_prompts(PROMPTS)
    for sid, edges in EDGES.items():
        for index, scores in edges:
            store.catalog.put_calibration(f"civitai:{sid}", prompt_ids[index], scores, METRICS, seed=1234 + index)
    run = store.catalog.start_run("miniworld")
    store.catalog.finish_run(run, "ok", {"new": 6})
    return store


@pytest.fixture
def pg_graph(pg_url, tmp_path, vectors_by_text):
    with GraphStore.open(tmp_path / "pg_home", db_url=pg_url) as store:
        yield build(store, vectors_by_text)


def test_register_status_and_calibration_on_postgres(pg_graph, pg_url):
    catalog = pg_graph.catalog
    assert catalog.backend == "postgresql"
    assert not (pg_graph.home / "catalog.sqlite").exists()
    # register: rows, JSON columns, descriptions and vectors
    row = catalog.get("civitai:a")
    assert (row.kind, row.base_model, row.status, row.files[0].sha256) == ("lora", "sd15", "active", "ab" * 32)
    assert row.description["visual_attributes"] == ["watercolor"] and row.description["subjects"] == []
    assert [r.id for r in catalog.list_experts()] == sorted(f"civitai:{s}" for s in [*EXPERTS, "pending"])  # byte order
    assert [r.id for r in catalog.get_many(["civitai:Z", "civitai:a"])] == ["civitai:Z", "civitai:a"]
    # status with reason and attempts
    row = catalog.get("civitai:_q")
    assert (row.status, row.status_reason, row.attempts) == ("failed", "render failed: out of memory", 1)
    pg_graph.set_status("civitai:_q", "failed", "again")
    assert catalog.get("civitai:_q").attempts == 2
    pg_graph.set_status("civitai:_q", "active")
    assert catalog.get("civitai:_q").status_reason is None
    assert pg_graph.vectors.entries(["civitai:_q"])[0].status == "active"
    with pytest.raises(KeyError):
        pg_graph.set_status("civitai:404", "active")
    # upsert outcomes; a new version drops its calibration edges
    assert pg_graph.upsert_expert(record("a")) == "unchanged"
    assert pg_graph.upsert_expert(record("a", tags=["paint"])) == "updated"
    assert len(catalog.calibration(["civitai:a"])) == 2
    assert pg_graph.upsert_expert(record("a", version="v2")) == "replaced"
    assert catalog.calibration(["civitai:a"]) == [] and catalog.get("civitai:a").status == "pending"
    # calibration edges: exact floats back, overwrite on conflict, foreign keys and finiteness enforced
    edges = catalog.calibration(["civitai:B", "civitai:Z"])
    assert [(e.expert_id, e.scores, e.metric_names) for e in edges] == \
        [("civitai:B", [0.22, 4.0], METRICS), ("civitai:B", [0.25, 4.5], METRICS), ("civitai:Z", [0.3, 6.5], METRICS)]
    catalog.put_calibration("civitai:Z", edges[2].prompt_id, [0.1 + 0.2, 7.0], METRICS, seed=2 ** 40)
    (edge,) = catalog.calibration(["civitai:Z"])
    assert edge.scores == [0.1 + 0.2, 7.0] and edge.seed == 2 ** 40
    assert catalog.calibration_counts() == (3, 2)  # civitai:a lost its two edges with v2
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        catalog.put_calibration("nobody", edges[0].prompt_id, [1.0, 1.0], METRICS, 0)
    with pytest.raises(ValueError, match="finite"):
        catalog.put_calibration("civitai:Z", edges[0].prompt_id, [float("nan"), 1.0], METRICS, 0)
    # reference prompts keep ids; removing one drops its edges (ON DELETE CASCADE)
    ids = pg_graph.set_reference_prompts(PROMPTS[1:])
    assert {e.prompt_id for e in catalog.calibration()} <= set(ids)
    assert catalog.reference_prompt_embeddings(ids).shape == (2, 384)
    # a failed transaction leaves nothing behind
    with pytest.raises(RuntimeError, match="boom"):
        with catalog.transaction():
            catalog.upsert_expert(record("ghost"))
            raise RuntimeError("boom")
    assert catalog.get("civitai:ghost") is None
    # status counts come from the same SQL
    status = graph_status(pg_graph)
    assert status["experts"]["by_status"]["pending"] == 2 and status["last_run"]["counts"] == {"new": 6}
    # reopening finds the schema and the data
    again = Catalog.open(pg_url)
    try:
        assert again.get("civitai:B").name == "expert B" and again.backend == "postgresql"
    finally:
        again.close()


def test_reconcile_with_chroma_on_postgres(pg_graph, vectors_by_text):
    assert reconcile(pg_graph)["clean"]
    vectors = pg_graph.vectors
    vectors.delete("civitai:B")  # missing
    ghost = vectors_by_text["a watercolor painting"]
    vectors.upsert("civitai:ghost", ghost, "lora", "sd15", "active", "a ghost")  # stray
    vectors.set_status("civitai:_q", "active")  # the catalog says failed
    oil = "oil painting, thick impasto"
    pg_graph.catalog.set_description("civitai:a", describe(oil), oil, None)  # stale
    pg_graph.catalog.upsert_expert(record("é", base="sd15"))  # moved to sd15 in the catalog only: misplaced

    dry = reconcile(pg_graph, repair=False)
    assert (dry["missing"], dry["stray"], dry["status"], dry["stale"], dry["misplaced"]) == \
        (["civitai:B"], ["civitai:ghost"], ["civitai:_q"], ["civitai:a"], ["civitai:é"])
    assert reconcile(pg_graph)["repaired"]
    again = reconcile(pg_graph)
    assert again["clean"] and again["experts"] == again["vectors"] == 5
    np.testing.assert_array_equal(vectors.get_embeddings(["civitai:a"])[0], vectors_by_text[oil])
    query = vectors_by_text["a watercolor painting"]
    assert {h[0] for h in vectors.query(query, "lora", "sd15", k=10)} == {"civitai:a", "civitai:B", "civitai:é"}


def test_export_is_identical_to_sqlite_for_the_same_inputs(pg_graph, pg_url, postgres_admin_url, tmp_path,
                                                         vectors_by_text):
    with GraphStore.open(tmp_path / "sqlite_home") as lite:
        build(lite, vectors_by_text)
        assert lite.catalog.backend == "sqlite"
        export_graph(lite, tmp_path / "from_sqlite")
    manifest = export_graph(pg_graph, tmp_path / "from_postgres")
    assert manifest["counts"] == {"experts": 6, "reference_prompts": 3, "edges": 5}
    assert [e["id"] for e in manifest["experts"]][:3] == ["civitai:B", "civitai:Z", "civitai:_q"]  # byte order
    for name in EXPORT_FILES:
        assert (tmp_path / "from_sqlite" / name).read_bytes() == (tmp_path / "from_postgres" / name).read_bytes(), name

    # SQLite's export imported into another PostgreSQL database exports the same bytes again
    name = f"dg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    other = postgres_admin_url.replace("/postgres?", f"/{name}?")
    try:
        assert import_graph(tmp_path / "from_sqlite", tmp_path / "home2", db_url=other) == manifest["counts"]
        with GraphStore.open(tmp_path / "home2", db_url=other) as copy:
            assert reconcile(copy)["clean"]
            export_graph(copy, tmp_path / "round_trip")
        for name_ in EXPORT_FILES:
            assert (tmp_path / "from_sqlite" / name_).read_bytes() == (tmp_path / "round_trip" / name_).read_bytes()
        with pytest.raises(ValueError, match="empty store"):
            import_graph(tmp_path / "from_sqlite", tmp_path / "home2", db_url=other)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_concurrent_writers_queue_on_the_catalog_lock(pg_url):
    """Several processes' catalogs on one database (GCA workers on several machines): write
    transactions that read then write (next run id, upsert) must not interleave."""
    catalogs = [Catalog.open(pg_url) for _ in range(4)]
    run_ids, errors = [], []

    def work(catalog: Catalog, worker: int) -> None:
        try:
            for i in range(10):
                run_ids.append(catalog.start_run(f"worker{worker}"))
                catalog.upsert_expert(record(f"w{worker}-{i}"))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c, n)) for n, c in enumerate(catalogs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert sorted(run_ids) == list(range(1, 41))
        assert len(catalogs[0].list_experts()) == 40
    finally:
        for c in catalogs:
            c.close()


def test_postgres_catalog_and_chroma_server_from_settings(pg_url, tmp_path, monkeypatch, vectors_by_text):
    """DIFFGRAPH_DB_URL + DIFFGRAPH_CHROMA_URL: the shared-deployment configuration end to end,
    registration, retrieval and the planner's subgraph, with nothing stored in DIFFGRAPH_HOME."""
    home = tmp_path / "home"
    with chroma_server(tmp_path / "chroma_server") as (chroma_url, log):
        monkeypatch.setenv("DIFFGRAPH_HOME", str(home))
        monkeypatch.setenv("DIFFGRAPH_DB_URL", pg_url)
        monkeypatch.setenv("DIFFGRAPH_CHROMA_URL", chroma_url)
        with GraphStore.from_settings(get_settings()) as store:
            assert store.catalog.backend == "postgresql"
            build(store, vectors_by_text)
            query = vectors_by_text["a watercolor painting"]
            hits = store.vectors.query(query, "lora", "sd15", k=5)
            assert [h[0] for h in hits] == ["civitai:a", "civitai:B"]  # failed and sdxl experts left out
            assert hits[0][1] > hits[1][1]
            data = activated_subgraph(store, ["civitai:Z", "civitai:a", "civitai:B"], query)
            data.validate()
            assert data["expert", "calibrated_on", "reference_prompt"].edge_index.shape == (2, 5)
            assert reconcile(store)["clean"]
        # a second process (here: a second store) sees the same graph through both servers
        with GraphStore.from_settings(get_settings()) as again:
            assert graph_status(again)["vectors"] == 5 and len(again.catalog.list_experts()) == 6
        assert "No telemetry is configured" in log.read_text(errors="replace")
    assert not home.exists() or not any(home.iterdir())


def test_a_schema_1_catalog_on_postgres_is_migrated_to_family_names(pg_url):
    """The published base name of a schema-1 row becomes declared_base and its family the
    base_model, on PostgreSQL as on SQLite (tests/test_local_library.py)."""
    catalog = Catalog.open(pg_url)
    for source_id, declared in (("a", "SD 1.5"), ("b", "Pony"), ("c", "Hunyuan 1")):
        catalog.upsert_expert(record(source_id, base=declared))
    catalog.close()
    with psycopg.connect(pg_url, autocommit=True) as db:  # what schema 1 held
        db.execute("UPDATE experts SET base_model = declared_base")
        db.execute("ALTER TABLE experts DROP COLUMN declared_base")
        db.execute("ALTER TABLE experts DROP COLUMN preferred_weight")
        db.execute("ALTER TABLE experts DROP COLUMN nsfw_level")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    catalog = Catalog.open(pg_url)
    try:
        assert catalog.migrated
        rows = {r.source_id: (r.base_model, r.declared_base) for r in catalog.list_experts()}
        assert rows == {"a": ("sd15", "SD 1.5"), "b": ("sdxl", "Pony"), "c": ("Hunyuan 1", "Hunyuan 1")}
        assert [r.source_id for r in catalog.list_experts(base_model="SD1.5")] == ["a"]
    finally:
        catalog.close()
    catalog = Catalog.open(pg_url)
    assert not catalog.migrated  # once
    catalog.close()
