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
``write()`` returns, and the first reader after the writer died (the audit, or
:class:`Trace`) folds it in — the writer holds a ``flock`` on the log while it lives, so
readers of a running trace see the folded steps only. Folding is idempotent
(``INSERT OR IGNORE``), so a crash between a fold's commit and the log's truncation loses
nothing and doubles nothing.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import sqlite3
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import jsonout
from .config import TRACE_PHASES

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


class TraceWriter:
    """Writes one run's trace. Each :meth:`write_step` is durable when it returns (see the
    module's notes on the step log); :meth:`finish` folds everything into SQLite."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"trace already exists: {self.path}")
        # one connection, used under `_lock` by the run's thread and the folding thread
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
        self._db.executescript(_DDL)
        self._ids: dict[tuple[str, str, str, str], int] = {}
        self._pending_tensors: list[tuple[int, str, str, str, str]] = []
        base = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "status": "running"}
        base["started"] = time.time()
        self._put_meta({**base, **meta})
        # Locked before it appears under its name: a reader never finds a live writer's log
        # unlocked (and so never folds and removes it).
        fresh = f"{step_log_path(self.path)}.{os.getpid()}"
        self._log = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        _OPEN_LOGS.add(self._log)
        if fcntl is not None:
            fcntl.flock(self._log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(fresh, step_log_path(self.path))
        self._unfolded: list[_LoggedStep] = []
        self._folded_at = time.monotonic()
        self._closed = threading.Event()
        self._folder: threading.Thread | None = None

    def _put_meta(self, items: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(key, jsonout.dumps(value)) for key, value in items.items()],
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
        logged = _LoggedStep(
            step, ids, digests, loss, wall_s, self._pending_tensors, sketches, observed
        )
        self._pending_tensors = []
        frame = logged.frame()
        with self._lock:
            if os.write(self._log, frame) != len(frame):
                raise OSError(f"{step_log_path(self.path)}: short write (is the disk full?)")
            self._unfolded.append(logged)
            if (
                len(self._unfolded) >= FOLD_STEPS
                or time.monotonic() - self._folded_at >= FOLD_SECONDS
            ):
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
                    return  # the run's own next fold meets the error and raises it

    def fold(self) -> None:
        """Commit the logged steps to SQLite in one transaction, then empty the log."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        if self._unfolded:
            _insert(self._db, self._unfolded, "INSERT")
            os.ftruncate(self._log, 0)
            self._unfolded = []
        self._folded_at = time.monotonic()

    def finish(self, status: str, error: str | None = None, **meta: Any) -> None:
        """Mark the run complete or failed (with its error line) and close the file."""
        self._closed.set()
        if self._folder is not None and self._folder is not threading.current_thread():
            self._folder.join(timeout=5)
        self.fold()
        self._put_meta({"status": status, "error": error, "finished": time.time(), **meta})
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            # a finished trace leaves WAL mode: a read-only reader of a WAL database makes
            # -wal and -shm files it cannot remove (empty ones left in the report folder)
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.close()
        _OPEN_LOGS.discard(self._log)
        os.close(self._log)  # releases the lock
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
    def parse(data: bytes) -> list[_LoggedStep]:
        """The whole frames of a step log; a torn or corrupt tail is where it ends."""
        out, at = [], 0
        while at + _FRAME.size <= len(data):
            size, crc = _FRAME.unpack_from(data, at)
            payload = data[at + _FRAME.size : at + _FRAME.size + size]
            if len(payload) != size or size < _HEAD.size or zlib.crc32(payload) != crc:
                break
            step, loss, wall_s, has_loss, id_bytes, observed, extra_bytes = _HEAD.unpack_from(
                payload
            )
            digest_bytes = id_bytes // 4 * DIGEST_BYTES
            if _HEAD.size + id_bytes + digest_bytes + extra_bytes != size:
                break
            body = payload[_HEAD.size :]
            tensors, sketches = (
                json.loads(body[id_bytes + digest_bytes :]) if extra_bytes else ([], [])
            )
            out.append(
                _LoggedStep(
                    step,
                    body[:id_bytes],
                    body[id_bytes : id_bytes + digest_bytes],
                    loss if has_loss else None,
                    wall_s,
                    [tuple(t) for t in tensors],
                    [tuple(s) for s in sketches],
                    observed,
                )
            )
            at += _FRAME.size + size
        return out


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


def recover(path: str | os.PathLike) -> int:
    """Fold the step log of a trace whose writer is gone (killed) into the trace; returns
    how many logged steps it held. A live writer's log (locked), a missing one, or one that
    cannot be folded (a read-only folder) is left as it is."""
    log_path = step_log_path(path)
    if fcntl is None or not os.path.exists(log_path):
        return 0
    try:
        fd = os.open(log_path, os.O_RDWR)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # its writer is alive
        with os.fdopen(os.dup(fd), "rb") as log:
            steps = _LoggedStep.parse(log.read())
        if steps:
            db = sqlite3.connect(os.fspath(path), timeout=5, isolation_level=None)
            try:
                _insert(db, steps, "INSERT OR IGNORE")
            finally:
                db.close()
        os.unlink(log_path)
        return len(steps)
    except (OSError, sqlite3.Error, ValueError, struct.error):
        return 0  # left for a reader that can fold it; the trace reads as it stands
    finally:
        os.close(fd)


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
        recover(self.path)  # a killed run's logged steps
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
                    f"SELECT step, {_ALL_RECORDS} FROM records ORDER BY step"
                ).fetchall()
            else:
                cursor = self.db.execute(
                    f"SELECT step, {_ALL_RECORDS} FROM records WHERE step = ?", (step,)
                ).fetchall()
            for step_, ids, digests, latent_ids, latent_digests in cursor:
                # every record of the step: the observable ones, then the latent ones
                yield from self._step_records(step_, ids + latent_ids, digests + latent_digests)
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

    def phases(self) -> set[str]:
        """The phases this trace holds records of."""
        return {phase for phase, *_ in self._tensors.values()}

    def losses(self) -> dict[int, float | None]:
        return dict(self.db.execute("SELECT step, loss FROM steps ORDER BY step"))

    def record_count(self) -> int:
        total = self.db.execute(
            "SELECT sum(length(digests) + length(latent_digests)) FROM records"
        ).fetchone()[0]
        return (total or 0) // DIGEST_BYTES


def committed_steps(path: str | os.PathLike) -> int:
    """How many steps a (possibly running) trace has committed; 0 if unreadable yet. The
    steps of a running writer's log count once folded; a dead writer's log is folded now."""
    recover(path)
    try:
        db = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=0.5)
        try:
            return db.execute("SELECT count(*) FROM steps").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def leave_wal(path: str | os.PathLike) -> None:
    """Take a trace whose writer is gone out of WAL mode: that removes the ``-wal`` and
    ``-shm`` files a reader polling the live run (fail-fast, progress) made and could not
    remove itself. Nothing to do, or a trace too broken to open: left as it is."""
    if not os.path.exists(os.fspath(path) + "-wal") and not os.path.exists(
        os.fspath(path) + "-shm"
    ):
        return
    try:
        db = sqlite3.connect(os.fspath(path), timeout=1)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
    except sqlite3.Error:
        pass


def mark_ended(path: str | os.PathLike, status: str, error: str) -> None:
    """Record, from outside, how a run that could not say it itself ended (killed, timed out)."""
    recover(path)
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
        db.execute("PRAGMA journal_mode=DELETE")  # out of WAL mode, as finish() leaves it
    except sqlite3.Error:
        pass  # a trace too broken to annotate: the report still says what happened
    finally:
        db.close()
