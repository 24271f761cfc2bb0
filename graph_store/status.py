"""What is in the universal graph, for `diffgraph graph status [--json]`.

``graph_status`` returns plain JSON-able data (the --json output and what tests check);
``render_status`` turns it into rich tables for the terminal. Both are cheap: counts come from
GROUP BY queries and per-collection counts, never from loading every row.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .catalog import STATUSES
from .store import GraphStore

FAILURE_STATUSES = ("failed", "rejected")
FAILURES_SHOWN = 50  # rows of the failures table (a crawl of a big catalogue rejects thousands)


def graph_status(store: GraphStore) -> dict:
    """Experts by (base model, kind) and status, reference prompts, calibration edges, vectors,
    the last GCA run, every failed or rejected expert with its reason, and the experts merged
    into another because they are the same file from another source."""
    by_status = {s: 0 for s in STATUSES}
    partitions: dict[tuple[str, str], dict] = {}
    for base_model, kind, status, n in store.catalog.expert_counts():
        by_status[status] += n
        part = partitions.setdefault((base_model, kind), {"base_model": base_model, "kind": kind,
                                                          **{s: 0 for s in STATUSES}, "total": 0})
        part[status] += n
        part["total"] += n
    edges, calibrated = store.catalog.calibration_counts()
    failures = store.catalog.failures(FAILURE_STATUSES)
    return {
        "home": str(store.home),
        "experts": {"total": sum(by_status.values()), "by_status": by_status, "by_partition": list(partitions.values())},
        "reference_prompts": len(store.catalog.reference_prompts()),
        "calibration": {"edges": edges, "experts": calibrated},
        "vectors": store.vectors.count(),
        "last_run": store.catalog.last_run(),
        "failures": failures,  # sorted by id
        "use": store.catalog.use_counts(),  # of the active experts: NSFW, licence granting commercial use
        "merged": store.catalog.merged(),  # experts that are another's file from another source
    }


def render_status(status: dict) -> Group:
    """Rich renderables for ``graph_status``'s result (print them with a Console). Names and
    reasons come from sources, so they go in as Text: never read as markup or emoji codes."""
    experts = Table(title=f"Experts in {status['home']}", show_footer=True)
    experts.add_column("base model", footer="all")
    experts.add_column("kind")
    for s in STATUSES:
        experts.add_column(s, justify="right", footer=str(status["experts"]["by_status"][s]))
    experts.add_column("total", justify="right", footer=str(status["experts"]["total"]))
    for part in status["experts"]["by_partition"]:
        experts.add_row(Text(part["base_model"]), part["kind"], *(str(part[s]) for s in STATUSES), str(part["total"]))

    graph = Table(title="Graph", show_header=False)
    graph.add_row("reference prompts", str(status["reference_prompts"]))
    graph.add_row("calibration edges",
                  f"{status['calibration']['edges']} ({status['calibration']['experts']} experts calibrated)")
    graph.add_row("vectors in Chroma", str(status["vectors"]))
    use = status["use"]
    graph.add_row("active experts' terms", f"{use['nsfw']} NSFW; commercial use: {use['commercial']['yes']} yes, "
                                           f"{use['commercial']['no']} no, {use['commercial']['unknown']} unknown")
    run = status["last_run"]
    graph.add_row("last run", "none" if run is None else
                  f"#{run['id']} {run['source_spec']} {run['status']} {run['started_at']} -> {run['finished_at'] or '…'}"
                  + (f" {run['counts']}" if run["counts"] else "") + (f" error: {run['error']}" if run["error"] else ""))

    parts = [experts, graph]
    if status["failures"]:
        failures = Table(title="Failures")
        for column in ("id", "name", "status", "attempts", "reason"):
            failures.add_column(column, overflow="fold")
        for f in status["failures"][:FAILURES_SHOWN]:
            shown = "failed, quarantined (gca retry)" if f.get("quarantined") else f["status"]
            failures.add_row(Text(f["id"]), Text(f["name"]), shown, str(f["attempts"]), Text(f["reason"] or ""))
        if len(status["failures"]) > FAILURES_SHOWN:
            failures.caption = (f"and {len(status['failures']) - FAILURES_SHOWN} more: `diffgraph graph status --json` "
                                "lists them all")
        parts.append(failures)
    if status["merged"]:
        merged = Table(title="Merged: the same file from another source")
        for column in ("id", "name", "merged into"):
            merged.add_column(column, overflow="fold")
        for m in status["merged"]:
            merged.add_row(Text(m["id"]), Text(m["name"]), Text(m["reason"] or ""))
        parts.append(merged)
    return Group(*parts)
