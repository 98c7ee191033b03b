"""Hashing beside training (``reprocheck.recorder.BESIDE_BYTES``): the large tensors of a
step hashed on a thread while training goes on give the digests hashing them in place
gives, whatever training writes meanwhile — the next optimizer step, ``.data`` writes, a
``.data`` swap, gradients zeroed in place, storage torch cannot share copy-on-write."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reprocheck import recorder as recorder_module
from reprocheck.config import PHASES
from reprocheck.contract import Recording
from reprocheck.parent.launch import hash_beside
from reprocheck.recorder import StepRecorder, flatten, parameter_names
from reprocheck.trace import Trace, TraceWriter
from tests.conftest import SCRIPTS, run_cli, run_exec, write_config

WIDTH = 512  # a 1-MiB weight: hashed beside training (BESIDE_BYTES is 256 KiB)

needs_lazy_clone = pytest.mark.skipif(
    not hasattr(torch, "_lazy_clone"),
    reason=f"torch {torch.__version__} has no torch._lazy_clone: every tensor is hashed in place",
)


def _train(path: Path, beside: bool, recording: Recording, hostile: bool) -> tuple[list, dict]:
    """Six AdamW steps of a model with batch norm (its buffers move in each forward),
    recorded; with ``hostile``, training writes every recorded tensor right after its
    step's record: what the thread had not read yet must be read as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.BatchNorm1d(WIDTH), torch.nn.Linear(WIDTH, 10)
    )
    loose = torch.nn.Parameter(torch.from_numpy(np.ones((WIDTH, WIDTH), dtype=np.float32)))
    model.register_parameter("loose", loose)  # NumPy's memory: no copy-on-write alias
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    names = parameter_names(model)
    rec = StepRecorder(TraceWriter(str(path), {}), PHASES, recording=recording, hash_thread=beside)
    assert rec.beside is beside
    seen = {"behind": 0}
    rec.begin(0)
    rec.state(model, [optimizer], names)
    rec.commit(0, None)
    x, y = torch.randn(64, WIDTH), torch.randint(0, 10, (64,))
    for step in range(1, 7):
        rec.begin(step)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y) + model.loose.sum() * 0
        rec.add_all("outputs", flatten(out, "output"))
        rec.add_all("loss", [("loss", loss)])
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        loss.backward()
        rec.grads(model)
        optimizer.step()
        rec.state(model, [optimizer], names)
        rec.commit(step, loss)
        if rec._waiting is not None and not rec._waiting.done():
            seen["behind"] += 1  # the writes below come before the thread read the tensors
        if hostile:
            for p in model.parameters():
                p.data.clamp_(-0.05, 0.05)  # a .data write: no version counter moves
            with torch.no_grad():
                model[0].weight.mul_(0.5)
                for state in optimizer.state.values():
                    state["exp_avg"].zero_()
            if step == 3:
                model[2].weight.data = model[2].weight.data.clone() * 2  # storage swapped
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
    rec.drain()
    rec.writer.finish("complete", None)
    with Trace(str(path)) as trace:
        records = [(r.step, r.phase, r.name, r.digest) for r in trace.records()]
    return records, seen


@pytest.fixture
def slow_thread(monkeypatch):
    """The thread starts 30 ms late: every write training makes right after a record
    comes before the thread reads (the race, made certain)."""
    hash_jobs = recorder_module._hash_jobs

    def late(jobs, digests):
        time.sleep(0.03)
        hash_jobs(jobs, digests)

    monkeypatch.setattr(recorder_module, "_hash_jobs", late)


@needs_lazy_clone
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_digests_hashed_beside_training_are_those_hashed_in_place(tmp_path, slow_thread, mode):
    recording = Recording(mode)
    in_place, _ = _train(tmp_path / "in_place.sqlite", False, recording, hostile=True)
    beside, seen = _train(tmp_path / "beside.sqlite", True, recording, hostile=True)
    assert seen["behind"] == 6  # each step's writes raced the thread
    assert beside == in_place
    assert sorted({step for step, *_ in beside}) == list(range(7))
    # and the hostile writes are seen: a run without them records other weights from
    # step 1 on (the writes come after step 1's record)
    calm, _ = _train(tmp_path / "calm.sqlite", True, recording, hostile=False)
    first = next(i for i, (a, b) in enumerate(zip(calm, in_place)) if a != b)
    assert calm[first][:2] == (2, "outputs")


