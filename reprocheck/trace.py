"""The trace of one run: a SQLite file written step by step, crash-safe, and read back.

Layout (schema version 2)::

    meta(key PRIMARY KEY, value)                 JSON: schema, config, environment, status ...
    tensors(id PRIMARY KEY, phase, name, shape, dtype)
    records(step PRIMARY KEY, tensors, digests)  one row per step: the step's records
    sketches(step, seq, sum, sum_sq, absmax, nonfinite)   only where sketches were taken
    steps(step PRIMARY KEY, records, loss, wall_s)   one row per committed step

A step's records are two blobs in record order (phases in order, then the order tensors
were recorded in): ``tensors``, their ids as little-endian uint32, and ``digests``, their
16-byte digests end to end; record ``seq`` is position ``seq`` in both. A tensor id
stands for (phase, name, shape, dtype); runs of one config assign ids in the same order,
so two traces are compared by one join on ``step`` and blob equality, and only the first
differing step is opened. One row per step, not per record: ~20 bytes per record on disk
and one INSERT per step (a row per record cost ~1.5 µs each to insert).

WAL mode and one transaction per step: a run killed at step k keeps every step < k, and
:class:`Trace` reports where it ended instead of failing.
"""

from __future__ import annotations

import array
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import TRACE_PHASES

SCHEMA = "reprocheck.trace/1"
SCHEMA_VERSION = 2

_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tensors (id INTEGER PRIMARY KEY, phase TEXT NOT NULL, name TEXT NOT NULL,
                      shape TEXT NOT NULL, dtype TEXT NOT NULL);
CREATE TABLE records (step INTEGER PRIMARY KEY, tensors BLOB NOT NULL, digests BLOB NOT NULL);
CREATE TABLE sketches (step INTEGER NOT NULL, seq INTEGER NOT NULL, sum REAL, sum_sq REAL,
                       absmax REAL, nonfinite INTEGER, PRIMARY KEY (step, seq)) WITHOUT ROWID;
CREATE TABLE steps (step INTEGER PRIMARY KEY, records INTEGER NOT NULL, loss REAL,
                    wall_s REAL NOT NULL);
"""


DIGEST_BYTES = 16


def pack_ids(ids: Sequence[int]) -> bytes:
    """Tensor ids as the ``records.tensors`` blob: little-endian uint32."""
    packed = array.array("I", ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    ids = array.array("I")
    ids.frombytes(blob)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tolist()


def split_digests(blob: bytes) -> list[bytes]:
    return [blob[i : i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES)]


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
        base = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "status": "running"}
        base["started"] = time.time()
        self._put_meta({**base, **meta})

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
        db.execute(
            "INSERT INTO records VALUES (?, ?, ?)",
            (step, pack_ids([tensor for tensor, _ in rows]), b"".join(d for _, d in rows)),
        )
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
            self._sketched = self.has_sketches
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

    def _step_records(self, step: int, tensors: bytes, digests: bytes) -> list[Record]:
        ids, values = unpack_ids(tensors), split_digests(digests)
        if len(ids) != len(values):
            raise TraceError(f"{self.path}: corrupted trace (step {step}: records do not match)")
        sketches = {}
        if self._sketched:
            sketches = {
                row[0]: tuple(row[1:])
                for row in self.db.execute(
                    "SELECT seq, sum, sum_sq, absmax, nonfinite FROM sketches WHERE step = ?",
                    (step,),
                )
            }
        out = []
        for seq, (tensor, digest) in enumerate(zip(ids, values)):
            key = self._tensors.get(tensor)
            if key is None:
                raise TraceError(f"{self.path}: corrupted trace (unknown tensor id {tensor})")
            phase, name, shape, dtype = key
            dims = tuple(int(d) for d in shape.split(",") if d)
            sketch = sketches.get(seq)
            out.append(Record(step, seq, phase, name, dims, dtype, bytes(digest), sketch))
        return out

    def records(self, step: int | None = None) -> Iterator[Record]:
        """Records in record order, of one step or of all."""
        try:
            if step is None:
                cursor = self.db.execute(
                    "SELECT step, tensors, digests FROM records ORDER BY step"
                ).fetchall()
            else:
                cursor = self.db.execute(
                    "SELECT step, tensors, digests FROM records WHERE step = ?", (step,)
                ).fetchall()
            for row in cursor:
                yield from self._step_records(*row)
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: corrupted trace ({exc})") from None

    def record(self, step: int, seq: int) -> Record | None:
        if seq < 0:
            return None
        found = list(self.records(step))
        return found[seq] if seq < len(found) else None

    def find(self, step: int, phase: str, name: str) -> Record | None:
        """The record of a named tensor at a step."""
        for rec in self.records(step):
            if rec.phase == phase and rec.name == name:
                return rec
        return None

    def losses(self) -> dict[int, float | None]:
        return dict(self.db.execute("SELECT step, loss FROM steps ORDER BY step"))

    def record_count(self) -> int:
        total = self.db.execute("SELECT sum(length(digests)) FROM records").fetchone()[0]
        return (total or 0) // DIGEST_BYTES


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
