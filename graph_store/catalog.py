"""The catalog: the universal graph's source of truth, in SQL.

Everything about an expert except its vector lives here: the source record, files, the skill
description, the status with its reason, the reference prompts and the calibration edges, and
the Graph Construction Agent's runs. Chroma holds only a derived copy (the description
embedding), so whenever the two disagree the catalog wins and ``reconcile`` rebuilds Chroma
from it.

Backends: SQLite (WAL) by default, PostgreSQL when the catalog URL is ``postgresql://...``
(DIFFGRAPH_DB_URL; needs the ``postgres`` extra, psycopg 3). One schema and one set of
statements serve both: only TEXT, INTEGER and BIGINT columns, JSON stored as TEXT, ISO-8601 UTC
timestamps as TEXT, ``ON CONFLICT`` upserts, and ids that the code assigns itself (no
AUTOINCREMENT / SERIAL). What differs is confined to ``_Dialect``: the placeholder (``?`` or
``%s``), the PRAGMAs (SQLite only), how a write transaction starts, and text collation.

- Write transactions are serialised on both. SQLite's ``BEGIN IMMEDIATE`` takes its one write
  lock up front; on PostgreSQL every write transaction first takes one transaction-scoped
  advisory lock, so two writers (GCA workers on several machines) queue the same way, and
  code that reads then writes inside a transaction (``start_run``'s next id, upserts that
  compare with the stored row) stays race-free without retry loops. Readers never wait.
- Text columns are ``COLLATE "C"`` on PostgreSQL: byte order, which is SQLite's BINARY order
  for UTF-8, so ``ORDER BY id`` and therefore exports are identical on both backends
  whatever locale the database was created with.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import one_line
from ..families import base_family
from ..text_embedding import DIM
from .records import ExpertFile, ExpertRecord, check_description, is_nsfw, licence_grants

SCHEMA_VERSION = 3  # 2: base_model is the family (diffgraph.families.base_family), declared_base the
#                     published name; preferred_weight. 3: nsfw_level
STATUSES = ("pending", "active", "rejected", "failed", "removed")
MAX_ATTEMPTS = 3  # a failed expert is retried on later passes up to this many times, then quarantined
KINDS = ("ckpt", "lora")
SAME_FILE = "the same file as"  # how the reason of an expert merged into the one holding its file begins

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS experts (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    version TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN {KINDS}),
    base_model TEXT NOT NULL,
    files TEXT NOT NULL,
    license TEXT NOT NULL,
    trigger_words TEXT NOT NULL,
    tags TEXT NOT NULL,
    homepage_url TEXT,
    source_description TEXT NOT NULL,
    page_sha256 TEXT,
    description TEXT,
    description_text TEXT,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    status_reason TEXT,
    published_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    declared_base TEXT NOT NULL DEFAULT '',
    preferred_weight DOUBLE PRECISION,
    nsfw_level INTEGER NOT NULL DEFAULT 0,
    UNIQUE (source, source_id)
);
CREATE INDEX IF NOT EXISTS experts_partition ON experts (base_model, kind, status);
-- status alone: `graph status` lists failed/rejected experts, and without this index that is a
-- scan of every row (benchmarks/scale.py)
CREATE INDEX IF NOT EXISTS experts_status ON experts (status);
CREATE TABLE IF NOT EXISTS reference_prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL UNIQUE,
    embedding TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS calibration (
    expert_id TEXT NOT NULL REFERENCES experts (id) ON DELETE CASCADE,
    prompt_id INTEGER NOT NULL REFERENCES reference_prompts (id) ON DELETE CASCADE,
    scores TEXT NOT NULL,
    metric_names TEXT NOT NULL,
    seed BIGINT NOT NULL,
    PRIMARY KEY (expert_id, prompt_id)
);
CREATE INDEX IF NOT EXISTS calibration_prompt ON calibration (prompt_id);
-- the verified sha256 of each expert's stored files: one file offered by several sources (a
-- Civitai upload, its Hugging Face mirror, a user's local copy) is found as one
CREATE TABLE IF NOT EXISTS expert_files (
    sha256 TEXT NOT NULL,
    expert_id TEXT NOT NULL REFERENCES experts (id) ON DELETE CASCADE,
    PRIMARY KEY (sha256, expert_id)
);
CREATE INDEX IF NOT EXISTS expert_files_expert ON expert_files (expert_id);
-- what each GCA pass has listed (seq NULL) and taken for work (seq: the order taken): the sweep
-- and a resumed pass read it, and a finished pass's rows are deleted
CREATE TABLE IF NOT EXISTS gca_work (
    run_id INTEGER NOT NULL,
    expert_id TEXT NOT NULL,
    seq INTEGER,
    PRIMARY KEY (run_id, expert_id)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    source_spec TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    counts TEXT NOT NULL,
    error TEXT
);
"""

