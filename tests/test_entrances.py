"""The doors users come in by: framework trainers (Lightning, transformers' Trainer,
accelerate), launchers (`accelerate launch`, a shell script starting two torchrun agents),
the as-is pair that says what the preset masked, and a folder per run.

Each planted case is audited once per test run (module-scoped fixtures) and read by the
tests that need it. The framework tests skip, with the reason, where the framework is not
installed (`pip install -e '.[frameworks]'`; `make test` installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from reprocheck.contract import Script
from reprocheck.report.terminal import render
from reprocheck.script import ScriptError, target_of
from reprocheck.trace import Trace

from .conftest import FIXED_HASH_SEED, SCRIPTS, CliResult, run_cli, script_line

AS_IS = {"REPROCHECK_AS_IS": "1"}
# the as-is pair (no preset) of a script whose answer does not hang on the hash seed: with
# one set in the environment its runs fork (tests/conftest.py)
AS_IS_FORKED = {**AS_IS, **FIXED_HASH_SEED}


def _needs(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[frameworks]'")


class Audits:
    """``reprocheck exec`` of a command, each distinct one once per module."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[tuple, CliResult] = {}

    def __call__(
        self,
        *command: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> CliResult:
        key = (command, options, tuple(sorted((env or {}).items())), str(cwd))
        if key not in self.done:
            index = len(self.done)
            if "--attribute" not in options:
                options = ("--no-attribute", *options)
            report = self.folder / f"r{index}.json"
            result = run_cli(
                "exec", "-q", "--out", str(self.folder / f"out{index}"), "--json", str(report),
                *options, "--", *command,
                env=env, cwd=cwd,
            )  # fmt: skip
            assert result.report is not None, result.stderr
            self.done[key] = result
        return self.done[key]


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> Audits:
    return Audits(tmp_path_factory.mktemp("entrances"))


def _script(name: str) -> str:
    return str(SCRIPTS / name)


def _text(report: dict) -> str:
    console = Console(record=True, width=400)
    render(report, console)
    return console.export_text()


def _finding(report: dict, code: str) -> dict:
    return next(f for f in report["findings"] if f["code"] == code)


# -- user objects' own methods are never called from a hook ------------------------------


def test_a_module_that_hashes_state_set_late_in_its_init_is_audited(audits):
    # Scorer.__hash__ reads an attribute its __init__ sets last: the hook on
    # Module.__init__ runs before it exists, and holds the module by identity
    result = audits("python", _script("late_seed.py"), env=AS_IS_FORKED)
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert [m["type"] for m in report["config"]["models"]] == ["Scorer"]
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [4, 4]
    # seeded at its top: the as-is runs agree, and no warning
    assert report["as_is"]["verdict"] == "reproducible"
    assert report["as_is"]["first_divergence"] is None
    assert [f["code"] for f in report["findings"]] == []
    assert "as is       ✔ 2 runs with no preset" in _text(report)


# -- the as-is pair ----------------------------------------------------------------------


def test_the_as_is_pair_names_a_model_built_before_the_script_seeds(audits):
    result = audits("python", _script("late_seed.py"), "--late", env=AS_IS_FORKED)
    assert result.code == 0, result.report  # a warning: the exit code is the verdict's
    report = result.report
    assert report["verdict"] == "reproducible"
    assert report["as_is"]["first_divergence"] == {
        "step": 0,
        "phase": "weights",
        "tensor": "body.0.weight",
        "process": "main",
    }
    built = script_line("late_seed.py", "model = Scorer()")
    seeded = script_line("late_seed.py", "torch.manual_seed(0)")
    assert report["as_is"]["cause"] == {
        "kind": "seeded-late",
        "call": report["as_is"]["cause"]["call"],
        "drawn_before": {"model": "Scorer", "where": built},
    }
    assert report["as_is"]["cause"]["call"]["where"] == seeded
    found = _finding(report, "RC030")
    assert found["severity"] == "warning"
    assert found["message"] == (
        "as its user runs it (no preset) the runs differ at step 0 · weights · "
        f"body.0.weight: Scorer was built at {built} before `torch.manual_seed(0)` at "
        f"{seeded} seeded torch — the preset seeded it before the script's first line"
    )
    assert found["fix"] == (
        f"seed before building the model: move `torch.manual_seed(0)` at {seeded} above {built}"
    )
    assert "(RC030 below)" in _text(report)


def test_as_is_audits_the_script_as_its_user_runs_it(audits):
    options = ("--as-is", "--no-measure")
    result = audits(
        "python", _script("late_seed.py"), "--late", options=options, env=FIXED_HASH_SEED
    )
    assert result.code == 1
    report = result.report
    assert report["config"]["preset"] == "none"
    first = report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (0, "weights", "body.0.weight")
    assert report["as_is"] is None  # the verdict itself is as is


# -- a folder per run, and the files runs share ------------------------------------------


def test_files_every_run_wrote_at_one_path_are_reported(audits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    result = audits("python", _script("checkpoint_dir.py"), cwd=folder)
    assert result.code == 0, result.report
    found = _finding(result.report, "RC031")
    assert found["severity"] == "warning"
    assert found["message"].startswith(
        "every run wrote checkpoints/ckpt.pt, checkpoints/train.log: the runs share"
    )
    assert found["evidence"]["paths"] == [
        str(folder / "checkpoints" / "ckpt.pt"),
        str(folder / "checkpoints" / "train.log"),
    ]


def test_run_in_the_arguments_gives_each_run_its_own_folder(audits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    command = ("python", _script("checkpoint_dir.py"), "--output_dir", "out/{run}")
    result = audits(*command, cwd=folder, env=AS_IS_FORKED)
    assert result.code == 0, result.report
    assert [f["code"] for f in result.report["findings"]] == []
    assert result.report["as_is"]["verdict"] == "reproducible"
    # the as-is pair's runs are named apart from the audit's own: none reads another's files
    assert sorted(os.listdir(folder / "out")) == [
        "as-is-cpu-r0",
        "as-is-cpu-r1",
        "cpu-r0",
        "cpu-r1",
    ]
    assert sorted(os.listdir(folder / "out" / "cpu-r0")) == ["ckpt.pt", "train.log"]
    # the command as the user gave it: a golden of it matches whichever run recorded it
    assert result.report["config"]["command"][-1] == "out/{run}"


# -- launchers ---------------------------------------------------------------------------


def test_a_shell_script_starting_two_torchrun_agents_is_compared_rank_by_rank(audits):
    result = audits("bash", _script("two_agents.sh"), "{port}")
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert report["config"]["name"] == "two_agents"
    for run in report["legs"][0]["runs"]:
        assert [(r["name"], r["rank"], r["steps"]) for r in run["ranks"]] == [
            ("rank0", 0, 4),
            ("rank1", 1, 4),
        ]
    assert report["replica_divergence"] is None


def test_accelerate_launch_is_audited_in_the_process_it_starts(audits):
    _needs("accelerate")
    command = ("accelerate", "launch", "--cpu", "--num_processes", "1")
    result = audits(*command, _script("accelerate_loop.py"))
    assert result.code == 0, result.report
    report = result.report
    assert report["config"]["name"] == "accelerate_loop"
    assert report["config"]["command"] == [*command, _script("accelerate_loop.py")]
    assert [m["type"] for m in report["config"]["models"]] == ["Sequential"]
    assert [o["type"] for o in report["config"]["optimizers"]] == ["AdamW"]
    # 8 batches, 2 accumulated per optimizer step: 4 steps, in the launched process
    for run in report["legs"][0]["runs"]:
        steps = {p["name"]: p["steps"] for p in run["processes"]}
        assert steps == {"main": None, "sub1": 4}


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["no-such-launcher", "train.py"], "no such command: no-such-launcher"),
        (["train.py"], "run a script with its interpreter"),
        ([], "no command given"),
    ],
)
def test_a_command_that_cannot_run_is_one_line_exit_2(words, message, tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    result = run_cli("exec", "-q", "--", *words, cwd=tmp_path)
    assert result.code == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_launcher_forms_name_the_audit_after_the_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    target, file, name = target_of(["bash", "-c", "true", str(script)], "exec")
    assert (target.launch, file, name) == (True, str(script), "train")
    target, file, name = target_of(["python", "-m", "IPython", str(script), "--lr", "1"], "exec")
    assert target == Script(argv=(str(script), "--lr", "1"))
    assert name == "train"
    with pytest.raises(ScriptError, match="is a notebook"):
        target_of(["python", str(tmp_path / "nb.ipynb")], "exec")


def test_as_is_with_another_preset_is_a_usage_error(tmp_path):
    result = run_cli("exec", "-q", "--as-is", "--preset", "strict", "--", "python", "x.py")
    assert result.code == 2
    assert "--as-is runs with no preset: drop --preset strict" in result.stderr


# -- framework trainers ------------------------------------------------------------------


def test_lightning_fit_with_self_log_and_torchmetrics_reproduces(audits):
    _needs("lightning")
    result = audits("python", _script("lightning_fit.py"))
    assert result.code == 0, result.report
    report = result.report
    assert report["verdict"] == "reproducible"
    assert [m["type"] for m in report["config"]["models"]] == ["Regressor"]
    assert [o["type"] for o in report["config"]["optimizers"]] == ["SGD"]
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [4, 4]


def test_a_transformers_trainer_reproduces_and_names_its_seeding_by_the_users_line(audits):
    _needs("transformers")
    result = audits("python", _script("hf_trainer.py"))
    assert result.code == 0, result.report
    report = result.report
    assert [m["type"] for m in report["config"]["models"]] == ["BertForSequenceClassification"]
    assert [o["type"] for o in report["config"]["optimizers"]] == ["AdamW"]
    # 4 optimizer steps of the Trainer's loop
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [4, 4]
    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        seeding = trace.meta["seeding"]
    first = script_line("hf_trainer.py", "set_seed(42)")
    trainer = script_line("hf_trainer.py", "trainer = Trainer(")
    calls = [(c["call"], c["where"].split(" (in ")[0]) for c in seeding]
    # the user's lines: their own set_seed, then the one TrainingArguments(seed=) makes
    assert ("torch.manual_seed", first) in calls and ("torch.manual_seed", trainer) in calls
    assert all(" (in set_seed, transformers/" in c["where"] for c in seeding)


@pytest.mark.slow
def test_a_transformers_trainer_model_built_before_its_seed_is_named(audits):
    _needs("transformers")
    result = audits("python", _script("hf_trainer.py"), "--late-seed", env=AS_IS)
    assert result.code == 0, result.report
    report = result.report
    assert [m["type"] for m in report["config"]["models"]] == ["BertForSequenceClassification"]
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [4, 4]
    first = report["as_is"]["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (
        0,
        "weights",
        "bert.embeddings.word_embeddings.weight",
    )
    built = script_line("hf_trainer.py", "model = BertForSequenceClassification(config)")
    trainer = script_line("hf_trainer.py", "trainer = Trainer(")
    found = _finding(report, "RC030")
    # the user's lines, with the framework's own frame beside the seeding call
    assert f"BertForSequenceClassification was built at {built} before" in found["message"]
    assert f"`torch.manual_seed(42)` at {trainer} (in set_seed, transformers/" in (found["message"])
    assert found["fix"] == (
        f"seed before building the model: call `set_seed(42)` (now reached at {trainer}) "
        f"above {built}"
    )


@pytest.mark.slow
def test_lightning_index_put_backward_diverges_with_its_op_line_and_override(audits):
    _needs("lightning")
    result = audits(
        "python",
        _script("lightning_fit.py"),
        "--table",
        "--deterministic",
        "false",
        options=("--threads", "2", "--attribute"),
    )
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "grads", "table")
    assert (first["op"], first["stage"], first["cause"]) == (
        "aten.index_put",
        "backward",
        "nondeterministic op",
    )
    assert first["source"] == script_line("lightning_fit.py", "rows = self.table[tokens]")
    tried = {item["control"]: item for item in result.report["attribution"]}
    trainer = script_line("lightning_fit.py", "trainer = L.Trainer(")
    assert tried["deterministic algorithms"]["verdict"] == "overridden"
    assert tried["deterministic algorithms"]["overridden_by"].startswith(
        f"`torch.use_deterministic_algorithms(False)` at {trainer} (in _set_torch_flags, "
        "lightning/pytorch/trainer/connectors/accelerator_connector.py:"
    )
    assert tried["one thread"]["verdict"] == "reproducible"


