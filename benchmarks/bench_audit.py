"""What an audit costs: recorded vs plain steps, op capture vs DebugMode, whole runs,
trace size, and comparing large traces. Ratios measured side by side in this one run,
medians of repeats, torch on one thread.

    python benchmarks/bench_audit.py [--markdown] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from reprocheck.compare import first_divergence
from reprocheck.config import PHASES
from reprocheck.localize import OpCapture
from reprocheck.recorder import StepRecorder, batch_tensors, flatten, parameter_names
from reprocheck.trace import TraceWriter
from reprocheck.zoo import data, models

ROOT = Path(__file__).resolve().parent.parent


def workloads() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    mlp = models.mlp(in_features=784, hidden=512, classes=10, depth=2)
    images = data.images(n=64, size=16)
    seqs = data.sequences(n=64, seq_len=16)
    return {
        "mlp 784-512-512-10": (mlp, (torch.randn(64, 784), torch.randint(0, 10, (64,)))),
        "cnn": (models.cnn(), images.tensors),
        "transformer": (models.transformer(), seqs.tensors),
    }


class Loop:
    """One training step of a workload, plain or recorded (all phases)."""

    def __init__(self, model: torch.nn.Module, batch, folder: str, recorded: bool) -> None:
        self.model, self.batch = model, batch
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.names = parameter_names(model)
        self.recorder = None
        if recorded:
            path = os.path.join(folder, f"t{time.monotonic_ns()}.sqlite")
            self.recorder = StepRecorder(TraceWriter(path, {}), PHASES)
        self.step_number = 0
        # seconds spent in each recorder call, per step (set to a dict to measure them)
        self.parts: dict[str, list[float]] | None = None

    def step(self, capture: object = None) -> None:
        x, y = self.batch
        rec = self.recorder
        self.step_number += 1
        clock, parts = time.perf_counter, self.parts
        if rec:
            started = clock()
            rec.begin(self.step_number)
            rec.add_all("data", batch_tensors(self.batch))
            if parts is not None:
                parts["data"].append(clock() - started)
        out = self.model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if rec:
            started = clock()
            rec.add_all("outputs", flatten(out, "output"))
            rec.add_all("loss", [("loss", loss)])
            if parts is not None:
                parts["outputs, loss"].append(clock() - started)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if rec:
            started = clock()
            rec.grads(self.model)
            if parts is not None:
                parts["grads"].append(clock() - started)
        self.optimizer.step()
        if rec:
            started = clock()
            rec.state(self.model, [self.optimizer], self.names)
            if parts is not None:
                parts["weights, optimizer, rng"].append(clock() - started)
                started = clock()
            rec.commit(self.step_number, loss)
            if parts is not None:
                parts["commit"].append(clock() - started)


PARTS = ["data", "outputs, loss", "grads", "weights, optimizer, rng", "commit"]


def recorder_parts(steps: int = 300) -> list[dict]:
    """Where a recorded step's added time goes: the recorder's calls timed inside the
    training loop (where the step has evicted them from the CPU caches), medians in µs."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, batch) in workloads().items():
            loop = Loop(model, batch, folder, recorded=True)
            for _ in range(5):
                loop.step()
            loop.parts = {part: [] for part in PARTS}
            for _ in range(steps):
                loop.step()
            records = loop.recorder.records / loop.step_number
            us = {part: statistics.median(v) * 1e6 for part, v in loop.parts.items()}
            rows.append({"workload": name, "records": records, "us": us})
    return rows


