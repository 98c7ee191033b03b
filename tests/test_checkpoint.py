"""Checkpoints for replays: what is kept, the budget, and an exact resume."""

from __future__ import annotations

import random

import numpy as np
import torch

from reprocheck import checkpoint


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(4, 8) + float(np.random.rand()) + random.random()  # every generator
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_a_resumed_run_is_bit_identical(tmp_path):
    model, optimizer = _setup()
    saver = checkpoint.Checkpointer(every=2, keep=16, prefix=str(tmp_path / "r0.ckpt-"))
    for step in range(1, 7):
        _step(model, optimizer)
        saver.after_step(step, 6, model, optimizer)
    assert saver.saved == [2, 4]  # not at the last step
    found = checkpoint.newest(str(tmp_path / "r0.ckpt-"), 3)
    assert found == (2, str(tmp_path / "r0.ckpt-2.pt"))

    resumed, resumed_optimizer = _setup(seed=1)  # other initial values: all restored
    checkpoint.restore(checkpoint.load(found[1]), resumed, resumed_optimizer)
    for _ in range(3, 7):
        _step(resumed, resumed_optimizer)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_the_newest_are_kept_within_the_budget(tmp_path, monkeypatch):
    model, optimizer = _setup()
    saver = checkpoint.Checkpointer(every=1, keep=16, prefix=str(tmp_path / "a.ckpt-"))
    saver.after_step(1, 10, model, optimizer)
    size = (tmp_path / "a.ckpt-1.pt").stat().st_size
    monkeypatch.setattr(checkpoint, "BUDGET_BYTES", 3 * size + 1)
    saver = checkpoint.Checkpointer(every=1, keep=16, prefix=str(tmp_path / "b.ckpt-"))
    for step in range(1, 8):
        saver.after_step(step, 10, model, optimizer)
    assert saver.keep == 3
    assert sorted(p.name for p in tmp_path.glob("b.ckpt-*")) == [
        "b.ckpt-5.pt",
        "b.ckpt-6.pt",
        "b.ckpt-7.pt",
    ]
    monkeypatch.setattr(checkpoint, "BUDGET_BYTES", size)  # not even two: none at all
    saver = checkpoint.Checkpointer(every=1, keep=16, prefix=str(tmp_path / "c.ckpt-"))
    saver.after_step(1, 10, model, optimizer)
    saver.after_step(2, 10, model, optimizer)
    assert not saver.enabled and not list(tmp_path.glob("c.ckpt-*"))
    checkpoint.remove_all(str(tmp_path))
    assert not list(tmp_path.glob("*.ckpt-*"))


def test_plan_spaces_sixteen_per_run():
    assert checkpoint.plan(2, "p") is None  # too short for a resume
    assert checkpoint.plan(6, "p").every == 1
    assert checkpoint.plan(200, "p").every == 13


def test_a_checkpoint_that_cannot_be_written_turns_checkpoints_off(tmp_path):
    model, optimizer = _setup()
    saver = checkpoint.Checkpointer(every=1, keep=16, prefix=str(tmp_path / "gone" / "r0.ckpt-"))
    saver.after_step(1, 10, model, optimizer)  # its folder does not exist: cannot be written
    assert not saver.enabled and saver.saved == []


def test_the_runs_of_an_audit_share_an_eighth_of_the_free_disk(tmp_path, monkeypatch):
    import collections

    model, optimizer = _setup()
    probe = checkpoint.Checkpointer(every=1, keep=16, prefix=str(tmp_path / "p.ckpt-"))
    probe.after_step(1, 10, model, optimizer)
    size = (tmp_path / "p.ckpt-1.pt").stat().st_size
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(0, 0, 8 * 4 * 5 * size))
    saver = checkpoint.Checkpointer.planned(checkpoint.plan(100, str(tmp_path / "r.ckpt-"), runs=4))
    for step in range(7, 70, 7):
        saver.after_step(step, 100, model, optimizer)
    assert saver.keep == 5 and len(list(tmp_path.glob("r.ckpt-*"))) == 5
