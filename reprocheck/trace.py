"""The trace of one run: a SQLite file written step by step, crash-safe, and read back.

Layout (schema version 3)::

    meta(key PRIMARY KEY, value)                 JSON: schema, config, environment, status ...
    tensors(id PRIMARY KEY, phase, name, shape, dtype)
    records(step PRIMARY KEY, tensors, digests, latent_tensors, latent_digests)
                                                 one row per step: the step's records
    sketches(step, seq, sum, sum_sq, absmax, nonfinite)   only where sketches were taken
    steps(step PRIMARY KEY, records, loss, wall_s)   one row per committed step

A step's records are two blobs in record order (phases in order, then the order tensors
were recorded in): ``tensors``, their ids as little-endian uint32, and ``digests``, their
16-byte digests end to end; record ``seq`` is position ``seq`` in both. The step's
generator states (phase ``rng``, always last) are kept apart in ``latent_tensors`` and
``latent_digests``: what training *observes* (data, outputs, loss, grads, weights,
optimizer state) decides a verdict, and a generator whose state differs while nothing
drawn from it differs is only latent (see DESIGN.md, "The verdict"); the latent records
continue the step's ``seq`` numbering after the observable ones. A tensor id
stands for (phase, name, shape, dtype); runs of one config assign ids in the same order,
so two traces are compared by one join on ``step`` and blob equality, and only the first
differing step is opened. One row per step, not per record: ~20 bytes per record on disk
and one INSERT per step (a row per record cost ~1.5 µs each to insert).

Writing a step costs one ``write()``: the writer appends the step as one checksummed
frame to the *step log* beside the trace (``<trace>-steps``) and folds the logged steps
into SQLite in one transaction every :data:`FOLD_SECONDS` (a SQLite transaction costs
~100 µs right after a training step has evicted SQLite from the CPU caches; an append
costs ~15 µs) — at a step's write when one is due, else from a small thread, so a long
step or a hang does not hold back what readers see for more than ~2 intervals. A run
killed at step k keeps every step < k: the log is in the OS's page cache as soon as
``write()`` returns, and the first of the audit's own readers after the writer died (the
launcher, or :class:`Trace` with ``own=True``) folds it in — the writer holds a ``flock`` on
the log while it lives, so readers of a running trace see the folded steps only. Folding is
idempotent (``INSERT OR IGNORE``), so a crash between a fold's commit and the log's
truncation loses nothing and doubles nothing.

Any other trace is hostile input (a golden trace from a pull request): :class:`Trace` reads
it read-only and inert — never written, no file made beside it, no SQL from it run, every
query under a deadline, every blob and meta value bounded (see "reading" below).
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import json
import math
import os
import re
import sqlite3
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import jsonout
from .config import TRACE_PHASES
from .contract import RunMeta

try:
    import fcntl
except ImportError:  # Windows: no step-log locks; a log is folded by its own writer only
    fcntl = None  # type: ignore[assignment]

SCHEMA = "reprocheck.trace/1"
SCHEMA_VERSION = 3
LATENT_PHASES = frozenset({"rng"})  # recorded apart: evidence of a cause, not a verdict

_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tensors (id INTEGER PRIMARY KEY, phase TEXT NOT NULL, name TEXT NOT NULL,
                      shape TEXT NOT NULL, dtype TEXT NOT NULL);
CREATE TABLE records (step INTEGER PRIMARY KEY, tensors BLOB NOT NULL, digests BLOB NOT NULL,
                      latent_tensors BLOB NOT NULL, latent_digests BLOB NOT NULL);
CREATE TABLE sketches (step INTEGER NOT NULL, seq INTEGER NOT NULL, sum REAL, sum_sq REAL,
                       absmax REAL, nonfinite INTEGER, PRIMARY KEY (step, seq)) WITHOUT ROWID;
CREATE TABLE steps (step INTEGER PRIMARY KEY, records INTEGER NOT NULL, loss REAL,
                    wall_s REAL NOT NULL);
"""


DIGEST_BYTES = 16
FOLD_SECONDS = 0.25  # the step log is folded into SQLite at least this often ...
FOLD_STEPS = 256  # ... or every this many steps
_FRAME = struct.Struct("<II")  # payload bytes, crc32 of the payload
_HEAD = struct.Struct("<qddBIII")  # step, loss, wall_s, has loss, id bytes, observed, extra
_STEP_LOG = "-steps"


def step_log_path(path: str | os.PathLike) -> str:
    """The step log beside a trace: steps written but not yet folded into SQLite."""
    return os.fspath(path) + _STEP_LOG


# Open step logs of this process: a forked child (a DataLoader worker) closes its copies,
# so the log's lock goes away with the writer, not with the last worker.
_OPEN_LOGS: set[int] = set()


def _close_logs_in_child() -> None:
    for fd in list(_OPEN_LOGS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN_LOGS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_logs_in_child)


