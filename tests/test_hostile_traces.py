"""Hostile traces: a golden trace from a pull request is input, never code.

Every trace reprocheck did not just write — ``show``, ``compare``, ``check --against`` —
is read read-only and inert: a trigger, a view (a recursive one above all), an index or
another table is refused before anything is read; no file is created, changed or deleted
(the bytes and the folder listing are the same after); a symlinked trace or step log is
never written through; blobs and meta values are bounded before they are read; and every
refusal is one line, exit 2 — or exit 3 for a golden without a training step. A fuzzer
keeps it so: corrupted bytes, random meta values and truncations are read or refused
(TraceError), never another exception, in bounded time, the file unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reprocheck import trace as trace_module
from reprocheck.compare import Tolerance, compare_sketches, first_divergence
from reprocheck.configfile import load_config
from reprocheck.golden import GoldenError, precheck
from reprocheck.trace import (
    Trace,
    TraceError,
    _LoggedStep,
    committed_steps,
    leave_wal,
    mark_ended,
    pack_ids,
    recover,
    step_log_path,
)

from .conftest import CONFIGS, ROOT, run_cli

DEMO = CONFIGS / "demo.yaml"
SECONDS = 10.0  # every read of a hostile trace ends well within this
MEMORY = 1536 << 20  # address space of the children that read the memory-hungry cases


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A real golden trace of the demo config: 2 steps, sketches, the whole meta."""
    folder = tmp_path_factory.mktemp("hostile")
    path = folder / "golden.sqlite"
    result = run_cli(
        "record", str(DEMO), "-o", str(path), "--steps", "2", "--out", str(folder / "out"), "-q"
    )
    assert result.code == 0, result.stderr
    shutil.rmtree(folder / "out")
    return path


@pytest.fixture
def good(golden, tmp_path) -> Path:
    """An untouched copy of the golden, in a folder of its own: the other side of compare."""
    folder = tmp_path / "good"
    folder.mkdir()
    return Path(shutil.copy(golden, folder / "good.sqlite"))


def _copy(golden: Path, folder: Path, name: str = "hostile.sqlite") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(golden, folder / name))