# Columns of the experts table, in schema order; ExpertRow has the same fields.
_EXPERT_COLUMNS = ("id", "source", "source_id", "version", "name", "kind", "base_model", "files", "license",
                   "trigger_words", "tags", "homepage_url", "source_description", "page_sha256", "description",
                   "description_text", "status", "status_reason", "published_at", "created_at", "updated_at",
                   "attempts", "declared_base", "preferred_weight", "nsfw_level")
_JSON_COLUMNS = ("files", "license", "trigger_words", "tags", "description")


def utcnow() -> str:
    """An ISO-8601 UTC timestamp with milliseconds; text so that it sorts and ports as is."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def _copy_json(value):
    """A copy of a JSON-shaped value (dicts, lists, scalars)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


@dataclass(frozen=True)
class ExpertRow:
    """One row of the experts table, JSON columns decoded."""

    id: str
    source: str
    source_id: str
    version: str
    name: str
    kind: str
    base_model: str
    files: list[ExpertFile]
    license: dict
    trigger_words: list[str]
    tags: list[str]
    homepage_url: str | None
    source_description: str
    page_sha256: str | None
    description: dict | None
    description_text: str | None
    status: str
    status_reason: str | None
    published_at: str | None
    created_at: str
    updated_at: str
    attempts: int
    declared_base: str = ""
    preferred_weight: float | None = None
    nsfw_level: int = 0

    @property
    def weights_file(self) -> ExpertFile | None:
        """The downloaded .safetensors file the merger reads (None before the GCA fetched one)."""
        return next((f for f in self.files if f.local_path and f.name.endswith(".safetensors")), None)

    def record(self) -> ExpertRecord:
        """The source-side view of this expert."""
        return ExpertRecord(source=self.source, source_id=self.source_id, version=self.version, name=self.name,
                            kind=self.kind, base_model=self.base_model, files=list(self.files),
                            homepage_url=self.homepage_url, trigger_words=list(self.trigger_words),
                            tags=list(self.tags), license=dict(self.license), published_at=self.published_at,
                            source_description=self.source_description, declared_base=self.declared_base,
                            preferred_weight=self.preferred_weight, nsfw_level=self.nsfw_level)

    def to_dict(self) -> dict:
        """The fields as plain JSON-able values (what asdict gives, without its recursive deep
        copy: that was most of an export's time at 100k experts)."""
        values = {key: _copy_json(getattr(self, key)) for key in _EXPERT_COLUMNS}
        values["files"] = [dict(vars(f)) for f in self.files]
        return values

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertRow":
        return cls(**{**d, "files": [ExpertFile(**f) for f in d["files"]]})


@dataclass(frozen=True)
class ReferencePrompt:
    id: int
    text: str


@dataclass(frozen=True)
class CalibrationEdge:
    """Expert -> reference prompt, holding the metric values of the expert's image for that prompt."""

    expert_id: str
    prompt_id: int
    scores: list[float]
    metric_names: list[str]
    seed: int