def per_step(fn, steps: int) -> float:
    gc.collect()  # untimed: no variant pays for the garbage another left behind
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def step_overhead(repeats: int, folder: str) -> list[dict]:
    from torch.utils._debug_mode import DebugMode  # noqa: F401 - checked below

    rows = []
    for name, (model, batch) in workloads().items():
        plain = Loop(model, batch, folder, recorded=False)
        recorded = Loop(model, batch, folder, recorded=True)
        for loop in (plain, recorded):
            per_step(loop.step, 3)
        samples: dict[str, list[float]] = {
            "plain": [],
            "recorded": [],
            "op capture": [],
            "DebugMode": [],
            "DebugMode+stack": [],
        }
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for _ in range(40):  # single steps, alternating: the median of many pairs
                samples["plain"].append(per_step(plain.step, 1))
                samples["recorded"].append(per_step(recorded.step, 1))
            for _ in range(8):
                samples["op capture"].append(per_step(lambda loop=plain: _captured(loop), 1))
                debug = _debug_mode(plain, stack=False)
                if debug is not None:
                    samples["DebugMode"].append(debug)
                    samples["DebugMode+stack"].append(_debug_mode(plain, stack=True))
        med = {k: statistics.median(v) for k, v in samples.items() if v}
        rows.append(
            {
                "workload": name,
                "ms": {k: v * 1e3 for k, v in med.items()},
                "ratio": {k: v / med["plain"] for k, v in med.items()},
            }
        )
    return rows


def _captured(loop: Loop) -> None:
    """A step at op depth: every aten op with exact digests, module and source line."""
    capture = OpCapture(loop.model)
    x, y = loop.batch
    with capture.during("forward"):
        loss = torch.nn.functional.cross_entropy(loop.model(x), y)
    loop.optimizer.zero_grad(set_to_none=True)
    with capture.during("backward"):
        loss.backward()
    with capture.during("optimizer"):
        loop.optimizer.step()


def _debug_mode(loop: Loop, stack: bool) -> float | None:
    try:
        from torch.utils._debug_mode import DebugMode
    except ImportError:
        return None

    def step() -> None:
        with DebugMode(record_stack_trace=stack):
            loop.step()

    return per_step(step, 1)


def whole_runs(repeats: int, folder: str) -> dict[str, float]:
    """`reprocheck run -n 2` against one plain run of the same training, as processes."""
    plain = (
        "import torch; torch.set_num_threads(1)\n"
        "from reprocheck.configfile import load_config\n"
        "from reprocheck.child import loop\n"
        f"c = load_config({str(ROOT / 'configs' / 'demo.yaml')!r})\n"
        "torch.manual_seed(0); m = loop.build_model(c, torch.device('cpu'))\n"
        "d = loop.build_data(c); o = loop.build_optimizer(c, m); s = loop.batches(d, 'cpu')\n"
        "for _ in range(c.steps):\n"
        "    x, y = next(s); loss = torch.nn.functional.cross_entropy(m(x), y)\n"
        "    o.zero_grad(); loss.backward(); o.step()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    audit = [
        sys.executable,
        "-m",
        "reprocheck",
        "run",
        str(ROOT / "configs" / "demo.yaml"),
        "-n",
        "2",
        "-q",
        "--out",
        folder,
        "--device",
        "cpu",
    ]
    times: dict[str, list[float]] = {"one plain run": [], "run -n 2": []}
    for _ in range(repeats):
        for name, command in (
            ("one plain run", [sys.executable, "-c", plain]),
            ("run -n 2", audit),
        ):
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def zoom_share(folder: str) -> dict[str, float]:
    """A 200-step audit of a model that goes nondeterministic at step 150: what the replay
    of that step with op capture (the zoom) costs next to the runs themselves."""
    config = Path(folder) / "zoom.yaml"
    config.write_text(
        (ROOT / "configs" / "planted-forward.yaml")
        .read_text()
        .replace("steps: 6", "steps: 200")
        .replace("{step: 3}", "{step: 150}")
    )
    report = Path(folder) / "zoom.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "reprocheck",
            "run",
            str(config),
            "-q",
            "--out",
            folder,
            "--no-attribute",
            "--no-fail-fast",
            "--json",
            str(report),
        ],
        env=env,
        capture_output=True,
    )
    import json

    result = json.loads(report.read_text())
    timings = result["timings"]
    return {
        "runs_s": timings["runs_s"],
        "zoom_s": timings["measure_s"],
        "total_s": timings["total_s"],
        "replay_from": (result["first_divergence"] or {}).get("replay_from") or 0,
    }


