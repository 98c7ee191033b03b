"""The canary: after a reproducible verdict, one more run with one bit flipped right before
step c's weights are recorded must differ first at exactly step c · weights · that tensor,
in every process that trains; where it does not, the verdict is NOT VERIFIED (exit 3)."""

from __future__ import annotations

import os

import pytest
import torch
from rich.console import Console

from reprocheck.canary import flip, pick, plant
from reprocheck.report.junit import cases
from reprocheck.report.terminal import render

from .conftest import SCRIPTS, run_cli, write_config

# the canary with the observer, as users have them: one audit of the demo serves the tests
# of both, and one warm-pool zygote (one is started per environment) the runs here
ON = {"REPROCHECK_CANARY": "1", "REPROCHECK_OBSERVER": "1"}


def test_flip_changes_the_lowest_bit_of_the_first_element_only():
    for dtype, ints in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        value = torch.randn(3, 4, dtype=dtype).t()  # not contiguous
        before = value.clone()
        flip(value)
        diff = (value.contiguous().view(ints) ^ before.contiguous().view(ints)).flatten()
        assert diff.tolist() == [1] + [0] * 11
    assert pick([("steps", torch.tensor([1])), ("empty", torch.zeros(0))]) is None
    weight = torch.nn.Parameter(torch.ones(2))
    assert plant([("w", weight)], 3) == {"step": 3, "tensor": "w", "flipped": True, "element": 0}
    assert weight.grad_fn is None and weight.requires_grad


def test_a_configs_canary_is_caught_at_its_step_and_tensor(audit):
    result = audit("demo.yaml", env=ON)
    assert result.code == 0, result.report
    canary = result.report["canary"]
    assert canary["caught"] is True and canary["step"] == 1
    assert canary["processes"] == [
        {
            "process": "main",
            "tensor": "layers.0.weight",
            "found": {"step": 1, "phase": "weights", "tensor": "layers.0.weight"},
            "reached": canary["processes"][0]["reached"],
        }
    ]


def test_a_config_that_records_no_weights_is_not_verified(tmp_path):
    text = (SCRIPTS.parent.parent / "configs" / "demo.yaml").read_text()
    text = text.replace("name: demo", "name: blind").replace(
        "devices: [cpu, cuda]", "devices: [cpu]"
    )
    config = write_config(tmp_path, text + "record: [loss]\n")
    report = tmp_path / "r.json"
    result = run_cli(
        "run", str(config), "-q", "--no-attribute", "--out", str(tmp_path / "out"),
        "--json", str(report), env=ON,
    )  # fmt: skip
    assert result.code == 3, result.report
    assert result.report["verdict"] == "not_verified"
    assert result.report["reason"] == (
        "the canary was not caught: a flipped bit in layers.0.weight after step 1 was not "
        "seen at all"
    )
    console = Console(record=True, width=300)
    render(result.report, console)
    text = console.export_text()
    assert "⚠ NOT VERIFIED  2 runs × 21 steps × 1 phase" in text
    assert "canary      ✘ a flipped bit in layers.0.weight after step 1 was not seen" in text
    assert {
        "name": "verified",
        "kind": "failure",
        "failure": f"not verified: {result.report['reason']}",
    } in cases(result.report)


def test_a_scripts_canary_is_caught(tmp_path):
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(report),
        "--", "python", str(SCRIPTS / "late_seed.py"), env=ON,
    )  # fmt: skip
    assert result.code == 0, result.report
    canary = result.report["canary"]
    assert canary["caught"] is True
    assert [(p["process"], p["tensor"], p["found"]) for p in canary["processes"]] == [
        ("main", "body.0.weight", {"step": 1, "phase": "weights", "tensor": "body.0.weight"})
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "processes"),
    [
        (("python", str(SCRIPTS / "spawn_train.py")), ["spawn0", "spawn1"]),
        (
            ("torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "ddp_train.py")),
            ["rank0", "rank1"],
        ),
    ],
    ids=["mp.spawn", "torchrun"],
)
def test_every_process_of_a_multi_process_run_has_its_canary(command, processes, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(report),
        "--", *command, env=ON,
    )  # fmt: skip
    assert result.code == 0, result.report
    canary = result.report["canary"]
    assert canary["caught"] is True
    assert [p["process"] for p in canary["processes"]] == processes
    for entry in canary["processes"]:
        assert entry["found"] == {"step": 1, "phase": "weights", "tensor": entry["tensor"]}


# -- the observer: recording must leave training alone ------------------------------------

PLANTED_RECORDER = '''
"""A planted defect for the test: reprocheck's recorder adds 1e-4 to every gradient it
records, in place (a recorder that perturbs training). The observer run records no
gradients, so it trains unperturbed."""
import os

if os.environ.get("PLANT_RECORDER_DEFECT"):
    import torch

    from reprocheck import recorder

    _original = recorder.StepRecorder._add

    def _add(self, phase, named):
        named = list(named)
        if phase == "grads":
            with torch.no_grad():
                for _, tensor in named:
                    if tensor.is_floating_point():
                        tensor.add_(1e-4)
        return _original(self, phase, named)

    recorder.StepRecorder._add = _add
'''

OBSERVER = {"REPROCHECK_OBSERVER": "1"}


def test_the_observer_run_agrees_with_the_recorded_runs(audit):
    result = audit("demo.yaml", env=ON)  # the canary's audit: the observer ran in it
    assert result.code == 0, result.report
    observer = result.report["observer"]
    assert (observer["agrees"], observer["first_difference"]) == (True, None)


def test_a_recorder_that_perturbs_training_is_not_verified(tmp_path):
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(PLANTED_RECORDER)
    report = tmp_path / "r.json"
    env = {
        **OBSERVER,
        "PLANT_RECORDER_DEFECT": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(tmp_path / "plant"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    # the demo trains with SGD: a shifted gradient moves the weights (Adam's first steps
    # are sign-like and may not show it)
    result = run_cli(
        "run", str(SCRIPTS.parent.parent / "configs" / "demo.yaml"), "-q", "--no-attribute",
        "--out", str(tmp_path / "out"), "--json", str(report), env=env,
    )  # fmt: skip
    assert result.code == 3, result.report
    report = result.report
    assert report["verdict"] == "not_verified"
    # both recorded runs shifted their gradients alike: they agree with each other
    assert report["first_divergence"] is None
    assert report["observer"]["first_difference"] == {
        "step": 1,
        "phase": "weights",
        "tensor": "layers.0.weight",
        "process": "main",
    }
    assert report["reason"] == (
        "recording changed training: step 1 · weights · layers.0.weight differs from a run "
        "that recorded only weights and optimizer state — a defect in reprocheck"
    )
