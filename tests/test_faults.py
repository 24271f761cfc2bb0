"""Faults a long-running server meets (issue 18): the disk filling up during a download or a
merged-model export, and Chroma's files left broken by a kill mid-write.

A full disk is a real one: a small tmpfs mounted for the test (the machines run the suite as
root, as .ci/run does; a machine where mounting is not allowed fails here, it does not skip).
Every case must end with a one-line error, no file left under a final name as if complete, and
everything stored before intact.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from support import crash_children, vector_damage
from support.budget import budget
from typer.testing import CliRunner
from support.fake_site import FakeSite
from support.serving import serving

from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.graph_store.store import vectors_path
from diffgraph.graph_store.vector_recovery import probe, recover
from diffgraph.graph_store.vectors import VectorsUnreadable
from diffgraph.merger.merge import MergeError
from diffgraph.settings import Settings
from diffgraph.tools.export import ExportError
from diffgraph.tools.sources import ContentStore, StoreFull


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block: a filesystem that really fills."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _weights(n_floats: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"lora_unet_x.lora_down.weight": torch.randn(n_floats, generator=g), "lora_unet_x.alpha": torch.tensor(4.0)})


def _store_files(home: Path) -> dict[str, str]:
    root = home / "blobs"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_a_disk_that_fills_during_a_download_leaves_the_store_as_it_was(tmp_path):
    small, big = _weights(20_000, 1), _weights(600_000, 2)  # 80 KB, then 2.4 MB onto a 1 MB disk
    site = FakeSite()
    with serving(site.app) as url, small_disk(tmp_path / "disk", "1m") as disk:
        site.url = url
        store = ContentStore(disk / "home")
        files = []
        for name, data in (("small.safetensors", small), ("big.safetensors", big)):
            key = str(len(site.blobs))
            site.blobs[key] = data
            files.append(ExpertFile(name=name, url=f"{url}/files/{key}", sha256=hashlib.sha256(data).hexdigest()))
        with httpx.Client() as client:
            kept = store.fetch(files[0], client)
            before = _store_files(disk / "home")
            with pytest.raises(StoreFull) as refused:
                store.fetch(files[1], client)
            message = str(refused.value)
            assert "\n" not in message and "disk holding the store is full" in message and "big.safetensors" in message
            assert _store_files(disk / "home") == before  # no partial file, no blob under the big file's name
            assert store.get(files[1].sha256) is None
            assert hashlib.sha256(kept.read_bytes()).hexdigest() == files[0].sha256
            # room again (the disk grows): the same download now completes and verifies
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            assert hashlib.sha256(store.fetch(files[1], client).read_bytes()).hexdigest() == files[1].sha256


def test_a_disk_that_fills_during_an_import_of_a_local_file_leaves_the_store_as_it_was(tmp_path):
    data = _weights(600_000, 3)
    source = tmp_path / "lora.safetensors"
    source.write_bytes(data)
    with small_disk(tmp_path / "disk", "1m") as disk:
        store = ContentStore(disk / "home")
        with pytest.raises(StoreFull) as refused:
            store.ingest(source, ExpertFile(name="lora.safetensors", url="", sha256=hashlib.sha256(data).hexdigest()))
        assert "\n" not in str(refused.value) and "full" in str(refused.value)
        assert _store_files(disk / "home") == {}


def test_a_disk_that_fills_during_an_export_leaves_nothing_under_the_name(tmp_path, graph_home):
    from diffgraph.agents.generate import generate
    from diffgraph.merger.recipe import MergeRecipe
    from diffgraph.merger.stream import merge_recipe_to_file
    from diffgraph.tools.export import export_checkpoint

    made = generate("a pink circle on a striped white background", seed=1, settings=Settings(home=graph_home),
                    out=tmp_path / "made.png")
    recipe = MergeRecipe.from_dict(made.recipe)
    with small_disk(tmp_path / "disk", "256k") as disk:
        old = disk / "merged.safetensors"
        old.write_bytes(b"an older export, kept whole")
        with pytest.raises(ExportError) as refused:
            export_checkpoint(recipe, old)
        assert "\n" not in str(refused.value) and "free" in str(refused.value)
        with pytest.raises(MergeError) as refused_stream:
            merge_recipe_to_file(crash_children.merged_recipe(), disk / "streamed.safetensors")
        assert "\n" not in str(refused_stream.value) and "disk" in str(refused_stream.value)
        assert sorted(p.name for p in disk.iterdir()) == ["merged.safetensors"]
        assert old.read_bytes() == b"an older export, kept whole"


# ----------------------------------------------------------------------------- Chroma's files
# The catalog is the truth (graph_store/store.py): a killed Chroma write or damaged Chroma files
# cost re-embedding, never data. `graph reconcile` reads the vector store back in a child process
# (graph_store/vector_recovery.py), sets an unreadable one aside and rebuilds it from the catalog.


@pytest.fixture(scope="module")
def vector_template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("vectors") / "home"
    vector_damage.build_home(home)
    return home


def _copy(template: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    return home


def _whole(home: Path, catalog_before: list[str] | None = None) -> None:
    """The store after reconcile: readable in full, no drift, every described expert's vector the
    embedding of its catalog text (and its own nearest neighbour), the catalog as it was."""
    assert probe(vectors_path(home)) is None
    with vector_damage.open_store(home) as store:
        assert reconcile(store, repair=False)["clean"]
        rows = [r for r in store.catalog.list_experts() if r.description_text]
        assert rows and store.vectors.count() == len(rows)
        stored = store.vectors.get_embeddings([r.id for r in rows])
        assert np.allclose(stored, vector_damage.stand_in_embed([r.description_text for r in rows]), atol=1e-6)
        for row, vector in list(zip(rows, stored))[::97]:
            assert store.vectors.query(vector, row.kind, row.base_model, 1)[0][0] == row.id
    if catalog_before is not None:
        assert vector_damage.catalog_dump(home) == catalog_before


def _repair(home: Path) -> dict:
    """What `graph reconcile` does, with the test's embedding: recover, then reconcile."""
    recovery = recover(vectors_path(home))
    with vector_damage.open_store(home) as store:
        return {**recovery, **reconcile(store)}