@pytest.mark.slow
def test_accelerate_noise_is_found_in_the_launched_process(audits):
    _needs("accelerate")
    result = audits(
        "accelerate", "launch", "--cpu", "--num_processes", "1",
        _script("accelerate_loop.py"), "--noise",
    )  # fmt: skip
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["process"]) == (1, "loss", "sub1")


@pytest.mark.slow
def test_transformers_trainer_with_workers_and_accumulation_reproduces(audits):
    _needs("transformers")
    result = audits("python", _script("hf_trainer.py"), "--workers", "2", "--accumulate", "2")
    assert result.code == 0, result.report
    assert [run["steps"] for run in result.report["legs"][0]["runs"]] == [4, 4]


@pytest.mark.slow
def test_fabric_wrappers_are_looked_through_in_every_phase(audits):
    _needs("lightning")
    # one thread: the factors' index_put_ backward repeats (2 threads: it does not)
    result = audits("python", _script("fabric_mf.py"), options=("--threads", "1"))
    assert result.code == 0, result.report
    report = result.report
    assert [m["type"] for m in report["config"]["models"]] == ["Factorization"]
    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        names = {(r.phase, r.name) for r in trace.records(1) if r.phase in ("grads", "weights")}
    assert names == {
        (phase, name)
        for phase in ("grads", "weights")
        for name in ("user_factors", "item_factors", "item_bias")
    }


@pytest.mark.slow
def test_the_as_is_pair_proves_a_hash_seed_dependence(audits):
    result = audits("python", _script("char_vocab.py"), env=AS_IS)
    assert result.code == 0, result.report
    section = result.report["as_is"]
    assert (section["first_divergence"]["step"], section["first_divergence"]["phase"]) == (
        1,
        "outputs",
    )
    assert section["cause"] == {"kind": "hash-seed"}
    found = _finding(result.report, "RC030")
    assert "with one fixed PYTHONHASHSEED they agree" in found["message"]
