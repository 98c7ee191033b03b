"""Compile legs: the same training eager and through ``torch.compile`` (inductor's C++
backend on this CPU), compared under the tolerance; within each leg runs still bit for bit.

The config audit is the default suite's real compiled audit; the script audits that
compile are ``slow`` (each run compiles)."""

from __future__ import annotations

import pytest

from reprocheck.trace import Trace

from .conftest import CONFIGS, SCRIPTS, run_cli, script_line


def _legs(report):
    return [leg for leg in report["legs"] if leg["status"] != "skipped"]


def _meta(report, leg: int, key: str):
    with Trace(_legs(report)[leg]["runs"][0]["trace"]) as trace:
        return trace.meta.get(key)


def test_a_config_compared_eager_against_compiled(audit):
    result = audit("demo.yaml", "--compile", "off,on", "--steps", "3")
    report = result.report
    eager, compiled = _legs(report)
    assert (eager["name"], compiled["name"]) == ("cpu-t1", "cpu-t1-compiled")
    (across,) = report["across_legs"]
    assert across["pair"] == ["cpu-t1", "cpu-t1-compiled"]
    with Trace(eager["runs"][0]["trace"]) as trace:
        observable = sum(not r.latent for r in trace.records())
    assert across["compared"] == observable and across["note"] is None  # every one paired
    # the compiled model's own numerics: its forward matches eager's here, its backward
    # (AOT-compiled) sums the first bias gradient in another order
    first = across["first_differing"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "grads", "layers.0.bias")
    assert 0 < first["max_rel_diff"] < 1e-5
    assert across["within_tolerance"] is True
    assert (report["verdict"], result.code, report["first_divergence"]) == ("reproducible", 0, None)
    assert _meta(report, 1, "compiled") is True and _meta(report, 0, "compiled") is False
    assert (
        compiled["compile"]["cache_dir"]
        and "shared by the leg's runs" in compiled["compile"]["note"]
    )
    assert eager["compile"] is None
    assert compiled["compile"]["cache_warm"] in (True, False)  # said, whichever it was


def test_compile_off_makes_a_scripts_torch_compile_return_its_model(tmp_path):
    result = run_cli(
        "exec", "-q", "--no-attribute", "--compile", "off", "--out", str(tmp_path),
        "--json", str(tmp_path / "r.json"), "--", "python", str(SCRIPTS / "nanogpt_style.py"),
        "--compile=True", "--max_iters=3",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    (leg,) = _legs(result.report)
    assert leg["name"] == "cpu"  # one setting: no second leg to compare
    line = script_line("nanogpt_style.py", "model = torch.compile(model)")
    assert _meta(result.report, 0, "compile") == {"mode": False, "calls": [line]}
    assert _meta(result.report, 0, "compiled") is False  # it ran eager


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--compile", "sometimes"], "--compile takes off, on or off,on"),
        (["--compile", ""], "--compile takes"),
    ],
)
def test_bad_compile_values_are_usage_errors(words, message, tmp_path):
    result = run_cli("run", str(CONFIGS / "demo.yaml"), "-q", "--out", str(tmp_path), *words)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_script_that_compiles_nothing_is_compiled_in_place_with_on(tmp_path):
    result = run_cli(
        "exec", "-q", "--no-attribute", "--threads", "1", "--compile", "off,on", "--out",
        str(tmp_path), "--json", str(tmp_path / "r.json"),
        "--", "python", str(SCRIPTS / "segment_pool.py"),
    )  # fmt: skip
    report = result.report
    eager, compiled = _legs(report)
    assert eager["records"] == compiled["records"]  # the outputs still recorded, eagerly
    (across,) = report["across_legs"]
    first = across["first_differing"]
    assert (first["step"], first["phase"]) == (1, "outputs")
    assert _meta(report, 1, "compile") == {"mode": True, "calls": []}
    assert _meta(report, 1, "compiled") is True


