"""Crash safety: SIGKILL at seeded random moments, then restart, and the store must be whole.

Four kinds of work are killed while they write, each in a child process of its own process group
(tests/support/crash_children.py; the test kills that group and nothing else):

- GCA passes over a mini-world hub: first a run killed before LangGraph's first checkpoint
  (it must not stay "running" in the runs table), then kills at random moments of the resumed
  pass. After every kill: no expert is duplicated or lost, catalog and Chroma disagree at most
  about the one expert in flight, every stored blob hashes to its name; the next start repairs
  that drift before it works (`graph reconcile` then finds nothing), and the final state is one
  completed run with every expert active.
- graph exports written again and again: every file under its final name is whole (equal to a
  reference export; the store does not change), and import reads either the whole export or
  refuses it by its hashes, never half a file.
- images through the HTTP API's code (ESA, planner, merge, render, PNG, then the resize written
  over it): every PNG under a final name decodes whole and carries its recipe. The merge engine
  itself writes nothing to disk (merged weights and LoRA deltas are cached in memory only), so
  these PNGs are everything the render path persists; merged models reach disk only through
  merger/stream.py's ``merge_recipe_to_file``, killed here too (the file is always a whole merge).
- planner checkpoints (weights + schema, two files): never read half-written or mismatched.
- chat turns (history persisted by LangGraph's SQLite checkpointer): after a restart the thread
  holds every finished turn once, in order, and answers the next message.

The kill schedule comes from a seeded RNG (SEED), so a failure can be replayed; where a timed
kill lands inside the work still depends on timing, and each check holds wherever it lands.
Some kills are exact instead: the child dies inside a file write, after a seeded fraction of
its bytes (crash_children.die_inside_write), which is where a non-atomic write would be caught.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from diffgraph.graph_store.export import export_graph, read_export
from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.store import GraphStore
from diffgraph.miniworld.hub import load_manifest, manifest_experts, running_hub
from PIL import Image
from support import crash_children

from diffgraph.settings import Settings

pytestmark = pytest.mark.browser

SEED = 20240607
N_R = 3
SUBSET = ("tangerine", "royal-purple", "navy-backdrop", "golden-hour")  # civitai, hf, civitai, hf
KILLS = {"gca": 6, "export": 6, "images": 3, "writes": 4, "merges": 3, "chat": 4}
CUT_KILLS = 2  # of the export and write kills: inside a write, at a seeded byte offset  # plus the run killed before its first checkpoint


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver that has imported everything and loaded the models once (see
    support/crash_warm.py). It finds tests/support through PYTHONPATH: Python 3.11's forkserver
    does not apply the parent's sys.path before preloading, and skips modules it cannot import."""
    tests = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([tests, *([old] if old else [])])
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*crash_children.PRELOAD, "support.crash_children", "support.crash_warm"])
    try:
        yield ctx
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture
def rng(request) -> random.Random:
    """The kill schedule of one test: seeded by SEED and the test's name, so each test replays
    the same schedule whether it runs alone or with the others."""
    return random.Random(f"{SEED}/{request.node.name}")


