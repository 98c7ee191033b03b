"""`reprocheck exec` on unchanged training scripts (the Python API: test_api.py)."""

from __future__ import annotations

import inspect

import pytest

from reprocheck.trace import Trace

from .conftest import ROOT, run_cli, run_exec

EXAMPLES = ROOT / "examples"


def _exec(tmp_path, *command: str, options: tuple[str, ...] = ()) -> tuple[int, dict]:
    report = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    result = run_exec(tmp_path / "out", report, command, options)
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
    assert [m["prefix"] for m in report["config"]["models"]] == [""]  # the loss is no model
    with Trace(runs[0]["trace"]) as trace:
        phases = {record.phase for record in trace.records(1)}
        assert phases == {"data", "outputs", "loss", "grads", "weights", "optimizer", "rng"}
        assert trace.meta["command"][0].endswith(script)


def test_entropy_noise_is_caught_at_its_step(tmp_path):
    code, report = _exec(
        tmp_path,
        str(EXAMPLES / "noisy_train.py"),
        "--noise-from",
        "3",
        options=("--no-measure",),  # a script's replay: tests/test_script_shapes.py
    )
    assert code == 1
    d = report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (3, "outputs", "output")
    assert d["runs"] == [[0], [1]]
    assert d["replay"] is None


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
        (("--", "no-such-launcher", "train.sh"), "no such command: no-such-launcher"),
        (("--", "python"), "no script given"),
        (("--", "python", "missing.py"), "no such script: missing.py"),
        (("--", "python", "-c", "print(1)"), "python option -c is not supported"),
        ((), "no command given"),
    ],
)
def test_exec_usage_errors(command, needle):
    result = run_cli("exec", *command)
    assert result.code == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1


def test_several_models_and_optimizers_named_by_creation_order(tmp_path):
    script = tmp_path / "gan.py"
    script.write_text(
        inspect.cleandoc("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        disc = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
        opt_d = torch.optim.SGD(disc.parameters(), lr=1e-2, momentum=0.9)
        bce = nn.BCEWithLogitsLoss()  # no parameters: not a model
        for _ in range(2):
            fake = gen(torch.randn(16, 4))
            real = torch.randn(16, 2) + 2
            loss_d = bce(disc(real), torch.ones(16, 1))
            loss_d = loss_d + bce(disc(fake.detach()), torch.zeros(16, 1))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()  # steps 1, 3: the discriminator is called first, created second
            loss_g = bce(disc(fake), torch.ones(16, 1))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    """)
    )
    code, report = _exec(tmp_path, str(script))
    assert code == 0, report
    assert report["config"]["models"] == [
        {"prefix": "model0.", "type": "Sequential"},
        {"prefix": "model1.", "type": "Sequential"},
    ]
    assert report["config"]["optimizers"] == [
        {"prefix": "opt0.", "type": "Adam"},
        {"prefix": "opt1.", "type": "SGD"},
    ]
    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        assert trace.meta["status"] == "complete"
        names = {step: {(r.phase, r.name) for r in trace.records(step)} for step in (1, 2)}
    assert ("grads", "model1.0.weight") in names[1] and ("grads", "model0.0.weight") in names[2]
    assert {n for p, n in names[1] if p == "outputs"} == {
        "model0.output",
        "model1.output0",
        "model1.output1",
    }
    assert ("optimizer", "opt1.model1.0.weight.momentum_buffer") in names[1]
    assert ("optimizer", "opt0.model0.0.weight.exp_avg") in names[2]
    assert [run["steps"] for run in report["legs"][0]["runs"]] == [4, 4]


@pytest.mark.slow
def test_a_hanging_script_times_out_with_its_steps_kept(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(
        inspect.cleandoc("""
        import time
        import torch
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, 100):
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 2:
                print("waiting for a lock that never comes", flush=True)
                time.sleep(600)
    """)
    )
    code, report = _exec(tmp_path, str(script), options=("--timeout", "4"))
    assert code == 3 and report["verdict"] == "failed"
    for run in report["legs"][0]["runs"]:
        assert (run["status"], run["steps"]) == ("timeout", 2)  # steps 0-2 kept
        assert run["error"] == "timed out after 4 s at step 3"
        assert run["log_tail"][-1] == "waiting for a lock that never comes"
