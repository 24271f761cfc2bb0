"""The Graph Construction Agent (paper Sec. 3.1) as a LangGraph StateGraph.

    discover -> next -> fetch -> read -> describe -> register -> calibrate -> commit -> next ...
                     \\-> sweep (experts gone from the source are removed) -> END

One pass crawls the configured sources, and each new or changed expert is downloaded and
checked, its homepage read, its skill described and embedded (registration), then rendered
on the reference prompts and scored (calibration) before it becomes active.

The listing is streamed: ``next`` pages through the sources as it needs experts
(:class:`Listing`), so the first expert is being fetched while a catalogue of 100,000 models
is still being listed, and what the pass has listed and taken is written to the catalog's work
list as it goes. The state holds a cursor and the current expert, never the listing, so a
checkpoint is the same size whatever the catalogue's; old checkpoints of the pass's thread are
pruned to the last DIFFGRAPH_GCA_CHECKPOINTS. Every store write is idempotent, so a node re-run
after a kill duplicates nothing; the SQLite checkpointer (durability "sync") makes the kill
resumable, and a resumed pass lists again from the start, passing over what it has taken.

A source whose listing fails (a dead endpoint, a refused answer, an unreadable folder) does not
end the pass: the other sources are crawled, nothing of that source's name is swept, and the
run is recorded "partial" ("failed" if no source could be listed) with one line per source.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import urlparse

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from rich.console import Console
from rich.markup import escape

from diffgraph.errors import describe as describe_error
from diffgraph.errors import one_line, reason
from diffgraph.families import base_family, label
from diffgraph.files import size_text
from diffgraph.graph_store.catalog import MAX_ATTEMPTS, SAME_FILE
from diffgraph.graph_store.reconcile import reconcile
from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.detect import BaseMismatchError, reconcile_base
from diffgraph.merger.merge import MergeError
from diffgraph.settings import Settings, get_settings
from diffgraph.text_embedding import embed
from diffgraph.tools import bases
from diffgraph.tools.browser import HomepageReader, PageError, PageReading
from diffgraph.tools.calibrate import CalibrationJob, calibrate_experts, select_reference_prompts
from diffgraph.tools.sources import (
    ContentStore,
    DownloadError,
    FileGone,
    IntegrityError,
    SourceError,
    UnsafeFileError,
    open_sources,
)

from .describe import describe as describe_expert
from .llm import chat_model

N_CANDIDATES = 300
RAY_BATCH = 4  # experts calibrated together on a Ray cluster when DIFFGRAPH_RAY_WORKERS does not say
CALIBRATION_SEEDS = (0,)


class GCAState(TypedDict, total=False):
    """What each checkpoint holds: counters, the current expert and its intermediate results,
    never the listing (the catalog's work list has it), so a checkpoint stays the same size
    whatever the catalogue's."""

    run_id: int
    cursor: int  # how many experts next_expert has taken for work in this pass
    current: str | None
    source: int | None  # the current expert's source: its index in the pass's (spec, source) pairs
    page: dict | None
    registration: dict | None
    calibration: dict | None  # expert id -> {"brain", "edges": [[prompt id, scores], ...]}, for commit
    batch: list  # [expert id, brain] of registered experts waiting to be calibrated together (Ray)
    unswept: list[str]  # source names whose listing failed: the sweep spares their experts
    source_errors: list[str]  # one line per source whose listing failed
    counts: dict
    failures: list[str]  # the first MAX_FAILURES_SHOWN one-line failures (all are in the catalog)


MAX_FAILURES_SHOWN = 100


def _say(console: Console, text: str) -> None:
    """Print one line of the pass's log. Names come from sources, so they are escaped where they
    are put into ``text``, and ``:name:`` is never an emoji code ("civitai:100: ..." is an id)."""
    console.print(text, emoji=False)


class GCABusy(RuntimeError):
    """Another GCA run holds the store's lock."""


@dataclass(frozen=True)
class ListingFailure:
    """A source whose listing failed in this process."""

    spec: str  # as given to the pass
    source: str  # the name its experts carry (ExpertRecord.source)
    reason: str  # one line

    def __str__(self) -> str:
        return f"{self.spec}: listing failed: {self.reason}"


LISTING_BATCH = 200  # listed experts looked up and marked in the catalog together


class Listing:
    """The pass's sources, listed lazily in order, one page at a time as ``next`` asks for
    experts. A failure (SourceError: a dead or refusing API; OSError: an unreadable folder) is
    that source's alone: it is recorded in ``failures``, the records it listed before are kept,
    and the next source is listed."""

    def __init__(self, sources: list[tuple[str, object]], console: Console):
        self.sources, self.console = sources, console
        self.failures: list[ListingFailure] = []
        self._records = self._walk()

    def _walk(self) -> Iterator[tuple[int, ExpertRecord]]:
        for index, (spec, source) in enumerate(self.sources):
            try:
                for record in source.iter_models():
                    yield index, record
                for note in getattr(source, "notes", ()):  # files a source skipped, and why (a local folder's VAEs, ...)
                    _say(self.console, f"  [dim]note[/] {escape(note)}")
            except (SourceError, OSError) as exc:
                failure = ListingFailure(spec, source.name, reason(exc))
                _say(self.console, f"  [red]source failed[/] {escape(str(failure))}")
                self.failures.append(failure)

    def batch(self, n: int = LISTING_BATCH) -> list[tuple[int, ExpertRecord]]:
        """The next ``n`` listed (source index, record) pairs; empty once every source is listed."""
        out = []
        for item in self._records:
            out.append(item)
            if len(out) == n:
                break
        return out


@dataclass
class Context:
    """What the nodes use but the checkpoint must not hold: live clients and models, and the
    pass's listing as far as it has been read."""

    store: GraphStore
    settings: Settings
    sources: list[tuple[str, object]]  # (spec, source) pairs, in the order given to the pass
    listing: Listing | None = None
    reader: object | None = None
    llm: object | None = None
    console: Console = field(default_factory=Console)
    reference_count: int = 12
    ahead: deque = field(default_factory=deque)  # (source index, record) listed and due, not yet taken
    taken: set[str] | None = None  # ids taken for work by this pass (read once on resume)
    seen: set[str] = field(default_factory=set)  # ids triaged by this process
    unready: dict[str, str | None] = field(default_factory=dict)  # base -> why it is not set up (None: ready)
    waiting: Counter = field(default_factory=Counter)  # base -> experts left pending because it is not ready
    refused: Counter = field(default_factory=Counter)  # reason -> experts rejected without a step
    checkpointer: SqliteSaver | None = None  # pruned as the pass goes (settings.gca_checkpoints)
    thread: str = ""
    calibration_batch: int = 1  # experts calibrated together: one per Ray worker when on a cluster
    listed_all: bool = False  # this process has read the whole listing

    @property
    def listing_failures(self) -> list[ListingFailure]:
        return self.listing.failures if self.listing else []


class RunLock:
    """The store's lock file, ``<home>/gca.lock``: flock'ed for the length of a run (the kernel
    releases it when the process dies, however it dies) and holding "<pid> <run id>" while a
    run is under way. A run id still written there when the next run takes the lock is a run
    whose process ended without finishing it."""

    def __init__(self, handle, previous: str):
        self._handle = handle
        parts = previous.split()
        self.previous_pid = parts[0] if parts else None
        self.previous_run = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    def record(self, run_id: int | None) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()} {run_id}" if run_id is not None else str(os.getpid()))
        self._handle.flush()
        os.fsync(self._handle.fileno())


