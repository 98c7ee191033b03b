"""What N runs prove: exact binomial bounds, and the report's `evidence`."""

from __future__ import annotations

import pytest

from reprocheck.evidence import percent, rate_interval, runs_for, statement

from .conftest import SCRIPTS, run_cli


def test_zero_of_n_gives_the_exact_one_sided_bound():
    assert rate_interval(0, 59) == (0.0, pytest.approx(1 - 0.05 ** (1 / 59)))
    assert statement(0, 59)["statement"] == "0 of 59 runs diverged: rate < 5% at 95%"
    assert statement(0, 2)["statement"] == "0 of 2 runs diverged: rate < 78% at 95%"
    assert runs_for(0.05) == 59 and runs_for(0.01) == 299 and runs_for(0.5) == 5


def test_k_of_n_gives_the_clopper_pearson_interval():
    # reference values (scipy.stats.beta.ppf) to 4 digits
    low, high = rate_interval(1, 10)
    assert (round(low, 4), round(high, 4)) == (0.0025, 0.445)
    low, high = rate_interval(3, 23)
    assert (round(low, 4), round(high, 4)) == (0.0278, 0.3359)
    assert rate_interval(4, 4) == (pytest.approx(0.05**0.25), 1.0)
    assert statement(1, 10)["statement"] == "1 of 10 runs diverged: rate 10% (0.25%–45% at 95%)"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rate_interval(3, 2), "0 ≤ k ≤ n"),
        (lambda: rate_interval(0, 0), "n ≥ 1"),
        (lambda: runs_for(0.0), "--max-rate must be between 0 and 1"),
        (lambda: runs_for(0.05, 1.0), "--confidence must be between 0 and 1"),
    ],
)
def test_out_of_range_values_say_which(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_percent_keeps_two_significant_digits():
    assert [percent(v) for v in (0.4455, 0.0495, 0.0025, 0.1)] == ["45%", "5%", "0.25%", "10%"]


def test_a_reproducible_report_states_the_bound_for_its_runs(audit):
    result = audit("demo.yaml")
    assert result.code == 0
    evidence = result.report["evidence"]
    assert (evidence["runs"], evidence["diverged"], evidence["confidence"]) == (2, 0, 0.95)
    assert evidence["rate_upper"] == pytest.approx(1 - 0.05**0.5)
    assert evidence["statement"] == "0 of 2 runs diverged: rate < 78% at 95%"


def test_max_rate_finds_an_intermittent_source_and_gives_its_rate(tmp_path):
    # about one run in four is unlucky: 59 runs are asked for (5% at 95%), fail-fast stops
    # them once one differs (a few runs in, not the ~10 of a 1-in-10 source, whose wait
    # made this test's time vary by seconds); none of 59 unlucky: 0.75**59 < 1e-7
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "--max-rate", "5%", "--no-attribute", "--no-measure",
        "--out", str(tmp_path / "out"), "--json", str(report),
        "--", "python", str(SCRIPTS / "intermittent.py"), "--rate", "0.25",
    )  # fmt: skip
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (2, "loss", "loss")
    assert len(result.report["legs"][0]["runs"]) == 59
    evidence = result.report["evidence"]
    k, n = evidence["diverged"], evidence["runs"]
    assert 1 <= k < n and evidence["rate"] == k / n
    assert (evidence["rate_lower"], evidence["rate_upper"]) == pytest.approx(rate_interval(k, n))
    assert evidence["statement"].startswith(f"{k} of {n} runs diverged: rate ")


def test_max_rate_runs_until_the_bound_and_n_caps_it(audit):
    result = audit("demo.yaml", "--max-rate", "50%")
    assert result.code == 0, result.report
    assert len(result.report["legs"][0]["runs"]) == 5
    evidence = result.report["evidence"]
    assert evidence["statement"] == "0 of 5 runs diverged: rate < 45% at 95%"
    assert (evidence["max_rate"], evidence["reached"]) == (0.5, True)
    capped = audit("demo.yaml", "--max-rate", "5%", "-n", "3")
    assert len(capped.report["legs"][0]["runs"]) == 3
    assert capped.report["evidence"]["statement"] == (
        "0 of 3 runs diverged: rate < 63% at 95% — not below 5%: -n caps the runs"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--max-rate", "0"), "--max-rate: 0 is out of range (between 0 and 100%)"),
        (("--max-rate", "five"), "--max-rate takes a rate such as 5% or 0.05 (got 'five')"),
        (("--confidence", "100%"), "--confidence: 100% is out of range (between 0 and 100%)"),
    ],
)
def test_bad_rates_are_one_line_exit_2(options, message, tmp_path):
    for quiet in ((), ("-q",)):
        result = run_cli("exec", *quiet, *options, "--", "python", "train.py", cwd=tmp_path)
        assert result.code == 2
        assert result.stderr.strip().splitlines() == [f"reprocheck: error: {message}"]


def test_coverage_counts_each_phase_and_says_why_one_is_missing(audit, tmp_path):
    result = audit("demo.yaml")
    [entry] = result.report["coverage"]
    assert (entry["leg"], entry["process"], entry["steps"], entry["complete"]) == (
        "cpu-t1",
        "main",
        20,
        True,
    )
    assert entry["tensors"] == {
        "data": [2, 2],
        "outputs": [1, 1],
        "loss": [1, 1],
        "grads": [6, 6],
        "weights": [6, 6],
        "optimizer": [6, 6],
    }
    script = tmp_path / "functional.py"
    script.write_text(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "w = torch.zeros(4, 1, requires_grad=True)\n"
        "opt = torch.optim.SGD([w], lr=0.1)\n"
        "x, y = torch.randn(32, 4), torch.randn(32, 1)\n"
        "for step in range(3):\n"
        "    loss = (x @ w - y).pow(2).mean()\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n"
    )
    report = tmp_path / "r.json"
    result = run_cli(
        "exec", "-q", "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(report),
        "--", "python", str(script),
    )  # fmt: skip
    assert result.code == 0, result.report
    [entry] = result.report["coverage"]
    assert entry["complete"] is False
    assert sorted(entry["missing"]) == ["data", "optimizer", "outputs"]
    assert entry["missing"]["data"] == (
        "no DataLoader batch seen (data read another way is not recorded)"
    )
    assert entry["tensors"] == {"loss": [1, 1], "grads": [1, 1], "weights": [1, 1]}
