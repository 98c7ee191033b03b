"""The canary: after a reproducible verdict, one more run with one bit flipped right before
step c's weights are recorded must differ first at exactly step c · weights · that tensor,
in every process that trains; where it does not, the verdict is NOT VERIFIED (exit 3)."""

from __future__ import annotations

import pytest
import torch

from reprocheck.canary import flip, pick, plant

from .conftest import SCRIPTS, run_cli, write_config

ON = {"REPROCHECK_CANARY": "1"}


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
