"""``--record sparse`` and ``--every M``: a long job's first divergent step found exactly,
then its tensor, by replays of two runs that disagree (tests/scripts/late_noise.py adds
entropy noise to the model's output from a step on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, SCRIPTS, run_cli, run_exec, write_config

NOISE = str(SCRIPTS / "late_noise.py")


def _audit(tmp_path: Path, steps: int, noise_step: int, *options: str):
    # the noise is added from loop index noise_step - 1 on: the optimizer's step noise_step
    # (loud enough that the loss, not only the gradients, differs at that step)
    command = (NOISE, "--steps", str(steps), "--noise-from", str(noise_step - 1))
    command += ("--noise-scale", "1e-3")
    return run_exec(tmp_path / "out", tmp_path / "r.json", command, ("--no-measure", *options))


def _where(report: dict) -> tuple:
    d = report["first_divergence"]
    return (d["step"], d["phase"], d["tensor"])


def test_sparse_records_find_the_step_and_a_full_replay_names_the_tensor(tmp_path):
    result = _audit(tmp_path, 300, 250, "--record", "sparse")
    r = result.report
    assert (result.code, r["verdict"]) == (1, "diverged")
    assert _where(r) == (250, "loss", "loss")
    assert r["config"]["recording"] == "sparse"
    assert r["localized"] == {
        "recording": "sparse",
        "recorded": {"step": 250, "phase": "loss", "process": "main"},
        "interval": None,
        "step": 250,
        "replays": 2,
        "named": True,
        "why": None,
        "every_step_from": None,  # sparse: every step was compared in the records
    }
    assert "records     sparse: the runs first differ at step 250 · loss; 2 replay runs named " in (
        run_cli("show", r["legs"][0]["runs"][0]["trace"]).stdout + _terminal(tmp_path, r)
    )
    # the verdict's traces hold one record per phase and step: outputs, loss, grads,
    # weights, rng (SGD keeps no state)
    run0 = r["legs"][0]["runs"][0]
    shown = run_cli("show", run0["trace"], "--step", "3").stdout
    assert [line.split()[1:3] for line in shown.splitlines() if line[:1].isdigit()] == [
        ["outputs", "*"],
        ["loss", "*"],
        ["grads", "*"],
        ["weights", "*"],
        ["rng", "*"],
    ]


def _terminal(tmp_path: Path, report: dict) -> str:
    from io import StringIO

    from rich.console import Console

    from reprocheck.report.terminal import render

    console = Console(file=StringIO(), width=200, color_system=None)
    render(report, console)
    return console.file.getvalue()


@pytest.mark.slow  # (the 2,000-step test below finds its interval the same way)
def test_sampled_records_find_the_interval_and_replays_the_exact_step(tmp_path):
    result = _audit(tmp_path, 300, 250, "--every", "64")
    r = result.report
    assert _where(r) == (250, "loss", "loss")
    found = r["localized"]
    # sampled steps 0, 64, …, 256: the runs agree at 192 and differ at 256
    assert (found["interval"], found["step"], found["replays"]) == ([192, 256], 250, 4)
    assert found["recorded"]["step"] == 256 and found["named"] is True
    # a script's replays hash every step from its start: every step before was compared
    assert found["every_step_from"] == 0
    assert "before      steps 0–249 identical in every observable phase" in _terminal(tmp_path, r)


@pytest.mark.slow
def test_a_sampled_configs_replays_from_a_checkpoint_say_which_steps_were_compared(tmp_path):
    text = (CONFIGS / "planted-forward.yaml").read_text()
    text = text.replace("steps: 6", "steps: 40").replace("{step: 3}", "{step: 30}")
    report = tmp_path / "r.json"
    result = run_cli(
        "run", str(write_config(tmp_path, text)), "-q", "--every", "8", "--no-attribute",
        "--out", str(tmp_path / "out"), "--json", str(report),
    )  # fmt: skip
    r = result.report
    assert (result.code, _where(r)) == (1, (30, "outputs", "output")), result.stderr
    found = r["localized"]
    # hashed at 0, 8, 16, 24, 32; the replays resumed from the step-24 checkpoint
    assert (found["interval"], found["every_step_from"], found["replays"]) == ([24, 32], 24, 4)
    assert (
        "before      steps 0–23 identical where hashed (every 8 steps), steps 24–29 at every "
        "step, in every observable phase"
    ) in _terminal(tmp_path, r)


@pytest.mark.slow
@pytest.mark.parametrize("options, replays", [(("--record", "sparse"), 2), (("--every", "128"), 4)])
def test_a_2000_step_job_with_noise_from_step_1500_is_found_exactly(tmp_path, options, replays):
    result = _audit(tmp_path, 2000, 1500, *options)
    r = result.report
    assert _where(r) == (1500, "loss", "loss")
    assert (r["localized"]["step"], r["localized"]["replays"]) == (1500, replays)
    if "--every" in options:
        assert r["localized"]["interval"] == [1408, 1536]


@pytest.mark.slow
def test_a_sparse_golden_is_checked_sparse_and_a_full_trace_is_refused(tmp_path, audit):
    golden = tmp_path / "golden.sqlite"
    command = ("--", "python", NOISE, "--steps", "200")
    made = run_cli("record", "-q", "--record", "sparse", "-o", str(golden), "--out",
                   str(tmp_path / "a"), *command)  # fmt: skip
    assert made.code == 0, made.stderr
    assert golden.stat().st_size < 100_000  # 201 steps × 5 phases
    checked = run_cli("check", "--against", str(golden), "-q", "--out", str(tmp_path / "b"),
                      "--json", str(tmp_path / "c.json"), *command)  # fmt: skip
    assert checked.code == 0, checked.stderr
    assert checked.report["golden"]["matches"] is True
    assert checked.report["config"]["recording"] == "sparse"
    # a trace recorded in full (the shared demo audit's): said in one line
    sparse = checked.report["legs"][0]["runs"][0]["trace"]
    full = audit("demo.yaml").report["legs"][0]["runs"][0]["trace"]
    refused = run_cli("compare", str(golden), full)
    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [
        "reprocheck: error: the traces were recorded differently (sparse vs full): record both "
        "the same way (--record, --every)"
    ]
    assert run_cli("compare", str(golden), sparse).code == 0
    wrong = run_cli("check", "--against", str(golden), "-q", "--every", "5", *command)
    assert wrong.code == 2 and "the golden was recorded sparse" in wrong.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (("--record", "all"), "--record takes full or sparse"),
        (("--record", "sparse", "--threads", "1,2"), "compare runs bit for bit within one leg"),
        (("--every", "0"), "--every"),
    ],
)
def test_bad_recording_options_are_one_line_and_exit_2(options, message):
    result = run_cli("exec", "-q", *options, "--", "python", NOISE, "--steps", "3")
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_sampled_audits_canary_is_flipped_at_a_hashed_step_and_caught_there(tmp_path):
    result = run_exec(
        tmp_path / "out", tmp_path / "r.json", (NOISE, "--steps", "30"),
        ("--every", "10", "--no-as-is-check"),
        env={"REPROCHECK_CANARY": "1", "REPROCHECK_OBSERVER": "1"},
    )  # fmt: skip
    r = result.report
    assert (result.code, r["verdict"]) == (0, "reproducible")
    (process,) = r["canary"]["processes"]
    assert (r["canary"]["caught"], r["canary"]["step"]) == (True, 10)
    assert process["found"] == {"step": 10, "phase": "weights", "tensor": "0.weight"}
    assert r["observer"]["agrees"] is True
    # the headline says which steps its digests are of
    assert "digests bitwise identical (every 10 steps)" in _terminal(tmp_path, r)