@pytest.mark.parametrize("shape", list(vector_damage.DAMAGE))
def test_damaged_chroma_files_are_set_aside_and_rebuilt_from_the_catalog(vector_template, tmp_path, shape):
    home = _copy(vector_template, tmp_path)
    catalog_before = vector_damage.catalog_dump(home)
    vector_damage.DAMAGE[shape](home)
    damaged = {p.relative_to(vectors_path(home)): p.read_bytes() for p in vectors_path(home).rglob("*") if p.is_file()}

    report = _repair(home)
    assert report["unreadable"] and "\n" not in report["unreadable"], report
    kept = Path(report["set_aside"])
    kept_files = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    assert set(damaged) <= set(kept_files)  # moved, not deleted; the index files as the damage left them
    assert all(kept_files[f] == data for f, data in damaged.items() if f.name != "chroma.sqlite3"), \
        "the damaged index files were altered"  # (opening a folder, Chroma itself writes to its sqlite file)
    assert len(report["missing"]) == vector_damage.LORAS + vector_damage.CHECKPOINTS and report["repaired"]
    _whole(home, catalog_before)


@budget(default=6, slow=40)
def test_any_damage_to_chroma_files_ends_in_a_whole_store_after_reconcile(vector_template, tmp_path, examples):
    """Generated damage: any file of the folder cut short, overwritten or deleted. Whether Chroma
    still reads the folder (the damage missed what it reads) or not (set aside and rebuilt), after
    reconcile the store is whole and the catalog unchanged."""
    homes = iter(range(examples * 10))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def damaged_then_reconciled(data):
        home = tmp_path / f"home{next(homes)}"
        shutil.copytree(vector_template, home)
        catalog_before = vector_damage.catalog_dump(home)
        files = sorted(p for p in vectors_path(home).rglob("*") if p.is_file() and p.stat().st_size)
        target = data.draw(st.sampled_from(files), label="file")
        size = target.stat().st_size
        how = data.draw(st.sampled_from(["truncate", "overwrite", "delete"]), label="how")
        if how == "truncate":
            os.truncate(target, data.draw(st.integers(0, size - 1), label="to"))
        elif how == "overwrite":
            at = data.draw(st.integers(0, size - 1), label="at")
            vector_damage.overwrite(target, at, data.draw(st.binary(min_size=1, max_size=4096), label="bytes"))
        else:
            target.unlink()
        _repair(home)
        _whole(home, catalog_before)
        shutil.rmtree(home)

    damaged_then_reconciled()