@contextmanager
def store_lock(home: Path):
    """An exclusive lock on the store for the length of a run (released if the process dies)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "gca.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise GCABusy(f"another GCA run is writing {home} (lock held by pid {handle.read().strip() or '?'})") from None
        handle.seek(0)
        lock = RunLock(handle, handle.read())
        lock.record(None)
        yield lock


def recover_interrupted_runs(store: GraphStore, lock: RunLock, resuming: int | None, private_catalog: bool,
                             console: Console) -> list[int]:
    """Mark the runs whose process died as "interrupted" (a run killed before its first
    checkpoint would otherwise stay "running" forever), and, after any interruption, bring Chroma
    back in line with the catalog (a kill between a catalog write and its vector leaves drift).
    Runs found: the one this home's lock file names, and, when the catalog belongs to this home
    alone, any other run still "running" (we hold the lock: nobody else is running here)."""
    candidates = {lock.previous_run} if lock.previous_run is not None else set()
    last = store.catalog.last_run() if private_catalog else None
    if last is not None and last["status"] == "running":
        candidates.add(last["id"])
    interrupted = []
    for run_id in sorted(candidates - {resuming}):
        run = store.catalog.get_run(run_id)
        if run is not None and run["status"] == "running":
            store.catalog.finish_run(run_id, "interrupted", run["counts"],
                                     f"the process running it ended before it finished (pid {lock.previous_pid or '?'})")
            interrupted.append(run_id)
    if interrupted or resuming is not None:
        report = reconcile(store, repair=True)
        drift = {k: v for k, v in report.items() if isinstance(v, list) and v}
        if interrupted:
            _say(console, f"GCA: run {', '.join(map(str, interrupted))} was interrupted; marked so")
        if drift:
            _say(console, f"GCA: repaired drift between catalog and vectors after the interruption: {drift}")
    return interrupted


def _fail(ctx: Context, state: GCAState, expert_id: str, status: str, reason: str) -> dict:
    reason = one_line(reason)
    ctx.store.set_status(expert_id, status, reason)
    _say(ctx.console, f"  [red]{status}[/] {escape(expert_id)}: {escape(reason)}")
    return _settled(state, status, f"{expert_id}: {reason}")


def _settled(state: GCAState, count: str, failure: str | None = None) -> dict:
    """The state update of an expert the pass is done with: ``count`` counted, ``failure`` (a
    line) kept among the first MAX_FAILURES_SHOWN, nothing current."""
    counts = dict(state.get("counts", {}))
    counts[count] = counts.get(count, 0) + 1
    update = {"current": None, "counts": counts}
    if failure is not None:
        update["failures"] = [*state.get("failures", []), failure][:MAX_FAILURES_SHOWN]
    return update


def _record(ctx: Context, expert_id: str) -> ExpertRecord:
    """The current expert's record, as ``next`` (or ``fetch``, filling in its base) stored it."""
    return ctx.store.catalog.get(expert_id).record()


