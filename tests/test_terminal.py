"""The terminal view's header and summary say what the runs did, not what was asked."""

from __future__ import annotations

import copy

from rich.console import Console

from reprocheck.report.terminal import render

PHASES = ["data", "outputs", "loss", "grads", "weights", "optimizer", "rng"]


def _run(index: int, steps: int | None) -> dict:
    return {"run": index, "status": "complete", "steps": steps, "trace": f"r{index}.sqlite"}


def _report(**config) -> dict:
    return {
        "verdict": "reproducible",
        "config": {
            "name": "demo",
            "seed": 0,
            "repeats": 2,
            "steps": 10,
            "preset": "seeded",
            "record": list(PHASES),
            **config,
        },
        "legs": [
            {
                "name": "cpu-t1",
                "device": "cpu",
                "threads": 1,
                "status": "ok",
                "reason": None,
                "records": 154,
                "runs": [_run(0, 10), _run(1, 10)],
            }
        ],
        "first_divergence": None,
        "across_legs": [],
        "environment": {
            "torch": "2.13.0+cpu",
            "python": "3.11.7",
            "cpu": "AMD EPYC",
            "threads": 1,
            "controls": {"preset": "seeded", "seeded": ["random", "numpy", "torch"]},
        },
        "out_dir": "reports/demo-1",
        "timings": {"total_s": 1.0, "runs_s": 1.0},
    }


def _lines(report: dict, width: int = 100) -> list[str]:
    console = Console(width=width, record=True, highlight=False, soft_wrap=True)
    render(report, console)
    return console.export_text().splitlines()


def _summary(report: dict) -> str:
    return next(line for line in _lines(report) if line.startswith("✔ REPRODUCIBLE"))


def test_one_leg_header_and_summary():
    lines = _lines(_report())
    assert lines[0] == "reprocheck 0.1.0 · torch 2.13.0+cpu · python 3.11.7 · AMD EPYC · 1 thread"
    assert lines[1] == "config  demo (seed 0, 2 runs × 10 steps, preset seeded)"
    assert _summary(_report()) == (
        "✔ REPRODUCIBLE  2 runs × 11 steps × 7 phases · 154 digests bitwise identical"
    )


def test_legs_with_different_thread_counts_are_all_named():
    report = _report()
    second = copy.deepcopy(report["legs"][0])
    second.update(name="cpu-t2", threads=2)
    skipped = {"name": "cpu-t4", "threads": 4, "status": "skipped", "reason": "x", "runs": []}
    report["legs"] += [second, skipped]
    assert _lines(report)[0].endswith(" · AMD EPYC · threads 1,2")
    report["legs"] = [report["legs"][1]]  # one leg: its count, whatever the first trace says
    assert _lines(report)[0].endswith(" · AMD EPYC · 2 threads")
    report["legs"][0]["threads"] = None  # torch's default: the environment's count
    assert _lines(report)[0].endswith(" · AMD EPYC · 1 thread")


def test_an_unseeded_audit_says_unseeded():
    report = _report(preset="none")
    report["environment"]["controls"] = {"preset": "none", "seeded": []}
    assert _lines(report)[1] == "config  demo (unseeded, 2 runs × 10 steps, preset none)"
    del report["environment"]["controls"]  # no trace says what was applied: the preset does
    assert _lines(report)[1] == "config  demo (unseeded, 2 runs × 10 steps, preset none)"
    report["environment"]["controls"] = {"preset": "none", "seeded": ["torch"]}  # seed_torch: true
    assert _lines(report)[1] == "config  demo (seed 0, 2 runs × 10 steps, preset none)"


def test_the_summary_counts_committed_steps_not_requested_ones():
    report = _report(steps=20)
    assert " 2 runs × 11 steps × " in _summary(report)
    report["legs"][0]["runs"] = [_run(0, 10), _run(1, 7)]
    assert " 2 runs × 8–11 steps × " in _summary(report)
    report["legs"][0]["runs"] = [_run(0, None), _run(1, None)]
    assert " 2 runs × 0 steps × " in _summary(report)
    report["legs"][0]["runs"] = [_run(0, 0)]
    assert "  1 run × 1 step × 7 phases" in _summary(report)


def test_the_summary_counts_recorded_phases_when_the_report_has_them():
    report = _report()
    assert " × 7 phases · " in _summary(report)
    report["config"]["record"] = ["data", "loss"]
    assert " × 2 phases · " in _summary(report)
    report["legs"][0]["phases"] = ["loss"]  # what was recorded beats what was configured
    assert " × 1 phase · " in _summary(report)
    report["legs"][0]["phases"] = []
    assert " × 0 phases · " in _summary(report)


def test_the_across_legs_table_is_indented_and_fits_100_columns():
    report = _report()
    second = copy.deepcopy(report["legs"][0])
    second.update(name="cuda:0-t16", threads=16)
    report["legs"].append(second)
    tensor = "encoder.layers.11.self_attention.in_projection.weight"
    report["across_legs"] = [
        {
            "pair": ["cpu-t1", "cuda:0-t16"],
            "tolerance": "rtol=1e-05,atol=1e-06",
            "within_tolerance": False,
            "compared": 123456,
            "identical": 12345,
            "first_outside": {"step": 12, "phase": "optimizer", "tensor": tensor + ".exp_avg"},
            "worst": {"max_rel_diff": 1.25e-3, "step": 143, "tensor": tensor},
            "growth": [],
            "note": None,
        }
    ]
    report["verdict"] = "diverged"
    lines = _lines(report)
    at = next(i for i, line in enumerate(lines) if line.startswith("  across legs"))
    assert lines[at].rstrip() == "  across legs under rtol=1e-05,atol=1e-06"
    table = lines[at + 1 : at + 3]
    assert table[0].startswith("  legs ") and "worst rel Δ" in table[0]
    assert table[1].startswith(
        "  cpu-t1 vs cuda:0-t16  outside  12,345/123,456  0.00125 · step 143"
    )
    assert "…" in table[1]  # cut, not wrapped: the next line is the report's next line
    assert lines[at + 3].startswith("  time ")
    assert all(len(line) <= 100 for line in lines)
    wide = _lines(report, width=240)
    assert any(f"step 12 · optimizer · {tensor}.exp_avg" in line for line in wide)
