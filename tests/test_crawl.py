"""The checkpoint database of a 2,000-expert simulated pass is within the goal.

A GCA pass over benchmarks/crawl_site.py's simulated Civitai (2,000 models, the first few
mini-world LoRAs this machine renders, the rest LoRAs and checkpoints of real bases not
configured here), with the default DIFFGRAPH_GCA_CHECKPOINTS:

- every processable expert ends active; every other listed expert is rejected in bulk while the
  listing is triaged, with one line naming its base, and none of their files is requested (the
  site counts every download and every 404), nor is any of them taken for work (the final
  checkpoint's cursor counts the experts taken);
- the checkpoint database stays under 20 KB per expert taken: pruned, it holds the last
  gca_checkpoints checkpoints plus the steps written after the last prune, where an unpruned one
  holds every step of every expert (about 40 KB per expert);
- a second pass over the unchanged site changes no row of the catalog and takes nothing for work.

The listing is scoped to the bases the site names (``baseModels``): the site also publishes
models whose base is "Other", which is no base (diffgraph.families.UNKNOWN) rather than an
unconfigured one, so the GCA asks for their files to tell the base from their tensors; the site
serves them none (404), so they fail with an attempt counted, and are quarantined after
MAX_ATTEMPTS passes.
"""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from langgraph.checkpoint.sqlite import SqliteSaver
from rich.console import Console

from diffgraph.agents.gca import NO_PROFILE, build_graph, run_pass
from diffgraph.benchmarks.crawl_site import BASE_NAMES, MINI_BASE, running_site
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings

# Pruned, the database is as large as the most checkpoints it ever held: gca_checkpoints (20) plus
# an expert's steps, about 220 KB with their writes and indexes however many experts were
# taken, so the goal per expert holds from about a dozen (10 experts: 22 KB each); unpruned, it
# is about 40 KB per expert however many.
MODELS, PROCESSABLE, N_R = 2000, 12, 2
TYPES = ["LORA", "Checkpoint"]  # what a civitai spec lists unless its scope says otherwise
NAMED_BASES = [b for b in BASE_NAMES if b != "Other"]
GOAL_BYTES_PER_EXPERT = 20 * 1024
SNAPSHOT = "SELECT id, status, version, updated_at FROM experts ORDER BY id"


@dataclass
class Pass:
    result: dict
    log: str
    downloads: int  # site: files served during the pass
    missing_files: int  # site: file requests answered 404
    taken: int  # the final checkpoint's cursor: experts taken for work
    checkpoints: int  # of the pass's thread, left in the database
    checkpoint_bytes: int  # gca_checkpoints.sqlite and its WAL
    rows: list[tuple]  # SNAPSHOT after the pass


@dataclass
class Crawl:
    home: Path
    settings: Settings
    listable: int
    first: Pass
    second: Pass


def _bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def _pass(site, spec: str, settings: Settings) -> Pass:
    thread, out = f"gca:{spec}", io.StringIO()
    before = site.stats()
    result = run_pass([spec], settings=settings, console=Console(file=out, width=300), read_pages=False)
    after = site.stats()
    db = settings.home / "gca_checkpoints.sqlite"
    conn = sqlite3.connect(db, check_same_thread=False)
    try:
        taken = build_graph(SqliteSaver(conn)).get_state({"configurable": {"thread_id": thread}}).values["cursor"]
        checkpoints = conn.execute("SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (thread,)).fetchone()[0]
    finally:
        conn.close()
    catalog = sqlite3.connect(f"file:{settings.home / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = catalog.execute(SNAPSHOT).fetchall()
    finally:
        catalog.close()
    return Pass(result, out.getvalue(), after["downloads"] - before["downloads"],
                after["missing_files"] - before["missing_files"], taken, checkpoints, _bytes(db), rows)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Crawl:
    with pytest.MonkeyPatch.context() as mp:
        for family in ("SD15", "SDXL", "FLUX"):  # the real bases stay unconfigured, whatever this shell sets
            mp.delenv(f"DIFFGRAPH_BASE_{family}", raising=False)
        with running_site(MODELS, PROCESSABLE) as site:
            home = tmp_path_factory.mktemp("crawl_home")
            settings = Settings(home=home, reference_prompts=N_R)
            spec = f"civitai:{site.url}?baseModels={','.join(NAMED_BASES)}"
            listable = site.count(types=TYPES, base_models=NAMED_BASES, nsfw=False)
            first = _pass(site, spec, settings)
            second = _pass(site, spec, settings)
    return Crawl(home, settings, listable, first, second)


def test_a_2000_expert_pass_rejects_in_bulk_within_the_checkpoint_goal_and_a_second_changes_nothing(crawl):
    first, second, keep = crawl.first, crawl.second, crawl.settings.gca_checkpoints
    assert keep == 20 and crawl.listable > 1000, (keep, crawl.listable)  # the defaults, over a large listing
    assert first.result["counts"].get("active") == PROCESSABLE, first.log[-3000:]
    assert first.result["counts"]["listed"] == crawl.listable

    with GraphStore.open(crawl.home) as store:
        rows = store.catalog.list_experts()
        edges = store.catalog.calibration()
    assert len(rows) == crawl.listable
    mini = [r for r in rows if r.declared_base == MINI_BASE]
    others = [r for r in rows if r.declared_base != MINI_BASE]
    assert len(mini) == PROCESSABLE
    assert all(r.status == "active" and r.description_text for r in mini), [(r.id, r.status) for r in mini]
    assert sorted(e.expert_id for e in edges) == sorted(r.id for r in mini for _ in range(N_R))
    assert all(f.local_path for r in mini for f in r.files)

    assert {r.declared_base for r in others} == set(NAMED_BASES) - {MINI_BASE}  # every base seen, none configured
    wrong = [(r.id, r.status, r.status_reason) for r in others
             if r.status != "rejected" or not r.status_reason.startswith(f"{NO_PROFILE} for {r.declared_base!r}")
             or "\n" in r.status_reason or r.attempts or r.description_text is not None
             or any(f.local_path for f in r.files)]
    assert not wrong, wrong[:5]
    # nothing of theirs was asked for: only the processable files were served, and no other file requested
    assert (first.downloads, first.missing_files) == (PROCESSABLE, 0)
    blobs = [p for p in (crawl.home / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == PROCESSABLE, blobs
    assert first.taken == PROCESSABLE  # the rejections took no step of their own

    # pruned (as the pass goes and when it ends): unpruned, every step of every expert stays (7 per expert)
    assert PROCESSABLE * 7 > keep
    assert first.checkpoints <= keep and second.checkpoints <= keep, (first.checkpoints, second.checkpoints)
    assert first.checkpoint_bytes < GOAL_BYTES_PER_EXPERT * first.taken, first.checkpoint_bytes / first.taken

    assert second.rows == first.rows  # id, status, version and updated_at of every expert
    assert second.taken == 0 and (second.downloads, second.missing_files) == (0, 0)
    assert second.result["counts"] == {"listed": crawl.listable, "removed": 0}, second.log[-3000:]