def pack_ids(ids: Sequence[int]) -> bytes:
    """Tensor ids as the ``records.tensors`` blob: little-endian uint32."""
    packed = array.array("I", ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    if len(blob) % 4:
        raise ValueError(f"a tensor ids blob of {len(blob):,} bytes (not a multiple of 4)")
    ids = array.array("I")
    ids.frombytes(blob)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tolist()


def split_digests(blob: bytes) -> list[bytes]:
    return [blob[i : i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES)]


_ALL_RECORDS = "tensors, digests, latent_tensors, latent_digests"


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
    def latent(self) -> bool:
        """A generator state: evidence of a cause, never a verdict by itself."""
        return self.phase in LATENT_PHASES

    @property
    def shape_text(self) -> str:
        return "×".join(map(str, self.shape)) if self.shape else "scalar"


_SQLITE_FULL = 13  # SQLite's "database or disk is full"


class TraceFull(OSError):
    """No space left on the device holding a trace (``ENOSPC``, or SQLite's "database or
    disk is full"). The writer keeps what it wrote — the steps committed to SQLite, and the
    whole frames of its step log, which it leaves there unfolded — and writes nothing more:
    every later write raises this again."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}", path)

    def __str__(self) -> str:
        return str(self.strerror)


def no_space(exc: BaseException) -> bool:
    """Is this error a full disk?"""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == _SQLITE_FULL or "database or disk is full" in str(exc)
    return False


class TraceWriter:
    """Writes one run's trace. Each :meth:`write_step` is durable when it returns (see the
    module's notes on the step log); :meth:`finish` folds everything into SQLite.

    On a full disk every write raises :class:`TraceFull` (``full`` then holds the first);
    :meth:`finish` still records the status where a page can take it, and raises it too."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"trace already exists: {self.path}")
        self.full: TraceFull | None = None
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, str, str, str], int] = {}
        self._keys: list[tuple[str, str, str, str]] = []  # id - 1 → its key
        self._pending_tensors: list[tuple[int, str, str, str, str]] = []
        self._unfolded: list[_LoggedStep] = []
        self._logged = 0  # bytes of whole frames in the step log
        self._closed = threading.Event()
        self._folder: threading.Thread | None = None
        self._log = -1
        fresh = f"{step_log_path(self.path)}.{os.getpid()}"
        try:
            # one connection, used under `_lock` by the run's thread and the folding thread
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            self._db.executescript(_DDL)
            base = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "status": "running"}
            base["started"] = time.time()
            self._put_meta({**base, **meta})
            # Locked before it appears under its name: a reader never finds a live writer's
            # log unlocked (and so never folds and removes it).
            self._log = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            _OPEN_LOGS.add(self._log)
            if fcntl is not None:
                fcntl.flock(self._log, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(fresh, step_log_path(self.path))
        except (OSError, sqlite3.Error) as exc:
            if not no_space(exc):
                raise
            self._abandon(fresh)  # nothing of it is worth keeping: no step, maybe no meta
            raise TraceFull(self.path) from None
        self._folded_at = time.monotonic()

    def _abandon(self, fresh: str) -> None:
        """A trace that could not be created: its files go."""
        with contextlib.suppress(AttributeError, sqlite3.Error):
            self._db.close()
        if self._log >= 0:
            _OPEN_LOGS.discard(self._log)
            with contextlib.suppress(OSError):
                os.close(self._log)
        for leftover in (self.path, f"{self.path}-wal", f"{self.path}-shm", fresh):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        if self._log >= 0:
            with contextlib.suppress(OSError):
                os.unlink(step_log_path(self.path))

    def _filled(self) -> TraceFull:
        """The disk is full: note it (the first time), and the error to raise."""
        if self.full is None:
            self.full = TraceFull(self.path)
        return TraceFull(self.path)

    def _put_meta(self, items: dict[str, Any]) -> None:
        if self.full is not None:
            raise TraceFull(self.path)
        self._commit_meta(items)

    def _commit_meta(self, items: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [(key, jsonout.dumps(value)) for key, value in items.items()],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if no_space(exc):
                    raise self._filled() from None
                raise

    def _rollback(self) -> None:
        if self._db.in_transaction:  # (a COMMIT that failed leaves its transaction open)
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

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
            with self._lock:  # (a thread hashing beside training may be logging a step)
                found = self._ids.get(key)
                if found is None:
                    found = len(self._ids) + 1
                    self._ids[key] = found
                    self._keys.append(key)
                    self._pending_tensors.append((found, *key))
        return found

    def tensor_key(self, tensor_id: int) -> tuple[str, str, str, str]:
        """(phase, name, shape as ``"2,3"``, dtype) of a registered id."""
        return self._keys[tensor_id - 1]

    def write_step(
        self,
        step: int,
        rows: Sequence[tuple[int, bytes]],
        sketches: Sequence[tuple[float, float, float, int] | None] | None,
        loss: float | None,
        wall_s: float,
        observed: int | None = None,
    ) -> None:
        """Write one step: its (tensor id, digest) rows in record order, optional sketches;
        the rows from ``observed`` on are latent (generator states; all observable if None)."""
        self.log_step(
            step,
            pack_ids([tensor for tensor, _ in rows]),
            b"".join(d for _, d in rows),
            [(step, seq, *s[:4]) for seq, s in enumerate(sketches) if s is not None]
            if sketches
            else [],
            loss,
            wall_s,
            len(rows) if observed is None else observed,
        )

    def log_step(
        self,
        step: int,
        ids: bytes,
        digests: bytes,
        sketches: list[tuple],
        loss: float | None,
        wall_s: float,
        observed: int,
    ) -> None:
        """Log one step with one ``write()`` and fold the log into SQLite when it is due.
        ``ids`` as :func:`pack_ids` packs them, ``digests`` end to end, ``sketches`` as rows
        ``(step, seq, sum, sum_sq, absmax, nonfinite)``; the first ``observed`` records are
        observable, the rest latent (generator states)."""
        if self.full is not None:
            raise TraceFull(self.path)
        with self._lock:  # the tensors registered so far go with this step
            pending, self._pending_tensors = self._pending_tensors, []
        logged = _LoggedStep(step, ids, digests, loss, wall_s, pending, sketches, observed)
        frame = logged.frame()
        with self._lock:
            try:
                written = os.write(self._log, frame)
            except OSError as exc:
                if not no_space(exc):
                    raise
                written = -1
            if written != len(frame):  # a full disk (a short write is one too)
                with contextlib.suppress(OSError):
                    os.ftruncate(self._log, self._logged)  # back to its last whole frame
                raise self._filled()
            self._logged += len(frame)
            self._unfolded.append(logged)
            if (
                len(self._unfolded) >= FOLD_STEPS
                or time.monotonic() - self._folded_at >= FOLD_SECONDS
            ):
                with contextlib.suppress(TraceFull):  # (logged: the next write says it)
                    self._fold()
        if self._folder is None:  # folds what a long step or a hang would leave unfolded
            self._folder = threading.Thread(
                target=self._fold_while_idle, name="reprocheck-trace-fold", daemon=True
            )
            self._folder.start()

    def _fold_while_idle(self) -> None:
        while not self._closed.wait(FOLD_SECONDS / 2):
            with self._lock:
                if self._closed.is_set():
                    return
                if time.monotonic() - self._folded_at < FOLD_SECONDS:
                    continue
                try:
                    self._fold()
                except (OSError, sqlite3.Error):
                    return  # the run's own next write meets the error (``full``) and raises it

    def fold(self) -> None:
        """Commit the logged steps to SQLite in one transaction, then empty the log."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        if self._unfolded and self.full is None:  # (full: they stay in the log)
            try:
                _insert(self._db, self._unfolded, "INSERT")
            except sqlite3.Error as exc:
                self._rollback()
                if no_space(exc):
                    raise self._filled() from None
                raise
            os.ftruncate(self._log, 0)
            self._logged = 0
            self._unfolded = []
        self._folded_at = time.monotonic()

    def finish(self, status: str, error: str | None = None, **meta: Any) -> None:
        """Mark the run complete or failed (with its error line) and close the file. On a
        full disk: the status where a page still takes it, the steps SQLite could not take
        left in the step log (a reader folds them once there is room), and
        :class:`TraceFull` raised once the files are closed."""
        self._closed.set()
        if self._folder is not None and self._folder is not threading.current_thread():
            self._folder.join(timeout=5)
        with contextlib.suppress(TraceFull):
            self.fold()
        with contextlib.suppress(TraceFull):  # even on a full disk: its status may fit
            self._commit_meta({"status": status, "error": error, "finished": time.time(), **meta})
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                # a finished trace leaves WAL mode: a read-only reader of a WAL database makes
                # -wal and -shm files it cannot remove (empty ones left in the report folder)
                with contextlib.suppress(sqlite3.OperationalError):
                    self._db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.Error as exc:
                if not no_space(exc):  # (full: what it committed is safe in the WAL)
                    raise
            finally:
                self._db.close()
                _OPEN_LOGS.discard(self._log)
                os.close(self._log)  # releases the lock
        if self.full is not None:
            raise TraceFull(self.path)
        with contextlib.suppress(OSError):
            os.unlink(step_log_path(self.path))


class _LoggedStep(NamedTuple):
    """One step as the writer logs it and folds it."""

    step: int
    ids: bytes
    digests: bytes
    loss: float | None
    wall_s: float
    tensors: list[tuple[int, str, str, str, str]]  # tensor ids first used in this step
    sketches: list[tuple]  # (step, seq, sum, sum_sq, absmax, nonfinite)
    observed: int  # records before the latent ones (generator states)

    def row(self) -> tuple[int, bytes, bytes, bytes, bytes]:
        """The ``records`` row: observable ids and digests, then the latent ones."""
        ids, digests = self.observed * 4, self.observed * DIGEST_BYTES
        return (
            self.step,
            self.ids[:ids],
            self.digests[:digests],
            self.ids[ids:],
            self.digests[digests:],
        )

    def frame(self) -> bytes:
        extra = (
            json.dumps([self.tensors, self.sketches]).encode()
            if self.tensors or self.sketches
            else b""
        )
        has_loss = self.loss is not None
        head = _HEAD.pack(
            self.step,
            self.loss if has_loss else 0.0,
            self.wall_s,
            has_loss,
            len(self.ids),
            self.observed,
            len(extra),
        )
        payload = b"".join((head, self.ids, self.digests, extra))
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @staticmethod
    def unpack(payload: bytes) -> _LoggedStep | None:
        """One frame's payload (its CRC checked) as a step; None where it is malformed."""
        if len(payload) < _HEAD.size:
            return None
        step, loss, wall_s, has_loss, id_bytes, observed, extra_bytes = _HEAD.unpack_from(payload)
        digest_bytes = id_bytes // 4 * DIGEST_BYTES
        if (
            id_bytes % 4
            or id_bytes // 4 > MAX_RECORDS_PER_STEP
            or observed > id_bytes // 4
            or _HEAD.size + id_bytes + digest_bytes + extra_bytes != len(payload)
        ):
            return None
        body = payload[_HEAD.size :]
        tensors: list = []
        sketches: list = []
        if extra_bytes:
            try:
                extra = json.loads(body[id_bytes + digest_bytes :])
            except (ValueError, RecursionError):
                return None
            if not (isinstance(extra, list) and len(extra) == 2):
                return None
            tensors, sketches = extra
            if not (
                isinstance(tensors, list)
                and isinstance(sketches, list)
                and all(_is_tensor_row(t) for t in tensors)
                and all(_is_sketch_row(k, step) for k in sketches)
            ):
                return None
        return _LoggedStep(
            step,
            body[:id_bytes],
            body[id_bytes : id_bytes + digest_bytes],
            loss if has_loss else None,
            wall_s,
            [tuple(t) for t in tensors],
            [tuple(k) for k in sketches],
            observed,
        )


def _is_tensor_row(row: object) -> bool:
    """(id, phase, name, shape, dtype) as a step log holds a newly seen tensor."""
    return (
        isinstance(row, list)
        and len(row) == 5
        and isinstance(row[0], int)
        and all(isinstance(x, str) and len(x) <= MAX_TEXT for x in row[1:])
    )


def _is_sketch_row(row: object, step: int) -> bool:
    """(step, seq, sum, sum_sq, absmax, nonfinite) of the frame's step."""
    return (
        isinstance(row, list)
        and len(row) == 6
        and row[0] == step
        and isinstance(row[1], int)
        and all(x is None or isinstance(x, (int, float)) for x in row[2:])
    )


def _insert(db: sqlite3.Connection, steps: Sequence[_LoggedStep], verb: str) -> None:
    """Logged steps into the trace's tables, in one transaction."""
    db.execute("BEGIN")
    try:
        db.executemany(
            f"{verb} INTO tensors VALUES (?, ?, ?, ?, ?)", [t for s in steps for t in s.tensors]
        )
        db.executemany(f"{verb} INTO records VALUES (?, ?, ?, ?, ?)", [s.row() for s in steps])
        db.executemany(
            f"{verb} INTO sketches VALUES (?, ?, ?, ?, ?, ?)",
            [k for s in steps for k in s.sketches],
        )
        db.executemany(
            f"{verb} INTO steps VALUES (?, ?, ?, ?)",
            [(s.step, len(s.ids) // 4, s.loss, s.wall_s) for s in steps],
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# ---------------------------------------------------------------------------------- reading
#
# Every trace reprocheck did not just write is hostile input — a golden trace from a pull
# request above all. A reader opens it read-only and inert: ``immutable`` (no lock, no
# journal, no -wal/-shm made or read beside it) unless it is one of the audit's own run
# traces (``own``: a live writer's WAL is read, a dead writer's step log folded in); no SQL
# from the file ever runs (``trusted_schema`` off, and before any other query the schema
# must be exactly the tables a TraceWriter creates: a trigger, a view, an index or another
# table is refused); every statement has a deadline; no value longer than MAX_BLOB_BYTES is
# ever loaded, and every blob's length is checked (``length()``, which reads no blob) before
# it is read; meta values are bounded in size and depth and type-checked.

QUERY_SECONDS = 5.0  # a statement on a foreign trace running longer is stopped: TraceError
OWN_QUERY_SECONDS = 120.0  # ... on one of the audit's own traces
MAX_RECORDS_PER_STEP = 1 << 20  # records one step may hold
MAX_BLOB_BYTES = MAX_RECORDS_PER_STEP * DIGEST_BYTES  # SQLite's length limit on every reader
MAX_TEXT = 1 << 16  # characters of a tensor's phase, name, shape or dtype
MAX_META_VALUE = 1 << 20  # characters of one meta value (its JSON)
MAX_META_TOTAL = 8 << 20  # ... of all of them
MAX_META_KEYS = 10_000
MAX_META_DEPTH = 32  # nesting of lists and objects in one meta value
MAX_FRAME_BYTES = 256 << 20  # one frame of a step log
_TABLES = ("meta", "tensors", "records", "sketches", "steps")
_BLOBS = ("tensors", "digests", "latent_tensors", "latent_digests")
_SHAPE = re.compile(r"(?:\d{1,19}(?:,\d{1,19})*)?")
# what a query of a hostile file raises: SQLite's errors, and text (an error message naming
# a schema object, say) that is not UTF-8
DB_ERRORS = (sqlite3.Error, UnicodeDecodeError)


class _Connection(sqlite3.Connection):
    """A connection to a trace whose every statement runs under a deadline (set by each
    ``execute``): past it, the progress handler stops the statement."""

    seconds = QUERY_SECONDS
    deadline = math.inf
    ran_too_long = False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.deadline = time.monotonic() + self.seconds
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self.deadline = time.monotonic() + self.seconds
        return super().executemany(sql, parameters)

    def progress(self) -> int:
        if time.monotonic() <= self.deadline:
            return 0
        self.ran_too_long = True
        return 1  # interrupts the statement


def _harden(db: _Connection, own: bool, query_only: bool) -> None:
    db.seconds = OWN_QUERY_SECONDS if own else QUERY_SECONDS
    db.set_progress_handler(db.progress, 10_000)
    if hasattr(db, "setlimit"):  # Python 3.11+; before, the length() checks alone bound reads
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_BLOB_BYTES)
    db.execute("PRAGMA trusted_schema=OFF")
    db.execute("PRAGMA cell_size_check=ON")
    if query_only:
        db.execute("PRAGMA query_only=ON")


def _uri(path: str, own: bool, write: bool = False) -> str:
    mode = "rw" if write else "ro" if own else "ro&immutable=1"
    return f"{Path(os.path.abspath(path)).as_uri()}?mode={mode}"


def _connect(path: str, own: bool, write: bool = False, timeout: float = 5.0) -> _Connection:
    """A hardened connection to one trace: read-only (``immutable`` unless ``own``), or
    read-write (``write``: the audit's own trace, to fold its log or mark how it ended)."""
    db = sqlite3.connect(
        _uri(path, own, write),
        uri=True,
        timeout=timeout,
        isolation_level=None,
        factory=_Connection,
    )
    try:
        _harden(db, own, query_only=not write)
    except BaseException:
        db.close()
        raise
    return db


def attach_traces(paths: Sequence[str], own: bool = False) -> sqlite3.Connection:
    """An in-memory connection with each trace attached read-only as t0, t1, ..., each as
    inert and bounded as a :class:`Trace` and its schema checked. TraceError if one is not a
    trace; sqlite3.DatabaseError from its queries (see :func:`query_error`)."""
    db = sqlite3.connect(":memory:", uri=True, isolation_level=None, factory=_Connection)
    try:
        _harden(db, own, query_only=False)
        for index, path in enumerate(paths):
            db.execute(f"ATTACH DATABASE ? AS t{index}", (_uri(path, own),))
        db.execute("PRAGMA query_only=ON")
        for index, path in enumerate(paths):
            try:
                check_schema(db, path, f"t{index}")
            except DB_ERRORS as exc:
                raise query_error(path, db, exc, "not a reprocheck trace") from None
    except BaseException:
        db.close()
        raise
    return db


def query_error(
    where: str, db: sqlite3.Connection | None, exc: Exception, what: str = "corrupted trace"
) -> TraceError:
    """The one line a failed query of a trace (``where``: its path) says."""
    if getattr(db, "ran_too_long", False):
        seconds = getattr(db, "seconds", QUERY_SECONDS)
        return TraceError(f"{where}: a query ran too long (over {seconds:g} s): refused")
    why = "text that is not UTF-8" if isinstance(exc, UnicodeDecodeError) else _one_line(exc)
    return TraceError(f"{where}: {what} ({why})")


def _one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else f"{text[:limit]}…"


def _short(value: object, limit: int = 80) -> str:
    """A value from a hostile file, as one short line (repr: no control character)."""
    text = repr(value) if isinstance(value, (str, bytes)) else _one_line(value, limit)
    return text if len(text) <= limit else f"{text[:limit]}…"


@functools.lru_cache(maxsize=1)
def _expected_columns() -> dict[str, list[tuple]]:
    """The tables a TraceWriter creates and their exact columns (as ``table_xinfo`` has them)."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(_DDL)
        return {table: _columns(db, "main", table) for table in _TABLES}
    finally:
        db.close()


def _columns(db: sqlite3.Connection, schema: str, table: str) -> list[tuple]:
    return db.execute(
        'SELECT cid, name, type, "notnull", dflt_value, pk, hidden FROM pragma_table_xinfo(?, ?)',
        (table, schema),
    ).fetchall()


def _schema_problem(db: sqlite3.Connection, path: str, schema: str = "main") -> tuple[str, bool]:
    """What differs between a file's schema and a trace's ("" if nothing), and whether its
    ``meta`` table is exactly a trace's. Made before any other query of the file; anything
    that could run SQL (a trigger, a view, an index, a virtual table) raises TraceError."""
    objects = db.execute(f"SELECT type, name, sql FROM {schema}.sqlite_master").fetchall()
    for kind, name, sql in objects:
        plain = isinstance(sql, str) and re.match(r"\s*CREATE\s+TABLE\s", sql, re.IGNORECASE)
        if kind != "table" or not plain:
            what = "virtual table" if kind == "table" else "object"
            what = kind if kind in ("trigger", "view", "index") else what
            raise TraceError(
                f"{path}: not a reprocheck trace (it holds {what} {_short(name)}: a trace is "
                "only the tables meta, tensors, records, sketches and steps, and no SQL from a "
                "trace is ever run)"
            )
    tables = {name for _, name, _ in objects}
    extra = sorted(str(name) for name in tables - set(_TABLES))
    expected = _expected_columns()
    differ = [t for t in _TABLES if t in tables and _columns(db, schema, t) != expected[t]]
    meta_exact = "meta" in tables and "meta" not in differ
    if extra:
        return f"not a reprocheck trace (it holds table {_short(extra[0])})", meta_exact
    if differ:
        return f"not a reprocheck trace (table {differ[0]} has other columns)", meta_exact
    missing = [t for t in _TABLES if t not in tables]
    if missing:
        return f"corrupted trace (missing table {', '.join(missing)})", meta_exact
    return "", meta_exact


def check_schema(db: sqlite3.Connection, path: str, schema: str = "main") -> None:
    """TraceError unless the file (attached as ``schema``) is exactly a trace's tables."""
    problem, _ = _schema_problem(db, path, schema)
    if problem:
        raise TraceError(f"{path}: {problem}")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _depth(value: object, limit: int) -> int:
    """How deep lists and objects nest in a JSON value (counted up to ``limit + 1``)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend(
                (x, level + 1) for x in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _text_or_null(value: object) -> bool:
    return value is None or isinstance(value, str)


def _object_or_null(value: object) -> bool:
    return value is None or isinstance(value, dict)


# The meta values the readers of ``show``, ``compare`` and ``check`` use, and their types:
# a trace holding another type is refused at opening, naming the file and the key.
_META_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "status": ("a string", lambda v: isinstance(v, str)),
    "error": ("a string or null", _text_or_null),
    "hasher": ("a string or null", _text_or_null),
    "device": ("a string, a list of strings or null", lambda v: _text_or_null(v) or _strings(v)),
    "config": ("an object or null", _object_or_null),
    "environment": ("an object or null", _object_or_null),
    "command": ("a list of strings or null", lambda v: v is None or _strings(v)),
    "packages": (
        "an object of strings or null",
        lambda v: v is None or (isinstance(v, dict) and all(_text_or_null(x) for x in v.values())),
    ),
    "golden": ("an object", lambda v: isinstance(v, dict)),
}
_GOLDEN_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "script": (
        "null or an object with a string 'script' and a list of strings 'arguments'",
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and isinstance(v.get("script"), str)
                and _strings(v.get("arguments"))
            )
        ),
    ),
    "config_sha256": ("a string or null", _text_or_null),
}


def _check_meta_types(path: str, meta: dict[str, Any]) -> None:
    checks = [(key, meta[key], spec) for key, spec in _META_TYPES.items() if key in meta]
    golden = meta.get("golden")
    if isinstance(golden, dict):
        checks += [(f"golden.{k}", golden[k], s) for k, s in _GOLDEN_TYPES.items() if k in golden]
    for key, value, (what, fits) in checks:
        if not fits(value):
            items = list(value.values()) if isinstance(value, dict) else value
            odd = [x for x in items if not isinstance(x, str)] if isinstance(items, list) else []
            held = f" holding {_json_kind(odd[0])}" if odd and _json_kind(value) in what else ""
            raise TraceError(
                f"{path}: corrupted trace metadata ({key} should be {what}, "
                f"not {_json_kind(value)}{held})"
            )


def _read_meta(db: sqlite3.Connection, path: str) -> dict[str, Any]:
    """The ``meta`` table, bounded: entries, characters, types and nesting."""
    count, characters, untyped = db.execute(
        "SELECT count(*), total(length(key)) + total(length(value)), "
        "total(typeof(key) != 'text' OR typeof(value) != 'text') FROM meta"
    ).fetchone()
    if count > MAX_META_KEYS or characters > MAX_META_TOTAL:
        raise TraceError(
            f"{path}: corrupted trace metadata ({count:,} entries, {characters:,.0f} "
            f"characters: more than a trace holds)"
        )
    (key,) = db.execute(
        "SELECT key FROM meta WHERE typeof(key) != 'text' OR typeof(value) != 'text' "
        "OR length(key) > 256 OR length(value) > ? LIMIT 1",
        (MAX_META_VALUE,),
    ).fetchone() or (None,)
    if untyped or key is not None:
        raise TraceError(
            f"{path}: corrupted trace metadata ({_short(key)}: not JSON text of at most "
            f"{MAX_META_VALUE:,} characters)"
        )
    meta: dict[str, Any] = {}
    for key, text in db.execute("SELECT key, value FROM meta").fetchall():
        try:
            value = json.loads(text)
        except RecursionError:
            value, deep = None, True
        except ValueError as exc:
            raise TraceError(
                f"{path}: corrupted trace metadata ({_short(key)}: {_one_line(exc)})"
            ) from None
        else:
            deep = _depth(value, MAX_META_DEPTH) > MAX_META_DEPTH
        if deep:
            raise TraceError(
                f"{path}: corrupted trace metadata ({_short(key)}: nested deeper than "
                f"{MAX_META_DEPTH} levels)"
            )
        meta[key] = value
    return meta


def _dims(shape: str) -> tuple[int, ...] | None:
    """A tensors row's shape (``"64,32"``, ``""`` for a scalar) as dims; None if malformed."""
    return _short_dims(shape) if len(shape) <= 64 else _parse_dims(shape)


def _parse_dims(shape: str) -> tuple[int, ...] | None:
    if not _SHAPE.fullmatch(shape):
        return None
    return tuple(int(d) for d in shape.split(",") if d)


_short_dims = functools.lru_cache(maxsize=4096)(_parse_dims)  # a model's shapes repeat


def _check_file(path: str) -> None:
    """A regular file (a symlink to one is read, never written) that starts as SQLite does."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise TraceError(f"{path}: is a folder, not a trace file")
        if not stat.S_ISREG(info.st_mode):
            raise TraceError(f"{path}: not a reprocheck trace (not a regular file)")
        with open(path, "rb") as head:
            magic = head.read(16)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror or exc})") from None
    if magic != b"SQLite format 3\x00":
        raise TraceError(f"{path}: not a reprocheck trace (not a SQLite file)")


# A step whose row or records are not what a writer writes: declared lengths, read by
# ``length()`` and ``typeof()`` (which read no blob), against the step's record count.
_BAD_STEP = """
SELECT s.step, s.records, typeof(s.records), typeof(s.loss), typeof(s.wall_s), r.step IS NULL,
       typeof(r.tensors), typeof(r.digests), typeof(r.latent_tensors), typeof(r.latent_digests),
       length(r.tensors), length(r.digests), length(r.latent_tensors), length(r.latent_digests)
FROM steps s LEFT JOIN records r ON r.step = s.step
WHERE r.step IS NULL OR typeof(s.records) != 'integer' OR s.records NOT BETWEEN 0 AND ?
   OR typeof(s.loss) NOT IN ('real', 'integer', 'null')
   OR typeof(s.wall_s) NOT IN ('real', 'integer')
   OR typeof(r.tensors) != 'blob' OR typeof(r.digests) != 'blob'
   OR typeof(r.latent_tensors) != 'blob' OR typeof(r.latent_digests) != 'blob'
   OR length(r.tensors) % 4 != 0 OR length(r.latent_tensors) % 4 != 0
   OR length(r.digests) != 4 * length(r.tensors)
   OR length(r.latent_digests) != 4 * length(r.latent_tensors)
   OR length(r.tensors) + length(r.latent_tensors) != 4 * s.records
LIMIT 1
"""


def _step_problem(row: tuple) -> str:
    step, records, records_type, loss_type, wall_type, missing, *rest = row
    types, lengths = rest[:4], rest[4:]
    where = f"step {step}"
    if missing:
        return f"{where}: no records row"
    if records_type != "integer" or not 0 <= records <= MAX_RECORDS_PER_STEP:
        declared = f"{records:,}" if records_type == "integer" else _short(records)
        return f"{where}: {declared} records declared (at most {MAX_RECORDS_PER_STEP:,})"
    if loss_type not in ("real", "integer", "null") or wall_type not in ("real", "integer"):
        return f"{where}: its loss or time is {loss_type}/{wall_type}, not a number"
    for column, kind in zip(_BLOBS, types):
        if kind != "blob":
            return f"{where}: its {column} is {kind}, not a blob"
    ids, digests, latent_ids, latent_digests = lengths
    for column, size in (("tensors", ids), ("latent_tensors", latent_ids)):
        if size % 4:
            return f"{where}: its {column} blob is {size:,} bytes, not a multiple of 4"
    if digests != 4 * ids or latent_digests != 4 * latent_ids:
        return (
            f"{where}: {digests + latent_digests:,} bytes of digests for "
            f"{(ids + latent_ids) // 4:,} tensor ids (16 bytes each)"
        )
    return f"{where}: {(ids + latent_ids) // 4:,} records where it declares {records:,}"


def recover(path: str | os.PathLike) -> int:
    """Fold the step log of one of the audit's own traces, whose writer is gone (killed),
    into the trace; returns how many logged steps it held. Only the audit's own traces are
    ever folded (readers of any other trace never call it). A live writer's log (locked), a
    missing one, one that cannot be folded (a read-only folder, a trace that is not
    exactly a trace's tables), and a trace or log that is not a regular file — a symlink
    above all: nothing one points to is ever written — are left as they are. The log is
    read frame by frame, never past its size nor a frame's bound."""
    if fcntl is None:
        return 0
    path = os.fspath(path)
    log_path = step_log_path(path)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return 0
        log = os.lstat(log_path)
        if not stat.S_ISREG(log.st_mode):
            return 0
        fd = os.open(log_path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (
            log.st_dev,
            log.st_ino,
        ):
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # its writer is alive
        folded = _fold_log(path, fd, info.st_size)
        os.unlink(log_path)
        return folded
    except (OSError, TraceError, *DB_ERRORS):
        return 0  # left for a reader that can fold it; the trace reads as it stands
    finally:
        os.close(fd)


def _read_log(fd: int, size: int) -> Iterator[_LoggedStep]:
    """The whole frames of a step log of ``size`` bytes, read one frame at a time (never
    more than its header declares, never past ``size``); a torn or corrupt frame ends it."""
    at = 0
    while at + _FRAME.size <= size:
        head = os.pread(fd, _FRAME.size, at)
        if len(head) != _FRAME.size:
            return
        length, crc = _FRAME.unpack(head)
        if not _HEAD.size <= length <= min(MAX_FRAME_BYTES, size - at - _FRAME.size):
            return
        payload = os.pread(fd, length, at + _FRAME.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            return
        logged = _LoggedStep.unpack(payload)
        if logged is None:
            return
        yield logged
        at += _FRAME.size + length


def _fold_log(path: str, fd: int, size: int) -> int:
    """Fold a step log into its trace, FOLD_STEPS steps (or MAX_FRAME_BYTES) at a time."""
    db: _Connection | None = None
    batch: list[_LoggedStep] = []
    held = folded = 0
    try:
        for logged in _read_log(fd, size):
            batch.append(logged)
            held += len(logged.ids) + len(logged.digests)
            held += 256 * (len(logged.tensors) + len(logged.sketches))
            if len(batch) >= FOLD_STEPS or held >= MAX_FRAME_BYTES:
                db = db or _open_own(path)
                _insert(db, batch, "INSERT OR IGNORE")
                folded, batch, held = folded + len(batch), [], 0
        if batch:
            db = db or _open_own(path)
            _insert(db, batch, "INSERT OR IGNORE")
            folded += len(batch)
    finally:
        if db is not None:
            db.close()
    return folded


def _open_own(path: str, timeout: float = 5.0) -> _Connection:
    """The audit's own trace, read-write, checked to be exactly a trace's tables first (a
    trigger would run on our writes)."""
    db = _connect(path, own=True, write=True, timeout=timeout)
    try:
        check_schema(db, path)
    except BaseException:
        db.close()
        raise
    return db


class Trace:
    """A trace opened for reading. Raises :class:`TraceError` for anything that is not one.

    ``own``: one of the current audit's run traces (the launcher and the runner reading the
    runs they started): a dead writer's step log is folded in first (:func:`recover`) and a
    live writer's WAL is read. Any other trace — ``show``, ``compare``, ``check --against``,
    a golden — is foreign, hostile input: opened ``immutable``, never written, no file made
    beside it. Either way no SQL from the file runs, the schema must be exactly a
    TraceWriter's before anything else is read, every query has a deadline, and every blob
    and meta value is bounded and type-checked before it is used."""

    def __init__(self, path: str | os.PathLike, own: bool = False) -> None:
        self.path = os.fspath(path)
        self.own = own
        _check_file(self.path)
        if own:
            recover(self.path)  # a killed run's logged steps
        try:
            self.db = _connect(self.path, own)
        except DB_ERRORS as exc:
            raise TraceError(f"{self.path}: cannot open the trace ({_one_line(exc)})") from None
        try:
            self._open()
        except BaseException:
            self.db.close()
            raise

    def _open(self) -> None:
        path, db = self.path, self.db
        try:
            problem, meta_exact = _schema_problem(db, path)  # the first query of the file
        except DB_ERRORS as exc:
            raise query_error(path, db, exc, "not a reprocheck trace") from None
        if problem and not self.own and os.path.isfile(path + "-wal"):
            problem += (
                " — its content is in the -wal file beside it (a run still being written, "
                "or killed), which a foreign trace's reader never reads"
            )
        if problem and not meta_exact:
            raise TraceError(f"{path}: {problem}")
        try:
            self.meta: dict[str, Any] = _read_meta(db, path)
            schema, version = self.meta.get("schema"), self.meta.get("schema_version")
            if schema != SCHEMA:
                raise TraceError(f"{path}: not a reprocheck trace (schema {_short(schema)})")
            if version != SCHEMA_VERSION:
                raise TraceError(
                    f"{path}: trace schema version {_short(version)}, this reprocheck reads "
                    f"{SCHEMA_VERSION} — re-record it with this version"
                )
            if problem:
                raise TraceError(f"{path}: {problem}")
            _check_meta_types(path, self.meta)
            self.steps: list[int] = [
                s for (s,) in db.execute("SELECT step FROM steps ORDER BY step").fetchall()
            ]
            if not self.own:  # the audit's own: its writer's rows, checked as they are read
                self._check_steps()
            self._tensors = self._read_tensors()
            self._sketched = self.has_sketches
        except DB_ERRORS as exc:
            raise query_error(path, db, exc) from None

    def _check_steps(self) -> None:
        """Every step's row and its records' blobs by their declared lengths (no blob is
        read): a record count within bounds, and blobs that hold exactly that many ids and
        digests; no records without a step."""
        bad = self.db.execute(_BAD_STEP, (MAX_RECORDS_PER_STEP,)).fetchone()
        if bad is not None:
            raise TraceError(f"{self.path}: corrupted trace ({_step_problem(bad)})")
        (rows,) = self.db.execute("SELECT count(*) FROM records").fetchone()
        if rows != len(self.steps):  # each step has its row: any other row has no step
            raise TraceError(f"{self.path}: corrupted trace (records of steps not committed)")

    def _read_tensors(self) -> dict[int, tuple[str, str, tuple[int, ...], str]]:
        """id → (phase, name, shape, dtype), every one text of at most MAX_TEXT characters
        and every shape digits and commas."""
        bad = self.db.execute(
            "SELECT id FROM tensors WHERE typeof(phase) != 'text' OR typeof(name) != 'text' "
            "OR typeof(shape) != 'text' OR typeof(dtype) != 'text' "
            "OR max(length(phase), length(name), length(shape), length(dtype)) > ? LIMIT 1",
            (MAX_TEXT,),
        ).fetchone()
        if bad is not None:
            raise TraceError(f"{self.path}: corrupted trace (tensor id {bad[0]} is malformed)")
        tensors = {}
        for tensor, phase, name, shape, dtype in self.db.execute(
            "SELECT id, phase, name, shape, dtype FROM tensors"
        ).fetchall():
            dims = _dims(shape)
            if dims is None:
                raise TraceError(
                    f"{self.path}: corrupted trace (tensor id {tensor}: shape {_short(shape)})"
                )
            tensors[tensor] = (phase, name, dims, dtype)
        return tensors

    def _rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """A query's rows; TraceError naming the file if it fails or runs too long."""
        try:
            return self.db.execute(sql, parameters).fetchall()
        except DB_ERRORS as exc:
            raise query_error(self.path, self.db, exc) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @functools.cached_property
    def run_meta(self) -> RunMeta:
        """The meta, typed (:class:`~reprocheck.contract.RunMeta`)."""
        return RunMeta.of(self.meta)

    @property
    def status(self) -> str:
        """complete | failed | running (a run still going, or one that was killed)."""
        return self.run_meta.status or "running"

    @property
    def error(self) -> str | None:
        return self.run_meta.error

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    @property
    def has_sketches(self) -> bool:
        return bool(self._rows("SELECT 1 FROM sketches LIMIT 1"))

    def _step_records(self, step: int, tensors: bytes, digests: bytes) -> list[Record]:
        if len(tensors) % 4 or len(digests) != len(tensors) // 4 * DIGEST_BYTES:
            raise TraceError(f"{self.path}: corrupted trace (step {step}: records do not match)")
        ids, values = unpack_ids(tensors), split_digests(digests)
        sketches: dict[int, tuple[float, float, float, int] | None] = {}
        if self._sketched:
            for seq, *sketch in self._rows(
                "SELECT seq, sum, sum_sq, absmax, nonfinite FROM sketches WHERE step = ?",
                (step,),
            ):
                if not isinstance(seq, int) or not all(
                    v is None or isinstance(v, (int, float)) for v in sketch
                ):
                    raise TraceError(
                        f"{self.path}: corrupted trace (step {step}: a sketch is not numbers)"
                    )
                sketches[seq] = None if None in sketch else tuple(sketch)  # type: ignore[assignment]
        out = []
        for seq, (tensor, digest) in enumerate(zip(ids, values)):
            key = self._tensors.get(tensor)
            if key is None:
                raise TraceError(f"{self.path}: corrupted trace (unknown tensor id {tensor})")
            phase, name, dims, dtype = key
            sketch = sketches.get(seq)
            out.append(Record(step, seq, phase, name, dims, dtype, bytes(digest), sketch))
        return out

    def records(self, step: int | None = None) -> Iterator[Record]:
        """Records in record order, of one step or of all."""
        if step is None:
            rows = self._rows(f"SELECT step, {_ALL_RECORDS} FROM records ORDER BY step")
        else:
            rows = self._rows(f"SELECT step, {_ALL_RECORDS} FROM records WHERE step = ?", (step,))
        for step_, *blobs in rows:
            if not all(isinstance(blob, bytes) for blob in blobs):
                raise TraceError(f"{self.path}: corrupted trace (step {step_}: not blobs)")
            ids, digests, latent_ids, latent_digests = blobs
            # every record of the step: the observable ones, then the latent ones
            yield from self._step_records(step_, ids + latent_ids, digests + latent_digests)

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

    def phases(self) -> set[str]:
        """The phases this trace holds records of."""
        return {phase for phase, *_ in self._tensors.values()}

    def losses(self) -> dict[int, float | None]:
        return dict(self._rows("SELECT step, loss FROM steps ORDER BY step"))

    def step_rows(self) -> list[tuple[int, int, float | None, float]]:
        """(step, records, loss, wall seconds) of every step, in order."""
        return self._rows("SELECT step, records, loss, wall_s FROM steps ORDER BY step")

    def record_count(self) -> int:
        rows = self._rows("SELECT sum(length(digests) + length(latent_digests)) FROM records")
        return (rows[0][0] or 0) // DIGEST_BYTES


def committed_steps(path: str | os.PathLike) -> int:
    """How many steps one of the audit's own (possibly running) traces has committed; 0 if
    unreadable yet. The steps of a running writer's log count once folded; a dead writer's
    log is folded now."""
    recover(path)
    try:
        db = _connect(os.fspath(path), own=True, timeout=0.5)
        try:
            check_schema(db, os.fspath(path))
            return db.execute("SELECT count(*) FROM steps").fetchone()[0]
        finally:
            db.close()
    except (TraceError, *DB_ERRORS):
        return 0


def _regular(path: str) -> bool:
    """A regular file, not a symlink (nothing a symlink points to is ever written)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def leave_wal(path: str | os.PathLike) -> None:
    """Take one of the audit's own traces whose writer is gone out of WAL mode: that removes
    the ``-wal`` and ``-shm`` files a reader polling the live run (fail-fast, progress) made
    and could not remove itself. Nothing to do, a symlink, or a trace too broken to open:
    left as it is."""
    path = os.fspath(path)
    if not os.path.exists(path + "-wal") and not os.path.exists(path + "-shm"):
        return
    if not _regular(path):
        return
    try:  # no statement runs on a table: a checkpoint, then the journal mode
        db = _connect(path, own=True, write=True, timeout=1)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
    except (TraceError, *DB_ERRORS):
        pass


def mark_ended(path: str | os.PathLike, status: str, error: str) -> None:
    """Record, from outside, how a run that could not say it itself ended (killed, timed out),
    in one of the audit's own traces (never through a symlink)."""
    path = os.fspath(path)
    if not _regular(path):
        return
    recover(path)
    try:
        db = _open_own(path)
    except (TraceError, *DB_ERRORS):
        return  # a trace too broken to annotate: the report still says what happened
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("status", json.dumps(status)),
                ("error", json.dumps(error)),
                ("finished", json.dumps(time.time())),
            ],
        )
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=DELETE")  # out of WAL mode, as finish() leaves it
    except DB_ERRORS:
        pass  # a trace too broken to annotate: the report still says what happened
    finally:
        db.close()
