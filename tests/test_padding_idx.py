"""A step-0 replay of a model with ``nn.Embedding(padding_idx=...)``, a replay that fails
saying why, and children started with a bare ``os.fork()`` named by creation order.

``tests/scripts/unseeded_padding.py`` builds a BERT-style encoder whose init draws from an
entropy-seeded generator: the runs differ at step 0 · weights, so the replay captures from
the script's first line, through ``Embedding.reset_parameters`` zeroing the padding row
under ``no_grad`` (a view whose ``grad_fn`` cannot be read). ``tests/scripts/fork_train.py``
trains in two ``os.fork()`` children. Each audit runs once per module (fixtures) and is
read by the tests that need it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from reprocheck.report.terminal import render

from .conftest import ScriptAudits, run_exec, script_line


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> ScriptAudits:
    return ScriptAudits(tmp_path_factory.mktemp("padding"))


@pytest.fixture(scope="module")
def padding(audits):
    return audits("unseeded_padding.py", options=("--steps", "3"))


def test_an_entropy_init_diverges_at_step_0_in_the_padded_embedding(padding):
    assert padding.code == 1, padding.stderr
    report = padding.report
    assert report["verdict"] == "diverged"
    first = report["first_divergence"]
    assert (first["process"], first["step"], first["phase"], first["tensor"]) == (
        "main",
        0,
        "weights",
        "tokens.weight",
    )
    # (how far each run got is fail-fast's timing: a leg's runs stop once two disagree)


def test_the_step_0_replay_measures_and_zooms_through_the_padding_row(padding):
    first = padding.report["first_divergence"]
    # the replay ran through nn.Embedding(padding_idx=0) and kept the real tensors
    assert first["replay"] == "differed"  # entropy: the replays differ from the audited runs
    assert first["replay_error"] is None
    assert first["replay_from"] == 0 and first["max_abs_diff"] > 0
    # every element but the padding row (zeroed in both runs): 50 × 32 − 32
    assert (first["elements"], first["elements_differing"]) == (1600, 1568)
    assert first["op"] == "aten.normal_"
    # the embedding's init in _init_weights (the first module apply() reaches is `tokens`)
    assert first["source"] == "tests/scripts/unseeded_padding.py:44"
    embedding = script_line("unseeded_padding.py", "elif isinstance(module, nn.Embedding)")
    assert int(embedding.rsplit(":", 1)[1]) + 1 == 44
    assert (
        first["code"] == "module.weight.data.normal_(mean=0.0, std=0.02, generator=self.generator)"
    )
    assert (first["stage"], first["cause"]) == ("forward", "initialisation")


FLAKY = """\
import os
import sys

import torch

slots = sys.argv[1]
slot = 0
while True:  # each process of the audit claims the next slot: the third and later fail
    try:
        os.close(os.open(os.path.join(slots, str(slot)), os.O_CREAT | os.O_EXCL))
        break
    except FileExistsError:
        slot += 1
if slot >= 2:
    raise RuntimeError("only two runs may train")
torch.seed()
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    loss = model(torch.ones(8, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


def test_a_failed_replay_says_why(tmp_path: Path):
    script, slots = tmp_path / "flaky.py", tmp_path / "slots"
    script.write_text(FLAKY)
    slots.mkdir()
    result = run_exec(
        tmp_path / "out", tmp_path / "r.json", (str(script), str(slots)), ("--steps", "3")
    )
    assert result.code == 1, result.stderr
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (0, "weights", "weight")
    assert first["replay"] == "failed" and first["max_abs_diff"] is None
    why = first["replay_error"]
    assert why.startswith("run #0: RuntimeError: only two runs may train (")
    assert why.endswith("flaky.py:15 in <module>)")
    console = Console(record=True, width=300)
    render(result.report, console)
    assert f"not measured: the replay of the divergent step failed: {why}" in (
        console.export_text()
    )


# -- bare os.fork() children -------------------------------------------------------------


def _processes(report: dict) -> list[list[tuple]]:
    return [
        [(p["name"], p["role"], p["index"], p["steps"], p["status"]) for p in run["processes"]]
        for run in report["legs"][0]["runs"]
    ]


def test_forked_children_that_train_alike_reproduce_named_by_fork_order(audits):
    result = audits("fork_train.py", options=("--steps", "3"))
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert report["first_divergence"] is None
    # the parent trains nothing; each child's steps 0–3, its trace closed at os._exit
    expected = [
        ("main", "script", None, None, "complete"),
        ("fork1", "fork", 1, 3, "complete"),
        ("fork2", "fork", 2, 3, "complete"),
    ]
    assert _processes(report) == [expected, expected]
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [3, 3]
    console = Console(record=True, width=200)
    render(report, console)
    assert "process main · fork1 (fork) · fork2 (fork)" in console.export_text()


def test_entropy_in_the_second_fork_diverges_in_fork2(audits):
    result = audits("fork_train.py", "--entropy-child", "2", options=("--steps", "3"))
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["process"], first["step"], first["phase"], first["tensor"]) == (
        "fork2",
        1,
        "outputs",
        "output",
    )
    assert first["seeding"] == (
        "every run re-seeded torch's CPU generator from entropy at "
        f"{script_line('fork_train.py', '        torch.seed()')} (`torch.seed()`)"
    )
    # the replay captured the step inside the forked child
    assert first["replay"] != "failed" and first["max_abs_diff"] > 0