def big_traces(folder: str, steps: int = 1000, per_step: int = 1000) -> dict[str, float]:
    """Two identical traces of steps × per_step records: bytes per record, compare time."""
    paths = []
    for index in range(2):
        path = os.path.join(folder, f"big{index}.sqlite")
        writer = TraceWriter(path, {})
        ids = [
            writer.tensor_id("weights", f"layer{i}.weight", (64, 64), "float32")
            for i in range(per_step)
        ]
        started = time.perf_counter()
        for step in range(steps):
            rows = [
                (tid, (step * per_step + seq).to_bytes(16, "little")) for seq, tid in enumerate(ids)
            ]
            writer.write_step(step, rows, None, None, 0.0)
        write_s = time.perf_counter() - started
        writer.finish("complete")
        paths.append(path)
    records = steps * per_step
    started = time.perf_counter()
    assert first_divergence(paths) is None
    compare_s = time.perf_counter() - started
    return {
        "records": records,
        "bytes_per_record": os.path.getsize(paths[0]) / records,
        "write_s": write_s,
        "compare_s": compare_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        steps = step_overhead(args.repeats, folder)
        parts = recorder_parts()
        runs = whole_runs(max(3, args.repeats // 2), folder)
        traces = big_traces(folder)
        zoom = zoom_share(folder)
    bar = "| " if args.markdown else ""
    end = " |" if args.markdown else ""
    sep = " | " if args.markdown else "  "
    variants = ["plain", "recorded", "op capture", "DebugMode", "DebugMode+stack"]
    print(
        bar
        + sep.join(
            ["workload"]
            + [f"{v} ms" for v in variants]
            + ["recorded ÷ plain", "op capture ÷ plain", "DebugMode ÷ plain"]
        )
        + end
    )
    if args.markdown:
        print("|---" * (len(variants) + 4) + "|")
    for row in steps:
        ms, ratio = row["ms"], row["ratio"]
        cells = [row["workload"]] + [f"{ms[v]:.2f}" if v in ms else "–" for v in variants]
        cells += [
            f"{ratio['recorded']:.3f}×",
            f"{ratio['op capture']:.2f}×",
            f"{ratio['DebugMode']:.2f}×" if "DebugMode" in ratio else "–",
        ]
        print(bar + sep.join(cells) + end)
    print()
    print(
        bar
        + sep.join(["recorder call, µs per step (in the loop)"] + PARTS + ["sum", "records"])
        + end
    )
    if args.markdown:
        print("|---" * (len(PARTS) + 3) + "|")
    for row in parts:
        us = row["us"]
        cells = [row["workload"]] + [f"{us[p]:.0f}" for p in PARTS]
        cells += [f"{sum(us.values()):.0f}", f"{row['records']:.0f}"]
        print(bar + sep.join(cells) + end)
    print()
    ratio = runs["run -n 2"] / runs["one plain run"]
    print(
        f"whole runs (demo, 20 steps, processes): one plain run {runs['one plain run']:.2f} s, "
        f"`reprocheck run -n 2` {runs['run -n 2']:.2f} s → {ratio:.2f}×"
    )
    print(
        f"traces: {traces['records']:,} records, {traces['bytes_per_record']:.1f} B/record, "
        f"written in {traces['write_s']:.2f} s; comparing two of them: {traces['compare_s']:.2f} s"
    )
    share = zoom["zoom_s"] / zoom["total_s"]
    print(
        f"zoom: a 200-step audit diverging at step 150: runs {zoom['runs_s']:.1f} s, replay "
        f"from step {zoom['replay_from']} to step 150 with op capture {zoom['zoom_s']:.1f} s "
        f"→ {share:.0%} of the audit"
    )


if __name__ == "__main__":
    main()