def _skip(ctx: Context, state: GCAState, expert_id: str, reason: str) -> dict:
    """An expert whose file cannot be downloaded now is left pending with the reason and no
    attempt counted: a login wall, an early-access window, a dead host or a full store is
    not the expert's fault, and the next pass tries again. (A file that is gone, 404 or 410,
    fails with an attempt counted instead: it is retried, then quarantined, not asked for forever.)"""
    reason = one_line(reason)
    ctx.store.set_status(expert_id, "pending", f"skipped: {reason}")
    _say(ctx.console, f"  [yellow]skipped[/] {escape(expert_id)}: {escape(reason)}; tried again next pass")
    return _settled(state, "skipped", f"{expert_id}: skipped: {reason}")


def _needs_work(known: tuple | None, record: ExpertRecord, held: set[str] = frozenset()) -> bool:
    """Whether a listed expert is new, changed or due again; ``known`` is its work state in the
    catalog (Catalog.work_states), None for an expert never seen; ``held``: the experts that
    merged ones were merged into and that still hold their file (active or pending)."""
    if known is None or known[0] != record.version:
        return True
    _, status, why, attempts, base_model = known
    if status == "failed":
        return attempts < MAX_ATTEMPTS
    if status == "rejected" and (why or "").startswith(NO_PROFILE):
        return bases.has_profile(base_model)  # the user has configured that base since
    if status == "removed" and (why or "").startswith(SAME_FILE):
        return _merged_into(why) not in held  # looked at again once that expert is gone (swept, say)
    return status in ("pending", "removed")


def discover(state: GCAState, runtime: Runtime[Context]) -> dict:
    """The pass begins: nothing is listed yet (``next`` streams the listing)."""
    return {"cursor": 0, "counts": {}, "failures": [], "unswept": [], "source_errors": []}


def _base_unready(ctx: Context, base: str) -> str | None:
    """Why a base with a profile is not set up (bases.check_ready: its weights, its metric
    weights), checked once per pass; None when it is ready."""
    if base not in ctx.unready:
        try:
            bases.check_ready(base)
            ctx.unready[base] = None
        except bases.BaseNotReady as exc:
            ctx.unready[base] = str(exc)
    return ctx.unready[base]


def _triage(ctx: Context, run_id: int, batch: list[tuple[int, ExpertRecord]]) -> None:
    """Mark a batch of listed experts in the work list and queue the ones due. Two kinds are
    settled here, without a step of their own: a remote expert of a base with no profile is
    rejected before anything is downloaded (a later pass looks again once the base is
    configured), and one of a base whose setup is incomplete waits pending, with one line naming
    the setting to fix, instead of failing at its first calibration. Local files are always
    fetched: their tensors may tell another base than their sidecar."""
    records = [r for _, r in batch]
    ctx.store.catalog.mark_listed(run_id, [r.id for r in records])
    known = ctx.store.catalog.work_states([r.id for r in records])
    twins = {_merged_into(k[2]) for k in known.values() if k[1] == "removed" and (k[2] or "").startswith(SAME_FILE)}
    held = {i for i, k in ctx.store.catalog.work_states(sorted(twins)).items() if k[1] in ("active", "pending")}
    with ctx.store.catalog.transaction():
        for index, record in batch:
            if record.id in ctx.seen or record.id in ctx.taken or not _needs_work(known.get(record.id), record, held):
                continue  # listed twice (a page boundary shifting under a live sort), done, or not due
            ctx.seen.add(record.id)
            if record.base_model != "unknown" and not _is_local(record) and not bases.has_profile(record.base_model):
                why = _no_profile(record.declared_base)
                if ctx.store.upsert_expert(record) == "inserted":  # no vector to relabel
                    ctx.store.catalog.set_status(record.id, "rejected", why)
                else:
                    ctx.store.set_status(record.id, "rejected", why)
                ctx.refused[why] += 1
            elif bases.has_profile(record.base_model) and _base_unready(ctx, record.base_model):
                ctx.store.upsert_expert(record)
                ctx.waiting[record.base_model] += 1
            else:
                ctx.ahead.append((index, record))


