"""The Python API: ``reprocheck.Recorder`` for a loop of your own, ``reprocheck.audit``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import reprocheck
from reprocheck.trace import Trace

from .conftest import ROOT, run_cli
from .strict_json import load_strict


def _loop(trace, steps: int = 4, noisy_step: int | None = None, fail_at: int | None = None):
    """A custom loop with no DataLoader; an entropy-seeded input at ``noisy_step``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    with reprocheck.Recorder(model, optimizer, trace=trace) as rec:
        for step in range(1, steps + 1):
            if step == fail_at:
                raise ValueError(f"bad batch at step {step}")
            x = torch.randn(8, 4)
            if step == noisy_step:
                x = x + torch.randn(8, 4, generator=noise)
            output = model(x)
            loss = output.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert rec.step(batch=x, output=output, loss=loss) == step


def test_recorder_records_step_zero_and_every_phase(tmp_path):
    _loop(tmp_path / "run.sqlite", steps=3)
    with Trace(tmp_path / "run.sqlite") as trace:
        assert trace.status == "complete"
        assert trace.steps == [0, 1, 2, 3]
        step0 = {(r.phase, r.name) for r in trace.records(0)}
        step2 = {(r.phase, r.name) for r in trace.records(2)}
        losses = trace.losses()
    assert {phase for phase, _ in step0} == {"weights", "rng"}  # Adam: no state before a step
    assert {phase for phase, _ in step2} == {
        "data",
        "outputs",
        "loss",
        "grads",
        "weights",
        "optimizer",
        "rng",
    }
    assert {("data", "input"), ("outputs", "output"), ("loss", "loss")} <= step2
    assert {("grads", "2.weight"), ("weights", "2.weight"), ("optimizer", "0.weight.exp_avg")} <= (
        step2
    )
    assert losses[0] is None and all(losses[k] > 0 for k in (1, 2, 3))


def test_two_recorded_loops_compare_to_the_noisy_step(tmp_path):
    _loop(tmp_path / "a.sqlite", noisy_step=3)
    _loop(tmp_path / "b.sqlite", noisy_step=3)
    result = run_cli(
        "compare", str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite"), "--json", "-"
    )
    assert result.code == 1, result.stderr
    d = load_strict(result.stdout)["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "data", "input")


def test_recorder_marks_the_trace_failed_on_an_exception(tmp_path):
    with pytest.raises(ValueError, match="bad batch at step 3"):
        _loop(tmp_path / "run.sqlite", fail_at=3)
    with Trace(tmp_path / "run.sqlite") as trace:
        assert trace.status == "failed"
        assert trace.error.startswith("ValueError: bad batch at step 3 (")
        assert trace.meta["failed_step"] == 3
        assert trace.steps == [0, 1, 2]


def test_recorder_misuse_is_one_clear_error(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="unknown phases \\['gradients'\\]"):
        reprocheck.Recorder(model, trace=tmp_path / "x.sqlite", phases=["gradients"])
    with pytest.raises(RuntimeError, match="outside `with Recorder"):
        reprocheck.Recorder(model, trace=tmp_path / "x.sqlite").step()


def train_three_steps() -> None:
    """For ``audit``: importable by name, so each child process can run it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_with_entropy_from_step_two() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for step in range(1, 5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        if step >= 2:
            model.weight.grad += 1e-3 * torch.randn(2, 4, generator=noise)
        optimizer.step()


def test_audit_runs_a_function_in_child_processes(tmp_path):
    report = reprocheck.audit(train_three_steps, repeats=2, out=tmp_path)
    assert report["verdict"] == "reproducible" and report["exit_code"] == 0
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [3, 3]
    assert report["config"]["models"] == [{"prefix": "", "type": "Linear"}]
    assert report["config"]["optimizers"] == [{"prefix": "", "type": "Adam"}]


def test_audit_finds_the_divergent_step_and_honours_steps(tmp_path):
    report = reprocheck.audit(train_with_entropy_from_step_two, repeats=2, steps=3, out=tmp_path)
    assert report["verdict"] == "diverged" and report["exit_code"] == 1
    d = report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (2, "grads", "weight")
    assert report["legs"][0]["runs"][0]["status"] == "complete"
    assert max(run["steps"] for run in report["legs"][0]["runs"]) == 3  # of the 4 it makes


def test_audit_refuses_a_function_children_cannot_import():
    with pytest.raises(ValueError, match="not importable: define it at module level"):
        reprocheck.audit(lambda: None)
    with pytest.raises(ValueError, match="preset 'loose'"):
        reprocheck.audit(train_three_steps, preset="loose")


@pytest.mark.slow
def test_the_api_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_recorder.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "audit(train): reproducible, 5 steps per run" in result.stdout
