"""Faults that end an audit from outside, each of which must end cleanly: the audit's own
process killed (nothing it started keeps running: docs/architecture.md, "When the audit
dies"), and a full disk under the audit's folder (a failed run that says so, exit 3)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reprocheck import trace as trace_module
from reprocheck.trace import Trace, TraceFull, TraceWriter

from .conftest import ROOT, run_cli
from .strict_json import load_strict

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="walks /proc for the audit's processes"
)

# Trains forever, slowly, and says it runs: a file named by its pid in ALIVE. With
# `--detached`, it first starts a process of its own in a session of its own (which leaves
# the run's group, as torchrun's ranks do), named in ALIVE too.
SLEEPER = """\
import os, subprocess, sys, time
import torch

alive = sys.argv[1]
if "--detached" in sys.argv:
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    open(os.path.join(alive, f"{child.pid}.detached"), "w").close()
if "RANK" in os.environ:
    import torch.distributed as dist

    dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
open(os.path.join(alive, f"{os.getpid()}.pid"), "w").close()
for step in range(10**6):
    loss = model(torch.ones(2, 4)).sum()
    optimizer.zero_grad()
    loss.backward()
    if "RANK" in os.environ:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    optimizer.step()
    time.sleep(0.2)
"""


def _table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            found[int(entry)] = (int(fields[1]), fields[0].decode())
    return found


def _descendants(pid: int) -> set[int]:
    table = _table()
    found, stack = set(), [pid]
    while stack:
        parent = stack.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those still running (a zombie has ended: only its parent has not reaped it)."""
    table = _table()
    return {pid for pid in pids if pid in table and table[pid][1] not in ("Z", "X")}