def _listing_done(ctx: Context, state: GCAState) -> dict:
    """The last expert is taken: say what the pass listed and settled without a step."""
    for base, n in sorted(ctx.waiting.items()):
        _say(ctx.console, f"  [yellow]{n} {escape(label(base))} experts wait[/]: {escape(ctx.unready[base])}")
    refused = [f"{n} experts rejected: {why}" for why, n in sorted(ctx.refused.items())]
    for line in refused:
        _say(ctx.console, f"  [red]rejected[/] {escape(line)}")
    counts = dict(state.get("counts", {}))
    if ctx.refused:
        counts["rejected"] = counts.get("rejected", 0) + sum(ctx.refused.values())
    listed = ctx.store.catalog.listed_count(state["run_id"])
    _say(ctx.console, f"GCA: {listed} experts listed, {state.get('cursor', 0)} to process")
    failures = ctx.listing_failures
    return {"current": None, "source": None, "counts": counts,
            "failures": [*state.get("failures", []), *refused][:MAX_FAILURES_SHOWN],
            "unswept": sorted({*state.get("unswept", []), *(f.source for f in failures)}),
            "source_errors": list(dict.fromkeys([*state.get("source_errors", []), *map(str, failures)]))}


def next_expert(state: GCAState, runtime: Runtime[Context]) -> dict:
    """Take the next listed expert that is due, listing further as needed."""
    ctx, run_id = runtime.context, state["run_id"]
    if ctx.taken is None:
        ctx.taken = ctx.store.catalog.taken(run_id, state.get("cursor", 0))
    cleared = {"page": None, "registration": None, "calibration": None}
    while not ctx.ahead:
        batch = ctx.listing.batch()
        if not batch:
            if ctx.listed_all:  # back from calibrating the last batch
                return {**cleared, "current": None, "source": None}
            ctx.listed_all = True
            return {**cleared, **_listing_done(ctx, state)}
        _triage(ctx, run_id, batch)
    index, record = ctx.ahead.popleft()
    cursor = state.get("cursor", 0)
    ctx.store.upsert_expert(record)
    ctx.store.catalog.mark_taken(run_id, record.id, cursor)
    ctx.taken.add(record.id)
    _ensure_reference_prompts(ctx, record.base_model)
    _prune_checkpoints(ctx)
    return {**cleared, "cursor": cursor + 1, "current": record.id, "source": index}


def fetch(state: GCAState, runtime: Runtime[Context]) -> dict:
    """Fetch and check the files. What can be refused before a byte is fetched is (ContentStore.admit);
    an expert whose published file is already stored under another expert is merged into it.
    The base the tensors show must not contradict the declared one (a file declared "Pony" that
    holds SD 1.5 weights is refused for that), an undeclared one is filled in from them, and
    only then must the base have a profile (a remote expert of a declared base without one was
    refused before its download, by ``_triage``; local files are read where they are)."""
    ctx, expert_id = runtime.context, state["current"]
    record, source = _record(ctx, expert_id), ctx.sources[state["source"]][1]
    store = ContentStore(ctx.settings.home, allow_pickle=ctx.settings.allow_pickle)
    files: list[ExpertFile] = []
    try:
        for f in record.files:
            store.admit(f)  # a hostile name, a pickle, a size over the limit: refused even as another's source
        if not _is_local(record) and (twin := _twin(ctx, expert_id, record.files)):
            return _same_file(ctx, state, expert_id, twin)
        for f in record.files:
            path = source.download(f, store)
            files.append(store.as_safetensors(ExpertFile(**{**f.__dict__, "local_path": str(path)})))
    except (IntegrityError, UnsafeFileError) as exc:  # bad bytes: the expert's own fault
        return _fail(ctx, state, expert_id, "rejected", str(exc))
    except FileGone as exc:  # the listing names a file its host does not have: an attempt, so it backs off
        return _fail(ctx, state, expert_id, "failed", str(exc))
    except DownloadError as exc:  # the file cannot be had now (a login, early access, a dead host, a full store)
        return _skip(ctx, state, expert_id, str(exc))
    except SourceError as exc:
        return _fail(ctx, state, expert_id, "failed", str(exc))
    if not any(f.name.endswith(".safetensors") for f in files):
        return _fail(ctx, state, expert_id, "rejected", "no weights file (.safetensors, or a pickle when opted in)")
    if twin := _twin(ctx, expert_id, files):  # the same bytes, whatever this copy's sidecar says
        return _same_file(ctx, state, expert_id, twin)
    try:
        base = reconcile_base(record.declared_base,
                              {f.name: Path(f.local_path) for f in files if f.name.endswith(".safetensors")})
    except BaseMismatchError as exc:
        return _fail(ctx, state, expert_id, "rejected", str(exc))
    if base_family(base) != record.base_model:
        record = ExpertRecord.from_dict({**record.to_dict(), "base_model": base})
        ctx.store.upsert_expert(record)
    if not bases.has_profile(record.base_model):
        return _fail(ctx, state, expert_id, "rejected", _no_profile(record.declared_base if record.base_model != "unknown"
                                                                    else "unknown (the files do not tell)"))
    ctx.store.catalog.set_files(expert_id, files)
    return {}


