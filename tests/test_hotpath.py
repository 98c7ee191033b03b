"""The recorder's fast paths and the trace's step log: each shortcut gives exactly what the
careful way gives, and a killed writer loses no step it wrote."""

from __future__ import annotations

import importlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reprocheck.config import PHASES
from reprocheck.fingerprint import fingerprint
from reprocheck.recorder import StepRecorder, rng_states
from reprocheck.trace import Trace, TraceWriter, recover, step_log_path

fp = importlib.import_module("reprocheck.fingerprint")


@pytest.fixture(params=["xxh3-128", "torchmix-128"])
def hasher(request, monkeypatch):
    monkeypatch.setattr(fp, "_FORCE_TORCHMIX", request.param == "torchmix-128")
    return request.param


def _expected(named):
    return [(name, fingerprint(t).value) for name, t in named]


def test_every_record_equals_fingerprint_whichever_path_it_takes(tmp_path, hasher):
    """Plain, requires-grad, non-contiguous, bf16, conjugate, 0-d and bool tensors, and
    kept weights that change in place, by `.data` swaps, dtype views and transposes: the
    trace holds `fingerprint()` of each at the moment it was recorded."""
    param = torch.nn.Parameter(torch.randn(4, 4))
    buffer = torch.zeros(4, 4)
    square = torch.arange(16.0).reshape(4, 4)
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    recorder = StepRecorder(writer, PHASES)
    changes = [
        lambda: None,
        lambda: param.data.add_(1.0),
        lambda: buffer.add_(2.0),
        lambda: setattr(param, "data", torch.randn(4, 4)),
        lambda: setattr(buffer, "data", buffer.data.view(torch.int32)),
        lambda: square.t_(),  # same storage and shape, no longer contiguous
        lambda: square.t_(),
        lambda: setattr(param, "data", param.data.view(torch.float32)[:2]),
    ]
    expected = {}
    for step, change in enumerate(changes):
        change()
        recorder.begin(step)
        data = [
            ("input", torch.randn(3, 5)),
            ("mask", torch.rand(6) > 0.5),
            ("strided", torch.randn(5, 3).t()),
            ("half", torch.randn(4).bfloat16()),
            ("complex", torch.randn(3, dtype=torch.complex64).conj()),
        ]
        outputs = [("output", torch.randn(2, 2, requires_grad=True) * 2)]
        weights = [("w", param), ("b", buffer), ("sq", square), ("count", step)]
        recorder.add_all("data", data)
        recorder.add_all("outputs", outputs)
        recorder.add_state("weights", weights)
        as_tensors = [
            (n, t if isinstance(t, torch.Tensor) else torch.tensor(t)) for n, t in weights
        ]
        expected[step] = _expected(data + outputs + as_tensors)
        recorder.commit(step, None)
    writer.finish("complete")
    with Trace(writer.path) as trace:
        assert trace.steps == list(range(len(changes)))
        for step, records in expected.items():
            got = [(r.name, r.digest) for r in trace.records(step)]
            assert got == records, f"step {step}"


def test_kept_views_are_only_those_of_the_last_step(tmp_path):
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    recorder = StepRecorder(writer, ["weights"])
    for step in range(3):
        recorder.begin(step)
        recorder.add_state("weights", [(f"w{step}", torch.zeros(2)), ("kept", torch.ones(2))])
        recorder.commit(step, None)
    assert sorted(recorder._kept["weights"]) == ["kept", "w2"]
    writer.finish("complete")


def test_python_and_numpy_rng_shortcuts_are_exact():
    """`random` is read through the generator's raw words, NumPy through the MT19937
    bytes: after any sequence of draws the recorded states equal `getstate()`."""
    draws = [
        lambda: None,
        lambda: random.random(),
        lambda: None,
        lambda: random.gauss(0, 1),  # fills the gauss cache
        lambda: random.gauss(0, 1),  # uses it: the words are unchanged
        lambda: random.seed(3),
        lambda: random.setstate(random.getstate()),
        lambda: random.getrandbits(200),
        lambda: np.random.normal(),
        lambda: random.shuffle([1, 2, 3]),
    ]
    random.seed(0)
    for draw in draws:
        draw()
        recorded = dict(rng_states())
        _, internal, gauss = random.getstate()
        assert torch.equal(recorded["random"], torch.tensor(internal, dtype=torch.int64))
        expected_gauss = float("nan") if gauss is None else gauss
        assert recorded["random.gauss"].item() == pytest.approx(expected_gauss, nan_ok=True)
        _, keys, pos, has_gauss, _ = np.random.get_state()
        expected_numpy = np.append(keys.astype(np.int64), [pos, has_gauss])
        assert torch.equal(recorded["numpy"], torch.from_numpy(expected_numpy))


def _steps(writer: TraceWriter, steps: range) -> None:
    for step in steps:
        tid = writer.tensor_id("weights", "w", (1,), "float32")
        writer.write_step(step, [(tid, bytes([step]) * 16)], None, float(step), 0.0)


