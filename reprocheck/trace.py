"""The trace of one run: a SQLite file written step by step, crash-safe, and read back.

Layout (schema version 1)::

    meta(key PRIMARY KEY, value)                 JSON: schema, config, environment, status ...
    tensors(id PRIMARY KEY, phase, name, shape, dtype)
    records(step, seq, tensor, digest)           PRIMARY KEY(step, seq), WITHOUT ROWID
    sketches(step, seq, sum, sum_sq, absmax, nonfinite)   only where sketches were taken
    steps(step PRIMARY KEY, records, loss, wall_s)   one row per committed step

``seq`` is the record's position within its step, so ``ORDER BY step, seq`` is record
order (phases in order, then the order tensors were recorded in). A tensor id stands for
(phase, name, shape, dtype); runs of one config assign ids in the same order, which lets
two traces be compared by a join on (step, seq) alone.

WAL mode and one transaction per step: a run killed at step k keeps every step < k, and
:class:`Trace` reports where it ended instead of failing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import TRACE_PHASES

SCHEMA = "reprocheck.trace/1"
SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tensors (id INTEGER PRIMARY KEY, phase TEXT NOT NULL, name TEXT NOT NULL,
                      shape TEXT NOT NULL, dtype TEXT NOT NULL);
CREATE TABLE records (step INTEGER NOT NULL, seq INTEGER NOT NULL, tensor INTEGER NOT NULL,
                      digest BLOB NOT NULL, PRIMARY KEY (step, seq)) WITHOUT ROWID;
CREATE TABLE sketches (step INTEGER NOT NULL, seq INTEGER NOT NULL, sum REAL, sum_sq REAL,
                       absmax REAL, nonfinite INTEGER, PRIMARY KEY (step, seq)) WITHOUT ROWID;
CREATE TABLE steps (step INTEGER PRIMARY KEY, records INTEGER NOT NULL, loss REAL,
                    wall_s REAL NOT NULL);
"""


class TraceError(Exception):
    """A trace that cannot be read: missing, not SQLite, not ours, or another schema."""


@dataclass(frozen=True)
class Record:
    """One fingerprinted tensor of one step."""

    step: int
    seq: int
    phase: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    digest: bytes
    sketch: tuple[float, float, float, int] | None = None

    @property
    def shape_text(self) -> str:
        return "×".join(map(str, self.shape)) if self.shape else "scalar"