def _is_local(record: ExpertRecord) -> bool:
    """A user's own files, read where they are (file: URLs), not downloaded."""
    return all(f.url.startswith("file:") for f in record.files)


def _twin(ctx: Context, expert_id: str, files: list[ExpertFile]) -> str | None:
    """Another active or pending expert holding a verified file with one of these sha256s."""
    return next((i for i in ctx.store.catalog.holders(f.sha256 for f in files if f.sha256) if i != expert_id), None)


def _merged_into(reason: str) -> str:
    """The expert a merged one was merged into, from the reason _same_file wrote."""
    return reason[len(SAME_FILE):].strip().rsplit(": one expert, another source", 1)[0]


def _same_file(ctx: Context, state: GCAState, expert_id: str, twin: str) -> dict:
    """An expert whose verified file another expert already holds (a re-upload, a Hub mirror of
    a Civitai model, the user's own copy) is that expert offered by another source: it is kept
    in the catalog as a source of ``twin`` (status removed, with the reason) and is not
    described or calibrated again. Only verified files hold a hash (Catalog.holders), so a remote
    expert publishing the hash of a file already stored is merged before any download: the
    bytes it would serve must be those bytes, or its download would be refused."""
    ctx.store.set_status(expert_id, "removed", f"{SAME_FILE} {twin}: one expert, another source")
    _say(ctx.console, f"  [cyan]merged[/] {escape(expert_id)} into {escape(twin)}: the same file")
    return _settled(state, "merged")


NO_PROFILE = "no base-model profile"  # how a rejection for a base nothing can render begins: retried once one exists


def _no_profile(declared: str) -> str:
    """The rejection of an expert whose base has no profile, with what the profile lookup says
    (for a real family: the setting to set)."""
    try:
        bases.profile(declared)
    except KeyError as exc:
        why = reason(exc)
        return why if why.startswith(NO_PROFILE) else f"{NO_PROFILE} for {declared!r}: {why}"
    return f"{NO_PROFILE} for {declared!r}"


def read(state: GCAState, runtime: Runtime[Context]) -> dict:
    ctx = runtime.context
    record = _record(ctx, state["current"])
    if not record.homepage_url or ctx.reader is None:
        return {"page": None}
    try:
        page = ctx.reader.read(record.homepage_url)
    except PageError as exc:  # the source's own description stands in; a page never fails an expert
        _say(ctx.console, f"  [yellow]note[/] {escape(state['current'])}: homepage unreadable ({escape(str(exc))}); "
                          "described from its source's metadata")
        return {"page": None}
    return {"page": page.to_dict()}


def describe(state: GCAState, runtime: Runtime[Context]) -> dict:
    ctx = runtime.context
    record = _record(ctx, state["current"])
    page = PageReading.from_dict(state["page"]) if state.get("page") else None
    reg = describe_expert(record, page, ctx.llm)
    return {"registration": {"description": reg.description, "text": reg.text, "brain": reg.brain,
                             "dropped": reg.dropped, "page_sha256": page.text_sha256 if page else None}}


def register(state: GCAState, runtime: Runtime[Context]) -> dict:
    reg = state["registration"]
    runtime.context.store.register(state["current"], reg["description"], reg["text"], reg["page_sha256"])
    return {}


