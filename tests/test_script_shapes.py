"""Verdict truth on scripts written the way public training scripts are written.

Each script in tests/scripts/ follows the shape of a public one (its docstring says which):
hand-written updates under ``.data`` and ``no_grad``, an LBFGS closure, training inside
``torch.multiprocessing`` workers, scripts that seed torch themselves and leave NumPy and
``random`` alone, a re-seed before dropout. Each planted case is audited once per test
run (module-scoped fixtures) and read by the tests that need it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from reprocheck.report.terminal import render
from reprocheck.trace import Trace

from .conftest import FIXED_HASH_SEED, ScriptAudits, run_cli, script_line
from .strict_json import load_strict


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> ScriptAudits:
    return ScriptAudits(tmp_path_factory.mktemp("shapes"))


def _steps(report: dict) -> list[int | None]:
    return [run["steps"] for run in report["legs"][0]["runs"]]


def _phases(trace_path: str, step: int) -> set[str]:
    with Trace(trace_path) as trace:
        return {record.phase for record in trace.records(step)}


# -- hand-written updates (pytorch/examples word_language_model, regression) -------------


def test_a_hand_written_update_is_a_step(audits):
    result = audits("manual_update.py", "--updates", "6")
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert _steps(report) == [6, 6]
    assert [m["prefix"] for m in report["config"]["models"]] == [""]
    trace = report["legs"][0]["runs"][0]["trace"]
    assert _phases(trace, 0) == {"weights", "rng"}
    assert _phases(trace, 3) == {"outputs", "loss", "grads", "weights", "rng"}
    with Trace(trace) as opened:
        names = [r.name for r in opened.records(1) if r.phase == "grads"]
    assert names[0] == "encoder.weight"  # named_parameters order, not graph order


def test_steps_ends_a_hand_written_loop_after_k_updates(audits):
    result = audits("manual_update.py", "--updates", "6", options=("--steps", "4"))
    assert result.code == 0
    assert _steps(result.report) == [4, 4]
    assert [run["note"] for run in result.report["legs"][0]["runs"]] == [None, None]


def test_a_script_that_ends_before_steps_k_says_so(audits):
    result = audits("manual_update.py", "--updates", "3", options=("--steps", "5"))
    assert result.code == 0
    runs = result.report["legs"][0]["runs"]
    assert [run["note"] for run in runs] == ["ended after 3 of 5 steps"] * 2


def test_noise_in_a_hand_written_update_is_caught_at_its_step(audits):
    result = audits("manual_update.py", "--updates", "6", "--noise-from", "3")
    assert result.code == 1
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (3, "weights", "encoder.weight")
    assert first["process"] == "main"
    # the script's replay, rerun from its start, captures step 3 op by op
    assert first["replay_from"] == 0 and first["max_abs_diff"] > 0
    assert (first["op"], first["stage"], first["cause"]) == (
        "aten.randn",
        "update",
        "unseeded or re-seeded RNG",
    )
    assert first["source"] == script_line("manual_update.py", "p.data.add_(torch.randn(p.shape")


def test_a_no_grad_update_with_accumulation_keeps_one_step_per_update(audits):
    result = audits("manual_update.py", "--updates", "4", "--no-grad-update", "--accumulate", "2")
    assert result.code == 0, result.report
    assert _steps(result.report) == [4, 4]
    trace = result.report["legs"][0]["runs"][0]["trace"]
    with Trace(trace) as opened:
        losses = [r.name for r in opened.records(2) if r.phase == "loss"]
    assert losses == ["loss0", "loss1"]  # two micro-batches, one update


def test_an_unseeded_hand_written_loop_diverges_at_its_initial_weights(audits):
    result = audits(
        "regression_manual.py",
        "--max-batches",
        "20",
        options=("--preset", "none", "--no-measure"),
        env=FIXED_HASH_SEED,  # the runs fork: tests/conftest.py
    )
    assert result.code == 1
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (0, "weights", "weight")


# -- closures (pytorch/examples time_sequence_prediction) --------------------------------


def test_each_lbfgs_step_holds_its_own_closure_evaluations(audits):
    result = audits("lbfgs_closure.py", "--steps", "2")
    assert result.code == 0, result.report
    assert _steps(result.report) == [2, 2]
    run = result.report["legs"][0]["runs"][0]
    assert _phases(run["trace"], 0) == {"weights", "rng"}  # LBFGS holds no state yet
    log = Path(run["log"]).read_text().splitlines()
    evaluations = sum(line.startswith("loss:") for line in log)  # one per closure call
    with Trace(run["trace"]) as trace:
        per_step = [[r for r in trace.records(step) if r.phase == "loss"] for step in (1, 2)]
        losses = trace.losses()
    assert all(per_step) and sum(map(len, per_step)) == evaluations
    assert {r.phase for r in trace_records(run["trace"], 1)} >= {"outputs", "loss", "grads"}
    assert losses[1] is not None and losses[2] is not None and losses[1] != losses[2]


def trace_records(path: str, step: int) -> list:
    with Trace(path) as trace:
        return list(trace.records(step))


# -- training in child processes (mp.spawn, mp.Process with fork) ------------------------


def test_training_in_spawned_workers_is_recorded_per_process(audits):
    result = audits("spawn_train.py", "--steps", "3")
    assert result.code == 0, result.report
    for run in result.report["legs"][0]["runs"]:
        processes = {p["name"]: p for p in run["processes"]}
        assert list(processes) == ["main", "spawn0", "spawn1"]
        assert processes["main"]["steps"] is None  # the parent does not train
        assert [processes[n]["steps"] for n in ("spawn0", "spawn1")] == [3, 3]
        assert [processes[n]["rank"] for n in ("spawn0", "spawn1")] == [0, 1]
        assert processes["spawn1"]["role"] == "spawn"


def test_a_forked_worker_seeded_from_entropy_diverges_in_its_own_process(audits):
    result = audits("spawn_train.py", "--steps", "3", "--start", "fork", "--entropy-rank", "1")
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["process"], first["step"], first["phase"], first["tensor"]) == (
        "mp2",
        0,
        "weights",
        "fc1.weight",
    )


# -- generators: observable versus latent (nanoGPT, makemore) ----------------------------


# slow: mp.spawn's recording stays in the default suite (training in spawned workers)
@pytest.mark.slow
def test_a_divergence_in_a_spawned_worker_is_replayed_and_zoomed_there(audits):
    result = audits("spawn_train.py", "--steps", "3", "--reseed", "1:2")
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["process"], first["step"], first["phase"]) == ("spawn1", 2, "outputs")
    assert first["max_abs_diff"] > 0 and first["replays_diverged"] == 1
    assert (first["op"], first["cause"]) == ("aten.randint", "unseeded or re-seeded RNG")
    assert first["source"] == script_line("spawn_train.py", "idx = torch.randint(")
    path, line = script_line("spawn_train.py", "step == reseed_at").rsplit(":", 1)
    assert first["seeding"].endswith(f"at {path}:{int(line) + 1} (`torch.seed()`)")


def test_unused_unseeded_generators_are_a_latent_finding_not_a_divergence(audits):
    result = audits(
        "nanogpt_style.py", "--max_iters=4", options=("--preset", "none"), env=FIXED_HASH_SEED
    )
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert report["first_divergence"] is None
    (latent,) = [f for f in report["findings"] if f["code"] == "RC018"]
    assert latent["severity"] == "warning"
    assert latent["evidence"]["generators"] == ["numpy", "random"]
    assert latent["evidence"]["step"] == 0


def test_an_evaluation_copy_loaded_with_torch_load_is_no_model(audits):
    result = audits(
        "makemore_style.py", "--max-steps", "6", options=("--preset", "none"), env=FIXED_HASH_SEED
    )
    assert result.code == 0, result.report
    assert result.report["config"]["models"] == [{"prefix": "", "type": "MLP"}]
    trace = result.report["legs"][0]["runs"][0]["trace"]
    with Trace(trace) as opened:
        names = {r.name for r in opened.records(1) if r.phase == "weights"}
    assert names and not any(name.startswith("model") for name in names)


def test_a_reseed_before_dropout_names_the_generator_as_the_cause(audits):
    result = audits("reseed_dropout.py")
    assert result.code == 1
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "outputs", "output")
    assert (first["module"], first["op"]) == ("Dropout", "aten.bernoulli_")
    assert first["source"] == script_line("reseed_dropout.py", "loss = F.cross_entropy(model(")
    assert first["generator"] == {
        "name": "torch.cpu",
        "step": 0,
        "runs": [[0], [1]],
        "process": "main",
    }
    assert first["cause"] == "unseeded or re-seeded RNG"
    assert first["seeding"] == (
        "every run re-seeded torch's CPU generator from entropy at "
        f"{script_line('reseed_dropout.py', 'torch.seed()  #')} (`torch.seed()`)"
    )
    assert [f["code"] for f in result.report["findings"]] == ["RC015"]
    assert first["seeding"] in result.report["findings"][0]["message"]


def test_a_clock_seeded_script_names_the_seeding_call_and_both_values(audits):
    result = audits("clock_seed.py", options=("--no-measure",))
    assert result.code == 1
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (0, "weights", "0.weight")
    found = re.fullmatch(r"`torch.manual_seed` got (\d+) vs (\d+) at (\S+)", first["seeding"])
    assert found is not None, first["seeding"]
    assert found.group(1) != found.group(2)
    assert found.group(3) == script_line("clock_seed.py", "torch.manual_seed(seed)")


def test_the_same_script_without_the_reseed_reproduces(audits):
    result = audits("reseed_dropout.py", "--no-reseed")
    assert result.code == 0, result.report
    assert result.report["findings"] == []


def test_a_nondeterministic_backward_op_in_a_script_is_named_with_its_forwardscript_line(audits):
    # the script sets its own thread count, as many do: the audit's one-thread control is
    # then overridden, and attribution says so rather than "does not help"
    result = audits("token_table.py", "--set-threads", "2", options=TOKEN_TABLE)
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "grads", "table")
    assert first["max_abs_diff"] > 0 and first["elements_differing"] > 0
    assert (first["op"], first["stage"], first["cause"]) == (
        "aten.index_put",
        "backward",
        "nondeterministic op",
    )
    assert first["source"] == script_line("token_table.py", "rows = self.table[tokens]")
    assert first["source_is_forward_line"] is True
    assert [f["code"] for f in result.report["findings"]] == ["RC011"]


TOKEN_TABLE = ("--threads", "2", "--attribute")


def test_attribution_of_a_script_names_the_fix_and_the_control_it_overrides(audits):
    result = audits("token_table.py", "--set-threads", "2", options=TOKEN_TABLE)
    tried = {item["control"]: item for item in result.report["attribution"]}
    assert tried["deterministic algorithms"]["verdict"] == "reproducible"
    assert tried["one thread"]["verdict"] == "overridden"
    assert tried["one thread"]["overridden_by"] == (
        f"`torch.set_num_threads(2)` at {script_line('token_table.py', 'set_num_threads(args')}"
    )
    assert (
        "with deterministic algorithms the runs reproduce"
        in (result.report["findings"][0]["message"])
    )
    console = Console(record=True, width=200)
    render(result.report, console)
    assert "one thread ⊘ overridden by `torch.set_num_threads(2)`" in console.export_text()


# -- never an empty pass -----------------------------------------------------------------


def test_a_script_that_never_trains_fails_with_the_reason(tmp_path):
    script = tmp_path / "evaluate_only.py"
    script.write_text(
        "import torch\n"
        "model = torch.nn.Linear(4, 2)\n"
        "with torch.no_grad():\n"
        "    print(model(torch.ones(3, 4)).sum().item())\n"
    )
    out = ("--out", str(tmp_path / "out"))
    result = run_cli("exec", *out, "--json", str(tmp_path / "r.json"), "--", "python", str(script))
    assert result.code == 3
    assert result.report["verdict"] == "failed"
    assert result.report["reason"].startswith("no training step recorded")
    assert "no training step recorded" in result.stdout
    quiet = run_cli("exec", "-q", *out, "--", "python", str(script))
    assert quiet.code == 3
    (line,) = quiet.stderr.strip().splitlines()
    assert line.startswith("reprocheck: no training step recorded")


# -- legs: sketches where comparisons need them ------------------------------------------


def test_two_exec_legs_compare_under_the_tolerance_from_sketches(audits):
    result = audits("reseed_dropout.py", "--no-reseed", options=("--threads", "1,2", "-j", "2"))
    assert result.code == 0, result.report
    (pair,) = result.report["across_legs"]
    assert pair["within_tolerance"] is True
    assert pair["compared"] > 0 and pair["note"] is None
    for leg in result.report["legs"]:
        with Trace(leg["runs"][0]["trace"]) as trace:
            assert trace.has_sketches


def test_compare_under_a_tolerance_without_sketches_is_not_comparable(audits):
    report = audits("manual_update.py", "--updates", "6", "--noise-from", "3").report
    traces = [run["trace"] for run in report["legs"][0]["runs"]]
    result = run_cli("compare", *traces, "--tolerance", "rtol=1e-5,atol=1e-6", "--json", "-")
    assert result.code == 3, result.stdout
    comparison = load_strict(result.stdout)["comparison"]
    assert comparison["within_tolerance"] is None
    assert comparison["note"].startswith("not comparable")


def test_every_report_written_is_strict_json(audits):
    """Every report.json the module's audits wrote parses strictly (no Infinity, NaN)."""
    audits("manual_update.py", "--updates", "6", "--noise-from", "3")
    audits("reseed_dropout.py", "--no-reseed", options=("--threads", "1,2", "-j", "2"))
    audits("reseed_dropout.py")
    reports = sorted(audits.folder.glob("out*/*/report.json"))
    assert len(reports) >= 3
    for path in reports:
        load_strict(path)
