"""The Graph Construction Agent crawling a Civitai-sized catalogue: how soon the first expert is
registered, how the checkpoint database grows, and what a pass that finds nothing new costs,
beside the time the project's own Civitai client alone takes to walk the same listing.

    python -m diffgraph.benchmarks.crawl --models 100000 --processable 20 [--reference-prompts 4]
        [--browser/--no-browser] [--base-models "SD 1.5,Pony,..."] [--out benchmarks/results/crawl.json]

The site is benchmarks/crawl_site.py's simulated Civitai, served from a child process on
loopback (its memory is not this process's). Its first ``--processable`` models are mini-world
LoRAs, which this machine renders; the others name real bases not configured here, which the
GCA rejects in bulk without downloading, except those of base "Other": that is no base
(diffgraph.families.UNKNOWN), so the GCA asks for their files to tell the base from their
tensors; the site serves them none (404: an attempt counted each pass, quarantined after
MAX_ATTEMPTS). ``--base-models`` scopes
the listing (e.g. to every base the site names but "Other"). In one run, side by side:

- baseline: ``CivitaiSource(url, scope=<the pass's>).iter_models()`` walked to the end, alone;
- pass 1, in a fresh DIFFGRAPH home: the time from the pass's start to the first expert
  registered (a catalog row whose description_text is set; a thread polls the catalog file
  read-only), and how much of it choosing the reference prompts took (once per store: it loads
  the text embedder); experts registered per minute with calibration time excluded (the GCA's
  ``calibrate_experts`` is wrapped with a timer), from the pass's start and from the first
  registration to the last; the pass's time, the peak RSS of this process,
  catalog bytes per listed expert, checkpoint-database bytes per expert processed (taken for
  work: the final checkpoint's cursor), and the checkpoints left;
- pass 2 over the unchanged site: its time, and that it registers, takes and changes nothing.

Goals: the first expert registered within 5 s of the start whatever the catalogue's size; a
no-change pass over 100k listed models under 60 s; a checkpoint database under 20 KB per
expert processed.
"""

from __future__ import annotations

import io
import os
import resource
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

import typer
from langgraph.checkpoint.sqlite import SqliteSaver
from rich.console import Console
from rich.table import Table

from diffgraph.agents import gca
from diffgraph.benchmarks import write_result
from diffgraph.benchmarks.crawl_site import running_site
from diffgraph.families import base_family
from diffgraph.settings import Settings
from diffgraph.tools.sources.civitai import CivitaiSource

console = Console()
RESULT = Path("benchmarks/results/crawl.json")
TYPES = ["LORA", "Checkpoint"]  # what a civitai spec without a scope lists (SFW only)
GOAL_FIRST_S = 5.0
GOAL_NO_CHANGE_S = 60.0
GOAL_CHECKPOINT_BYTES = 20 * 1024
REGISTERED = "SELECT COUNT(*) FROM experts WHERE description_text IS NOT NULL"
SNAPSHOT = "SELECT id, status, version, updated_at FROM experts ORDER BY id"


def _read(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows from a SQLite file opened read-only (empty until it exists and has the table)."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []  # the schema is still being created


def _count(db: Path, sql: str, params: tuple = ()) -> int:
    rows = _read(db, sql, params)
    return rows[0][0] if rows else 0


def _bytes(db: Path) -> int:
    """A SQLite database's bytes on disk: the file and its write-ahead log."""
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RegistrationWatch:
    """Polls the catalog from a thread and notes when each registration appeared (monotonic
    time of the poll that first saw the count). Polls often until the first registration, then
    less; stops once ``expected`` are seen (their rows are few then: the processable models are
    listed first) or when stopped."""

    def __init__(self, db: Path, expected: int):
        self.db, self.expected = db, expected
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.times) < self.expected:
            seen = _count(self.db, REGISTERED)
            now = time.monotonic()
            self.times += [now] * max(0, seen - len(self.times))
            # a full scan of the experts table: rare once the registrations stop coming
            quiet = bool(self.times) and now - self.times[-1] > 10
            self._stop.wait(0.02 if not self.times else 1.0 if quiet else 0.1)

    def __enter__(self) -> RegistrationWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def timed(module, name: str, calls: list[tuple[float, float]]):
    """Time every call of ``module.name`` (the real one runs): (start, end) in monotonic time."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            calls.append((start, time.monotonic()))

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, real)


def walk(url: str, scope: dict) -> tuple[float, int]:
    """The project's Civitai client alone, walking the whole listing."""
    source = CivitaiSource(url, token="", scope=scope)
    try:
        start = time.perf_counter()
        n = sum(1 for _ in source.iter_models())
        return time.perf_counter() - start, n
    finally:
        source.close()


