"""A pass never stalls on one expert: whatever a node raises for it (out of memory, a missing
file, a plain RuntimeError, an exception with no message), that expert alone is failed with one
line and an attempt counted, the others are built, the pass finishes, and the next pass retries
it. The faults are injected into the pass's own steps (describe, calibrate) for one expert."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from rich.console import Console

from diffgraph.agents import gca
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings

EXPERTS = ("tangerine", "royal-purple")
FAULTS = {
    "out of memory": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "memory": MemoryError(),
    "missing file": FileNotFoundError("[Errno 2] No such file or directory: 'ImageReward.pt'"),
    "no message": Exception(""),
    "multi-line": ValueError("first line\n  Traceback-like second line\n\n"),
}


@pytest.fixture
def library(tmp_path, artifacts_dir):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in EXPERTS:
        shutil.copy(artifacts_dir / "experts" / f"{name}.safetensors", lib / f"{name}.safetensors")
        (lib / f"{name}.json").write_text(json.dumps({"kind": "lora", "base_model": "miniworld-sd",
                                                      "description": f"the {name} look"}))
    return lib


def _pass(lib, home) -> tuple[dict, str]:
    out = io.StringIO()
    result = gca.run_pass([f"local:{lib}"], settings=Settings(home=home, reference_prompts=2),
                          console=Console(file=out, width=300), read_pages=False)
    return result, out.getvalue()


@pytest.mark.parametrize("node", ["describe", "calibrate"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_in_one_experts_step_fails_that_expert_alone(library, tmp_path, monkeypatch, node, fault):
    victim = "local:tangerine.safetensors"
    target = {"describe": "describe_expert", "calibrate": "calibrate_experts"}[node]
    real = getattr(gca, target)

    def faulty(*args, **kwargs):
        expert = args[0].id if node == "describe" else args[0][0].name
        if expert == victim:
            raise FAULTS[fault]
        return real(*args, **kwargs)

    monkeypatch.setattr(gca, target, faulty)
    home = tmp_path / "home"
    result, log = _pass(library, home)
    with GraphStore.open(home) as store:
        rows = {r.id: r for r in store.catalog.list_experts()}
        run = store.catalog.last_run()
    assert run["status"] == "completed", log[-2000:]
    assert rows["local:royal-purple.safetensors"].status == "active", log[-2000:]
    failed = rows[victim]
    assert (failed.status, failed.attempts) == ("failed", 1), (failed.status, failed.status_reason)
    assert failed.status_reason.startswith(f"{node} failed: {type(FAULTS[fault]).__name__}")
    assert "\n" not in failed.status_reason and len(failed.status_reason) <= 300

    monkeypatch.setattr(gca, target, real)  # the fault is gone: the next pass retries the expert and builds it
    _, log = _pass(library, home)
    with GraphStore.open(home) as store:
        assert store.catalog.get(victim).status == "active", log[-2000:]


def test_an_expert_failing_every_pass_is_quarantined_until_retried(library, tmp_path, monkeypatch):
    """After MAX_ATTEMPTS failed passes an expert is left alone (graph status says quarantined);
    `gca retry ID` sends it back, and the next pass builds it."""
    from typer.testing import CliRunner

    from diffgraph.agents.cli import app
    from diffgraph.graph_store.catalog import MAX_ATTEMPTS

    victim = "local:tangerine.safetensors"
    real = gca.describe_expert

    def faulty(record, *args, **kwargs):
        if record.id == victim:
            raise RuntimeError("the browser crashed")
        return real(record, *args, **kwargs)

    monkeypatch.setattr(gca, "describe_expert", faulty)
    home = tmp_path / "home"
    for _ in range(MAX_ATTEMPTS + 1):
        _, log = _pass(library, home)
    with GraphStore.open(home) as store:
        row = store.catalog.get(victim)
        (failure,) = [f for f in store.catalog.failures() if f["id"] == victim]
    assert (row.status, row.attempts) == ("failed", MAX_ATTEMPTS) and failure["quarantined"]  # the last pass left it
    monkeypatch.setenv("DIFFGRAPH_HOME", str(home))
    status = CliRunner().invoke(app, ["graph", "status"], env={"COLUMNS": "300"})
    assert "quarantined (gca retry)" in status.output, status.output
    monkeypatch.setattr(gca, "describe_expert", real)
    retried = CliRunner().invoke(app, ["gca", "retry", victim])
    assert retried.exit_code == 0 and "1 experts back to pending" in retried.output, retried.output
    _pass(library, home)
    with GraphStore.open(home) as store:
        assert store.catalog.get(victim).status == "active"
    unknown = CliRunner().invoke(app, ["gca", "retry", "local:nope"])
    assert unknown.exit_code == 1 and "no expert 'local:nope'" in unknown.output


def test_a_file_that_cannot_be_had_now_is_skipped_and_fetched_on_a_later_pass(artifacts_dir, tmp_path, monkeypatch):
    """A login wall (Civitai's 401 answer), a download page served instead of the file, and a
    file the store's budget (DIFFGRAPH_MAX_STORE_GB) has no room for: each expert is left
    pending with a one-line reason and no attempt counted, nothing partial is kept, the pass
    finishes, and once the file can be had the next pass makes it active. A file its host does
    not have (404: a deleted version) fails with an attempt counted, so it backs off."""
    from support.fake_site import FakeSite
    from support.serving import serving

    site = FakeSite()
    data = {name: (artifacts_dir / "experts" / f"{name}.safetensors").read_bytes()
            for name in ("tangerine", "polka-dots", "stripes-pro", "pink-pop")}  # 126 KB, 126 KB, 233 KB, 126 KB
    home = tmp_path / "home"
    with serving(site.app) as url:
        site.url = url
        login = site.publish_civitai("locked.safetensors", data["tangerine"], url=f"{url}/dl/locked")
        page = site.publish_civitai("paged.safetensors", data["polka-dots"], url=f"{url}/dl/page")
        big = site.publish_civitai("big.safetensors", data["stripes-pro"])
        gone = site.publish_civitai("gone.safetensors", data["pink-pop"], url=f"{url}/files/deleted")
        site.answers["/dl/locked"] = (401, "application/json", json.dumps(
            {"error": "The creator of this asset requires you to be logged in to download it"}))
        site.answers["/dl/page"] = (200, "text/html", "<html><body><h1>Log in to download</h1></body></html>")
        monkeypatch.setenv("DIFFGRAPH_MAX_STORE_GB", str(130_000 / 2**30))
        ids = [f"civitai:{i}" for i in (login, page, big)]

        def run() -> tuple[dict, str, dict]:
            out = io.StringIO()
            result = gca.run_pass([f"civitai:{url}"], settings=Settings(home=home, reference_prompts=2),
                                  console=Console(file=out, width=300), read_pages=False)
            with GraphStore.open(home) as store:
                return result, out.getvalue(), {i: store.catalog.get(i) for i in [*ids, f"civitai:{gone}"]}

        result, log, rows = run()
        assert result["counts"]["skipped"] == 3, log
        expected = {ids[0]: "HTTP 401", ids[1]: "answered a web page, not the file",
                    ids[2]: "would take the store over its budget (DIFFGRAPH_MAX_STORE_GB = 127.0 KiB"}
        for expert_id, why in expected.items():
            row = rows[expert_id]
            assert (row.status, row.attempts) == ("pending", 0), (expert_id, row)
            assert row.status_reason.startswith("skipped: ") and why in row.status_reason, row.status_reason
            assert "\n" not in row.status_reason and f"skipped {expert_id}: " in log, log
        assert "logged in" in rows[ids[0]].status_reason and "login or an API token" in rows[ids[0]].status_reason
        assert not list(home.rglob("*.partial"))
        deleted = rows.pop(f"civitai:{gone}")
        assert (deleted.status, deleted.attempts, result["counts"]["failed"]) == ("failed", 1, 1), deleted
        assert "HTTP 404" in deleted.status_reason, deleted.status_reason

        del site.answers["/dl/locked"], site.answers["/dl/page"]
        site.redirects["/dl/locked"] = f"{url}/files/0"
        site.redirects["/dl/page"] = f"{url}/files/1"
        monkeypatch.delenv("DIFFGRAPH_MAX_STORE_GB")
        result, log, rows = run()
    assert rows.pop(f"civitai:{gone}").attempts == 2  # tried again, counted again: quarantined after MAX_ATTEMPTS
    assert all(row.status == "active" for row in rows.values()), log
    assert result["counts"].get("active") == 3 and not result["counts"].get("skipped"), log
