"""The process boundary's contract: every value crosses as JSON and comes back equal; a key
either side does not know is an error, never dropped; process names parse one way."""

from __future__ import annotations

import json

import pytest

from reprocheck.contract import (
    MAIN,
    Canary,
    Capture,
    CheckpointPlan,
    ChildSettings,
    Function,
    ProcessName,
    Recipe,
    RunMeta,
    RunSpec,
    Script,
    TorchrunJob,
    child_traces,
    process_trace,
    target_from_json,
)

TARGETS = [
    Recipe(),
    Script(argv=("/w/train.py", "--lr", "1"), max_steps=3, run_prefix="as-is-"),
    Script(argv=("/usr/bin/bash", "run.sh"), command=("bash", "run.sh"), launch=True),
    Script(argv=("/w/nb.ipynb",), notebook=True, command=("nb.ipynb",)),
    TorchrunJob(
        argv=("-m", "torch.distributed.run", "--nproc_per_node", "2", "/w/t.py"),
        command=("torchrun", "--nproc_per_node", "2", "/w/t.py"),
        nproc_per_node=2,
        fixed_port=True,
    ),
    Function(function="/w/train.py:main", max_steps=4),
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.kind)
def test_every_target_crosses_as_json_and_comes_back_equal(target):
    back = target_from_json(json.loads(json.dumps(target.to_json())))
    assert back == target and type(back) is type(target)
    assert back.is_script == (target.kind != "recipe")


def test_a_run_spec_with_every_part_crosses_as_json(tmp_path):
    spec = RunSpec(
        config={"name": "demo", "seed": 0, "determinism": {"preset": "seeded"}},
        config_path="/w/demo.yaml",
        base_dir="/w",
        leg="cpu-t1",
        device="cpu",
        threads=1,
        compile=None,
        run=1,
        steps=8,
        trace=str(tmp_path / "cpu-t1-r1.sqlite"),
        target=TARGETS[1],
        with_sketch=True,
        depth="op",
        checkpoints=CheckpointPlan(every=1, keep=16, prefix="/w/ckpt-", runs=2),
        capture=Capture(
            step=3,
            tensors=(("grads", "fc1.weight"), ("outputs", "output")),
            out="/w/cap.pt",
            ops=True,
            process="rank1",
            backend="aot_eager",
            resume="/w/ckpt-1.pt",
        ),
        canary=Canary(step=1),
        observer=True,
    )
    path = tmp_path / "spec.json"
    spec.write(str(path))
    assert RunSpec.read(str(path)) == spec
    assert spec.meta["run"] == 1 and spec.meta["steps_planned"] == 8


def test_child_settings_cross_the_environment_and_come_back_equal():
    settings = ChildSettings(
        trace="/w/cpu-r0.sqlite",
        meta={"config": {"name": "x"}, "run": 0},
        controls={"preset": "seeded"},
        seed=7,
        max_steps=2,
        capture=Capture(step=2, tensors=(("loss", "loss"),), out="/w/c.pt"),
        canary=Canary(step=1),
        record=("weights", "optimizer"),
    )
    assert ChildSettings.imported(settings.export()) == settings
    assert settings.config == {"name": "x"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: target_from_json({"kind": "script", "argv": [], "shell": True}),
        lambda: target_from_json({"kind": "pipeline"}),
        lambda: Capture.from_json({"step": 1, "tensors": [], "out": "x", "extra": 1}),
    ],
    ids=["unknown-key", "unknown-kind", "unknown-capture-key"],
)
def test_a_key_the_other_side_does_not_know_is_an_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "name, role, number, rank",
    [
        ("main", "script", None, None),
        ("rank3", "rank", 3, 3),
        ("spawn1", "spawn", 1, None),
        ("mp1-2", "multiprocessing", 2, None),
        ("sub4", "subprocess", 4, None),
        ("rank0.fork2", "fork", 2, None),
        ("fork1-3", "fork", 3, None),
    ],
)
def test_process_names_parse_one_way(name, role, number, rank):
    process = ProcessName(name)
    assert (process.role, process.number, process.rank) == (role, number, rank)


def test_process_names_are_made_as_they_are_parsed():
    assert ProcessName.rank_name(2) == "rank2"
    assert ProcessName.multiprocessing_name((1, 2)) == "mp1-2"
    assert ProcessName.fork_name(MAIN, 1) == "fork1"
    assert ProcessName.fork_name("rank0", 1) == "rank0.fork1"
    assert ProcessName(ProcessName.fork_name("rank0", 1)).role == "fork"


def test_a_runs_process_traces_sit_beside_its_own_in_name_order(tmp_path):
    run = str(tmp_path / "cpu-r0.sqlite")
    for name in ("mp10", "mp2", "rank0"):
        (tmp_path / f"cpu-r0-{name}.sqlite").write_bytes(b"")
    (tmp_path / "cpu-r0.replay-s1.sqlite").write_bytes(b"")  # another run's, not a child's
    assert list(child_traces(run)) == ["mp2", "mp10", "rank0"]
    assert process_trace(run, "rank0") == str(tmp_path / "cpu-r0-rank0.sqlite")
    assert process_trace(run, MAIN) == run


def test_the_trace_meta_keeps_a_value_only_where_it_has_its_fields_kind():
    meta = RunMeta.of(
        {
            "status": "complete",
            "run": True,  # JSON true is no run number
            "seeding": "random.seed(0)",  # a list, not a string
            "failed_at": 12,
            "device": ["cpu", "cuda:0"],
            "config": {"name": "x"},
            "unknown": 1,  # another version's key: ignored
        }
    )
    assert (meta.status, meta.run, meta.seeding, meta.failed_at) == ("complete", None, None, 12)
    assert (meta.device, meta.config) == (["cpu", "cuda:0"], {"name": "x"})