def test_readers_of_a_live_trace_see_folded_steps_and_finish_folds_all(tmp_path):
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    _steps(writer, range(3))  # well within a fold interval: still in the log
    assert os.path.getsize(step_log_path(writer.path)) > 0
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == []  # the live writer holds the log; nothing is half-read
    writer.fold()
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == [0, 1, 2]
    _steps(writer, range(3, 5))
    writer.finish("complete")
    assert not os.path.exists(step_log_path(writer.path))
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == [0, 1, 2, 3, 4]
        assert trace.losses() == {s: float(s) for s in range(5)}
        assert trace.find(4, "weights", "w").digest == bytes([4]) * 16


def test_a_dead_writers_log_is_folded_once_and_a_torn_frame_is_dropped(tmp_path):
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    _steps(writer, range(4))
    log = step_log_path(writer.path)
    logged = Path(log).read_bytes()
    writer.fold()  # steps 0-3 in SQLite, the log emptied ...
    Path(log).write_bytes(logged)  # ... and back as if the process died before emptying it
    _steps(writer, range(4, 6))
    frame = (os.path.getsize(log) - len(logged)) // 2  # steps 4 and 5 log alike
    with open(log, "ab") as handle:  # step 5 again, cut off mid-write
        handle.write(Path(log).read_bytes()[-frame:][:-5])
    os.close(writer._log)  # the writer dies: its lock goes with it
    assert recover(writer.path) == 6
    assert not os.path.exists(log)
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == [0, 1, 2, 3, 4, 5]
        assert trace.record_count() == 6
        assert [trace.find(s, "weights", "w").digest[0] for s in trace.steps] == list(range(6))


def test_a_forked_child_does_not_keep_a_killed_writers_log_locked(tmp_path):
    """A DataLoader worker forked by the training process outlives it by seconds; the
    log must be foldable as soon as the writer is gone."""
    path = tmp_path / "k.sqlite"
    script = f"""
import os, time
from reprocheck.trace import TraceWriter
w = TraceWriter({str(path)!r}, {{}})
for step in range(5):
    tid = w.tensor_id("weights", "w", (1,), "float32")
    w.write_step(step, [(tid, bytes(16))], None, None, 0.0)
ready, said = os.pipe()
child = os.fork()
if child == 0:  # the fork's handlers have run once the child runs Python code
    os.write(said, b"x")
    time.sleep(60)
    os._exit(0)
os.read(ready, 1)  # the child is past them: a kill now cannot race them
print(child, flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child lives on
        with Trace(path, own=True) as trace:
            assert trace.steps == [0, 1, 2, 3, 4]
    finally:
        os.kill(child, signal.SIGKILL)


def test_logged_steps_are_folded_in_a_hang_and_when_due(tmp_path, monkeypatch):
    """Readers (progress, fail-fast) see a run's steps within ~2 fold intervals even when
    the run then hangs; a write folds itself once FOLD_STEPS steps are waiting."""
    import reprocheck.trace as trace_module

    monkeypatch.setattr(trace_module, "FOLD_SECONDS", 0.05)
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    log = step_log_path(writer.path)
    _steps(writer, range(2))  # ... and the run hangs
    deadline = time.monotonic() + 10
    while os.path.getsize(log) and time.monotonic() < deadline:
        time.sleep(0.01)
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == [0, 1]
    monkeypatch.setattr(trace_module, "FOLD_SECONDS", 100.0)
    monkeypatch.setattr(trace_module, "FOLD_STEPS", 3)
    time.sleep(0.1)  # the folding thread now waits for 50 s
    _steps(writer, range(2, 4))
    assert os.path.getsize(log) > 0
    _steps(writer, range(4, 5))  # the third step waiting: folded by the write itself
    assert os.path.getsize(log) == 0
    with Trace(writer.path, own=True) as trace:
        assert trace.steps == [0, 1, 2, 3, 4]
    writer.finish("complete")


def test_recording_leaves_every_storage_resizable(tmp_path):
    """`.numpy()` would mark a storage non-resizable for good; FSDP2 frees and regrows the
    storage of every unsharded parameter, so no record may touch that flag."""
    weight = torch.nn.Parameter(torch.randn(4, 4))
    data = torch.randn(3, 4)
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    recorder = StepRecorder(writer, PHASES)
    for step in range(2):  # the second step hashes the weight from its kept view
        recorder.begin(step)
        recorder.add_all("data", [("x", data)])
        recorder.add_state("weights", [("w", weight)])
        recorder.commit(step, None)
    fingerprint(torch.ones(3))
    writer.finish("complete")
    for tensor in (weight, data):
        tensor.data.untyped_storage().resize_(0)  # raises for a non-resizable storage
        assert tensor.untyped_storage().nbytes() == 0
