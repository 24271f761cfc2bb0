"""What every source offers the Graph Construction Agent, and the time handling they share.

A source lists expert versions as :class:`~diffgraph.graph_store.records.ExpertRecord` and
knows how to fetch one of their files into the content-addressed store (with its own
credentials); the agent needs nothing else, so adding a platform means adding one client.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from diffgraph.graph_store.records import ExpertFile, ExpertRecord

from .download import ContentStore

Since = datetime | date | str | None


@runtime_checkable
class Source(Protocol):
    """A source may also have ``notes``: one line per file it listed no expert for, and why
    (a local folder's VAEs, embeddings and copies), which the agent prints after listing."""

    name: str  # "civitai" | "hf" | "local": the ExpertRecord.source it yields

    def iter_models(self, *, since: Since = None) -> Iterator[ExpertRecord]:
        """Every expert version the source publishes (updated at or after ``since``)."""

    def download(self, file: ExpertFile, store: ContentStore) -> Path:
        """The verified file in ``store`` (fetched unless already there)."""

    def close(self) -> None:
        """Release connections."""


def as_utc(value: Since) -> datetime | None:
    """``since`` in any accepted form as an aware UTC datetime (a date means its midnight UTC;
    a naive datetime is taken as UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time as the APIs write it ("2024-02-02T12:00:00.000Z", or just a date)."""
    try:
        return as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError as exc:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from exc


def newest(*times: str | None) -> datetime | None:
    """The latest of the given ISO times, ignoring missing or unparsable ones."""
    parsed = []
    for text in times:
        if isinstance(text, str):
            try:
                parsed.append(parse_time(text))
            except ValueError:
                continue
    return max(parsed, default=None)


def scope_words(value: str | None) -> list[str]:
    """A scope value's comma-separated words ("LORA,Checkpoint" -> ["LORA", "Checkpoint"])."""
    return [w.strip() for w in (value or "").split(",") if w.strip()]


def scope_limit(value: str | None) -> int | None:
    """A scope's ``limit``: how many experts a listing yields at most (None: all)."""
    if value in (None, ""):
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"source scope: limit must be a whole number of at least 1, not {value!r}")
    return int(value)