def _kill_the_audit_and_see_everything_end(tmp_path, command, runs_alive, env=None):
    """Start ``reprocheck exec … -- COMMAND ALIVE`` in a fresh interpreter, wait for
    ``runs_alive`` training processes, note every process below the audit, SIGKILL the
    audit and give them 5 s to have ended."""
    alive = tmp_path / "alive"
    alive.mkdir()
    started: dict[int, str] = {}
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    audit = subprocess.Popen(
        [sys.executable, "-m", "reprocheck", "exec", "-n", "2", "--jobs", "2", "-q"]
        + ["--no-attribute", "--out", str(tmp_path / "out"), "--", *command(str(alive))],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(alive.glob("*.pid"))) < runs_alive:
            assert audit.poll() is None, audit.stderr.read().decode()
            assert time.monotonic() < deadline, "the runs never started"
            time.sleep(0.1)
        started.update({pid: _cmdline(pid) for pid in _descendants(audit.pid)})
        marked = {int(p.stem) for p in alive.iterdir()}
        assert marked <= set(started), "a training process is not below the audit"
        os.kill(audit.pid, signal.SIGKILL)
        audit.wait()
        deadline = time.monotonic() + 5
        while _alive(set(started)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _alive(set(started))
        assert not left, {pid: started[pid] for pid in left}
        return started, marked
    finally:
        if audit.poll() is None:
            audit.kill()
            audit.wait()
        for pid in _alive(set(started) | _descendants(audit.pid)):  # (nor does a failed test)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


@pytest.fixture
def sleeper(tmp_path) -> Path:
    path = tmp_path / "sleeper.py"
    path.write_text(SLEEPER)
    return path


@linux_only
def test_killing_the_audit_ends_its_zygote_its_forks_and_what_they_started(tmp_path, sleeper):
    # every run a fork of the warm zygote; each starts a process in a session of its own
    started, marked = _kill_the_audit_and_see_everything_end(
        tmp_path,
        lambda alive: ["python", str(sleeper), alive, "--detached"],
        runs_alive=2,
        env={"REPROCHECK_POOL": "all"},
    )
    assert len(marked) == 4  # two runs, two detached sleepers: all below the audit, all gone
    assert any(command.endswith("-m reprocheck.child.zygote ") for command in started.values())


@linux_only
def test_killing_the_audit_ends_a_fresh_run_and_a_forked_one(tmp_path, sleeper):
    # the default pool: run 0 of the leg starts a fresh interpreter, run 1 forks
    _kill_the_audit_and_see_everything_end(
        tmp_path,
        lambda alive: ["python", str(sleeper), alive],
        runs_alive=2,
        env={"REPROCHECK_POOL": None},
    )


@linux_only
@pytest.mark.slow
def test_killing_the_audit_ends_torchrun_agents_and_their_ranks(tmp_path, sleeper):
    # each rank in a session of its own (torchrun's), under an agent under the run
    _, marked = _kill_the_audit_and_see_everything_end(
        tmp_path,
        lambda alive: ["torchrun", "--standalone", "--nproc_per_node", "2", str(sleeper), alive],
        runs_alive=4,
    )
    assert len(marked) == 4


# Fills the disk it is given but LEAVE bytes (its ballast, written before it trains), then
# trains until the trace has taken what was left.
FILLER = """\
import os, sys
import torch

ballast, leave = sys.argv[1], int(sys.argv[2])
stat = os.statvfs(os.path.dirname(ballast))
room = stat.f_bavail * stat.f_frsize - leave
with open(ballast, "wb") as handle:
    while room > 0:
        handle.write(bytes(min(room, 1 << 20)))
        room -= 1 << 20
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(200)])
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 4)
while True:
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
"""


def _tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (made), unmounted afterwards; the test is
    skipped where mounting one is not permitted."""
    folder.mkdir()
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        pytest.skip(f"no mount command to make a small disk with ({exc})")
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {made.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB disk: the audit wants 16 MiB free to start."""
    yield from _tmpfs(tmp_path / "disk", "20m")


@pytest.fixture
def tiny_disk(tmp_path):
    yield from _tmpfs(tmp_path / "tiny", "256k")


@linux_only
@pytest.mark.parametrize("fold_steps", [1, 256], ids=["sqlite-fills", "log-fills"])
def test_a_trace_writer_on_a_full_disk_keeps_every_step_it_wrote(
    tiny_disk, fold_steps, monkeypatch
):
    monkeypatch.setattr(trace_module, "FOLD_STEPS", fold_steps)
    path = tiny_disk / "run.sqlite"
    writer = TraceWriter(path, {"config": {}, "leg": "cpu", "run": 0})
    rows = [(writer.tensor_id("weights", f"w{i}", (4,), "float32"), bytes(16)) for i in range(64)]
    written = 0
    with pytest.raises(TraceFull) as raised:
        while True:
            writer.write_step(written, rows, None, 0.5, 0.0)
            written += 1
    assert str(raised.value) == f"no space left on device while writing {path}"
    assert written > 2 and writer.full is not None
    with pytest.raises(TraceFull):  # nothing more is written: no step after a gap
        writer.write_step(written + 1, rows, None, 0.5, 0.0)
    with pytest.raises(TraceFull):  # closed, the steps SQLite could not take in its log
        writer.finish("failed", "stopped")
    assert not [p.name for p in tiny_disk.iterdir() if p.name.startswith("run.sqlite-steps.")]
    # every step whose write returned is kept: with room again, a reader folds them in
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    with Trace(path, own=True) as trace:
        assert trace.steps == list(range(written))


@linux_only
def test_a_full_disk_is_a_failed_run_that_says_so(tmp_path, small_disk):
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    report_path = tmp_path / "report.json"  # on another disk than the audit's folder
    result = run_cli(
        "exec", "-n", "2", "-q", "--no-attribute", "--jobs", "1", "--timeout", "120",
        "--out", str(small_disk / "out"), "--json", str(report_path),
        "--", "python", str(script), "{run_dir}/ballast", str(1 << 20),
    )  # fmt: skip
    assert result.code == 3, result.stderr
    report = load_strict(report_path)
    assert report["verdict"] == "failed"
    runs = report["legs"][0]["runs"]
    for run in runs:  # run 0 filled the disk, run 1 found it full
        assert run["status"] == "failed", run
        assert run["error"] == f"no space left on device while writing {run['trace']}"
    assert f"cpu run #0 failed: {runs[0]['error']}" in result.stderr
    folder = Path(report["out_dir"])
    assert f"warning: {folder / 'report.json'} not written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p.name for p in small_disk.rglob("*") if ".tmp" in p.name]
    # the steps the trace kept, exactly: committed to SQLite, and the whole frames of the
    # step log no one could fold; with room again, a reader folds them all in
    for ballast in small_disk.rglob("ballast"):
        ballast.unlink()
    with Trace(runs[0]["trace"], own=True) as trace:
        kept = trace.steps
    assert len(kept) > 2 and kept == list(range(len(kept)))
    assert runs[0]["steps"] == kept[-1]
