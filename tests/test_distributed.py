"""Distributed audits: unchanged DDP scripts under ``torchrun`` (gloo, 2 ranks, CPU).

Each planted case is audited once (module-scoped) and asserted exactly: run to run rank by
rank, the replicas within each run, the rules they match, failures and hangs."""

from __future__ import annotations

import os
import time

import pytest

from reprocheck.parent.audit import AuditOptions, _jobs
from reprocheck.replicas import REPLICA_PHASES
from reprocheck.script import ScriptError, script_config

from .conftest import ROOT, SCRIPTS, run_cli, script_line
from .strict_json import load_strict

SCRIPT = "ddp_train.py"
# One torchrun job audit runs in the default suite (the clean DDP job); the planted cases
# are `slow` (`make test-slow`), each still audited once and shared between its tests.
TORCHRUN = ("torchrun", "--standalone", "--nproc_per_node", "2")


class Jobs:
    def __init__(self, folder):
        self.folder, self.done = folder, {}

    def __call__(
        self,
        *args: str,
        options: tuple[str, ...] = ("--no-measure",),
        runs: int = 2,
        script: str = SCRIPT,
    ):
        key = (script, *args, "|", *options, runs)
        if key not in self.done:
            index = len(self.done)
            out, report = self.folder / f"out{index}", self.folder / f"r{index}.json"
            self.done[key] = run_cli(
                "exec", "-n", str(runs), "-q", "--no-attribute", "--out", str(out),
                "--json", str(report), *options, "--", *TORCHRUN, str(SCRIPTS / script), *args,
            )  # fmt: skip
        return self.done[key]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return Jobs(tmp_path_factory.mktemp("ddp"))


