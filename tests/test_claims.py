"""What a report says is what the traces show: the seeding call that made the generators
differ (written as the calls happen, so a run stopped by fail-fast keeps them), a
generator built from entropy named with its line, and a fix that names the script's own
call. Each script is audited once (module-scoped) and read by the tests that need it.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import ScriptAudits, run_cli, script_line


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> ScriptAudits:
    return ScriptAudits(tmp_path_factory.mktemp("claims"))


def _finding(report: dict, code: str) -> dict:
    return next(f for f in report["findings"] if f["code"] == code)


def test_a_reseed_mid_run_is_named_though_fail_fast_stopped_a_run(audits):
    result = audits("late_reseed.py", options=("--no-measure",))
    assert result.code == 1, result.report
    report = result.report
    first = report["first_divergence"]
    assert (first["step"], first["phase"]) == (20, "outputs")
    reseed = script_line("late_reseed.py", "            torch.seed()")
    # run #1 was stopped by fail-fast: its seeding calls were in its trace all the same
    assert first["seeding"] == (
        f"every run re-seeded torch's CPU generator from entropy at {reseed} (`torch.seed()`)"
    )
    found = _finding(report, "RC015")
    assert found["fix"] == (
        f"`torch.seed()` at {reseed} seeds from entropy, other in every run: remove it, or "
        "seed with a fixed value (`torch.manual_seed(0)`)"
    )
    # the page's loss plot keeps a run fail-fast stopped early, marked and named
    import copy

    from reprocheck.report.html import render_html

    early = copy.deepcopy(report)
    late = early["plot"]["runs"][1]
    late["status"], late["losses"] = "stopped", late["losses"][:3]
    page = render_html(early)
    assert f"run #{late['run']} (stopped at step 2)" in page


def test_a_collator_generator_built_from_entropy_is_named_with_its_line(audits):
    result = audits("collate_entropy.py", options=("--no-measure",))
    assert result.code == 1, result.report
    report = result.report
    first = report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "data", "input")
    built = script_line("collate_entropy.py", "else np.random.default_rng()")
    found = _finding(report, "RC015")
    assert found["message"] == (
        f"`np.random.default_rng()` at {built} builds a generator from entropy in every run: "
        "what it draws differs, and the runs part at step 1 · data"
    )
    assert found["fix"] == (
        f"seed it: `np.random.default_rng(0)` at {built} (or derive it from your seed)"
    )


def test_the_seeded_collator_reproduces_with_no_finding(audits):
    result = audits("collate_entropy.py", "--seeded")
    assert result.code == 0, result.report
    assert result.report["findings"] == []


# a race between two threads: it shows in most audits, not in every one (slow, not flaky CI)
@pytest.mark.slow
def test_batches_from_workers_are_data_and_the_zoom_names_the_steps_own_op(audits):
    result = audits("token_table.py", "--workers", "4", options=("--threads", "2"))
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "grads", "table")
    # not `aten.set_`/`aten.empty` where the workers' batches are unpickled
    assert (first["op"], first["stage"], first["cause"]) == (
        "aten.index_put",
        "backward",
        "nondeterministic op",
    )
    assert first["source"] == script_line("token_table.py", "rows = self.table[tokens]")


GRAD_NOISE = """
import os
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
for step in range(3):
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    model.weight.grad += 1e-3 * torch.rand(model.weight.shape, generator=noise)
    opt.step()
"""


def test_the_page_says_why_it_draws_no_loss_gap_and_shows_no_none(tmp_path):
    script = tmp_path / "grad_noise.py"
    script.write_text(GRAD_NOISE)
    page = tmp_path / "report.html"
    result = run_cli(
        "exec", "-q", "--no-attribute", "--no-measure", "--steps", "1",
        "--out", str(tmp_path / "out"), "--html", str(page), "--", "python", str(script),
    )  # fmt: skip
    assert result.code == 1, result.stderr
    html = page.read_text()
    # step 1's losses agree (its gradients differ): the |Δ loss| panel says so, not an
    # empty log axis
    assert "no |Δ loss| to draw: the losses the two groups recorded are equal at every" in html
    assert ">None<" not in html and ">[]<" not in html


BATCHNORM = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
for step in range(2):
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_step_0_is_the_state_before_the_first_forward(tmp_path):
    from reprocheck.fingerprint import fingerprint
    from reprocheck.trace import Trace

    script = tmp_path / "bn.py"
    script.write_text(BATCHNORM)
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "-n", "1", "--no-attribute", "--out", str(tmp_path / "out"),
        "--json", str(report), "--", "python", str(script),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    with Trace(result.report["legs"][0]["runs"][0]["trace"]) as trace:
        step0 = {r.name: r.digest for r in trace.records(0) if r.phase == "weights"}
        step1 = {r.name: r.digest for r in trace.records(1) if r.phase == "weights"}
    # the running statistics as BatchNorm1d made them, not as the first forward left them
    assert step0["1.running_mean"] == fingerprint(torch.zeros(8)).value
    assert step0["1.running_var"] == fingerprint(torch.ones(8)).value
    assert step1["1.running_mean"] != step0["1.running_mean"]


# a race between two threads: it shows in most audits, not in every one (slow, not flaky CI)
@pytest.mark.slow
def test_the_op_that_made_the_divergent_tensor_is_named_beside_the_first_differing_op(audits):
    result = audits("factorization.py", options=("--threads", "2"))
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "grads", "user_factors")
    # backward runs in reverse: the item factors' gradient is accumulated (and differs) first
    assert (first["op"], first["stage"]) == ("aten.index_put", "backward")
    assert first["source"] == script_line("factorization.py", "v = self.item_factors[items]")
    made = first["made_by"]
    assert (made["tensor"], made["op"], made["shape"], made["first_shapes"]) == (
        "user_factors",
        "aten.index_put",
        [64, 32],
        [[16, 32]],
    )
    assert made["source"] == script_line("factorization.py", "u = self.user_factors[users]")


COMPILED_NOISE = """
import random
import torch
from torch import nn
torch.manual_seed(0)
scale = random.SystemRandom().uniform(0.9, 1.1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(x) * scale


model = torch.compile(Net())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 8), torch.randn(16, 1)
for step in range(3):
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow  # torch.compile: ~15 s
def test_a_script_that_compiles_itself_says_the_capture_ran_eager(tmp_path):
    script = tmp_path / "compiled_noise.py"
    script.write_text(COMPILED_NOISE)
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(report),
        "--", "python", str(script),
    )  # fmt: skip
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["op"], first["cause"]) == (
        1,
        "outputs",
        "aten.mul",
        "a Python value differs",
    )
    assert first["rung"].startswith("eager (op capture): the model ran torch.compile'd")