def sqlite_path(url: str | Path) -> Path:
    """The file behind a SQLite catalog URL: a plain path or ``sqlite:///path``
    (``sqlite:////abs`` for an absolute path, as in SQLAlchemy)."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///"):])
    if "://" in text:
        if is_postgres_url(text):
            raise ValueError(f"{redact(text)} is a PostgreSQL URL, not a SQLite path (Catalog.open takes both)")
        raise ValueError(f"unsupported catalog URL {redact(text)}: use a path, sqlite:///path or postgresql://...")
    return Path(text)


def is_postgres_url(url: str | Path) -> bool:
    return str(url).split("://", 1)[0] in ("postgresql", "postgres")


def redact(url: str | Path) -> str:
    """A catalog URL fit for messages and logs: the password replaced by ***."""
    text = str(url)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[1]}"))


# One advisory lock key for all catalog write transactions on a PostgreSQL database
# (an arbitrary 64-bit constant: "diffgraph" in ASCII, truncated).
_PG_WRITE_LOCK = 0x64696666677261


@dataclass(frozen=True)
class _Dialect:
    """The few things that differ between SQLite and PostgreSQL (module docstring)."""

    name: str  # "sqlite" | "postgresql"

    @property
    def begin(self) -> tuple[str, ...]:
        if self.name == "sqlite":
            return ("BEGIN IMMEDIATE",)  # takes the write lock up front, so two writers queue
        return ("BEGIN", f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")

    def sql(self, statement: str) -> str:
        # None of the catalog's statements has a "?" or "%" inside a literal, so this is exact.
        return statement if self.name == "sqlite" else statement.replace("?", "%s")

    def schema(self) -> list[str]:
        statements = [s.strip() for s in SCHEMA.split(";") if s.strip()]
        if self.name == "postgresql":
            statements = [re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', s) for s in statements]
        return statements


def _connect(url: str | Path) -> tuple[Any, _Dialect, str]:
    """(DB-API connection in autocommit mode, its dialect, a printable name) for a catalog URL."""
    if is_postgres_url(url):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:
            raise RuntimeError("a PostgreSQL catalog needs psycopg: pip install 'diffgraph[postgres]'") from exc
        # autocommit: transactions are opened explicitly by Catalog.transaction, as on SQLite
        conn = psycopg.connect(str(url), autocommit=True, row_factory=dict_row)
        return conn, _Dialect("postgresql"), redact(url)
    path = sqlite_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")  # readers (status, ESA) never block the GCA's writes
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn, _Dialect("sqlite"), str(path)


class Catalog:
    """The catalog, on SQLite or PostgreSQL. Every write runs in a transaction; nested
    ``transaction()`` blocks join the outer one, so callers can group several writes into one
    atomic step."""

    def __init__(self, conn, dialect: _Dialect | None = None, name: str = "catalog"):
        self._conn = conn
        self._dialect = dialect or _Dialect("sqlite")
        self.name = name
        self._lock = threading.RLock()  # LangGraph may call tools from worker threads
        self._depth = 0
        self._ref_cache: tuple[str, dict[int, np.ndarray]] | None = None
        self.migrated = False  # set when open() upgraded an older schema

    @property
    def backend(self) -> str:
        """Which database this catalog is on: "sqlite" or "postgresql"."""
        return self._dialect.name

    @classmethod
    def open(cls, url: str | Path) -> "Catalog":
        """A catalog at a path, ``sqlite:///path`` or ``postgresql://user@host/db`` (the database
        must exist; the tables are created on first open)."""
        conn, dialect, name = _connect(url)
        catalog = cls(conn, dialect, name)
        try:
            with catalog.transaction():
                for statement in dialect.schema():
                    catalog._exec(statement)
                version = catalog._meta("schema_version")
                if version is None:
                    catalog._set_meta("schema_version", str(SCHEMA_VERSION))
                elif int(version) in (1, 2):
                    if int(version) == 1:
                        catalog._migrate_to_family_names()
                    catalog._exec("ALTER TABLE experts ADD COLUMN nsfw_level INTEGER NOT NULL DEFAULT 0")
                    catalog._set_meta("schema_version", str(SCHEMA_VERSION))
                elif int(version) != SCHEMA_VERSION:
                    raise RuntimeError(f"catalog {name} has schema version {version}; this code reads {SCHEMA_VERSION}")
                if catalog._meta("expert_files_indexed") is None:
                    catalog._index_files()
        except BaseException:
            conn.close()
            raise
        return catalog

    def _migrate_to_family_names(self) -> None:
        """Schema 1 -> 2 (3 adds nsfw_level after it): base_model becomes the family and the published name moves to
        declared_base (preferred_weight is added, empty), so experts of one family are found
        together however they were spelled. GraphStore.open then moves the vectors to their
        family's partitions (``migrated``)."""
        self._exec("ALTER TABLE experts ADD COLUMN declared_base TEXT NOT NULL DEFAULT ''")
        self._exec("ALTER TABLE experts ADD COLUMN preferred_weight DOUBLE PRECISION")
        for row in self._query("SELECT id, base_model FROM experts"):
            self._exec("UPDATE experts SET base_model = ?, declared_base = ? WHERE id = ?",
                       (base_family(row["base_model"]), row["base_model"], row["id"]))
        self.migrated = True

    def _index_files(self) -> None:
        """Fill expert_files from the files of a catalog written before it existed."""
        for row in self._rows(self._query("SELECT * FROM experts")):
            self._index(row.id, row.files)
        self._set_meta("expert_files_indexed", "1")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator["Catalog"]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._exec(self._dialect.begin[0])
            self._depth = 1
            try:
                for statement in self._dialect.begin[1:]:  # PostgreSQL: the catalog's write lock
                    self._exec(statement)
                yield self
            except BaseException:
                self._exec("ROLLBACK")
                raise
            else:
                self._exec("COMMIT")
            finally:
                self._depth = 0

    def _exec(self, sql: str, params: Iterable = ()):
        """Run one statement in this dialect; returns the DB-API cursor."""
        params = tuple(params)
        if not params and self._dialect.name == "postgresql":
            params = None  # psycopg: no parameters, no placeholder parsing
        with self._lock:
            return self._conn.execute(self._dialect.sql(sql), params)

    def _query(self, sql: str, params: Iterable = ()) -> list:
        """Rows addressable by column name (sqlite3.Row or dict)."""
        with self._lock:
            return self._exec(sql, params).fetchall()

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def _set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._exec("INSERT INTO meta (key, value) VALUES (?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # ---- experts -------------------------------------------------------------------------------

    @staticmethod
    def _rows(rows) -> list[ExpertRow]:
        """Decode rows, each JSON column of all rows in one json.loads (per-value calls were
        most of list_experts' time at 100k experts)."""
        if not rows:
            return []
        decoded = {key: json.loads("[" + ",".join("null" if r[key] is None else r[key] for r in rows) + "]")
                   for key in _JSON_COLUMNS}
        out = []
        for n, row in enumerate(rows):
            values = {key: row[key] for key in _EXPERT_COLUMNS}
            for key in _JSON_COLUMNS:
                values[key] = decoded[key][n]
            values["files"] = [ExpertFile(**f) for f in values["files"]]
            out.append(ExpertRow(**values))
        return out

    def _write_row(self, row: ExpertRow) -> None:
        values = row.to_dict()
        for key in _JSON_COLUMNS:
            if values[key] is not None:
                values[key] = _dumps(values[key])
        columns = ", ".join(_EXPERT_COLUMNS)
        marks = ", ".join("?" for _ in _EXPERT_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _EXPERT_COLUMNS if c != "id")
        with self.transaction():
            self._exec(f"INSERT INTO experts ({columns}) VALUES ({marks}) "
                               f"ON CONFLICT (id) DO UPDATE SET {updates}",
                               [values[c] for c in _EXPERT_COLUMNS])

    def upsert_expert(self, record: ExpertRecord) -> str:
        """Insert or update the expert a source reported. Returns what happened:

        - "inserted": a new expert, status pending;
        - "replaced": a new version of a known expert. It replaces its predecessor: status back to
          pending, attempts reset, calibration edges dropped (they measured other weights). The
          description and page hash stay, so the agent can skip re-describing an unchanged page;
        - "updated": same version, some field changed (status, description, edges untouched);
        - "unchanged": nothing to write, so a re-crawl leaves the catalog byte for byte as it was.

        Local paths of already-downloaded files survive an update of the same version.
        """
        if record.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {record.kind!r}")
        fields = record.to_dict()
        fields.pop("files")
        with self.transaction():
            old = self.get(record.id)
            now = utcnow()
            if old is None:
                self._write_row(ExpertRow(id=record.id, **fields, files=list(record.files), page_sha256=None,
                                          description=None, description_text=None, status="pending",
                                          status_reason=None, created_at=now, updated_at=now, attempts=0))
                return "inserted"
            if old.version != record.version:
                self._write_row(replace(old, **fields, files=list(record.files), status="pending",
                                        status_reason=f"new version {record.version} replaces {old.version}",
                                        attempts=0, updated_at=now))
                self._exec("DELETE FROM calibration WHERE expert_id = ?", (record.id,))
                self._exec("DELETE FROM expert_files WHERE expert_id = ?", (record.id,))
                return "replaced"
            known = {(f.name, f.sha256): f.local_path for f in old.files}
            files = [f if f.local_path else replace(f, local_path=known.get((f.name, f.sha256)))
                     for f in record.files]
            new = replace(old, **fields, files=files)
            if new == old:
                return "unchanged"
            self._write_row(replace(new, updated_at=now))
            return "updated"

    def _update(self, expert_id: str, **changes) -> None:
        with self.transaction():
            old = self.get(expert_id)
            if old is None:
                raise KeyError(f"no expert {expert_id!r} in the catalog")
            self._write_row(replace(old, **changes, updated_at=utcnow()))

    def set_status(self, expert_id: str, status: str, reason: str | None = None) -> None:
        """Set the status and its one-line reason. A "failed" status counts one more attempt of
        this version, so a background watcher can back off experts that keep failing."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        with self.transaction():
            old = self.get(expert_id)
            if old is None:
                raise KeyError(f"no expert {expert_id!r} in the catalog")
            attempts = old.attempts + 1 if status == "failed" else old.attempts
            reason = None if reason is None else one_line(reason, 500)
            if (old.status, old.status_reason, old.attempts) == (status, reason, attempts):
                return  # nothing to write: a pass that finds the same again leaves the row as it was
            self._update(expert_id, status=status, status_reason=reason, attempts=attempts)

    def retry(self, expert_ids: Iterable[str] | None = None) -> list[str]:
        """Send failed and rejected experts (``expert_ids``, or all of them) back to pending with
        their attempts reset, so the next pass works on them again (`gca retry`); returns their ids."""
        chosen = [f["id"] for f in self.failures()] if expert_ids is None else list(expert_ids)
        done = []
        with self.transaction():
            for expert_id in chosen:
                row = self.get(expert_id)
                if row is None:
                    raise KeyError(f"no expert {expert_id!r} in the catalog")
                if row.status in ("failed", "rejected"):
                    self._update(expert_id, status="pending", status_reason="retry asked for", attempts=0)
                    done.append(expert_id)
        return done

    def set_description(self, expert_id: str, description: dict, text: str, page_sha256: str | None) -> None:
        """Store the structured skill description, the text that gets embedded, and the hash of the
        homepage text it was written from."""
        if not text.strip():
            raise ValueError("an empty description text cannot be embedded")
        self._update(expert_id, description=check_description(description), description_text=text,
                     page_sha256=page_sha256)

    def set_files(self, expert_id: str, files: list[ExpertFile]) -> None:
        """The expert's files as stored (``local_path`` set: verified against their sha256)."""
        with self.transaction():
            self._update(expert_id, files=list(files))
            self._index(expert_id, files)

    def _index(self, expert_id: str, files: list[ExpertFile]) -> None:
        """expert_files for one expert: the sha256 of each file it has stored."""
        self._exec("DELETE FROM expert_files WHERE expert_id = ?", (expert_id,))
        for sha256 in sorted({f.sha256.lower() for f in files if f.local_path and f.sha256}):
            self._exec("INSERT INTO expert_files (sha256, expert_id) VALUES (?, ?)", (sha256, expert_id))

    def holders(self, sha256s: Iterable[str], statuses: Iterable[str] = ("active", "pending")) -> list[str]:
        """The experts in ``statuses`` holding a stored file with one of these sha256s, by id."""
        hashes, statuses = sorted({h.lower() for h in sha256s}), list(statuses)
        if not hashes:
            return []
        rows = self._query(f"SELECT DISTINCT e.id FROM expert_files f JOIN experts e ON e.id = f.expert_id WHERE "
                           f"f.sha256 IN ({', '.join('?' for _ in hashes)}) AND e.status IN "
                           f"({', '.join('?' for _ in statuses)}) ORDER BY e.id", [*hashes, *statuses])
        return [r["id"] for r in rows]

    def merged(self) -> list[dict]:
        """Experts merged into another that holds the same file (status removed, reason beginning
        with SAME_FILE): {"id", "name", "reason"}, by id, for `graph status`."""
        rows = self._query("SELECT id, name, status_reason FROM experts WHERE status = 'removed' AND "
                           "status_reason LIKE ? ORDER BY id", (SAME_FILE + "%",))
        return [{"id": r["id"], "name": r["name"], "reason": r["status_reason"]} for r in rows]

    def restore_expert(self, row: ExpertRow) -> None:
        """Write a row exactly as given (used by graph import)."""
        with self.transaction():
            self._write_row(row)
            self._index(row.id, row.files)

    def get(self, expert_id: str) -> ExpertRow | None:
        rows = self._query("SELECT * FROM experts WHERE id = ?", (expert_id,))
        return self._rows(rows)[0] if rows else None

    def uses(self, expert_ids: list[str]) -> dict[str, tuple[int, dict]]:
        """{id: (nsfw_level, licence)} of the known ones among ``expert_ids``: what a UsePolicy
        needs, without decoding whole rows."""
        ids = list(expert_ids)
        if not ids:
            return {}
        rows = self._query(f"SELECT id, nsfw_level, license FROM experts WHERE id IN ({', '.join('?' for _ in ids)})", ids)
        return {r["id"]: (r["nsfw_level"], json.loads(r["license"])) for r in rows}

    def use_counts(self, status: str = "active") -> dict:
        """How many experts of ``status`` are NSFW, and grant commercial use (yes / no / unknown)."""
        rows = self._query("SELECT nsfw_level, license FROM experts WHERE status = ?", (status,))
        licences = json.loads("[" + ",".join(r["license"] for r in rows) + "]")
        commercial = Counter({True: "yes", False: "no", None: "unknown"}[licence_grants(lic, "commercial")]
                             for lic in licences)
        return {"nsfw": sum(is_nsfw(r["nsfw_level"]) for r in rows),
                "commercial": {k: commercial.get(k, 0) for k in ("yes", "no", "unknown")}}

    def get_many(self, expert_ids: list[str]) -> list[ExpertRow]:
        """Rows in the order of ``expert_ids``; KeyError names the unknown ids."""
        ids = list(expert_ids)
        if not ids:
            return []
        rows = self._query(f"SELECT * FROM experts WHERE id IN ({', '.join('?' for _ in ids)})", ids)
        by_id = {row.id: row for row in self._rows(rows)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"not in the catalog: {missing}")
        return [by_id[i] for i in ids]

    def list_experts(self, status: str | None = None, kind: str | None = None,
                     base_model: str | None = None) -> list[ExpertRow]:
        """Experts sorted by id, optionally filtered."""
        where, params = [], []
        base_model = None if base_model is None else base_family(base_model)
        for column, value in (("status", status), ("kind", kind), ("base_model", base_model)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return self._rows(self._query(f"SELECT * FROM experts{clause} ORDER BY id", params))

    def base_models(self, status: str = "active") -> list[str]:
        """The base-model families that experts of ``status`` have, sorted."""
        rows = self._query("SELECT DISTINCT base_model FROM experts WHERE status = ? ORDER BY base_model", (status,))
        return [r["base_model"] for r in rows]

    def expert_counts(self) -> list[tuple[str, str, str, int]]:
        """(base_model, kind, status, count) for every combination present."""
        rows = self._query("SELECT base_model, kind, status, COUNT(*) AS n FROM experts "
                           "GROUP BY base_model, kind, status ORDER BY base_model, kind, status")
        return [(r["base_model"], r["kind"], r["status"], r["n"]) for r in rows]

    def failures(self, statuses: Iterable[str] = ("failed", "rejected")) -> list[dict]:
        """id, name, status, reason and attempts of the experts in ``statuses``, by id: what
        `graph status` lists, without decoding whole rows (thousands of them at 100k experts)."""
        statuses = list(statuses)
        if not statuses:
            return []
        rows = self._query("SELECT id, name, status, status_reason, attempts FROM experts "
                           f"WHERE status IN ({', '.join('?' for _ in statuses)}) ORDER BY id", statuses)
        return [{"id": r["id"], "name": r["name"], "status": r["status"], "reason": r["status_reason"],
                 "attempts": r["attempts"], "quarantined": r["status"] == "failed" and r["attempts"] >= MAX_ATTEMPTS}
                for r in rows]

    # ---- reference prompts ---------------------------------------------------------------------
    # Their embeddings are stored here as JSON text rather than in Chroma: they are few (N_r is in
    # the tens to hundreds), never searched by similarity, needed as one fixed-order matrix in
    # every subgraph, and part of every export. JSON keeps the schema BLOB-free and portable, and
    # float32 -> JSON -> float32 is exact.

    def set_reference_prompts(self, texts: list[str], embeddings: dict[str, np.ndarray]) -> list[int]:
        """Make ``texts`` the reference set. Prompts already present keep their id (and their
        calibration edges); new ones get fresh ids and their vector from ``embeddings`` (text ->
        vector, needed for new texts only); prompts no longer in the set are deleted with their
        edges. Returns the ids in the order of ``texts``."""
        texts = list(texts)
        if len(set(texts)) != len(texts):
            raise ValueError("reference prompts must be distinct")
        with self.transaction():
            existing = {r["text"]: r["id"] for r in self._query("SELECT id, text FROM reference_prompts")}
            missing = [t for t in texts if t not in existing and t not in embeddings]
            if missing:
                raise ValueError(f"no embedding given for new reference prompts {missing}")
            keep = set(texts)
            for text, pid in existing.items():
                if text not in keep:
                    self._exec("DELETE FROM reference_prompts WHERE id = ?", (pid,))
            next_id = max(existing.values(), default=0) + 1
            ids = []
            for text in texts:
                if text not in existing:
                    self.restore_reference_prompt(next_id, text, embeddings[text])
                    existing[text] = next_id
                    next_id += 1
                ids.append(existing[text])
            return ids

    def restore_reference_prompt(self, prompt_id: int, text: str, embedding: np.ndarray) -> None:
        """Insert one prompt with a given id (set_reference_prompts and graph import)."""
        vector = np.asarray(embedding, dtype=np.float32).tolist()
        with self.transaction():
            self._exec("INSERT INTO reference_prompts (id, text, embedding) VALUES (?, ?, ?)",
                               (int(prompt_id), text, json.dumps(vector)))
            self._set_meta("reference_prompts_rev", str(int(self._meta("reference_prompts_rev") or 0) + 1))

    def reference_prompts(self) -> list[ReferencePrompt]:
        return [ReferencePrompt(r["id"], r["text"])
                for r in self._query("SELECT id, text FROM reference_prompts ORDER BY id")]

    def reference_prompt_embeddings(self, prompt_ids: list[int]) -> np.ndarray:
        """float32 matrix (len(prompt_ids), dim), rows in the order given.

        Decoded once and cached: subgraphs are built per user prompt. A revision counter bumped
        by every insert invalidates the cache, also when another process changed the set
        (deletions only remove rows, which the cache never needs to forget)."""
        rev = self._meta("reference_prompts_rev") or ""
        if self._ref_cache is None or self._ref_cache[0] != rev:
            rows = self._query("SELECT id, embedding FROM reference_prompts")
            self._ref_cache = (rev, {r["id"]: np.asarray(json.loads(r["embedding"]), dtype=np.float32)
                                     for r in rows})
        cache = self._ref_cache[1]
        missing = [p for p in prompt_ids if p not in cache]
        if missing:
            raise KeyError(f"unknown reference prompt ids: {missing}")
        if not prompt_ids:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([cache[p] for p in prompt_ids])

    # ---- calibration edges ---------------------------------------------------------------------

    def put_calibration(self, expert_id: str, prompt_id: int, scores, metric_names: list[str], seed: int) -> None:
        """Insert or overwrite the edge expert -> reference prompt. Scores must be finite: a NaN
        edge feature would poison every planner step that touches it."""
        scores = [float(s) for s in scores]
        if len(scores) != len(metric_names) or not all(math.isfinite(s) for s in scores):
            raise ValueError(f"need one finite score per metric {list(metric_names)}, got {scores}")
        with self.transaction():
            self._exec(
                "INSERT INTO calibration (expert_id, prompt_id, scores, metric_names, seed) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (expert_id, prompt_id) DO UPDATE SET scores = excluded.scores, "
                "metric_names = excluded.metric_names, seed = excluded.seed",
                (expert_id, int(prompt_id), _dumps(scores), _dumps(list(metric_names)), int(seed)))

    def calibration(self, expert_ids: list[str] | None = None) -> list[CalibrationEdge]:
        """Edges sorted by (expert_id, prompt_id), for all experts or the ones given."""
        sql = "SELECT * FROM calibration"
        params: list = []
        if expert_ids is not None:
            params = list(expert_ids)
            if not params:
                return []
            sql += f" WHERE expert_id IN ({', '.join('?' for _ in params)})"
        rows = self._query(sql + " ORDER BY expert_id, prompt_id", params)
        # One json.loads for all score lists and one per distinct metric list: this runs on the
        # per-prompt path, where decoding each edge separately was 70% of the subgraph's time.
        scores = json.loads("[" + ",".join(r["scores"] for r in rows) + "]")
        names = {text: json.loads(text) for text in {r["metric_names"] for r in rows}}
        return [CalibrationEdge(r["expert_id"], r["prompt_id"], s, names[r["metric_names"]], r["seed"])
                for r, s in zip(rows, scores)]

    def calibration_columns(self) -> dict[str, list]:
        """Every edge as columns, sorted by (expert_id, prompt_id): lists "expert_id", "prompt_id",
        "scores", "metric_names" and "seed". What an export needs, without one object per edge
        (1.1M of them at 100k experts)."""
        rows = self._query("SELECT expert_id, prompt_id, scores, metric_names, seed FROM calibration "
                           "ORDER BY expert_id, prompt_id")
        names = {text: json.loads(text) for text in {r["metric_names"] for r in rows}}
        return {"expert_id": [r["expert_id"] for r in rows], "prompt_id": [r["prompt_id"] for r in rows],
                "scores": json.loads("[" + ",".join(r["scores"] for r in rows) + "]"),
                "metric_names": [names[r["metric_names"]] for r in rows], "seed": [r["seed"] for r in rows]}

    def calibration_counts(self) -> tuple[int, int]:
        """(edges, calibrated experts)."""
        # an index probe per expert is cheaper than COUNT(DISTINCT) over every edge (which sorts them)
        row = self._query("SELECT (SELECT COUNT(*) FROM calibration) AS e, (SELECT COUNT(*) FROM experts WHERE "
                          "EXISTS (SELECT 1 FROM calibration WHERE calibration.expert_id = experts.id)) AS x")[0]
        return row["e"], row["x"]

    # ---- GCA runs ------------------------------------------------------------------------------

    def start_run(self, source_spec: str) -> int:
        with self.transaction():
            run_id = self._query("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM runs")[0]["n"]
            self._exec("INSERT INTO runs (id, source_spec, started_at, status, counts) "
                               "VALUES (?, ?, ?, 'running', '{}')", (run_id, source_spec, utcnow()))
            return run_id

    def finish_run(self, run_id: int, status: str, counts: dict, error: str | None = None) -> None:
        """Record how the run ended; its work list is dropped (a finished pass never resumes)."""
        with self.transaction():
            self._exec("DELETE FROM gca_work WHERE run_id = ?", (run_id,))
            cur = self._exec("UPDATE runs SET finished_at = ?, status = ?, counts = ?, error = ? WHERE id = ?",
                                     (utcnow(), status, _dumps(counts), None if error is None else one_line(error, 2000), run_id))
            if cur.rowcount != 1:
                raise KeyError(f"no run {run_id}")

    # ---- a pass's work list ---------------------------------------------------------------------
    # A pass streams its sources' listings, so what it has seen and taken is written as it goes,
    # one row per listed expert, instead of riding in every checkpoint of the pass.

    def mark_listed(self, run_id: int, expert_ids: Iterable[str]) -> None:
        """Record that this pass's sources list these experts (idempotent: a resumed pass lists
        again from the start)."""
        with self.transaction():
            for expert_id in expert_ids:
                self._exec("INSERT INTO gca_work (run_id, expert_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                           (run_id, expert_id))

    def mark_taken(self, run_id: int, expert_id: str, seq: int) -> None:
        """Record that the pass took this (listed) expert for work, as its ``seq``-th."""
        with self.transaction():
            self._exec("INSERT INTO gca_work (run_id, expert_id, seq) VALUES (?, ?, ?) "
                       "ON CONFLICT (run_id, expert_id) DO UPDATE SET seq = excluded.seq", (run_id, expert_id, seq))

    def taken(self, run_id: int, before: int) -> set[str]:
        """The experts this pass took for work as one of its first ``before`` (its checkpointed
        cursor), which a resumed pass does not take again. A mark at or past the cursor was made
        by a step whose checkpoint a kill prevented: that expert was not taken."""
        return {r["expert_id"] for r in self._query("SELECT expert_id FROM gca_work WHERE run_id = ? AND seq < ?",
                                                     (run_id, before))}

    def listed_count(self, run_id: int) -> int:
        return self._query("SELECT COUNT(*) AS n FROM gca_work WHERE run_id = ?", (run_id,))[0]["n"]

    def unlisted(self, run_id: int, sources: Iterable[str]) -> list[str]:
        """Experts of these sources, not removed, that this pass has not listed: what its sweep removes."""
        sources = sorted(set(sources))
        if not sources:
            return []
        rows = self._query(f"SELECT id FROM experts WHERE source IN ({', '.join('?' for _ in sources)}) "
                           "AND status != 'removed' AND NOT EXISTS (SELECT 1 FROM gca_work WHERE "
                           "gca_work.run_id = ? AND gca_work.expert_id = experts.id) ORDER BY id", [*sources, run_id])
        return [r["id"] for r in rows]

    def drop_stale_work(self) -> None:
        """Delete the work lists of runs that are no longer running (killed, then marked interrupted)."""
        with self.transaction():
            self._exec("DELETE FROM gca_work WHERE run_id NOT IN (SELECT id FROM runs WHERE status = 'running')")

    def work_states(self, expert_ids: list[str]) -> dict[str, tuple[str, str, str | None, int, str]]:
        """{id: (version, status, status_reason, attempts, base_model)} of the known ones among
        ``expert_ids``, without decoding whole rows: a pass asks this of every listed expert."""
        out = {}
        for start in range(0, len(expert_ids), 500):
            chunk = expert_ids[start:start + 500]
            rows = self._query("SELECT id, version, status, status_reason, attempts, base_model FROM experts "
                               f"WHERE id IN ({', '.join('?' for _ in chunk)})", chunk)
            out.update({r["id"]: (r["version"], r["status"], r["status_reason"], r["attempts"], r["base_model"])
                        for r in rows})
        return out

    def get_run(self, run_id: int) -> dict | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (int(run_id),))
        return {**dict(rows[0]), "counts": json.loads(rows[0]["counts"])} if rows else None

    def last_run(self) -> dict | None:
        rows = self._query("SELECT * FROM runs ORDER BY id DESC LIMIT 1")
        if not rows:
            return None
        run = dict(rows[0])
        run["counts"] = json.loads(run["counts"])
        return run