def _edit(path: Path, *statements: str | tuple[str, tuple]) -> None:
    """Change a trace as anyone with sqlite3 could; it is left in rollback-journal mode."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            sql, parameters = statement if isinstance(statement, tuple) else (statement, ())
            db.execute(sql, parameters)
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()


def _state(*folders: Path) -> dict[str, str]:
    """Every entry of the folders: a file by its sha256, a symlink by its target."""
    found = {}
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                found[str(entry)] = f"-> {os.readlink(entry)}"
            elif entry.is_file():
                found[str(entry)] = hashlib.sha256(entry.read_bytes()).hexdigest()
            else:
                found[str(entry)] = "folder" if entry.is_dir() else "other"
    return found


def _one_line(result, code: int, needle: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.code == code, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _commands(path: Path, good: Path, out: Path) -> dict[str, tuple[str, ...]]:
    return {
        "show": ("show", str(path)),
        "compare": ("compare", str(path), str(good)),
        "check -q": ("check", str(DEMO), "--against", str(path), "--out", str(out), "-q"),
        "check": ("check", str(DEMO), "--against", str(path), "--out", str(out)),
    }


def _refused_everywhere(path: Path, good: Path, code: int, needle: str) -> dict[str, str]:
    """``show``, ``compare`` and ``check --against``: each one line, the same exit code, in
    bounded time, no run started, and nothing beside the trace created or changed."""
    out = path.parent.parent / f"out-{path.stem}"
    before = _state(path.parent, good.parent)
    lines = {}
    for name, args in _commands(path, good, out).items():
        started = time.monotonic()
        result = run_cli(*args)
        assert time.monotonic() - started < SECONDS, name
        lines[name] = _one_line(result, code, needle)
        assert _state(path.parent, good.parent) == before, name
    assert not out.exists()  # refused before any run
    return lines


# ------------------------------------------------------------------- refused, one line


HOSTILE = {
    "trigger": (
        ["CREATE TRIGGER wipe AFTER INSERT ON meta BEGIN DELETE FROM steps; END"],
        "it holds trigger 'wipe'",
    ),
    "view in place of steps": (
        [
            "DROP TABLE steps",
            "CREATE VIEW steps AS SELECT step, 1 AS records, NULL AS loss, 0.0 AS wall_s "
            "FROM records",
        ],
        "it holds view 'steps'",
    ),
    "recursive view": (
        [
            "DROP TABLE steps",
            "CREATE VIEW steps(step, records, loss, wall_s) AS WITH RECURSIVE n(i) AS "
            "(SELECT 0 UNION ALL SELECT i + 1 FROM n) SELECT i, 0, NULL, 0.0 FROM n",
        ],
        "it holds view 'steps'",
    ),
    "index": (["CREATE INDEX names ON tensors(name)"], "it holds index 'names'"),
    "another table": (["CREATE TABLE notes (text TEXT)"], "it holds table 'notes'"),
    "another column": (
        ["ALTER TABLE steps ADD COLUMN extra INTEGER"],
        "table steps has other columns",
    ),
    "generated column": (
        ["ALTER TABLE tensors ADD COLUMN big BLOB AS (zeroblob(1000000000)) VIRTUAL"],
        "table tensors has other columns",
    ),
    "odd-length ids": (
        ["UPDATE records SET tensors = x'01020304050607' WHERE step = 1"],
        "corrupted trace (step 1: its tensors blob is 7 bytes, not a multiple of 4)",
    ),
    "digests for other ids": (
        ["UPDATE records SET digests = x'00' WHERE step = 1"],
        "bytes of digests for",
    ),
    "records declared": (
        ["UPDATE steps SET records = 99999999 WHERE step = 1"],
        "step 1: 99,999,999 records declared",
    ),
    "loss as text": (["UPDATE steps SET loss = 'x' WHERE step = 1"], "step 1: its loss or time"),
    "ids as text": (
        ["UPDATE records SET tensors = 'abcd' WHERE step = 1"],
        "step 1: its tensors is text, not a blob",
    ),
    "shape": (["UPDATE tensors SET shape = '2,x' WHERE id = 1"], "shape '2,x'"),
    "deeply nested meta": (
        [("UPDATE meta SET value = ? WHERE key = 'environment'", ("[" * 100_000 + "]" * 100_000,))],
        "corrupted trace metadata ('environment': nested deeper than 32 levels)",
    ),
    "nested 40 levels": (
        [("UPDATE meta SET value = ? WHERE key = 'config'", ("[" * 40 + "]" * 40,))],
        "('config': nested deeper than 32 levels)",
    ),
    "meta not JSON": (
        ["UPDATE meta SET value = '{' WHERE key = 'config'"],
        "corrupted trace metadata ('config': Expecting property name",
    ),
    "meta a blob": (
        ["UPDATE meta SET value = x'7b7d' WHERE key = 'config'"],
        "('config': not JSON text",
    ),
    "meta too long": (
        [("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps("x" * 2_000_000),))],
        "('config': not JSON text of at most 1,048,576 characters)",
    ),
    "environment a string": (
        ["UPDATE meta SET value = '\"cpu\"' WHERE key = 'environment'"],
        "(environment should be an object or null, not a string)",
    ),
    "config a list": (
        ["UPDATE meta SET value = '[1, 2]' WHERE key = 'config'"],
        "(config should be an object or null, not a list)",
    ),
    "status a number": (
        ["UPDATE meta SET value = '5' WHERE key = 'status'"],
        "(status should be a string, not a number)",
    ),
    "command a string": (
        ["INSERT OR REPLACE INTO meta VALUES ('command', '\"python train.py\"')"],
        "(command should be a list of strings or null, not a string)",
    ),
    "packages of numbers": (
        ["UPDATE meta SET value = '{\"torch\": 2}' WHERE key = 'packages'"],
        "(packages should be an object of strings or null, not an object holding a number)",
    ),
    "golden a list": (
        ["UPDATE meta SET value = '[]' WHERE key = 'golden'"],
        "(golden should be an object, not a list)",
    ),
    "golden script": (
        [
            "UPDATE meta SET value = json_set(value, '$.script', json('{\"script\": 3}')) "
            "WHERE key = 'golden'"
        ],
        "(golden.script should be null or an object",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_trace_is_one_line_exit_2_and_left_as_it_is(golden, good, tmp_path, case):
    statements, needle = HOSTILE[case]
    path = _copy(golden, tmp_path / "pr")
    _edit(path, *statements)
    lines = _refused_everywhere(path, good, 2, needle)
    assert all(line.startswith(f"reprocheck: error: {path}: ") for line in lines.values())


def test_the_audits_own_writers_refuse_a_trace_with_a_trigger(golden, tmp_path):
    """Folding a log or marking how a run ended writes: a trigger would run then. A trace
    that is not exactly a trace's tables is never written, even as the audit's own."""
    path = _copy(golden, tmp_path / "run")
    _edit(path, "CREATE TRIGGER wipe AFTER INSERT ON meta BEGIN DELETE FROM steps; END")
    log = Path(step_log_path(path))
    log.write_bytes(_frame(7))
    before = _state(path.parent)
    mark_ended(path, "failed", "killed")
    leave_wal(path)
    assert committed_steps(path) == 0
    assert recover(path) == 0
    with pytest.raises(TraceError, match="it holds trigger 'wipe'"):
        Trace(path, own=True)
    assert _state(path.parent) == before


def test_a_query_past_its_deadline_is_stopped(golden, monkeypatch):
    """Every statement on a trace has a deadline (the schema check is what keeps a hostile
    file's SQL out; this bounds whatever else could run long)."""
    monkeypatch.setattr(trace_module, "QUERY_SECONDS", 0.2)
    forever = "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n"
    with Trace(golden) as trace:
        started = time.monotonic()
        with pytest.raises(TraceError, match=r"a query ran too long \(over 0.2 s\)"):
            trace._rows(forever)
        assert time.monotonic() - started < 2


def test_a_fifo_is_no_trace_and_does_not_hang(good, tmp_path):
    path = tmp_path / "pr" / "fifo.sqlite"
    path.parent.mkdir()
    os.mkfifo(path)
    _refused_everywhere(path, good, 2, "not a reprocheck trace (not a regular file)")


# ----------------------------------------------------------------- empty and step-0 goldens


@pytest.mark.parametrize(
    ("case", "where"), [("empty", "1"), ("step 0 only", "step > 0")], ids=["empty", "step0"]
)
@pytest.mark.parametrize("quiet", [True, False], ids=["q", "loud"])
def test_a_golden_without_a_training_step_is_exit_3_before_any_run(
    golden, tmp_path, case, where, quiet
):
    path = _copy(golden, tmp_path / "pr")
    _edit(path, *(f"DELETE FROM {table} WHERE {where}" for table in ("steps", "records")))
    _edit(path, f"DELETE FROM sketches WHERE {where}")
    out = tmp_path / "out"
    before = _state(path.parent)
    started = time.monotonic()
    result = run_cli(
        "check", str(DEMO), "--against", str(path), "--out", str(out), *(["-q"] if quiet else [])
    )
    assert time.monotonic() - started < SECONDS
    _one_line(result, 3, f"reprocheck: error: {path}: the golden holds no training step")
    assert not out.exists() and _state(path.parent) == before
    shown = run_cli("show", str(path))  # a trace may hold no step: show says so
    assert shown.code == 0 and shown.stderr == ""
    assert ("no step committed" in shown.stdout) == (case == "empty")


# ---------------------------------------------------------------- never written, never made


def _frame(step: int) -> bytes:
    """One whole step-log frame, as a writer appends it: would be folded if it were read."""
    logged = _LoggedStep(step, pack_ids([1]), bytes(16), None, 0.0, [], [], 1)
    return logged.frame()


def test_a_symlinked_trace_is_read_and_nothing_it_points_to_is_written(golden, good, tmp_path):
    target = _copy(golden, tmp_path / "elsewhere", "golden.sqlite")
    link = tmp_path / "pr" / "golden.sqlite"
    link.parent.mkdir()
    link.symlink_to(target)
    Path(step_log_path(link)).write_bytes(_frame(9))  # a dead writer's log, beside the link
    before = _state(target.parent, link.parent)
    for args in (("show", str(link)), ("compare", str(link), str(good))):
        result = run_cli(*args)
        assert result.code == 0 and result.stderr == "", result.stderr
    # even the audit's own readers and writers fold nothing through a symlink
    with Trace(link, own=True) as trace:
        assert trace.steps == [0, 1, 2]
    assert recover(link) == 0 and committed_steps(link) == 3
    mark_ended(link, "failed", "killed")
    leave_wal(link)
    assert _state(target.parent, link.parent) == before


def test_a_symlinked_step_log_is_never_read_nor_removed(golden, tmp_path):
    path = _copy(golden, tmp_path / "run", "run.sqlite")
    elsewhere = tmp_path / "elsewhere" / "log"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(_frame(9))
    Path(step_log_path(path)).symlink_to(elsewhere)
    before = _state(path.parent, elsewhere.parent)
    assert recover(path) == 0
    with Trace(path, own=True) as trace:
        assert trace.steps == [0, 1, 2]
    assert _state(path.parent, elsewhere.parent) == before


def test_a_step_log_that_is_a_fifo_is_not_opened(golden, tmp_path):
    path = _copy(golden, tmp_path / "run", "run.sqlite")
    os.mkfifo(step_log_path(path))
    started = time.monotonic()
    assert recover(path) == 0 and committed_steps(path) == 3
    assert time.monotonic() - started < SECONDS


def test_a_wal_mode_golden_leaves_no_file_beside_it(golden, tmp_path):
    """A golden in WAL mode is read from its own bytes alone: no -wal, no -shm appears,
    and a -wal committed beside it (with other steps in it) is never read nor changed."""
    path = _copy(golden, tmp_path / "pr")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    db.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["hostile.sqlite"]
    out = tmp_path / "out"
    before = _state(path.parent)
    good = _copy(golden, tmp_path / "good", "good.sqlite")
    for args in (("show", str(path)), ("compare", str(path), str(good))):
        result = run_cli(*args)
        assert result.code == 0 and result.stderr == "", result.stderr
    # the whole check: the golden read again after the run, compared and reported
    result = run_cli(
        "check",
        str(DEMO),
        "--against",
        str(path),
        "--steps",
        "2",
        "--out",
        str(out),
        "-q",
        "--json",
        str(tmp_path / "report.json"),
    )
    assert result.code == 0, result.stderr
    assert result.report["golden"]["matches"] is True
    assert result.report["golden"]["comparison"]["identical"] > 0
    assert _state(path.parent) == before

    # a -wal beside it, holding a deletion of every step: ignored, untouched
    source = _copy(golden, tmp_path / "writer", "golden.sqlite")
    writer = sqlite3.connect(source, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("DELETE FROM steps")
    committed = tmp_path / "pr2"
    committed.mkdir()
    for suffix in ("", "-wal", "-shm"):
        shutil.copy(f"{source}{suffix}", committed / f"golden.sqlite{suffix}")
    writer.close()
    before = _state(committed)
    with Trace(committed / "golden.sqlite") as trace:
        assert trace.steps == [0, 1, 2]
    shown = run_cli("show", str(committed / "golden.sqlite"))
    assert shown.code == 0 and "steps 0–2" in shown.stdout
    assert _state(committed) == before


# ------------------------------------------------------------------------ bounded memory


def _in_a_child(body: str) -> dict:
    """Run ``body`` in a fresh interpreter limited to MEMORY of address space; it prints one
    JSON line (``result``), and its peak RSS growth and time come back with it."""
    script = textwrap.dedent(
        """
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
        from reprocheck.trace import Trace, TraceError, committed_steps, recover
        from reprocheck.compare import first_divergence
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.monotonic()
        result = {{}}
        """
    ).format(memory=MEMORY)
    script += textwrap.dedent(body)
    script += textwrap.dedent(
        """
        result["seconds"] = time.monotonic() - started
        result["rss_growth_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss
        ) / 1024
        print(json.dumps(result))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_step_log_pointing_at_dev_zero_is_never_read(golden, good, tmp_path):
    path = _copy(golden, tmp_path / "run", "run.sqlite")
    Path(step_log_path(path)).symlink_to("/dev/zero")
    before = _state(path.parent)
    result = _in_a_child(
        f"""
        path = {str(path)!r}
        result["recovered"] = recover(path)
        with Trace(path, own=True) as trace:
            result["steps"] = trace.steps
        with Trace(path) as trace:
            result["foreign_steps"] = trace.steps
        result["committed"] = committed_steps(path)
        """
    )
    assert result["recovered"] == 0 and result["committed"] == 3
    assert result["steps"] == result["foreign_steps"] == [0, 1, 2]
    assert result["seconds"] < SECONDS and result["rss_growth_mib"] < 64, result
    for args in (("show", str(path)), ("compare", str(path), str(good))):
        assert run_cli(*args).code == 0
    assert _state(path.parent) == before


def _varint(value: int) -> bytes:
    """SQLite's big-endian varint (values below 2**56)."""
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups.reverse()
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def _declaring_a_huge_blob(golden: Path, folder: Path) -> tuple[Path, int]:
    """A ~3 MB trace whose step 1 declares a ~120 MB digests blob: the record's header (its
    payload size and the blob's serial type) rewritten so that the part of the row on its
    page stays the same — only its length says otherwise, and a reader that loaded the blob
    would allocate it first."""
    path = _copy(golden, folder)
    ids, digests = 137_500 * 4, 137_500 * 16  # a consistent step: 137,500 records
    _edit(
        path,
        "DELETE FROM sketches WHERE step = 1",
        (
            "UPDATE records SET tensors = ?, digests = ?, latent_tensors = x'', "
            "latent_digests = x'' WHERE step = 1",
            (pack_ids([1] * (ids // 4)), bytes(digests)),
        ),
        ("UPDATE steps SET records = ? WHERE step = 1", (ids // 4,)),
    )
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    declared = digests + (120_000_000 - digests) // (page - 4) * (page - 4)
    header = 1 + 1 + len(_varint(2 * ids + 12)) + len(_varint(2 * digests + 12)) + 2
    payload = header + ids + digests
    old = _varint(payload) + b"\x01" + bytes([header, 0]) + _varint(2 * ids + 12)
    new = _varint(payload + declared - digests) + old[len(_varint(payload)) :]
    old += _varint(2 * digests + 12) + b"\x0c\x0c"
    new += _varint(2 * declared + 12) + b"\x0c\x0c"
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    (length,) = (
        sqlite3.connect(path)
        .execute("SELECT length(digests) FROM records WHERE step = 1")
        .fetchone()
    )
    assert length == declared > 100_000_000 and declared > 30 * path.stat().st_size
    return path, declared


def test_a_small_trace_declaring_a_huge_blob_is_refused_unread(golden, good, tmp_path):
    path, declared = _declaring_a_huge_blob(golden, tmp_path / "pr")
    needle = f"step 1: {declared:,} bytes of digests for 137,500 tensor ids (16 bytes each)"
    result = _in_a_child(
        f"""
        path, good = {str(path)!r}, {str(good)!r}
        for read in (lambda: Trace(path), lambda: first_divergence([path, good])):
            try:
                read()
                result.setdefault("read", []).append("read")
            except TraceError as exc:
                result.setdefault("read", []).append(str(exc))
        """
    )
    assert result["read"] == [f"{path}: corrupted trace ({needle})"] * 2
    assert result["seconds"] < SECONDS and result["rss_growth_mib"] < 64, result
    _refused_everywhere(path, good, 2, needle)


def test_huge_declared_shapes_are_only_text(golden, good, tmp_path):
    path = _copy(golden, tmp_path / "pr")
    _edit(path, "UPDATE tensors SET shape = '1000000000000,1000000000000' WHERE id = 1")
    before = _state(path.parent)
    shown = run_cli("show", str(path), "--step", "1")
    assert shown.code == 0 and "1000000000000×1000" in shown.stdout
    assert run_cli("compare", str(path), str(good)).code == 1  # a structural divergence
    assert _state(path.parent) == before


# ---------------------------------------------------------------------------------- fuzz

FUZZ_CASES = 120  # ~5 s; 2,000 seeds were run once offline with no failure


def _fuzz_value(rng: random.Random) -> str:
    """A random meta value: valid JSON of any type and depth, or not JSON at all."""
    choice = rng.randrange(8)
    if choice == 0:
        return json.dumps(rng.choice(["", "x" * rng.randrange(1, 5000), "\x1b[2J", "\ud800"]))
    if choice == 1:
        return json.dumps(rng.choice([0, -1, 2**70, 1.5, float("inf"), True, None]))
    if choice == 2:
        depth = rng.randrange(1, 60)
        return "[" * depth + "]" * depth
    if choice == 3:
        return json.dumps({"script": rng.choice([None, 1, "a", {"script": "x"}]), "name": []})
    if choice == 4:
        return json.dumps([rng.random() for _ in range(rng.randrange(50))])
    if choice == 5:
        return rng.choice(["{", "[1,", "nul", "", "'x'", "1" * 5000, '{"a": NaN}'])
    if choice == 6:
        return json.dumps({str(i): {"x": [i]} for i in range(rng.randrange(20))})
    return json.dumps("y" * rng.randrange(10))


def _fuzz_cell(rng: random.Random) -> object:
    return rng.choice(
        [
            None,
            0,
            -(2**63),
            2**63 - 1,
            1.5,
            float("inf"),
            "",
            "x" * 9,
            "2,3",
            b"",
            b"\x01" * 7,
            bytes(16),
            bytes(rng.randrange(1, 100)),
        ]
    )


_KEYS = {"meta": ("key",), "sketches": ("step", "seq")}  # WITHOUT ROWID tables
_COLUMNS = {
    "meta": ["value"],
    "tensors": ["phase", "name", "shape", "dtype"],
    "records": ["tensors", "digests", "latent_tensors", "latent_digests"],
    "sketches": ["sum", "sum_sq", "absmax", "nonfinite", "seq"],
    "steps": ["records", "loss", "wall_s", "step"],
}


def _mutate(rng: random.Random, base: bytes, path: Path) -> str:
    """One corrupted copy of ``base`` at ``path``; returns what was done."""
    kind = rng.choice(["bytes", "truncate", "meta", "cell"])
    if kind == "bytes":
        data = bytearray(base)
        for _ in range(rng.randrange(1, 24)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(base[: rng.randrange(len(base))])
    elif kind == "meta":
        path.write_bytes(base)
        keys = [
            "config",
            "environment",
            "golden",
            "status",
            "error",
            "hasher",
            "packages",
            "command",
            "device",
            "schema",
            "schema_version",
            "leg",
            "run",
        ]
        for _ in range(rng.randrange(1, 4)):
            _edit(
                path,
                ("INSERT OR REPLACE INTO meta VALUES (?, ?)", (rng.choice(keys), _fuzz_value(rng))),
            )
    else:
        path.write_bytes(base)
        for _ in range(rng.randrange(1, 4)):
            table = rng.choice(sorted(_COLUMNS))
            column = rng.choice(_COLUMNS[table])
            keys = _KEYS.get(table, ("rowid",))
            db = sqlite3.connect(path)
            try:
                row = db.execute(
                    f"SELECT {', '.join(keys)} FROM {table} ORDER BY random() LIMIT 1"
                ).fetchone()
            finally:
                db.close()
            if row is None:
                continue
            where = " AND ".join(f"{key} = ?" for key in keys)
            with contextlib.suppress(sqlite3.IntegrityError):  # NOT NULL, a taken key
                _edit(
                    path,
                    (f"UPDATE {table} SET {column} = ? WHERE {where}", (_fuzz_cell(rng), *row)),
                )
    return kind


def _read_everything(path: Path, good: Path, config) -> str:
    """Every reader ``show``, ``compare`` and ``check`` use: read, or refused (TraceError,
    GoldenError), never anything else."""
    outcome = "read"
    try:
        with Trace(path) as trace:
            list(trace.records())
            trace.losses(), trace.step_rows(), trace.record_count(), trace.phases()
            assert isinstance(trace.run_meta.config, (dict, type(None))), (
                trace.status,
                trace.error,
            )
    except TraceError:
        outcome = "refused"
    for read in (
        lambda: first_divergence([str(path), str(good)]),
        lambda: compare_sketches(str(path), str(good), Tolerance(rtol=1e-5), ("a", "b")),
        lambda: precheck(str(path), config, None, False),
    ):
        try:
            read()
        except (TraceError, GoldenError):
            outcome = "refused"
    for args in (
        ("show", str(path)),
        ("show", str(path), "--step", "1"),
        ("compare", str(path), str(good)),
        ("compare", str(path), str(good), "--tolerance", "rtol=1e-5,atol=1e-6"),
    ):
        result = run_cli(*args)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.code in (0, 1, 2, 3), (args, result.code, result.stderr)
        if result.code == 2:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return outcome


def test_fuzzed_traces_are_read_or_refused_never_a_traceback(golden, good, tmp_path):
    base = golden.read_bytes()
    config = load_config(DEMO)
    stats: collections.Counter = collections.Counter()
    slowest = 0.0
    for k in range(FUZZ_CASES):
        rng = random.Random(k)
        folder = tmp_path / f"case{k}"
        folder.mkdir()
        path = folder / "trace.sqlite"
        kind = _mutate(rng, base, path)
        before = _state(folder, good.parent)
        started = time.monotonic()
        outcome = _read_everything(path, good, config)
        took = time.monotonic() - started
        assert took < SECONDS, (k, kind)
        assert _state(folder, good.parent) == before, (k, kind)
        slowest = max(slowest, took)
        stats[kind, outcome] += 1
        shutil.rmtree(folder)
    print(f"fuzz: {dict(sorted(stats.items()))}, slowest case {slowest:.3f} s")
    assert sum(stats.values()) == FUZZ_CASES
    assert {outcome for _, outcome in stats} == {"read", "refused"}  # both kinds were met