def calibrate(state: GCAState, runtime: Runtime[Context]) -> dict:
    """Render the reference prompts with the registered experts and score them, in this process
    or, when DIFFGRAPH_RAY_ADDRESS is set, on the cluster: there experts wait in the state's
    batch until there is one per worker (or the listing is done), and the batch calibrates at
    once, each expert's prompts fanned out over the workers. A batch that fails is calibrated
    again one expert at a time, so that an expert that does not fit fails alone."""
    ctx = runtime.context
    waiting = [*state.get("batch", []), *([[state["current"], state["registration"]["brain"]]]
                                          if state.get("current") else [])]
    if state.get("current") and len(waiting) < ctx.calibration_batch:
        return {"batch": waiting, "current": None}
    prompts = ctx.store.catalog.reference_prompts()
    outcomes: dict[str, object] = {}  # expert id -> its score vectors, or the exception that stopped it
    ready = []
    for expert_id, _ in waiting:
        try:
            ready.append((expert_id, _calibration_job(ctx, expert_id)))
        except Exception as exc:
            outcomes[expert_id] = exc
    if len(ready) > 1:
        _say(ctx.console, f"  calibrating {len(ready)} experts together on {escape(str(ctx.settings.ray_address))}")
    try:
        outcomes.update(zip((i for i, _ in ready), _calibrate(ctx, [job for _, job in ready], prompts)))
    except Exception as exc:
        for expert_id, job in ready:
            try:
                outcomes[expert_id] = exc if len(ready) == 1 else _calibrate(ctx, [job], prompts)[0]
            except Exception as alone:
                outcomes[expert_id] = alone
    update: dict = {}
    calibration = {}
    for expert_id, brain in waiting:
        result = outcomes[expert_id]
        if isinstance(result, Exception):  # MergeError: the expert itself does not fit, or is not finite
            status = "rejected" if isinstance(result, MergeError) else "failed"
            why = str(result) if status == "rejected" else f"calibrate failed: {describe_error(result)}"
            update.update(_fail(ctx, {**state, **update}, expert_id, status, why))
        else:
            calibration[expert_id] = {"brain": brain, "edges": [[p.id, v] for p, v in zip(prompts, result)]}
    return {**update, "current": None, "batch": [], "calibration": calibration}


def _calibration_job(ctx: Context, expert_id: str) -> CalibrationJob:
    row = ctx.store.catalog.get(expert_id)
    weights = next(f for f in row.files if f.local_path and f.name.endswith(".safetensors"))
    return CalibrationJob(row.base_model, row.kind, expert_id, str(Path(weights.local_path)), weights.sha256,
                          tuple(row.trigger_words) if row.kind == "lora" else ())


def _calibrate(ctx: Context, jobs: list[CalibrationJob], prompts) -> list:
    return calibrate_experts(jobs, [p.text for p in prompts], CALIBRATION_SEEDS, ray_address=ctx.settings.ray_address,
                             workers=ctx.settings.ray_workers, gpus_per_worker=ctx.settings.ray_gpus_per_worker)


def commit(state: GCAState, runtime: Runtime[Context]) -> dict:
    """Store the calibrated experts' edges and make them active."""
    ctx = runtime.context
    counts = dict(state.get("counts", {}))
    for expert_id, done in state["calibration"].items():
        row = ctx.store.catalog.get(expert_id)
        names = list(bases.suite_for(row.base_model).names)
        with ctx.store.catalog.transaction():
            for prompt_id, vector in done["edges"]:
                ctx.store.catalog.put_calibration(expert_id, prompt_id, vector, names, CALIBRATION_SEEDS[0])
        ctx.store.set_status(expert_id, "active", f"registered by the {done['brain']} brain")
        counts["active"] = counts.get("active", 0) + 1
        _say(ctx.console, f"  [green]active[/] {escape(expert_id)} ({escape(row.name)})")
    return {"current": None, "calibration": None, "counts": counts}


def sweep(state: GCAState, runtime: Runtime[Context]) -> dict:
    """Experts gone from their source are marked removed. A source that lists only some of its
    site's experts (one URL or path) sweeps nothing, nor does one whose listing failed; rows carry
    only the source's name, so all sources of that name are spared."""
    ctx, run_id = runtime.context, state["run_id"]
    source_names = {s.name for _, s in ctx.sources if getattr(s, "sweeps", True)} - set(state.get("unswept", []))
    gone = ctx.store.catalog.unlisted(run_id, source_names)
    for expert_id in gone:
        ctx.store.set_status(expert_id, "removed", "no longer published by its source")
    counts = {"listed": ctx.store.catalog.listed_count(run_id), **state.get("counts", {})}
    return {"counts": {**counts, "removed": len(gone)}}


def after_next(state: GCAState) -> Literal["fetch", "calibrate", "sweep"]:
    if state.get("current"):
        return "fetch"
    return "calibrate" if state.get("batch") else "sweep"  # the listing is done: calibrate what waits


def after_fetch(state: GCAState) -> Literal["next", "read"]:
    return "next" if state.get("current") is None else "read"  # None: the expert failed or was skipped


def after_read(state: GCAState) -> Literal["next", "describe"]:
    return "next" if state.get("current") is None else "describe"


def after_describe(state: GCAState) -> Literal["next", "register"]:
    return "next" if state.get("current") is None else "register"


def after_register(state: GCAState) -> Literal["next", "calibrate"]:
    return "next" if state.get("current") is None else "calibrate"


def after_calibrate(state: GCAState) -> Literal["next", "commit"]:
    return "commit" if state.get("calibration") else "next"