@budget(default=1, slow=3)
def test_a_chroma_write_killed_at_any_moment_is_repaired_by_reconcile(vector_template, tmp_path, examples):
    """The writer rewrites descriptions (one by one through GraphStore.register, and in batches
    of 300 as reconcile and import write) and is SIGKILLed at seeded moments; after each kill,
    recover + reconcile leave the store whole and the catalog's SQLite intact."""
    home = _copy(vector_template, tmp_path)
    rng = random.Random("chroma writes killed")
    tests = Path(__file__).parent
    for kill in range(examples):
        writer = subprocess.Popen([sys.executable, "-m", "support.vector_damage", "write", str(home)], cwd=tests,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 2.0))
        finally:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
        assert writer.returncode == -signal.SIGKILL, f"kill {kill}: the writer had stopped by itself"
        with sqlite3.connect(home / "catalog.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        _repair(home)
        _whole(home)


def test_reading_a_damaged_store_is_one_line_that_names_the_repair(vector_template, tmp_path):
    home = _copy(vector_template, tmp_path)
    vector_damage.DAMAGE["torn index metadata"](home)
    with vector_damage.open_store(home) as store:
        with pytest.raises(VectorsUnreadable) as unreadable:
            store.vectors.query(vector_damage.stand_in_embed(["any"])[0], "lora", "sd15", 5)
    message = str(unreadable.value)
    assert "\n" not in message and len(message) < 400 and "diffgraph graph reconcile" in message


def test_graph_reconcile_rebuilds_an_unreadable_store_from_the_catalog(tmp_path):
    """The command, on a home embedded with the real model (MiniLM): --dry-run says what is wrong
    and moves nothing; without it the folder is set aside and every vector rebuilt, so retrieval
    finds each expert by its own description again."""
    from diffgraph.agents.cli import app
    from diffgraph.graph_store.store import GraphStore

    home = tmp_path / "home"
    texts = {str(n): f"a LoRA that paints {thing}" for n, thing in enumerate(
        ["watercolor foxes", "pixel-art castles", "neon city streets", "oil-painted fruit bowls", "ink dragons"])}
    with GraphStore.open(home) as store:
        for sid, text in texts.items():
            files = [ExpertFile(name=f"{sid}.safetensors", url=f"http://hub/{sid}", sha256=f"{int(sid):064x}", size=1)]
            store.upsert_expert(ExpertRecord(source="civitai", source_id=sid, version="v1", name=sid, kind="lora",
                                             base_model="sd15", files=files))
            store.register(f"civitai:{sid}", {"summary": text}, text, None)
    os.truncate(vectors_path(home) / "chroma.sqlite3", 50_000)
    env = {"DIFFGRAPH_HOME": str(home), "COLUMNS": "400"}

    dry = CliRunner().invoke(app, ["graph", "reconcile", "--dry-run"], env=env)
    assert dry.exit_code == 1 and "cannot be read" in dry.output and len(dry.output.strip().splitlines()) == 1, \
        dry.output
    assert [p.name for p in home.iterdir() if p.name.startswith("chroma")] == ["chroma"]

    done = CliRunner().invoke(app, ["graph", "reconcile"], env=env)
    assert done.exit_code == 0 and "set aside as" in done.output, done.output
    assert len([p for p in home.iterdir() if p.name.startswith("chroma.unreadable-")]) == 1
    with GraphStore.open(home) as store:
        assert reconcile(store, repair=False)["clean"]
        for sid, text in texts.items():
            assert store.vectors.query(store.embed([text])[0], "lora", "sd15", 1, status=None)[0][0] == f"civitai:{sid}"
