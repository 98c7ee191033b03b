"""The trace file: crash safety, reading back, refusing what is not a trace."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from reprocheck.compare import first_divergence
from reprocheck.trace import SCHEMA_VERSION, Trace, TraceError, TraceWriter


def _write(path: Path, steps: int, digest_at: dict[tuple[int, int], bytes] | None = None) -> None:
    writer = TraceWriter(path, {"hasher": "test"})
    for step in range(steps):
        ids = [writer.tensor_id("weights", name, (2, 3), "float32") for name in ("a", "b", "c")]
        rows = [
            (tid, (digest_at or {}).get((step, seq), bytes([seq]) * 16))
            for seq, tid in enumerate(ids)
        ]
        writer.write_step(step, rows, None, loss=None, wall_s=0.0)
    writer.finish("complete")


def test_round_trip(tmp_path):
    _write(tmp_path / "t.sqlite", 3)
    with Trace(tmp_path / "t.sqlite") as trace:
        assert trace.status == "complete"
        assert trace.steps == [0, 1, 2]
        records = list(trace.records(1))
        assert [(r.phase, r.name, r.shape, r.dtype) for r in records] == [
            ("weights", "a", (2, 3), "float32"),
            ("weights", "b", (2, 3), "float32"),
            ("weights", "c", (2, 3), "float32"),
        ]
        assert records[2].digest == bytes([2]) * 16
        assert trace.record_count() == 9


def test_first_divergence_finds_the_earliest_record(tmp_path):
    _write(tmp_path / "a.sqlite", 5)
    _write(tmp_path / "b.sqlite", 5, {(3, 1): b"x" * 16, (4, 0): b"y" * 16})
    found = first_divergence([str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")])
    assert (found.step, found.seq, found.phase, found.tensor) == (3, 1, "weights", "b")
    assert found.runs == [[0], [1]]
    assert first_divergence([str(tmp_path / "a.sqlite")] * 2) is None


def test_three_runs_grouped_by_digest(tmp_path):
    for name in "abc":
        _write(tmp_path / f"{name}.sqlite", 3, {(2, 0): b"z" * 16} if name == "c" else None)
    found = first_divergence([str(tmp_path / f"{n}.sqlite") for n in "abc"])
    assert found.runs == [[0, 1], [2]]


def test_extra_record_in_second_trace_is_a_structural_divergence(tmp_path):
    _write(tmp_path / "a.sqlite", 2)
    writer = TraceWriter(tmp_path / "b.sqlite", {})
    for step in range(2):
        ids = [writer.tensor_id("weights", n, (2, 3), "float32") for n in ("a", "b", "c")]
        rows = [(tid, bytes([seq]) * 16) for seq, tid in enumerate(ids)]
        if step == 1:
            rows.append((writer.tensor_id("rng", "extra", (1,), "int64"), b"e" * 16))
        writer.write_step(step, rows, None, None, 0.0)
    writer.finish("complete")
    found = first_divergence([str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")])
    assert (found.step, found.seq, found.kind) == (1, 3, "structure")


def test_killed_writer_keeps_committed_steps(tmp_path):
    """SIGKILL in the middle of a run: every committed step survives, status says running."""
    path = tmp_path / "k.sqlite"
    script = f"""
import time
from reprocheck.trace import TraceWriter
w = TraceWriter({str(path)!r}, {{}})
step = 0
while True:
    tid = w.tensor_id("weights", "w", (1,), "float32")
    w.write_step(step, [(tid, bytes(16))], None, None, 0.0)
    step += 1
    if step == 5:
        print("ready", flush=True)
        time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Trace(path, own=True) as trace:  # the audit's own trace: its log is folded
        assert trace.steps == [0, 1, 2, 3, 4]
        assert trace.status == "running"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such trace file"),
        (b"", "not a SQLite file"),
        (b"hello world, not a database at all", "not a SQLite file"),
        (b"SQLite format 3\x00" + b"\x00" * 100, "not a reprocheck trace"),
    ],
)
def test_not_a_trace(tmp_path, content, message):
    path = tmp_path / "x.sqlite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        Trace(path)


def test_foreign_sqlite_and_wrong_version(tmp_path):
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE people (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(TraceError, match="not a reprocheck trace"):
        Trace(foreign)
    _write(tmp_path / "old.sqlite", 1)
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(TraceError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Trace(tmp_path / "old.sqlite")


def test_truncated_trace_is_a_clear_error(tmp_path):
    _write(tmp_path / "t.sqlite", 50)
    data = (tmp_path / "t.sqlite").read_bytes()
    (tmp_path / "cut.sqlite").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError):
        trace = Trace(tmp_path / "cut.sqlite")
        list(trace.records())


def test_writer_refuses_to_overwrite(tmp_path):
    _write(tmp_path / "t.sqlite", 1)
    with pytest.raises(FileExistsError):
        TraceWriter(tmp_path / "t.sqlite", {})


def test_a_step_is_one_row_and_reads_back_in_order(tmp_path):
    """A step's records are two blobs (ids, digests) in one row; reading them back gives
    each record its place, and a step without records is allowed."""
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    ids = [writer.tensor_id("grads", f"t{i}", (1,), "float32") for i in range(300)]
    writer.write_step(1, [(tid, bytes([i % 256]) * 16) for i, tid in enumerate(ids)], None, None, 0)
    writer.write_step(2, [], None, None, 0.0)
    writer.finish("complete")
    with Trace(tmp_path / "t.sqlite") as trace:
        records = list(trace.records(1))
        assert [r.name for r in records] == [f"t{i}" for i in range(300)]
        assert [r.digest[0] for r in records] == [i % 256 for i in range(300)]
        assert trace.record(1, 299).name == "t299" and trace.record(1, 300) is None
        assert list(trace.records(2)) == [] and trace.record_count() == 300
        (row,) = trace.db.execute(
            "SELECT length(tensors), length(digests) FROM records WHERE step = 1"
        )
    assert row == (300 * 4, 300 * 16)


def test_traces_with_ids_assigned_differently_compare_by_meaning(tmp_path):
    """Two traces whose tensor ids differ (registered in another order) still compare
    record by record on what the ids stand for."""
    paths = []
    for name, order in (("a", ["x", "y"]), ("b", ["y", "x"])):
        writer = TraceWriter(tmp_path / f"{name}.sqlite", {})
        ids = {n: writer.tensor_id("weights", n, (2,), "float32") for n in order}
        for step in range(3):
            digest_y = bytes([9 if (name == "b" and step == 2) else 1]) * 16
            writer.write_step(step, [(ids["x"], bytes(16)), (ids["y"], digest_y)], None, None, 0)
        writer.finish("complete")
        paths.append(str(tmp_path / f"{name}.sqlite"))
    found = first_divergence(paths)
    assert (found.step, found.phase, found.tensor) == (2, "weights", "y")