def per_expert(node):
    """A node's work on the current expert, guarded: an exception the node did not expect (out
    of memory, a diffusers or browser error, one with no message) fails that expert alone, in
    one line with an attempt counted, so a later pass retries it, and the pass goes on."""

    @functools.wraps(node)
    def guarded(state: GCAState, runtime: Runtime[Context]) -> dict:
        try:
            return node(state, runtime)
        except Exception as exc:
            return _fail(runtime.context, state, state["current"], "failed",
                         f"{node.__name__} failed: {describe_error(exc)}")
    return guarded


def build_graph(checkpointer=None):
    """The GCA, compiled; run it with ``invoke(..., context=Context(...))``."""
    g = StateGraph(GCAState, context_schema=Context)
    for name, node in (("discover", discover), ("next", next_expert), ("sweep", sweep)):
        g.add_node(name, node)
    for name, node in (("fetch", fetch), ("read", read), ("describe", describe), ("register", register),
                       ("calibrate", calibrate), ("commit", commit)):
        g.add_node(name, per_expert(node))
    g.add_edge(START, "discover")
    g.add_edge("discover", "next")
    for source, router in (("next", after_next), ("fetch", after_fetch), ("read", after_read),
                           ("describe", after_describe), ("register", after_register), ("calibrate", after_calibrate)):
        g.add_conditional_edges(source, router)
    g.add_edge("commit", "next")
    g.add_edge("sweep", END)
    return g.compile(checkpointer=checkpointer)


def _ensure_reference_prompts(ctx: Context, base: str) -> None:
    """Choose the reference prompts once per store (paper's diversity recipe), from the
    candidates of the base of the first expert taken that has a profile."""
    if bases.has_profile(base) and not ctx.store.catalog.reference_prompts():
        candidates = bases.profile(base).reference_candidates(N_CANDIDATES)
        ctx.store.set_reference_prompts(select_reference_prompts(candidates, ctx.reference_count, embed))


def _prune_checkpoints(ctx: Context) -> None:
    """Keep the last ``settings.gca_checkpoints`` checkpoints of the pass's thread (0 keeps all):
    a resumed pass needs only the latest, so older ones would make the database grow with every
    expert. Checkpoint ids are time-ordered (uuid6), so the newest are the largest."""
    keep, saver = ctx.settings.gca_checkpoints, ctx.checkpointer
    if not keep or saver is None:
        return
    with saver.cursor() as cur:  # the saver's own lock and transaction
        for table in ("writes", "checkpoints"):
            cur.execute(f"DELETE FROM {table} WHERE thread_id = ? AND checkpoint_id < (SELECT MIN(checkpoint_id) FROM "
                        "(SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? ORDER BY checkpoint_id DESC LIMIT ?))",
                        (ctx.thread, ctx.thread, keep))


def _run_status(source_errors: list[str], failures: list[ListingFailure], sources: list) -> str:
    """How the run is recorded: "completed", "partial" when a source could not be listed (in this
    process or when the pass began), or "failed" when none could be listed."""
    if failures and len(failures) == len(sources):
        return "failed"
    return "partial" if source_errors else "completed"


def _allowed_hosts(sources) -> set[str]:
    """The hosts of the sources' own sites; a homepage elsewhere (a local file's sidecar naming
    civitai.com, say) is read only when DIFFGRAPH_PAGE_HOSTS lists its host, else it is a note."""
    hosts = set()
    for source in sources:
        url = getattr(source, "base_url", None)
        if url:
            parsed = urlparse(url)
            hosts.add(f"{parsed.hostname}:{parsed.port}" if parsed.port else parsed.hostname)
    return hosts


def preview_pass(specs: list[str], settings: Settings | None = None) -> list[str]:
    """What a pass over ``specs`` would fetch, listed and nothing else (`gca run --dry-run`): a
    line per source and a total of experts, files and bytes (a file whose size its source does
    not publish is counted apart)."""
    settings = settings or get_settings()
    lines, totals = [], [0, 0, 0, 0]
    with ExitStack() as stack:
        for spec in specs:
            opened = open_sources(spec, hub_port=settings.hub_port, home=settings.home,
                                  allowed_hosts=settings.allowed_hosts)
            for source in stack.enter_context(opened):
                records = list(source.iter_models())
                files = [f for r in records for f in r.files]
                sized = sum(f.size or 0 for f in files)
                unsized = sum(f.size is None for f in files)
                for i, n in enumerate((len(records), len(files), sized, unsized)):
                    totals[i] += n
                lines.append(f"{spec} ({source.name}): {len(records)} experts, {len(files)} files, {size_text(sized)}"
                             + (f" (+{unsized} files of unpublished size)" if unsized else ""))
    lines.append(f"total: {totals[0]} experts, {totals[1]} files, {size_text(totals[2])}"
                 + (f" (+{totals[3]} files of unpublished size)" if totals[3] else "") + "; nothing was fetched")
    if settings.max_store_bytes is not None:
        used, budget = ContentStore(settings.home).used(), settings.max_store_bytes
        over = used + totals[2] - budget
        lines.append(f"the store holds {size_text(used)} of its {size_text(budget)} budget (DIFFGRAPH_MAX_STORE_GB)"
                     + (f": this pass would exceed it by {size_text(over)}, and what does not fit is skipped"
                        if over > 0 else ""))
    return lines


