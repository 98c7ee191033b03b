"""End-to-end audits of the built-in configs on real torch runs: exact verdicts, steps,
phases and tensors."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from reprocheck.trace import Trace
from reprocheck.zoo import planted

from .conftest import run_cli, write_config
from .strict_json import load_strict

NO_CUDA = not torch.cuda.is_available()


def _line_of(function, needle: str) -> int:
    """The line number of ``needle`` inside a function's source (so tests follow edits)."""
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if needle in line)


def test_demo_is_reproducible(audit):
    result = audit("demo.yaml")
    assert result.code == 0, result.stderr
    report = result.report
    assert report["schema"] == "reprocheck.report/1"
    assert report["verdict"] == "reproducible"
    assert report["first_divergence"] is None
    cpu = report["legs"][0]
    assert (cpu["name"], cpu["status"]) == ("cpu-t1", "ok")
    assert [run["status"] for run in cpu["runs"]] == ["complete", "complete"]
    assert [run["steps"] for run in cpu["runs"]] == [20, 20]
    # 21 steps (0..20); every run records the same number of digests
    assert cpu["records"] % 2 == 0 and cpu["records"] > 21 * 6
    if NO_CUDA:
        cuda = report["legs"][1]
        assert (cuda["status"], cuda["reason"]) == ("skipped", "no CUDA device")
    env = report["environment"]
    assert env["torch"] == torch.__version__
    assert env["threads"] == 1
    assert env["env"]["PYTHONHASHSEED"] == "0"
    assert env["controls"]["seeded"] == ["random", "numpy", "torch"]
    assert Path(report["out_dir"], "report.json").exists()


@pytest.mark.parametrize(
    ("config", "step", "phase", "tensor"),
    [
        ("planted-forward.yaml", 3, "outputs", "output"),
        ("planted-backward.yaml", 3, "grads", "fc1.weight"),
        ("planted-init.yaml", 0, "weights", "fc1.weight"),
    ],
)
def test_planted_divergence_is_caught_exactly(audit, config, step, phase, tensor):
    result = audit(config)
    assert result.code == 1, result.stderr
    report = result.report
    assert report["verdict"] == "diverged"
    first = report["first_divergence"]
    assert (first["leg"], first["step"], first["phase"], first["tensor"]) == (
        "cpu-t1",
        step,
        phase,
        tensor,
    )
    assert first["runs"] == [[0], [1]]
    assert first["kind"] == "value"
    assert first["digests"][0] != first["digests"][1]
    # measured on the real tensors of a replay of both runs
    assert first["elements_differing"] > 0
    assert first["max_abs_diff"] > 0
    assert first["max_ulp"] >= 1
    assert report["legs"][0]["first_divergence"] == {"step": step, "phase": phase, "tensor": tensor}


def test_backward_noise_leaves_outputs_and_loss_identical(audit, tmp_path):
    """At the divergent step, only what backward touches differs."""
    result = audit("planted-backward.yaml", "--no-fail-fast", "--no-measure")
    assert result.code == 1
    traces = [run["trace"] for run in result.report["legs"][0]["runs"]]
    from reprocheck.trace import Trace

    with Trace(traces[0]) as a, Trace(traces[1]) as b:
        assert a.last_step == b.last_step == 6  # no fail-fast: both ran to the end
        same = {(r.phase, r.name): r.digest for r in a.records(3)}
        other = {(r.phase, r.name): r.digest for r in b.records(3)}
    assert same[("outputs", "output")] == other[("outputs", "output")]
    assert same[("loss", "loss")] == other[("loss", "loss")]
    assert same[("grads", "fc2.weight")] == other[("grads", "fc2.weight")]
    assert same[("grads", "fc1.weight")] != other[("grads", "fc1.weight")]


def test_crash_gives_exit_3_with_the_error_line_and_keeps_earlier_steps(audit):
    result = audit("planted-crash.yaml")
    assert result.code == 3, result.stderr
    report = result.report
    assert report["verdict"] == "failed"
    line = _line_of(planted.Crash.forward, "raise RuntimeError")
    for run in report["legs"][0]["runs"]:
        assert run["status"] == "failed"
        assert run["steps"] == 2  # steps 0, 1, 2 committed; step 3 raised
        assert run["error"] == (
            f"RuntimeError: planted crash at step 3 (reprocheck/zoo/planted.py:{line} in forward)"
        )
    from reprocheck.trace import Trace

    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        assert trace.status == "failed"
        assert trace.steps == [0, 1, 2]


def test_timeout_kills_the_run_and_says_so(audit):
    result = audit("planted-hang.yaml", "--timeout", "6")
    assert result.code == 3, result.stderr
    for run in result.report["legs"][0]["runs"]:
        assert run["status"] == "timeout"
        assert run["error"] == "timed out after 6 s at step 2"
        assert run["steps"] == 1


def test_compare_two_traces(audit):
    result = audit("planted-backward.yaml", "--no-measure")
    traces = [run["trace"] for run in result.report["legs"][0]["runs"]]
    same = run_cli("compare", traces[0], traces[0])
    assert same.code == 0, same.stderr
    assert "IDENTICAL" in same.stdout
    differ = run_cli("compare", traces[0], traces[1], "--json", "-")
    assert differ.code == 1, differ.stderr
    data = load_strict(differ.stdout)
    d = data["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "grads", "fc1.weight")


def test_config_error_from_a_factory_is_exit_2_one_line(audit, tmp_path):
    config = write_config(
        tmp_path,
        """
name: bad-factory
steps: 2
model: {factory: reprocheck.zoo.models:no_such_model}
data: {factory: reprocheck.zoo.data:classification}
""",
    )
    result = audit(config)
    assert result.code == 2, result.stderr
    assert result.report["verdict"] == "failed"
    assert "no_such_model" in result.report["legs"][0]["runs"][0]["error"]


def test_torchmix_hasher_end_to_end(audit):
    """The device-side digest (the CUDA code path) run on CPU catches the same divergence."""
    result = audit("planted-backward.yaml", "--no-measure", env={"REPROCHECK_HASHER": "torch"})
    assert result.code == 1, result.stderr
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (3, "grads", "fc1.weight")
    assert result.report["environment"]["hasher"] == "torchmix-128"


def test_thread_legs_are_compared_under_tolerance(audit):
    result = audit(
        "demo.yaml", "--threads", "1,2", "--steps", "4", "--device", "cpu", "--jobs", "2"
    )
    assert result.code == 0, result.stderr
    report = result.report
    assert [leg["name"] for leg in report["legs"]] == ["cpu-t1", "cpu-t2"]
    (pair,) = report["across_legs"]
    assert pair["pair"] == ["cpu-t1", "cpu-t2"]
    assert pair["tolerance"] == "rtol=1e-05,atol=1e-06"
    assert pair["within_tolerance"] is True
    # every observable record of a run (generator states are latent: never compared)
    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        observable = sum(not record.latent for record in trace.records())
        assert observable < trace.record_count()
    assert pair["compared"] == observable
    assert [step for step, _ in pair["growth"]] == [0, 1, 2, 3, 4]