@needs_lazy_clone
def test_only_large_tensors_of_a_copy_on_write_storage_go_beside(tmp_path):
    rec = StepRecorder(TraceWriter(str(tmp_path / "t.sqlite"), {}), PHASES, hash_thread=True)
    rec.begin(0)
    big, small = torch.randn(WIDTH, WIDTH), torch.randn(8)
    numpy_backed = torch.from_numpy(np.zeros((WIDTH, WIDTH), dtype=np.float32))
    torch.save({"moment": torch.randn(WIDTH, WIDTH)}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt")["moment"]  # a resumed optimizer's state
    named = [("big", big), ("numpy", numpy_backed), ("small", small), ("loaded", loaded)]
    rec.add_state("weights", named)
    # big alone; NumPy's, the small one and torch.load's (no allocator: a copy-on-write
    # alias of it, written while the alias lives, crashes torch) are hashed in place
    assert [slot for slot, *_ in rec._jobs] == [0]
    assert torch._C._is_cow_tensor(big) and not torch._C._is_cow_tensor(loaded)
    rec.commit(0, None)
    loaded.add_(1)  # the next optimizer step of a resumed run: no crash
    rec.drain()
    assert not rec._jobs and rec._waiting is None
    big.add_(1)  # the thread dropped its alias: the write takes the storage back, no copy
    assert not torch._C._is_cow_tensor(big)


def test_a_core_is_left_free_for_each_runs_thread(monkeypatch):
    monkeypatch.delenv("REPROCHECK_HASH_THREAD", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert hash_beside(1, 2) is True  # 2 runs of 1 thread on 8 cores
    assert hash_beside(2, 2, processes=2) is False  # 2 runs of 2 ranks of 2 threads: 8 busy
    assert hash_beside(3, 2) is True and hash_beside(4, 2) is False
    assert hash_beside(None, 1) is False  # torch's default thread count takes every core
    monkeypatch.setenv("REPROCHECK_HASH_THREAD", "1")
    assert hash_beside(None, 8) is True
    monkeypatch.setenv("REPROCHECK_HASH_THREAD", "0")
    assert hash_beside(1, 1) is False


@needs_lazy_clone
def test_an_audit_hashed_beside_training_catches_its_canary(tmp_path):
    text = (
        "name: wide\nseed: 0\nrepeats: 2\nsteps: 6\ndevices: [cpu]\nthreads: [1]\n"
        "model:\n  factory: reprocheck.zoo.models:mlp\n"
        f"  kwargs: {{in_features: {WIDTH}, hidden: {WIDTH}, classes: 4}}\n"
        "data:\n  factory: reprocheck.zoo.data:classification\n"
        f"  kwargs: {{n: 256, features: {WIDTH}, classes: 4}}\n  batch_size: 32\n"
        "optimizer: {name: AdamW, lr: 0.001}\nloss: cross_entropy\n"
    )
    report = tmp_path / "r.json"
    result = run_cli(
        "run", str(write_config(tmp_path, text)), "-q", "--no-attribute",
        "--out", str(tmp_path / "out"), "--json", str(report),
        env={"REPROCHECK_HASH_THREAD": "1", "REPROCHECK_CANARY": "1"},
    )  # fmt: skip
    r = result.report
    assert (result.code, r["verdict"]) == (0, "reproducible"), result.stderr
    canary = r["canary"]
    assert canary["caught"] is True
    assert canary["processes"][0]["found"] == {
        "step": 1,
        "phase": "weights",
        "tensor": "layers.0.weight",
    }
    for run in r["legs"][0]["runs"]:
        with Trace(run["trace"]) as trace:
            assert trace.run_meta.hash_thread is True and trace.status == "complete"


@needs_lazy_clone
@pytest.mark.slow  # (the config audit above runs the same recorder in the default suite)
def test_a_script_audit_hashed_beside_training_catches_its_canary(tmp_path):
    # nanoGPT's shape at n_embd 256: its MLP's weights (1 MiB) and their AdamW moments
    # are hashed beside training; gradient clipping, LR writes and eval batches between
    command = (str(SCRIPTS / "nanogpt_style.py"), "--n_embd=256", "--max_iters=6")
    result = run_exec(
        tmp_path / "out",
        tmp_path / "r.json",
        command,
        env={"REPROCHECK_HASH_THREAD": "1", "REPROCHECK_CANARY": "1"},
    )
    r = result.report
    assert (result.code, r["verdict"]) == (0, "reproducible"), result.stderr
    assert r["canary"]["caught"] is True
    assert r["canary"]["processes"][0]["found"]["step"] == 1
    for run in r["legs"][0]["runs"]:
        with Trace(run["trace"]) as trace:
            assert trace.run_meta.hash_thread is True and trace.status == "complete"


def test_a_trace_says_it_was_hashed_beside_only_where_it_was(tmp_path):
    from reprocheck.child.context import RunContext

    for sketches, expected in ((False, hasattr(torch, "_lazy_clone")), (True, False)):
        path = tmp_path / f"sketches{sketches}.sqlite"
        context = RunContext(path, {"hash_thread": True}, PHASES, with_sketch=sketches)
        assert context.recorder.beside is expected  # sketches: every record the careful way
        context.finish("complete")
        with Trace(str(path)) as trace:
            assert trace.run_meta.hash_thread is expected