class Child:
    """One child process, killed by process group. Every child still running when its test
    ends is killed then (``_no_child_outlives_its_test``): the children loop forever, and one
    left behind by a failed assertion would keep the test run's output pipe open."""

    started: list[Child] = []

    def __init__(self, ctx, target, args: tuple, log: Path):
        self.log = log
        log.write_text("")
        self.process = ctx.Process(target=target, args=(*args, str(log)))
        self.process.start()
        Child.started.append(self)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 120) -> bool:
        """True once ``pattern`` is in the log; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return True
            if not self.process.is_alive():
                return bool(re.search(pattern, self.text()))
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"no {pattern!r} within {timeout:.0f} s:\n{self.text()[-3000:]}")

    def kill(self) -> bool:
        """SIGKILL the child's process group; True if it was still running."""
        alive = self.process.is_alive()
        if alive:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.join(timeout=60)
        return alive and self.process.exitcode == -signal.SIGKILL

    def run_for(self, seconds: float) -> bool:
        """Let it work ``seconds`` more, then kill it; True if the kill hit a running process."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process.is_alive():
            time.sleep(0.01)
        return self.kill()


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    while Child.started:
        Child.started.pop().kill()


def _blobs_whole(home: Path) -> None:
    for blob in (home / "blobs").rglob("*") if (home / "blobs").exists() else []:
        if blob.is_file() and not blob.name.endswith(".partial"):
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"{blob} is not what its name says"


def _store_state(home: Path, expected_ids: set[str]) -> dict:
    """Invariants that hold after any kill, and the drift a restart must repair."""
    with GraphStore.open(home) as store:
        rows = {r.id: r for r in store.catalog.list_experts()}
        entries = store.vectors.entries()
        report = reconcile(store, repair=False)
        runs = [store.catalog.get_run(i) for i in range(1, (store.catalog.last_run() or {"id": 0})["id"] + 1)]
        edges = {}
        for e in store.catalog.calibration():
            edges[e.expert_id] = edges.get(e.expert_id, 0) + 1
    ids = [e.expert_id for e in entries]
    assert len(ids) == len(set(ids)), f"an expert has two vectors: {sorted(ids)}"
    assert set(rows) <= expected_ids, set(rows) - expected_ids
    assert sum(r["status"] == "running" for r in runs) <= 1, runs
    active = {i for i, r in rows.items() if r.status == "active"}
    assert all(edges.get(i) == N_R for i in active), edges
    drift = {i for k in ("missing", "stale", "misplaced", "stray", "status") for i in report[k]}
    _blobs_whole(home)
    return {"active": active, "drift": drift, "runs": runs, "rows": rows}


@pytest.fixture(scope="module")
def crashed_home(forkserver, artifacts_dir, tmp_path_factory):
    """A GCA pass over SUBSET killed KILLS["gca"] + 1 times, then finished. Yields (home, kills,
    notes) for the other cases, which work on the finished store."""
    published = {s.slug: (s, e) for s, e in manifest_experts(load_manifest(artifacts_dir))}
    rng = random.Random(f"{SEED}/gca")
    root = tmp_path_factory.mktemp("crash")
    home = root / "home"
    kills, notes = 0, []
    with running_hub(artifacts_dir, experts=[published[s] for s in SUBSET]) as hub:
        specs = [f"civitai:{hub.url}", f"hf:{hub.url}"]
        expected = {f"civitai:{e.model_id}" for e in hub.experts("civitai")} | {f"hf:{e.repo_id}" for e in hub.experts("hf")}

        # 1. killed before its first checkpoint: the run is recorded, LangGraph has written nothing
        child = Child(forkserver, crash_children.gca, (str(home), specs, True), root / "gca-0.log")
        child.process.join(timeout=180)
        assert child.process.exitcode == -signal.SIGKILL and "dying before the first checkpoint" in child.text(), \
            child.text()[-3000:]
        kills += 1
        state = _store_state(home, expected)
        assert [r["status"] for r in state["runs"]] == ["running"]  # what the fix must clean up
        checkpoints = home / "gca_checkpoints.sqlite"
        con = sqlite3.connect(checkpoints)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "checkpoints" not in tables or con.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 0
        finally:
            con.close()

        # 2. the pass, killed at random moments; each restart resumes it
        previous_active: set[str] = set()
        previous_drift: set[str] = set()
        for i in range(1, KILLS["gca"] + 1):
            child = Child(forkserver, crash_children.gca, (str(home), specs, False), root / f"gca-{i}.log")
            # the first kill lands in the pass's first steps (listing, choosing reference prompts);
            # later ones are timed from when experts are being processed
            started = child.wait_for(r"GCA run \d+ \(" if i == 1 else r"experts listed|\(resuming;")
            log = child.text()
            if i == 1:
                assert "run 1 was interrupted" in log and "GCA run 2 (new;" in log, log[-3000:]
            else:
                assert "GCA run 2 (resuming;" in log, log[-3000:]
            if previous_drift:
                assert "repaired drift" in log, f"drift {previous_drift} left by the last kill was not repaired:\n{log}"
            delay = rng.uniform(0.3, 3.0) if i == 1 else rng.uniform(0.5, 8.0)
            killed = started and child.run_for(delay)
            if not killed:
                notes.append(f"gca kill {i}: the pass had finished before {delay:.1f} s")
                break
            kills += 1
            state = _store_state(home, expected)
            assert previous_active <= state["active"], f"lost {previous_active - state['active']}"
            assert len(state["drift"]) <= 1, f"drift beyond the expert in flight: {state['drift']}"
            previous_active, previous_drift = state["active"], state["drift"]
            notes.append(f"gca kill {i} at +{delay:.1f} s: {len(state['active'])} active, drift {sorted(state['drift'])}")

        # 3. the same command once more finishes the pass
        child = Child(forkserver, crash_children.gca, (str(home), specs, False), root / "gca-final.log")
        child.process.join(timeout=400)
        log = child.text()
        assert child.process.exitcode == 0 and "pass done" in log, log[-3000:]
        if previous_drift:
            assert "repaired drift" in log, log
    state = _store_state(home, expected)
    assert state["active"] == expected and not state["drift"], state
    # run 1 died before its first checkpoint; run 2 was killed and resumed until it completed (a
    # later run, if the pass completed before the last kill, found nothing to do)
    statuses = [r["status"] for r in state["runs"]]
    assert statuses[:2] == ["interrupted", "completed"] and set(statuses[2:]) <= {"completed"}, state["runs"]
    assert state["runs"][1]["counts"] == {"listed": len(SUBSET), "active": len(SUBSET), "removed": 0}
    with GraphStore.open(home) as store:
        assert reconcile(store, repair=False)["clean"]
    assert not list(home.rglob("*.partial"))
    yield home, kills, notes


def _kill(child, cut, rng, max_delay: float) -> float:
    """SIGKILL ``child`` after a random run of up to ``max_delay`` s, or, when it was given a
    ``cut``, wait for it to kill itself inside that write. Returns the delay (0 for a cut)."""
    if cut is not None:
        child.process.join(timeout=120)
        assert child.process.exitcode == -signal.SIGKILL and "dying inside a write" in child.text(), child.text()
        return 0.0
    delay = rng.uniform(0.0, max_delay)
    assert child.run_for(delay), child.text()[-2000:]
    return delay


def test_gca_passes_survive_sigkill(crashed_home):
    _, kills, notes = crashed_home
    print(f"\nGCA: {kills} kills survived\n  " + "\n  ".join(notes))
    assert kills >= 4


def test_graph_exports_survive_sigkill(crashed_home, forkserver, rng, tmp_path):
    home = crashed_home[0]
    with GraphStore.open(home) as store:
        reference = export_graph(store, tmp_path / "reference")
    ref = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
    target = tmp_path / "export"
    kills, outcomes = 0, []
    for i in range(KILLS["export"]):
        # the last CUT_KILLS die inside a file write, at a seeded write and byte offset
        cut = (rng.randrange(4 * 3), rng.uniform(0.05, 0.95)) if i >= KILLS["export"] - CUT_KILLS else None
        child = Child(forkserver, crash_children.export, (str(home), str(target), cut), tmp_path / f"export-{i}.log")
        child.wait_for("ready")
        delay = _kill(child, cut, rng, 2.5)
        kills += 1
        done = child.text().count("export ")
        for path in target.iterdir() if target.exists() else []:
            if path.name in ref:
                assert path.read_bytes() == ref[path.name], f"{path.name} is not whole after a kill at +{delay:.2f} s"
            else:
                assert path.name.startswith(".") and path.name.endswith(".tmp"), path.name  # a temporary, never read
        try:
            manifest, _ = read_export(target)
            assert manifest == reference
            outcomes.append(f"{f'write {cut[0] + 1}, cut at {cut[1]:.0%}' if cut else f'+{delay:.2f} s'} "
                            f"({done} exports done): readable, equal to the reference")
        except (ValueError, FileNotFoundError) as exc:  # a first export cut short: refused, not half-read
            assert done == 0, f"an export written before the kill is unreadable: {exc}"
            outcomes.append(f"{f'write {cut[0] + 1}, cut at {cut[1]:.0%}' if cut else f'+{delay:.2f} s'} "
                            f"({done} exports done): refused ({type(exc).__name__})")
        leftovers = [p.name for p in target.iterdir() if p.name.endswith(".tmp")] if target.exists() else []
        outcomes[-1] += f", {len(leftovers)} temporary files left"
    with GraphStore.open(home) as store:
        assert reconcile(store, repair=False)["clean"]
    print(f"\nexport: {kills} kills survived\n  " + "\n  ".join(outcomes))
    assert kills == KILLS["export"]


def _png_whole(path: Path) -> None:
    from diffgraph.merger.png import read_recipe

    with Image.open(path) as im:
        im.load()  # decodes every byte: a truncated PNG raises here
    read_recipe(path)


def test_image_writes_survive_sigkill(crashed_home, forkserver, rng, tmp_path):
    from diffgraph.agents.chat import ChatServices
    from diffgraph.agents.server import ImageAPI

    home, _, _ = crashed_home
    api_dir = home / "outputs" / "api"
    kills, outcomes = 0, []
    for i in range(KILLS["images"]):
        child = Child(forkserver, crash_children.images, (str(home),), tmp_path / f"images-{i}.log")
        child.wait_for("ready")
        child.wait_for("image ", timeout=240)  # models loaded, one image through: kills now land in the loop
        delay = rng.uniform(0.0, 2.0)
        assert child.run_for(delay), child.text()[-2000:]
        kills += 1
        finals = sorted(p for p in api_dir.glob("*.png"))
        temps = [p for p in api_dir.iterdir() if p.name.endswith(".tmp")]
        for png in finals:
            _png_whole(png)
        api = ImageAPI(ChatServices(Settings(home=home)))
        for png in finals:
            found = api.find(png.stem)
            assert found is not None and found.suffix == ".png"
            _png_whole(found)
        outcomes.append(f"+{delay:.2f} s: {len(finals)} PNGs whole, {len(temps)} temporary files left")

    # The write itself: a process doing nothing but the API's resize-in-place of one PNG, so the
    # kills land inside writes. The file is always one whole version (a plain write_bytes, as
    # the server had before, leaves a truncated PNG here).
    png = sorted(api_dir.glob("*.png"))[0]
    versions = {}
    for side in (1024, 512):
        from diffgraph.agents.server import resize_in_place

        versions[side] = resize_in_place(png, (side, side)).read_bytes()
    mid_write = 0
    for i in range(KILLS["writes"]):
        cut = (rng.randrange(6), rng.uniform(0.05, 0.95)) if i >= KILLS["writes"] - CUT_KILLS else None
        child = Child(forkserver, crash_children.resize_writes, (str(png), cut), tmp_path / f"writes-{i}.log")
        if cut is None:
            child.wait_for("write 1\n")
        delay = _kill(child, cut, rng, 1.0)
        kills += 1
        assert png.read_bytes() in versions.values(), "a PNG under its final name is not one whole version"
        _png_whole(png)
        temps = [p for p in api_dir.iterdir() if p.name.startswith(f".{png.name}.")]
        mid_write += bool(temps)
        for t in temps:
            t.unlink()
        outcomes.append(f"resize writes, {f'write {cut[0] + 1} cut at {cut[1]:.0%}' if cut else f'+{delay:.2f} s'} "
                        f"({child.text().count(chr(10) + 'write ')} done): whole"
                        + (", killed mid-write (temporary file left)" if temps else ""))
    print(f"\nimages: {kills} kills survived, {mid_write} of them inside a write\n  " + "\n  ".join(outcomes))
    assert kills == KILLS["images"] + KILLS["writes"] and mid_write >= CUT_KILLS


def test_merged_model_files_survive_sigkill(forkserver, rng, tmp_path):
    """The one place the merger writes a merged model to disk (merger/stream.py,
    ``merge_recipe_to_file``: a single .safetensors for A1111 and friends). The merge is
    deterministic, so the file under its final name must always equal a reference merge."""
    from diffgraph.merger.stream import merge_recipe_to_file, read_recipe_metadata
    from diffgraph.tools.sources import validate_safetensors

    reference = merge_recipe_to_file(crash_children.merged_recipe(), tmp_path / "reference.safetensors").read_bytes()
    out = tmp_path / "merged.safetensors"
    kills, outcomes = 0, []
    for i in range(KILLS["merges"]):
        child = Child(forkserver, crash_children.merged_files, (str(out),), tmp_path / f"merge-{i}.log")
        child.wait_for("ready")
        delay = rng.uniform(0.0, 1.5)
        assert child.run_for(delay), child.text()[-2000:]
        kills += 1
        done = len(re.findall(r"^merge \d+", child.text(), re.M))
        if out.exists():
            assert out.read_bytes() == reference, f"the merged file is not whole after a kill at +{delay:.2f} s"
            validate_safetensors(out)
            assert read_recipe_metadata(out) == crash_children.merged_recipe()
        else:
            assert done == 0
        temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(out.name) and p.name != out.name]
        outcomes.append(f"+{delay:.2f} s ({done} merges done): {'whole' if out.exists() else 'absent'}, "
                        f"{len(temps)} temporary files left")
    print(f"\nmerged model files: {kills} kills survived\n  " + "\n  ".join(outcomes))
    assert kills == KILLS["merges"]


def _turns(home: Path, thread: str) -> tuple[list[dict], list[dict]]:
    from diffgraph.agents.chat import ChatAgent

    with ChatAgent(Settings(home=home), llm=None, use_plugins=False) as agent:
        return agent.history(thread), agent.images(thread)


def _check_thread(history: list[dict], images: list[dict], kills: int) -> list[int]:
    """Every finished turn once, in order: user n, its answer, user n+1 ... A user message
    without an answer is a turn a kill cut short: at most one per kill. Every image is whole."""
    numbers, unanswered = [], 0
    for k, message in enumerate(history):
        if message["role"] == "user":
            numbers.append(int(re.search(r"number (\d+)", message["content"]).group(1)))
            unanswered += k + 1 == len(history) or history[k + 1]["role"] == "user"
        else:
            assert k > 0 and history[k - 1]["role"] == "user", f"two answers in a row: {history[k - 1:k + 1]}"
    assert numbers == sorted(set(numbers)), f"a turn was replayed or reordered: {numbers}"
    assert unanswered <= kills, f"{unanswered} turns without an answer after {kills} kills"
    for image in images:
        _png_whole(Path(image["path"]))
    assert [im["n"] for im in images] == sorted({im["n"] for im in images}), images
    return numbers


def test_chat_turns_survive_sigkill(crashed_home, forkserver, rng, tmp_path):
    home = tmp_path / "chat-home"
    shutil.copytree(crashed_home[0], home)
    thread, start, kills, outcomes = "crash", 1, 0, []
    answered = 0
    for i in range(KILLS["chat"]):
        child = Child(forkserver, crash_children.chat, (str(home), thread, start), tmp_path / f"chat-{i}.log")
        child.wait_for("ready")
        child.wait_for(r"turn \d+", timeout=240)
        delay = rng.uniform(0.0, 3.0)
        assert child.run_for(delay), child.text()[-2000:]
        kills += 1
        history, images = _turns(home, thread)
        numbers = _check_thread(history, images, kills)
        start = max(numbers, default=0) + 1  # the next child asks for new numbers: a replay would show
        finished = sum(m["role"] == "assistant" for m in history)
        assert finished >= answered, "a finished turn was lost"
        answered = finished
        outcomes.append(f"+{delay:.2f} s: {finished} turns answered, {len(images)} images, last user turn "
                        f"{'answered' if history and history[-1]['role'] == 'assistant' else 'cut short'}")
    from diffgraph.agents.chat import ChatAgent

    with ChatAgent(Settings(home=home), llm=None, use_plugins=False) as agent:
        before = len(agent.history(thread))
        reply = agent.send("status", thread=thread)
        after = agent.history(thread)
    assert reply.text and after[-1]["role"] == "assistant" and len(after) >= before + 2
    print(f"\nchat: {kills} kills survived\n  " + "\n  ".join(outcomes))
    assert kills == KILLS["chat"]


def test_a_planner_checkpoint_cut_mid_save_is_never_misread(forkserver, rng, tmp_path):
    """Weights and schema are two files: a kill inside the weights leaves the old planner whole;
    a kill between them (inside the schema write) leaves new weights beside the old schema,
    which load refuses by the weights' sha256 instead of reading them with the wrong schema."""
    import torch
    from diffgraph.planner.checkpoint import load_planner, save_planner

    directory = tmp_path / "planner"
    old = crash_children.tiny_planner(0)
    save_planner(old, directory)
    outcomes = []
    for write in (0, 1):  # 0: the weights file, 1: the schema, written after the weights
        cut = (write, rng.uniform(0.05, 0.95))
        child = Child(forkserver, crash_children.planner_save, (str(directory), 1, cut), tmp_path / f"planner-{write}.log")
        child.process.join(timeout=120)
        assert child.process.exitcode == -signal.SIGKILL and "dying inside a write" in child.text(), child.text()
        if write == 0:
            loaded = load_planner(directory)
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
            outcomes.append(f"cut inside the weights at {cut[1]:.0%}: the old planner loads, whole")
        else:
            with pytest.raises(ValueError, match="sha256 differs") as refused:
                load_planner(directory)
            assert "\n" not in str(refused.value)
            outcomes.append(f"cut inside the schema at {cut[1]:.0%}: refused ({str(refused.value)[:60]}...)")
    save_planner(crash_children.tiny_planner(1), directory)  # saving again repairs it
    load_planner(directory)
    print("\nplanner checkpoint: 2 kills survived\n  " + "\n  ".join(outcomes))