def final_state(home: Path, thread: str) -> dict:
    """The values of the thread's last checkpoint (what a resumed pass would start from)."""
    conn = sqlite3.connect(home / "gca_checkpoints.sqlite", check_same_thread=False)
    try:
        return dict(gca.build_graph(SqliteSaver(conn)).get_state({"configurable": {"thread_id": thread}}).values)
    finally:
        conn.close()


def run_one_pass(spec: str, settings, read_pages: bool, expected: int) -> dict:
    """One GCA pass, timed, its console kept in memory; registrations and calibrations timed."""
    log, calls, choosing = io.StringIO(), [], []
    db = settings.home / "catalog.sqlite"
    with timed(gca, "calibrate_experts", calls), timed(gca, "select_reference_prompts", choosing), \
            RegistrationWatch(db, expected) as watch:
        start = time.monotonic()
        result = gca.run_pass([spec], settings=settings, console=Console(file=log, width=240), read_pages=read_pages)
        end = time.monotonic()
    return {"result": result, "log": log.getvalue(), "start": start, "end": end, "registered_at": watch.times,
            "calibrations": calls, "reference_selection": choosing}


def _lines(log: str, *marks: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if any(m in line for m in marks)]


def main(models: int = typer.Option(100_000, help="Models the simulated site lists."),
         processable: int = typer.Option(20, help="Mini-world LoRAs among them (listed first)."),
         reference_prompts: int = typer.Option(4, help="N_r: reference prompts each expert is calibrated on."),
         browser: bool = typer.Option(False, help="Read homepages in Chromium (default: described from the API)."),
         base_models: str = typer.Option("", help="A baseModels scope for the listing (comma-separated Civitai "
                                                   "names); default none, as `civitai:URL` lists."),
         seed: int = typer.Option(0, help="The site's seed."),
         out: Path = typer.Option(RESULT, help="Where the JSON goes.")) -> None:
    base_family("SD 1.5")  # loads the base-family plugins (the pass has them): the baseline times the client alone
    load = {"start": os.getloadavg()}
    bases = [b.strip() for b in base_models.split(",") if b.strip()]
    scope = {"baseModels": ",".join(bases)} if bases else {}  # none: LoRAs and checkpoints, newest first, SFW
    with running_site(models, processable, seed=seed) as site, tempfile.TemporaryDirectory() as tmp:
        spec = f"civitai:{site.url}" + (f"?{urlencode(scope, quote_via=quote)}" if scope else "")
        thread = f"gca:{spec}"
        listable = site.count(types=TYPES, base_models=bases, nsfw=False)
        console.print(f"site: {models:,} models, {listable:,} listable ({'LoRAs and checkpoints, SFW'}"
                      f"{', bases ' + ', '.join(bases) if bases else ''}), {processable} processable; "
                      f"load average {load['start'][0]:.2f}")

        walk_s, walked = walk(site.url, scope)
        rss_walk = _peak_rss_mb()
        load["after_walk"] = os.getloadavg()
        console.print(f"baseline walk: {walked:,} models in {walk_s:.1f} s")

        home = Path(tmp) / "home"
        settings = Settings(home=home, reference_prompts=reference_prompts)
        catalog, checkpoints = home / "catalog.sqlite", home / "gca_checkpoints.sqlite"
        stats0 = site.stats()
        one = run_one_pass(spec, settings, browser, processable)
        stats1 = site.stats()
        rss_pass1 = _peak_rss_mb()
        load["after_pass1"] = os.getloadavg()
        processed = int(final_state(home, thread).get("cursor", 0))
        listed = int(one["result"]["counts"].get("listed", 0))
        catalog_bytes, checkpoint_bytes = _bytes(catalog), _bytes(checkpoints)
        checkpoint_rows = _count(checkpoints, "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (thread,))
        write_rows = _count(checkpoints, "SELECT COUNT(*) FROM writes WHERE thread_id = ?", (thread,))
        statuses = dict(_read(catalog, "SELECT status, COUNT(*) FROM experts GROUP BY status"))
        undeclared = _count(catalog, "SELECT COUNT(*) FROM experts WHERE base_model = 'unknown'")
        registered1 = _count(catalog, REGISTERED)
        before = _read(catalog, SNAPSHOT)
        pass1_s = one["end"] - one["start"]
        console.print(f"pass 1: {pass1_s:.1f} s, {one['result']['counts']}")

        two = run_one_pass(spec, settings, browser, 0)  # not polled: the catalog is compared before and after
        stats2 = site.stats()
        rss_pass2 = _peak_rss_mb()
        load["after_pass2"] = os.getloadavg()
        taken2 = int(final_state(home, thread).get("cursor", 0))
        after = _read(catalog, SNAPSHOT)
        registered2 = _count(catalog, REGISTERED)
        checkpoint_rows2 = _count(checkpoints, "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (thread,))
        pass2_s = two["end"] - two["start"]
        console.print(f"pass 2: {pass2_s:.1f} s, {two['result']['counts']}")

    times = one["registered_at"]
    first_s = times[0] - one["start"] if times else None
    choosing_s = sum(e - s for s, e in one["reference_selection"])
    last = times[-1] if times else one["end"]
    calibration_s = sum(e - s for s, e in one["calibrations"])
    calibration_before_last = sum(min(e, last) - s for s, e in one["calibrations"] if s < last)
    working_s = (last - one["start"]) - calibration_before_last
    per_minute = 60 * len(times) / working_s if times and working_s > 0 else None
    # steady: from the first registration to the last, without the one-time start (opening the
    # stores, choosing the reference prompts) and without the calibrations in between
    between = sum(max(0.0, min(e, last) - max(s, times[0])) for s, e in one["calibrations"]) if times else 0.0
    steady_s = (last - times[0] - between) if len(times) > 1 else None
    steady = 60 * (len(times) - 1) / steady_s if steady_s else None
    changed = sum(a != b for a, b in zip(before, after)) + abs(len(before) - len(after))
    result = {
        "models": models, "listable": listable, "processable": processable, "reference_prompts": reference_prompts,
        "browser": browser, "base_models": bases, "seed": seed, "spec": spec.replace(site.url, "URL"),
        "cpus": os.cpu_count(), "load_average": load,
        "baseline": {"walk_s": round(walk_s, 2), "models": walked, "peak_rss_mb": round(rss_walk, 1)},
        "pass1": {"total_s": round(pass1_s, 2), "first_registered_s": None if first_s is None else round(first_s, 2),
                  "reference_selection_s": round(choosing_s, 2),
                  "first_registered_excluding_reference_selection_s":
                      None if first_s is None else round(first_s - choosing_s, 2),
                  "registered": len(times), "registered_per_minute_excluding_calibration":
                      None if per_minute is None else round(per_minute, 1),
                  "registered_per_minute_steady_excluding_calibration": None if steady is None else round(steady, 1),
                  "calibration_s": round(calibration_s, 2), "calibrations": len(one["calibrations"]),
                  "registration_times_s": [round(t - one["start"], 2) for t in times],
                  "peak_rss_mb": round(rss_pass1, 1), "listed": listed, "processed": processed,
                  "undeclared_base": undeclared, "catalog_bytes": catalog_bytes,
                  "catalog_bytes_per_listed": round(catalog_bytes / listed) if listed else None,
                  "checkpoint_db_bytes": checkpoint_bytes,
                  "checkpoint_db_bytes_per_processed": round(checkpoint_bytes / processed) if processed else None,
                  "checkpoints_left": checkpoint_rows, "checkpoint_writes_left": write_rows,
                  "gca_checkpoints": settings.gca_checkpoints, "statuses": statuses,
                  "counts": one["result"]["counts"], "site": _delta(stats0, stats1),
                  "summary": _lines(one["log"], "experts rejected", "GCA:")},
        "pass2": {"total_s": round(pass2_s, 2), "taken": taken2, "new_registrations": registered2 - registered1,
                  "rows_changed": changed, "counts": two["result"]["counts"], "peak_rss_mb": round(rss_pass2, 1),
                  "checkpoints_left": checkpoint_rows2, "site": _delta(stats1, stats2),
                  "summary": _lines(two["log"], "experts rejected", "GCA:")},
        "pass2_over_walk": round(pass2_s / walk_s, 2) if walk_s else None,
    }
    result["goals"] = {
        "first_registered_within_5s": first_s is not None and first_s <= GOAL_FIRST_S,
        "no_change_pass_under_60s": pass2_s < GOAL_NO_CHANGE_S,
        "checkpoint_db_under_20kb_per_processed": bool(processed) and checkpoint_bytes / processed < GOAL_CHECKPOINT_BYTES,
        "pass2_registered_nothing": registered2 == registered1,
        "pass2_changed_nothing": changed == 0 and taken2 == 0 and stats2["downloads"] == stats1["downloads"],
    }
    console.print(table(result))
    write_result(out, result)
    console.print(f"written to {out}")


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("pages", "page_bytes", "downloads", "missing_files", "homepages")}


def table(r: dict) -> Table:
    p1, p2, goals = r["pass1"], r["pass2"], r["goals"]
    ok = {True: "[green]yes[/]", False: "[red]no[/]"}
    scope = f", bases {', '.join(r['base_models'])}" if r["base_models"] else ""
    t = Table(title=f"GCA crawl: {r['models']:,} models ({r['listable']:,} listed{scope}), {r['processable']} "
                    f"processable, N_r {r['reference_prompts']}, {'browser' if r['browser'] else 'no browser'}, "
                    f"load {r['load_average']['start'][0]:.2f} at start")
    for name, justify in (("figure", "left"), ("value", "right"), ("goal", "left"), ("met", "left")):
        t.add_column(name, justify=justify)

    def s(x, unit="s", digits=1):
        return "-" if x is None else f"{x:,.{digits}f} {unit}".rstrip()

    rows = [
        ("baseline: client walk of the listing", s(r["baseline"]["walk_s"]), "", None),
        ("baseline: models walked", f"{r['baseline']['models']:,}", f"= listable ({r['listable']:,})",
         r["baseline"]["models"] == r["listable"]),
        ("pass 1: first expert registered after", s(p1["first_registered_s"], digits=2), f"< {GOAL_FIRST_S:.0f} s",
         goals["first_registered_within_5s"]),
        ("  of which choosing the reference prompts", s(p1["reference_selection_s"], digits=2), "", None),
        ("pass 1: registered / min (calibration excluded)",
         s(p1["registered_per_minute_excluding_calibration"], "/min"), "", None),
        ("  from the first registration to the last", s(p1["registered_per_minute_steady_excluding_calibration"],
                                                         "/min"), "", None),
        ("pass 1: experts registered", f"{p1['registered']} of {r['processable']}", "", None),
        ("pass 1: calibration time", s(p1["calibration_s"]), "", None),
        ("pass 1: total", s(p1["total_s"]), "", None),
        ("pass 1: listed / taken for work", f"{p1['listed']:,} / {p1['processed']:,}", "", None),
        ("pass 1: statuses", ", ".join(f"{k} {v:,}" for k, v in sorted(p1["statuses"].items())), "", None),
        ("pass 1: of an undeclared base (Other)", f"{p1['undeclared_base']:,}", "", None),
        ("pass 1: downloads / missing files", f"{p1['site']['downloads']} / {p1['site']['missing_files']:,}",
         f"{r['processable']} / 0", (p1["site"]["downloads"], p1["site"]["missing_files"]) == (r["processable"], 0)),
        ("peak RSS after walk / pass 1 / pass 2",
         f"{r['baseline']['peak_rss_mb']:,.0f} / {p1['peak_rss_mb']:,.0f} / {p2['peak_rss_mb']:,.0f} MB", "", None),
        ("catalog bytes / listed expert", s(p1["catalog_bytes_per_listed"], "B", 0), "", None),
        ("checkpoint DB bytes / expert taken", s(p1["checkpoint_db_bytes_per_processed"], "B", 0),
         f"< {GOAL_CHECKPOINT_BYTES:,} B", goals["checkpoint_db_under_20kb_per_processed"]),
        ("checkpoint DB bytes", s(p1["checkpoint_db_bytes"], "B", 0), "", None),
        ("checkpoints left after pass 1 / pass 2", f"{p1['checkpoints_left']} / {p2['checkpoints_left']}",
         f"<= gca_checkpoints ({p1['gca_checkpoints']})",
         max(p1["checkpoints_left"], p2["checkpoints_left"]) <= p1["gca_checkpoints"]),
        ("pass 2 (no change): total", s(p2["total_s"]), f"< {GOAL_NO_CHANGE_S:.0f} s",
         goals["no_change_pass_under_60s"]),
        ("pass 2 / baseline walk", s(r["pass2_over_walk"], "x", 2), "", None),
        ("pass 2: new registrations", f"{p2['new_registrations']}", "0", goals["pass2_registered_nothing"]),
        ("pass 2: taken / rows changed / downloads / missing files",
         f"{p2['taken']:,} / {p2['rows_changed']:,} / {p2['site']['downloads']} / {p2['site']['missing_files']:,}",
         "0 / 0 / 0 / 0", goals["pass2_changed_nothing"] and p2["site"]["missing_files"] == 0),
    ]
    for figure, value, goal, met in rows:
        t.add_row(figure, value, goal, "" if met is None else ok[bool(met)])
    return t


if __name__ == "__main__":
    typer.run(main)