@pytest.mark.slow
def test_a_compiled_nanogpt_diverges_and_the_eager_capture_says_the_compiled_code_did_it(
    tmp_path,
):
    """nanoGPT's own `torch.compile(model)`, two threads: the compiled embedding backward
    sums wte's gradient in another order each run; the op capture (eager) repeats."""
    result = run_cli(
        "exec", "-q", "--no-attribute", "--compile", "on", "--threads", "2", "--out",
        str(tmp_path), "--json", str(tmp_path / "r.json"), "--", "python",
        str(SCRIPTS / "nanogpt_style.py"), "--compile=True", "--max_iters=3",
    )  # fmt: skip
    d = result.report["first_divergence"]
    assert result.code == 1
    assert (d["leg"], d["step"], d["phase"], d["tensor"]) == (
        "cpu-t2-compiled",
        1,
        "grads",
        "wte.weight",
    )
    assert d["replays_diverged"] == 0  # the op capture (eager) repeats
    # down the ladder: through aot_eager (eager kernels) it repeats too: inductor's code
    assert d["ladder"] == {"inductor": "diverges", "aot_eager": "repeats", "eager": "repeats"}
    assert d["rung"].startswith("compile-caused")
    # inductor's own forward graphs, digested call by call, agree: the backward did it
    assert (
        d["compiled_output"]["differs"] is False
        and "compiled backward" in d["compiled_output"]["note"]
    )


AUTOTUNED = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
model = torch.compile(model, mode="max-autotune")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
for _ in range(2):
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


def test_an_autotuning_compile_is_named_with_its_line(tmp_path):
    """mode="max-autotune" picks kernels by timing (RC026) and records CUDA graphs (RC027):
    both said with the call's line, as warnings (the verdict is the runs')."""
    script = tmp_path / "autotuned.py"
    script.write_text(AUTOTUNED)
    result = run_cli(
        "exec", "-q", "--no-attribute", "--compile", "off", "--out", str(tmp_path / "out"),
        "--json", str(tmp_path / "r.json"), "--", "python", str(script),
    )  # fmt: skip
    report = result.report
    assert (result.code, report["verdict"]) == (0, "reproducible")
    codes = {f["code"]: f for f in report["findings"]}
    assert set(codes) == {"RC026", "RC027"}
    for item in codes.values():
        assert item["severity"] == "warning"
        assert item["evidence"]["where"].endswith("autotuned.py:5")
        assert "max-autotune" in item["message"]


@pytest.mark.slow
def test_dropout_in_a_compiled_model_is_named_unless_strict_falls_back_to_eager_random(
    tmp_path,
):
    def audit(*options: str) -> dict:
        result = run_cli(
            "exec", "-n", "1", "-q", "--no-attribute", *options, "--compile", "on",
            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), "--",
            "python", str(SCRIPTS / "nanogpt_style.py"), "--compile=True", "--dropout=0.1",
            "--max_iters=2",
        )  # fmt: skip
        return result.report

    (found,) = [f for f in audit()["findings"] if f["code"] == "RC028"]
    assert found["severity"] == "warning" and "drop (Dropout)" in found["message"]
    # the strict preset sets fallback_random: torch's generator, as eager
    assert "RC028" not in {f["code"] for f in audit("--preset", "strict")["findings"]}


RECOMPILING = """
import torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=16)
for x, y in loader:  # 16, 16, then 8: the last batch recompiles
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


@pytest.mark.slow
def test_a_recompile_while_training_is_named(tmp_path):
    script = tmp_path / "recompiling.py"
    script.write_text(RECOMPILING)
    result = run_cli(
        "exec", "-n", "1", "-q", "--no-attribute", "--compile", "on", "--out",
        str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), "--", "python", str(script),
    )  # fmt: skip
    (found,) = [f for f in result.report["findings"] if f["code"] == "RC029"]
    assert found["evidence"]["end"] > found["evidence"]["step1"] >= 1
    assert result.code == 0  # a warning: the verdict is the runs'


@pytest.mark.slow
def test_an_entropy_value_in_a_compiled_forward_persists_down_the_ladder_to_its_line(tmp_path):
    result = run_cli(
        "exec", "-q", "--no-attribute", "--compile", "on", "--out", str(tmp_path / "out"),
        "--json", str(tmp_path / "r.json"), "--", "python", str(SCRIPTS / "entropy_scale.py"),
    )  # fmt: skip
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"]) == (1, "outputs", "output")
    assert d["ladder"] == {"inductor": "diverges", "aot_eager": "diverges", "eager": "diverges"}
    assert d["rung"].startswith("it persists at every rung down to eager")
    graph = d["compiled_output"]  # what the compiled code computed: its first graph's output
    assert (graph["differs"], graph["graph"], graph["call"]) == (True, 0, 0)
    assert (d["module"], d["op"], d["cause"]) == ("Block", "aten.mul", "a Python value differs")
    assert d["source"].endswith(script_line("entropy_scale.py", "* self.scale").split("/")[-1])