class TraceWriter:
    """Writes one run's trace. Each :meth:`write_step` is one committed transaction."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"trace already exists: {self.path}")
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
        self._db.executescript(_DDL)
        self._ids: dict[tuple[str, str, str, str], int] = {}
        self._pending_tensors: list[tuple[int, str, str, str, str]] = []
        self._inserts: dict[int, str] = {}
        # bound parameters per statement: SQLite's limit (999 before 3.32) over 4 per row
        limit = 999
        if hasattr(self._db, "getlimit"):  # Python ≥ 3.11
            limit = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._rows_per_insert = max(1, min(limit, 4000) // 4)
        base = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "status": "running"}
        base["started"] = time.time()
        self._put_meta({**base, **meta})

    def _insert_sql(self, rows: int) -> str:
        sql = self._inserts.get(rows)
        if sql is None:
            sql = "INSERT INTO records VALUES " + ",".join(["(?,?,?,?)"] * rows)
            if len(self._inserts) < 64:
                self._inserts[rows] = sql
        return sql

    def _put_meta(self, items: dict[str, Any]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [(key, json.dumps(value)) for key, value in items.items()],
        )
        self._db.execute("COMMIT")

    def set_meta(self, **items: Any) -> None:
        """Store (or replace) meta entries, committed at once."""
        self._put_meta(items)

    def tensor_id(self, phase: str, name: str, shape: Sequence[int], dtype: str) -> int:
        """The id of (phase, name, shape, dtype), registered on first sight."""
        if phase not in TRACE_PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        key = (phase, name, ",".join(map(str, shape)), dtype)
        found = self._ids.get(key)
        if found is None:
            found = len(self._ids) + 1
            self._ids[key] = found
            self._pending_tensors.append((found, *key))
        return found

    def write_step(
        self,
        step: int,
        rows: Sequence[tuple[int, bytes]],
        sketches: Sequence[tuple[float, float, float, int] | None] | None,
        loss: float | None,
        wall_s: float,
    ) -> None:
        """Commit one step: its (tensor id, digest) rows in record order, optional sketches."""
        db = self._db
        db.execute("BEGIN")
        if self._pending_tensors:
            db.executemany("INSERT INTO tensors VALUES (?, ?, ?, ?, ?)", self._pending_tensors)
            self._pending_tensors = []
        # Multi-row INSERTs: one statement per up-to-`_rows_per_insert` records, not one
        # per record (executemany pays ~1.5 µs of statement stepping per row).
        per = self._rows_per_insert
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            params: list[Any] = []
            for seq, (tensor, digest) in enumerate(chunk, start):
                params += (step, seq, tensor, digest)
            db.execute(self._insert_sql(len(chunk)), params)
        if sketches:
            db.executemany(
                "INSERT INTO sketches VALUES (?, ?, ?, ?, ?, ?)",
                [(step, seq, *s[:4]) for seq, s in enumerate(sketches) if s is not None],
            )
        db.execute("INSERT INTO steps VALUES (?, ?, ?, ?)", (step, len(rows), loss, wall_s))
        db.execute("COMMIT")

    def finish(self, status: str, error: str | None = None, **meta: Any) -> None:
        """Mark the run complete or failed (with its error line) and close the file."""
        self._put_meta({"status": status, "error": error, "finished": time.time(), **meta})
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class Trace:
    """A trace opened for reading. Raises :class:`TraceError` for anything that is not one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise TraceError(f"{self.path}: no such trace file")
        if os.path.isdir(self.path):
            raise TraceError(f"{self.path}: is a folder, not a trace file")
        with open(self.path, "rb") as head:
            magic = head.read(16)
        if magic != b"SQLite format 3\x00":
            raise TraceError(f"{self.path}: not a reprocheck trace (not a SQLite file)")
        try:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            rows = self.db.execute("SELECT key, value FROM meta").fetchall()
            self.meta: dict[str, Any] = {key: json.loads(value) for key, value in rows}
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: not a reprocheck trace ({exc})") from None
        except ValueError as exc:
            raise TraceError(f"{self.path}: corrupted trace metadata ({exc})") from None
        if self.meta.get("schema") != SCHEMA:
            raise TraceError(
                f"{self.path}: not a reprocheck trace (schema {self.meta.get('schema')!r})"
            )
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TraceError(
                f"{self.path}: trace schema version {version}, this reprocheck reads "
                f"{SCHEMA_VERSION} — re-record it with this version"
            )
        tables = {
            name
            for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = sorted({"meta", "tensors", "records", "sketches", "steps"} - tables)
        if missing:
            raise TraceError(f"{self.path}: corrupted trace (missing table {', '.join(missing)})")
        try:
            self.steps: list[int] = [
                s for (s,) in self.db.execute("SELECT step FROM steps ORDER BY step")
            ]
            self._tensors = {
                row[0]: row[1:]
                for row in self.db.execute("SELECT id, phase, name, shape, dtype FROM tensors")
            }
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: corrupted trace ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def status(self) -> str:
        """complete | failed | running (a run still going, or one that was killed)."""
        return self.meta.get("status", "running")

    @property
    def error(self) -> str | None:
        return self.meta.get("error")

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    @property
    def has_sketches(self) -> bool:
        return self.db.execute("SELECT 1 FROM sketches LIMIT 1").fetchone() is not None

    def _record(self, row: tuple) -> Record:
        step, seq, tensor, digest, *sketch = row
        phase, name, shape, dtype = self._tensors[tensor]
        dims = tuple(int(d) for d in shape.split(",") if d)
        sk = tuple(sketch) if sketch and sketch[0] is not None else None
        return Record(step, seq, phase, name, dims, dtype, bytes(digest), sk)

    _SELECT = (
        "SELECT r.step, r.seq, r.tensor, r.digest, s.sum, s.sum_sq, s.absmax, s.nonfinite "
        "FROM records r LEFT JOIN sketches s USING (step, seq) "
    )

    def records(self, step: int | None = None) -> Iterator[Record]:
        """Records in record order, of one step or of all."""
        try:
            if step is None:
                cursor = self.db.execute(self._SELECT + "ORDER BY r.step, r.seq")
            else:
                cursor = self.db.execute(self._SELECT + "WHERE r.step = ? ORDER BY r.seq", (step,))
            for row in cursor:
                yield self._record(row)
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: corrupted trace ({exc})") from None

    def record(self, step: int, seq: int) -> Record | None:
        try:
            row = self.db.execute(
                self._SELECT + "WHERE r.step = ? AND r.seq = ?", (step, seq)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: corrupted trace ({exc})") from None
        return None if row is None else self._record(row)

    def find(self, step: int, phase: str, name: str) -> Record | None:
        """The record of a named tensor at a step."""
        for rec in self.records(step):
            if rec.phase == phase and rec.name == name:
                return rec
        return None

    def losses(self) -> dict[int, float | None]:
        return dict(self.db.execute("SELECT step, loss FROM steps ORDER BY step"))

    def record_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM records").fetchone()[0]


def committed_steps(path: str | os.PathLike) -> int:
    """How many steps a (possibly running) trace has committed; 0 if unreadable yet."""
    try:
        db = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=0.5)
        try:
            return db.execute("SELECT count(*) FROM steps").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def mark_ended(path: str | os.PathLike, status: str, error: str) -> None:
    """Record, from outside, how a run that could not say it itself ended (killed, timed out)."""
    db = sqlite3.connect(os.fspath(path), timeout=5)
    try:
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("status", json.dumps(status)),
                    ("error", json.dumps(error)),
                    ("finished", json.dumps(time.time())),
                ],
            )
    except sqlite3.Error:
        pass  # a trace too broken to annotate: the report still says what happened
    finally:
        db.close()
