"""The warm pool (reprocheck/parent/pool.py): a forked run is a fresh run, bit for bit, and
shows every divergence a fresh interpreter shows — entropy-seeded generators and address
order included — while the runs that make a verdict still start fresh."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reprocheck.compare import first_divergence
from reprocheck.config import DeterminismConfig
from reprocheck.configfile import load_config
from reprocheck.parent import pool
from reprocheck.parent.launch import Launcher, plan_legs
from reprocheck.script import script_config
from reprocheck.trace import Trace

from .conftest import CONFIGS, ROOT, run_exec

SCRIPTS = ROOT / "tests" / "scripts"


def _runs(config, folder, fork: bool, target=None):
    folder.mkdir(exist_ok=True)
    leg = plan_legs(config)[0]
    launcher = Launcher(config, folder, fork_runs=fork, target=target)
    (leg,), _ = launcher.run([leg])
    return leg.runs


# a script's case is slow: the default suite's run-0 test below audits a script with a fresh
# run 0 and two forks, exit 0 asserted (the forks record what the fresh run records)
@pytest.mark.parametrize("kind", ["config", pytest.param("script", marks=pytest.mark.slow)])
def test_a_forked_run_records_what_a_fresh_run_records(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("REPROCHECK_POOL", "1")  # fork_runs=False must mean a fresh start
    if kind == "config":
        config = dataclasses.replace(load_config(CONFIGS / "demo.yaml"), repeats=1, steps=4)
        target = None
    else:
        config, target = script_config(
            ["python", str(SCRIPTS / "segment_pool.py")], "exec", repeats=1
        )
    fresh = _runs(config, tmp_path / "fresh", False, target)
    forked = _runs(config, tmp_path / "forked", True, target)
    assert [r.status for r in fresh + forked] == ["complete", "complete"]
    assert (fresh[0].forked, forked[0].forked) == (False, True)
    assert fresh[0].steps == forked[0].steps > 3
    assert first_divergence([fresh[0].trace, forked[0].trace]) is None


def test_runs_forked_from_several_threads_at_once_each_get_their_own_process(tmp_path):
    # attribution and the doctor audit their variants in threads that share a zygote: a
    # pid handed to the wrong thread would make one run read another's exit as its own
    config = dataclasses.replace(load_config(CONFIGS / "demo.yaml"), repeats=2, steps=1)
    with ThreadPoolExecutor(max_workers=4) as threads:
        legs = list(threads.map(lambda i: _runs(config, tmp_path / f"t{i}", True), range(4)))
    runs = [run for leg in legs for run in leg]
    assert [(r.status, r.forked, r.steps) for r in runs] == [("complete", True, 2)] * 8
    assert len({r.exit_code for r in runs}) == 1


def test_forks_draw_from_generators_seeded_from_entropy_as_fresh_runs_do(tmp_path):
    # an unseeded script (pytorch/examples regression): fresh runs differ at their first
    # weights; forks must too, though they share the zygote's generators at fork time
    config, target = script_config(
        ["python", str(SCRIPTS / "regression_manual.py")], "exec", repeats=2, steps=2
    )
    unseeded = dataclasses.replace(
        DeterminismConfig(preset="none", seed_python=False, seed_numpy=False, seed_torch=False),
        pythonhashseed=0,  # a fixed hash seed: the runs may fork
    )
    config = dataclasses.replace(config, determinism=unseeded)
    runs = _runs(config, tmp_path, True, target.with_steps(2))
    assert [r.forked for r in runs] == [True, True]
    found = first_divergence([r.trace for r in runs])
    assert found is not None and (found.step, found.phase) == (0, "weights")


def test_an_address_order_case_diverges_and_no_control_fixes_it(tmp_path, monkeypatch):
    # the product's default: run 0 starts fresh, run 1 forks (a fork and a fresh
    # interpreter drew one order in 0 of 7,200 pairs: benchmarks/bench_address_order.py)
    monkeypatch.setenv("REPROCHECK_POOL", "1")
    result = run_exec(
        tmp_path / "out", tmp_path / "r.json", (str(SCRIPTS / "set_init.py"),), ("--attribute",)
    )
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["cause"]) == (0, "weights", "initialisation")
    # the replays and every control's reruns are forks: each diverges as fresh runs do
    assert first["replays_diverged"] == 1
    tried = result.report["attribution"]
    assert tried and {item["verdict"] for item in tried} == {"diverged"}, tried
    assert result.report["findings"] == []
    runs = result.report["legs"][0]["runs"]
    assert [run["forked"] for run in runs] == [False, True]


def test_a_verdicts_run_0_starts_fresh_and_its_other_runs_fork(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROCHECK_POOL", "1")
    result = run_exec(
        tmp_path / "out",
        tmp_path / "r.json",
        (str(SCRIPTS / "set_init.py"), "--list"),
        ("-n", "3"),
    )
    assert result.code == 0, result.report
    runs = result.report["legs"][0]["runs"]
    assert [(run["forked"], run["status"]) for run in runs] == [
        (False, "complete"),
        (True, "complete"),
        (True, "complete"),
    ]


# slow: the thread-count zygotes are also exercised by the one-thread control test below
@pytest.mark.slow
def test_each_thread_count_forks_from_a_zygote_of_its_own_count(tmp_path, monkeypatch):
    # NumPy's OpenBLAS sizes its pool from OMP_NUM_THREADS when `import torch` loads it,
    # so a fork computes a count's bits only from a zygote started with that count. Here
    # NumPy features, then torch: 1 and 2 threads differ in their bits, and each leg's
    # run 0 (fresh) and run 1 (a fork) must agree bit for bit
    monkeypatch.setenv("REPROCHECK_POOL", "1")
    result = run_exec(
        tmp_path / "out",
        tmp_path / "r.json",
        (str(SCRIPTS / "thread_count.py"), "--numpy-features", "--steps", "2"),
        ("--threads", "1,2"),
    )
    assert result.code == 0, result.report.get("first_divergence")
    legs = result.report["legs"]
    assert [[run["forked"] for run in leg["runs"]] for leg in legs] == [[False, True]] * 2
    (across,) = result.report["across_legs"]
    assert across["first_differing"] is not None  # the counts' bits differ
    keys = {pool.startup_key({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}) for n in "12"}
    assert len(keys) == 2


def test_the_one_thread_control_forks_from_the_legs_zygote_and_runs_at_one_thread(audit):
    # its two runs are compared with each other alone: they may share the 2-thread
    # zygote's NumPy, with torch set to one thread (the race then goes: it reproduces)
    result = audit("nondeterministic-index.yaml", "--attribute")
    assert result.code == 1, result.stderr
    tried = {item["control"]: item["verdict"] for item in result.report["attribution"]}
    assert tried["one thread"] == "reproducible", tried
    folder = Path(result.report["out_dir"])
    traces = sorted(folder.glob("attribution/control-*/*/cpu-t1-r*.sqlite"))
    assert len(traces) == 2
    for path in traces:
        with Trace(path) as trace:
            assert trace.meta["environment"]["threads"] == 1
            assert trace.meta["environment"]["env"]["OMP_NUM_THREADS"] == "1"


SLOW_SCRIPT = """
import time, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    loss = model(torch.ones(2, 4)).sum()
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    time.sleep(1.5)
"""


def test_a_fork_whose_zygote_dies_is_reported_killed_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROCHECK_POOL", "1")
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT)
    config, target = script_config(["python", str(script)], "exec", repeats=1)
    folder = tmp_path / "out"
    folder.mkdir()
    leg = plan_legs(config)[0]
    launcher = Launcher(config, folder, fork_runs=True, target=target)
    ran: list = []
    worker = threading.Thread(target=lambda: ran.extend(launcher.run([leg])[0]))
    worker.start()
    deadline = time.monotonic() + 60

    def forked_and_running() -> bool:
        running = [task.result for task in launcher.scheduler.running]  # live
        return bool(running) and running[0].status == "running" and running[0].forked

    while not forked_and_running():
        assert time.monotonic() < deadline, "the run never forked"
        time.sleep(0.05)
    zygote = pool.registered(launcher._environment(leg))
    assert zygote is not None
    os.kill(zygote.process.pid, signal.SIGKILL)  # an OOM kill of the server, say
    worker.join(timeout=30)
    assert not worker.is_alive(), "the launcher waited for a fork it can no longer hear"
    (run,) = ran[0].runs
    assert (run.status, run.exit_code) == ("killed", -signal.SIGKILL)


def test_a_zygote_that_never_gets_ready_is_stopped_and_the_runs_start_fresh(tmp_path, monkeypatch):
    # a server stuck in its imports (here a sitecustomize that sleeps in it) must not hold
    # the audit: after READY_TIMEOUT_S it is killed and its runs start fresh
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(
        "import time\n"
        "if b'reprocheck.parent.pool' in open('/proc/self/cmdline', 'rb').read():\n"
        "    time.sleep(10**6)\n"
    )
    monkeypatch.setenv("REPROCHECK_POOL", "1")
    monkeypatch.setenv("PYTHONPATH", str(hang))
    monkeypatch.setattr(pool, "READY_TIMEOUT_S", 1.0)
    config, target = script_config(
        ["python", str(SCRIPTS / "thread_count.py"), "--steps", "1"], "exec", repeats=1
    )
    runs = _runs(config, tmp_path / "out", True, target.with_steps(1))
    assert [(r.status, r.forked) for r in runs] == [("complete", False)]
    stuck = [z for z in pool._ZYGOTES.values() if str(hang) in z.env.get("PYTHONPATH", "")]
    assert stuck and not any(z.alive() for z in stuck)  # killed, not left running


# slow: the default suite audits the same command in the run-0 test above (a fresh run 0
# and two forks, exit 0 asserted: the forks agree with each other and with a fresh run)
@pytest.mark.slow
def test_the_same_script_in_its_modules_order_reproduces(tmp_path):
    result = run_exec(
        tmp_path / "out", tmp_path / "r.json", (str(SCRIPTS / "set_init.py"), "--list")
    )
    assert result.code == 0, result.report


@pytest.mark.parametrize(
    ("env", "device", "forks"),
    [
        ({"PYTHONHASHSEED": "0"}, "cpu", True),
        ({"PYTHONHASHSEED": "7"}, "cpu", True),
        ({}, "cpu", False),  # a random hash seed: every fork would share the zygote's
        ({"PYTHONHASHSEED": "random"}, "cpu", False),
        ({"PYTHONHASHSEED": "0"}, "cuda", False),  # CUDA cannot be used in a fork
        ({"PYTHONHASHSEED": "0", "REPROCHECK_POOL": "0"}, "cpu", False),
    ],
)
def test_which_runs_may_fork(env, device, forks, monkeypatch):
    monkeypatch.delenv("REPROCHECK_POOL", raising=False)
    assert pool.usable(env, device) is forks