def test_a_clean_ddp_job_reproduces_and_its_replicas_are_identical(job):
    result = job()
    report = result.report
    assert (result.code, report["verdict"], report["first_divergence"]) == (0, "reproducible", None)
    assert report["config"]["command"][:4] == list(TORCHRUN)
    assert report["config"]["name"] == "ddp_train"
    runs = report["legs"][0]["runs"]
    assert [r["run"] for r in runs] == [0, 1]
    for run in runs:
        ranks = run["ranks"]
        assert [(r["name"], r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [
            ("rank0", 0, 0, 2),
            ("rank1", 1, 1, 2),
        ]
        assert {(r["backend"], r["device"], r["status"], r["steps"]) for r in ranks} == {
            ("gloo", "cpu", "complete", 6)  # 96 samples, 2 ranks, batches of 16, 2 epochs
        }
    replicas = report["replicas"]
    assert replicas["checked"] and replicas["identical"]
    assert (replicas["ranks"], replicas["runs"], replicas["steps"]) == (2, [0, 1], 7)
    assert report["replica_divergence"] is None and report["findings"] == []
    assert set(REPLICA_PHASES) <= set(report["legs"][0]["phases"])


@pytest.mark.slow
def test_a_scheduler_stepped_on_rank_0_only_splits_the_replicas_at_its_step(job):
    result = job("--sched-rank0")
    report = result.report
    assert (result.code, report["verdict"]) == (1, "diverged")
    assert report["first_divergence"] is None  # every run does the same: runs agree
    split = report["replica_divergence"]
    assert (split["step"], split["phase"], split["tensor"], split["kind"]) == (
        2,
        "weights",
        "fc1.weight",
        "parameter",
    )
    assert (split["ranks"], split["runs"]) == ([[0], [1]], [0, 1])
    assert split["agreed"] == {"grad": True, "parameter": False, "buffer": None, "optimizer": True}
    (finding,) = report["findings"]
    assert finding["code"] == "RC023" and "scheduler" in finding["message"]
    assert "every rank" in finding["fix"]


@pytest.mark.slow
def test_unsynced_batchnorm_buffers_are_named_while_parameters_agree(job):
    report = job("--batchnorm", "--no-broadcast-buffers").report
    split = report["replica_divergence"]
    # step 0 is the state before the first forward: the replicas' own batch statistics
    # first move the running mean in step 1's forward
    assert (split["step"], split["phase"], split["tensor"], split["kind"]) == (
        1,
        "weights",
        "norm.running_mean",
        "buffer",
    )
    assert split["agreed"]["parameter"] is True
    (finding,) = report["findings"]
    assert finding["code"] == "RC022"
    assert "SyncBatchNorm" in finding["fix"] and "broadcast_buffers" in finding["fix"]
    assert report["exit_code"] == 1


@pytest.mark.slow
def test_batchnorm_with_ddps_buffer_broadcast_is_not_an_alarm(job):
    """DDP (default) copies rank 0's buffers in at each forward, so after a step each rank
    holds its own update of them: expected, not compared."""
    report = job("--batchnorm").report
    assert (report["verdict"], report["replica_divergence"]) == ("reproducible", None)
    assert report["replicas"]["identical"] and "buffers not compared" in report["replicas"]["note"]


@pytest.mark.slow
def test_dropout_reseeded_from_entropy_diverges_run_to_run_on_its_rank(job):
    result = job("--dropout", "0.3", "--entropy-dropout", options=())
    d = result.report["first_divergence"]
    assert result.code == 1
    assert (d["step"], d["phase"], d["tensor"], d["process"], d["rank"]) == (
        1,
        "outputs",
        "output",
        "rank0",
        0,
    )
    # zoom under torchrun: the replay reran the whole job and captured rank 0's step
    assert (d["module"], d["op"]) == ("Dropout", "aten.bernoulli_")
    assert d["source"].endswith(script_line(SCRIPT, "return self.fc2(self.drop(").split("/")[-1])
    assert "torch.seed()" in d["seeding"]


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_audit_naming_the_rank_and_its_line(job):
    result = job("--fail-rank", "1", runs=1)
    assert result.code == 3 and result.report["verdict"] == "failed"
    line = script_line(SCRIPT, 'raise RuntimeError(f"rank {self.rank} lost')
    for run in result.report["legs"][0]["runs"]:
        assert run["status"] == "failed"
        assert run["error"].startswith("rank1: RuntimeError: rank 1 lost its data shard (")
        assert run["error"].split("(")[1].split(" in ")[0].endswith(line.split("/")[-1])


def _processes_running(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_rank_stuck_in_a_collective_ends_at_the_timeout_with_every_rank(job):
    started = time.monotonic()
    result = job("--hang-rank", "1", options=("--no-measure", "--timeout", "12"), runs=1)
    assert result.code == 3
    assert time.monotonic() - started < 60
    (run,) = result.report["legs"][0]["runs"]
    assert run["status"] == "timeout" and "timed out after 12 s" in run["error"]
    # it hung in training: both ranks had committed their first step
    assert [(r["rank"], r["steps"]) for r in run["ranks"]] == [(0, 1), (1, 1)]
    time.sleep(0.5)
    assert _processes_running("--hang-rank") == []  # no rank left behind


def test_repeats_run_side_by_side_only_where_each_job_finds_its_own_port():
    script = str(SCRIPTS / SCRIPT)
    config, target = script_config(
        ["torchrun", "--standalone", "--nproc_per_node", "2", script], "exec"
    )
    assert (target.nproc_per_node, target.fixed_port) == (2, False)
    assert target.argv[:2] == ("-m", "torch.distributed.run")
    assert _jobs(config, AuditOptions(target=target, jobs=4)) == 4
    assert _jobs(config, AuditOptions(target=target)) is None  # as for any script: cores ÷ threads
    for fixed in (
        ["torchrun", "--nproc_per_node", "2", script],  # static rendezvous, port 29500
        ["torchrun", "--nproc_per_node", "2", "--master-port", "29611", script],
        ["python", "-m", "torch.distributed.run", "--rdzv-endpoint", "localhost:29400",
         "--rdzv-backend", "c10d", script],
    ):  # fmt: skip
        config, target = script_config(fixed, "exec")
        assert target.fixed_port is True
        assert _jobs(config, AuditOptions(target=target, jobs=4)) == 1


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["torchrun", "--nproc_per_node", "2", "missing.py"], "no such script: missing.py"),
        (["torchrun", "--no-python", "echo"], "runs no Python script"),
        (["torchrun", "--bogus-option", "x.py"], "torchrun: "),
    ],
)
def test_torchrun_command_lines_that_name_no_script_are_usage_errors(words, message, tmp_path):
    with pytest.raises(ScriptError, match=message):
        script_config(words, "exec")
    result = run_cli("exec", "-q", "--out", str(tmp_path), "--", *words)
    assert result.code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fsdp2_shards_are_compared_rank_by_rank_and_not_as_replicas(job):
    """fully_shard: each rank holds its shard of every parameter (a DTensor, recorded as its
    local shard); FSDP2's unsharded parameters, freed after backward, are no weights."""
    report = job(script="fsdp2_train.py").report
    assert (report["verdict"], report["exit_code"]) == ("reproducible", 0)
    assert report["config"]["models"] == [{"prefix": "", "type": "FSDPModel"}]
    replicas = report["replicas"]
    assert replicas["checked"] is False and "shards, as with FSDP" in replicas["note"]
    assert set(report["legs"][0]["phases"]) >= {"grads", "weights", "optimizer"}
    for run in report["legs"][0]["runs"]:
        assert [(r["rank"], r["steps"], r["status"]) for r in run["ranks"]] == [
            (0, 5, "complete"),
            (1, 5, "complete"),
        ]


