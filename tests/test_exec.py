"""`reprocheck exec` on unchanged training scripts, and the Python API."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import reprocheck
from reprocheck.trace import Trace

from .conftest import ROOT, run_cli

EXAMPLES = ROOT / "examples"


def _exec(tmp_path, *command: str, options: tuple[str, ...] = ()) -> tuple[int, dict]:
    report = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    result = run_cli(
        "exec",
        "-n",
        "2",
        "-q",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(report),
        *options,
        "--",
        "python",
        *command,
    )
    assert result.report is not None, result.stderr
    return result.code, result.report


@pytest.mark.parametrize(
    ("script", "args", "steps"),
    [
        pytest.param(
            "word_lm.py", ("--epochs", "1", "--sentences", "40"), 10, marks=pytest.mark.slow
        ),
        ("cnn_augment.py", ("--epochs", "1", "--n", "96", "--workers", "2"), 3),
        pytest.param(
            "regression_scheduler.py", ("--epochs", "1", "--n", "256"), 4, marks=pytest.mark.slow
        ),
    ],
)
def test_examples_reproduce(tmp_path, script, args, steps):
    code, report = _exec(tmp_path, str(EXAMPLES / script), *args)
    assert code == 0, report
    assert report["verdict"] == "reproducible"
    runs = report["legs"][0]["runs"]
    assert [run["steps"] for run in runs] == [steps, steps]
    with Trace(runs[0]["trace"]) as trace:
        phases = {record.phase for record in trace.records(1)}
        assert phases == {"data", "outputs", "loss", "grads", "weights", "optimizer", "rng"}
        assert trace.meta["command"][0].endswith(script)


def test_entropy_noise_is_caught_at_its_step(tmp_path):
    code, report = _exec(tmp_path, str(EXAMPLES / "noisy_train.py"), "--noise-from", "3")
    assert code == 1
    d = report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "outputs", "output")
    assert d["runs"] == [[0], [1]]


def test_steps_stops_each_run_cleanly(tmp_path):
    code, report = _exec(
        tmp_path,
        str(EXAMPLES / "regression_scheduler.py"),
        "--epochs",
        "3",
        options=("--steps", "2"),
    )
    assert code == 0
    for run in report["legs"][0]["runs"]:
        assert (run["status"], run["steps"]) == ("complete", 2)


def test_sys_exit_and_caught_interrupt_keep_complete_traces(tmp_path):
    # exit status 0 through sys.exit: complete; a nonzero status is a failed run (exit 3)
    code, report = _exec(
        tmp_path,
        str(EXAMPLES / "regression_scheduler.py"),
        "--epochs",
        "1",
        "--n",
        "128",
        "--exit-code",
        "0",
    )
    assert code == 0 and report["verdict"] == "reproducible"
    code, report = _exec(
        tmp_path,
        str(EXAMPLES / "regression_scheduler.py"),
        "--epochs",
        "1",
        "--n",
        "128",
        "--exit-code",
        "4",
    )
    assert code == 3
    for run in report["legs"][0]["runs"]:
        assert run["error"] == "the script exited with status 4"
        assert run["steps"] == 2


def test_caught_keyboard_interrupt_still_records(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(
        inspect.cleandoc("""
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            for step in range(10):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 2:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            print("stopped by the user")
    """)
    )
    code, report = _exec(tmp_path, str(script))
    assert code == 0, report
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [3, 3]


def test_crashing_script_is_exit_3_with_its_traceback_tail(tmp_path):
    code, report = _exec(
        tmp_path, str(EXAMPLES / "noisy_train.py"), "--noise-from", "99", "--crash-at", "4"
    )
    assert code == 3
    lines, start = inspect.getsourcelines(_noisy_main())
    line = start + next(i for i, text in enumerate(lines) if "raise ValueError" in text)
    for run in report["legs"][0]["runs"]:
        assert run["status"] == "failed" and run["steps"] == 3
        assert (
            run["error"]
            == f"ValueError: bad batch at step 4 (examples/noisy_train.py:{line} in main)"
        )
        assert run["log_tail"][-1] == "ValueError: bad batch at step 4"


def _noisy_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("noisy_train", EXAMPLES / "noisy_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (("--", "bash", "train.sh"), "exec runs a Python script"),
        (("--", "python"), "no script given"),
        (("--", "python", "missing.py"), "no such script: missing.py"),
        (("--", "python", "-c", "print(1)"), "python option -c is not supported"),
        ((), "exec runs a Python script"),
    ],
)
def test_exec_usage_errors(command, needle):
    result = run_cli("exec", *command)
    assert result.code == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1


def _train_for_api() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_api_audit_runs_a_function_in_child_processes(tmp_path):
    report = reprocheck.audit(_train_for_api, repeats=2, out=tmp_path)
    assert report["verdict"] == "reproducible"
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [3, 3]
    with pytest.raises(ValueError, match="not importable"):
        reprocheck.audit(lambda: None)


def test_api_recorder_traces_compare(tmp_path):
    traces = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        with reprocheck.Recorder(model, optimizer, trace=tmp_path / f"{name}.sqlite") as rec:
            for step in range(1, 5):
                x = torch.randn(8, 4)
                if step == 3:
                    x = x + torch.randn(8, 4, generator=noise)
                loss = model(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                rec.step(batch=x, output=None, loss=loss)
        traces.append(str(tmp_path / f"{name}.sqlite"))
    result = run_cli("compare", *traces, "--json", "-")
    assert result.code == 1, result.stderr
    import json

    d = json.loads(result.stdout)["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "data", "input")