def run_pass(specs: list[str], settings: Settings | None = None, console: Console | None = None,
             thread: str | None = None, read_pages: bool = True) -> dict:
    """One GCA pass over the given source specs; resumes an interrupted pass of the same thread.
    A spec that is malformed or cannot be opened (a missing folder) raises before any work; a
    source whose listing fails is reported in ``source_errors``, one line each, and the pass
    goes on with the others."""
    settings = settings or get_settings()
    console = console or Console()
    thread = thread or "gca:" + "+".join(specs)
    with ExitStack() as stack:
        lock = stack.enter_context(store_lock(settings.home))
        store = stack.enter_context(GraphStore.open(settings.home, db_url=settings.db_url, chroma_url=settings.chroma_url))
        opened = [(spec, source) for spec in specs for source in stack.enter_context(open_sources(
            spec, hub_port=settings.hub_port, home=settings.home, allowed_hosts=settings.allowed_hosts))]
        conn = sqlite3.connect(settings.home / "gca_checkpoints.sqlite", check_same_thread=False)
        stack.callback(conn.close)
        saver = SqliteSaver(conn)
        ctx = Context(store=store, settings=settings, sources=opened, listing=Listing(opened, console), console=console,
                      llm=chat_model(settings), reference_count=settings.reference_prompts, checkpointer=saver,
                      thread=thread, calibration_batch=(settings.ray_workers or RAY_BATCH) if settings.ray_address else 1)
        if read_pages:
            ctx.reader = stack.enter_context(HomepageReader(_allowed_hosts(s for _, s in opened) | set(settings.page_hosts)))
        graph = build_graph(saver)
        config = {"configurable": {"thread_id": thread}, "recursion_limit": 100_000}
        snapshot = graph.get_state(config)
        # Not `snapshot.next`: it leaves out a task whose writes were saved before the kill but whose
        # step's checkpoint was not (killed right after a node finished), so an unfinished pass looked
        # finished and a new run started. `tasks` keeps it; a finished pass (at END) has none.
        resuming = bool(snapshot.tasks)
        recover_interrupted_runs(store, lock, snapshot.values.get("run_id") if resuming else None,
                                 private_catalog=settings.db_url is None, console=console)
        store.catalog.drop_stale_work()  # work lists of passes that will never resume
        run_id = snapshot.values.get("run_id") if resuming else store.catalog.start_run("+".join(specs))
        lock.record(run_id)
        _say(console, f"GCA run {run_id} ({'resuming' if resuming else 'new'}; brain: {'llm' if ctx.llm else 'offline'})")
        final = graph.invoke(None if resuming else {"run_id": run_id}, config, durability="sync", context=ctx)
        _prune_checkpoints(ctx)  # the steps since the last expert was taken (all of them, if none was)
        counts = final.get("counts", {})
        # the sources that failed when the pass began (its listing decided the queue) and now
        source_errors = list(dict.fromkeys([*final.get("source_errors", []), *map(str, ctx.listing_failures)]))
        store.catalog.finish_run(run_id, _run_status(source_errors, ctx.listing_failures, opened), counts,
                                 "; ".join([*source_errors, *final.get("failures", [])])[:2000] or None)
        lock.record(None)
        return {"run_id": run_id, "counts": counts, "failures": final.get("failures", []),
                "source_errors": source_errors, "resumed": resuming}


def watch(specs: list[str], interval_s: float, passes: int = 0, console: Console | None = None,
          settings: Settings | None = None, stop=None) -> None:
    """Run passes forever (or ``passes`` times); one failing pass is logged, not fatal.
    ``stop``, a threading.Event, ends the watch between passes (a pass itself is resumable)."""
    console = console or Console()
    stop = stop or threading.Event()
    done = 0
    while (passes == 0 or done < passes) and not stop.is_set():
        try:
            result = run_pass(specs, settings=settings, console=console)
            _say(console, f"pass {result['run_id']}: {result['counts']}")
        except GCABusy as exc:
            _say(console, f"[yellow]skipped a pass: {escape(str(exc))}")
        except Exception as exc:  # a dead source must not end a days-long watch
            _say(console, f"[red]pass failed: {escape(describe_error(exc))}")
        done += 1
        if passes == 0 or done < passes:
            stop.wait(interval_s)