@pytest.mark.slow
def test_fsdp2_with_one_rank_drawing_from_entropy_diverges_on_that_rank(job):
    d = job("--entropy-rank", "1", script="fsdp2_train.py").report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"], d["rank"]) == (1, "outputs", "output", 1)


@pytest.mark.slow
def test_a_config_trains_under_torchrun_with_distributed(tmp_path):
    """`distributed:` in a config: each run a torchrun job of the config's loop in DDP with
    a seeded DistributedSampler, recorded rank by rank, replicas checked."""
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "name: ddp-mlp\nsteps: 3\n"
        "model: {factory: reprocheck.zoo.models:mlp,\n"
        "        kwargs: {in_features: 32, hidden: 32, depth: 2}}\n"
        "data: {factory: reprocheck.zoo.data:classification,\n"
        "       kwargs: {n: 128, features: 32}, batch_size: 16}\n"
        "optimizer: {name: SGD, lr: 0.1, momentum: 0.9}\n"
        "distributed: {nproc_per_node: 2, backend: gloo}\n"
    )
    result = run_cli(
        "run", str(config), "-q", "--no-attribute", "--out", str(tmp_path / "out"),
        "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    report = result.report
    assert (result.code, report["verdict"]) == (0, "reproducible"), result.stderr
    assert report["config"]["command"][:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    for run in report["legs"][0]["runs"]:
        assert [(r["rank"], r["steps"], r["backend"]) for r in run["ranks"]] == [
            (0, 3, "gloo"),
            (1, 3, "gloo"),
        ]
    assert report["replicas"]["identical"] and report["replicas"]["steps"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("distributed: {nproc_per_node: 0}", "distributed.nproc_per_node"),
        ("distributed: {backend: mpi}", "expected gloo or nccl, got 'mpi'"),
        ("distributed: {ranks: 2}", "unknown key 'ranks'"),
    ],
)
def test_bad_distributed_settings_are_config_errors(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs" / "demo.yaml").read_text() + "\n" + text + "\n")
    result = run_cli("run", str(config), "-q", "--out", str(tmp_path))
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_hand_written_all_reduce_is_recorded_and_a_difference_placed_before_it(job):
    """The tutorial's average_gradients: each all_reduce's input and output are recorded
    (phase `comm`); noise added on rank 1 before the reduction is found there, at the
    input of the first all-reduce, on rank 1."""
    clean = job(script="allreduce_train.py").report
    assert clean["verdict"] == "reproducible" and "comm" in clean["legs"][0]["phases"]
    assert clean["replicas"]["identical"]
    d = job("--noise-rank", "1", script="allreduce_train.py").report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"], d["rank"]) == (1, "comm", "all_reduce:0.in", 1)


@pytest.mark.slow
def test_gradients_changed_on_one_rank_after_the_all_reduce_are_placed_after_it(job):
    report = job("--clip-rank", "0", script="allreduce_train.py").report
    split = report["replica_divergence"]
    assert (split["step"], split["phase"], split["tensor"], split["kind"]) == (
        1,
        "grads",
        "0.weight",
        "grad",
    )
    assert split["agreed"]["comm"] is True  # every rank received the same reduction
    (finding,) = report["findings"]
    assert finding["code"] == "RC024" and "after communication" in finding["message"]
    assert report["first_divergence"] is None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_ctrl_c_stops_every_job_and_every_rank(tmp_path):
    """SIGINT while both runs' ranks wait in a collective: exit 130, a partial report, and
    no rank left (torchrun starts each in a session of its own)."""
    import signal
    import subprocess
    import sys

    report_path = tmp_path / "report.json"
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # see test_reliability
    parent = subprocess.Popen(
        [
            sys.executable, "-m", "reprocheck", "exec", "-q", "--no-attribute", "--no-measure",
            "-j", "2", "--out", str(tmp_path / "out"), "--json", str(report_path), "--",
            *TORCHRUN, str(SCRIPTS / SCRIPT), "--hang-rank", "1",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    signal.signal(signal.SIGINT, ignored)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both jobs' rank 0 has committed its first step
        traces = list((tmp_path / "out").glob("*/cpu-r*-rank0.sqlite"))
        if len(traces) == 2 and all(os.path.getsize(t) > 0 for t in traces):
            break
        time.sleep(0.3)
    time.sleep(2)
    parent.send_signal(signal.SIGINT)
    parent.communicate(timeout=60)
    assert parent.returncode == 130
    report = load_strict(report_path)
    assert report["interrupted"] is True
    assert {run["status"] for run in report["legs"][0]["runs"]} == {"interrupted"}
    time.sleep(0.5)
    assert _processes_running("--hang-rank") == []
