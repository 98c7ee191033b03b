"""What recording costs a long job, per step: full, sparse and sampled records against a
plain step, at three model sizes with AdamW, torch on one thread.

Each mode runs in a fresh process (its peak memory is its own): a plain MLP training loop,
recorded through :class:`~reprocheck.recorder.StepRecorder` as the config loop records
(data, outputs, loss, gradients, weights, optimizer state, generators). Per-step times are
taken around each step (start-up is never in them), medians over the steps after warm-up;
the hashing floor is the bytes a step hashes divided by the fingerprint's bandwidth on the
same tensors, measured in the same process.

    python benchmarks/bench_long_runs.py [--steps 30] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table

# (name, width, layers, batch): ~1M, ~10M, ~40M parameters; the batch sets the step time
SIZES = [("~1M", 1024, 1, 160), ("~10M", 1600, 4, 160), ("~40M", 2560, 6, 160)]
MODES = ["plain", "full", "sparse", "every 10"]


class Loop:
    """One model, its AdamW and (but ``plain``) its recorder, stepped on the same batch."""

    def __init__(self, width: int, layers: int, batch: int, mode: str, steps: int, folder: str):
        import torch

        from reprocheck.config import PHASES
        from reprocheck.contract import Recording
        from reprocheck.recorder import StepRecorder, parameter_names
        from reprocheck.trace import TraceWriter

        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.model = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 10))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.names = parameter_names(self.model)
        self.x, self.y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
        self.trace = os.path.join(folder, f"{mode.replace(' ', '')}-{time.monotonic_ns()}.sqlite")
        self.recorder = None
        self.times: list[float] = []
        self.step = 0
        if mode != "plain":
            recording = {
                "full": Recording(),
                "sparse": Recording("sparse"),
                "every 10": Recording("sparse", 10),
            }[mode]
            self.recorder = StepRecorder(
                TraceWriter(self.trace, {}), PHASES, recording=recording, last=steps
            )
            self.recorder.begin(0)
            self.recorder.state(self.model, [self.optimizer], self.names)
            self.recorder.commit(0, None)

    def run(self) -> None:
        import torch

        from reprocheck.recorder import batch_tensors, flatten

        started = time.perf_counter()
        self.step += 1
        rec, model, optimizer = self.recorder, self.model, self.optimizer
        if rec:
            rec.begin(self.step)
            rec.add_all("data", batch_tensors((self.x, self.y)))
        out = model(self.x)
        loss = torch.nn.functional.cross_entropy(out, self.y)
        if rec:
            rec.add_all("outputs", flatten(out, "output"))
            rec.add_all("loss", [("loss", loss)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if rec:
            rec.grads(model)
        optimizer.step()
        if rec:
            rec.state(model, [optimizer], self.names)
            rec.commit(self.step, loss)
        self.times.append(time.perf_counter() - started)
        self.out, self.loss = out, loss

    def floor(self) -> tuple[int, float]:
        """(bytes a recorded step hashes, seconds the fingerprint takes over them)."""
        from reprocheck.fingerprint import fingerprint

        model, optimizer = self.model, self.optimizer
        tensors = [self.x, self.y, self.out.detach(), self.loss.detach()]
        tensors += [p.grad for p in model.parameters()] + [p.detach() for p in model.parameters()]
        tensors += [v for s in optimizer.state.values() for v in s.values() if v.dim()]
        began = time.perf_counter()
        for _ in range(3):
            for t in tensors:
                fingerprint(t)
        return sum(t.numel() * t.element_size() for t in tensors), (time.perf_counter() - began) / 3


def timed(width: int, layers: int, batch: int, steps: int, folder: str) -> dict:
    """Every mode in this process, one step each in turn (the machine's drift falls on all
    alike): the median step of each, and the hashing floor."""
    import torch

    torch.set_num_threads(1)
    loops = {mode: Loop(width, layers, batch, mode, steps, folder) for mode in MODES}
    for _ in range(steps):
        for loop in loops.values():
            loop.run()
    for loop in loops.values():
        if loop.recorder:
            loop.recorder.writer.finish("complete")
    hashed, floor = loops["full"].floor()
    return {
        "step_s": {mode: statistics.median(loop.times[3:]) for mode, loop in loops.items()},
        "bytes_per_step": {
            mode: os.path.getsize(loop.trace) / (steps + 1)
            for mode, loop in loops.items()
            if loop.recorder
        },
        "params": sum(p.numel() for p in loops["plain"].model.parameters()),
        "hashed_bytes": hashed,
        "floor_s": floor,
    }


def peak(width: int, layers: int, batch: int, mode: str, steps: int, folder: str) -> dict:
    """One mode alone in this process: its peak resident memory."""
    import torch

    torch.set_num_threads(1)
    loop = Loop(width, layers, batch, mode, steps, folder)
    for _ in range(steps):
        loop.run()
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(*args: object) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def whole_audits(steps: int, repeats: int) -> list[list[str]]:
    """``reprocheck exec -n 2`` of a long script (tests/scripts/late_noise.py, a ~0.4-ms
    step) recorded each way, its canary and observer runs included, against the two plain
    runs it stands for, one after the other; medians of ``repeats``, interleaved."""
    script = str(Path(__file__).resolve().parent.parent / "tests" / "scripts" / "late_noise.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ways = {"full": (), "sparse": ("--record", "sparse"), "every 10": ("--every", "10")}
    times: dict[str, list[float]] = {"plain": [], **{way: [] for way in ways}}

    def clock(command: list[str], cwd: str) -> float:
        began = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        return time.perf_counter() - began

    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            plain = [sys.executable, script, "--steps", str(steps)]
            times["plain"].append(clock(plain, folder) + clock(plain, folder))
            for way, options in ways.items():
                command = [sys.executable, "-m", "reprocheck", "exec", "-n", "2", "-q",
                           "--no-as-is-check", "--out", folder, *options, "--", "python",
                           script, "--steps", str(steps)]  # fmt: skip
                times[way].append(clock(command, folder))
    plain = statistics.median(times["plain"])
    cells = [f"{steps:,} steps", f"{plain:.1f} s"]
    for way in ways:
        took = statistics.median(times[way])
        cells.append(f"{took:.1f} s ({took / plain:.2f}×)")
    return [cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audits-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.audits_only:
        head = ["job", "2 plain runs", "audit, full", "audit, sparse", "audit, every 10"]
        print(table(head, whole_audits(2000, 3), args.markdown))
        return
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps((timed if kind == "timed" else peak)(*rest)))
        return
    rows = []
    for name, width, layers, batch in SIZES:
        with tempfile.TemporaryDirectory() as folder:
            found = _child("timed", width, layers, batch, args.steps, folder)
            memory = {m: _child("peak", width, layers, batch, m, 5, folder) for m in MODES}
        step, plain = found["step_s"], found["step_s"]["plain"]
        rows.append(
            [
                name,
                f"{found['params'] / 1e6:.1f}M",
                f"{plain * 1e3:.0f} ms",
                *(f"{step[m] / plain:.3f}×" for m in MODES[1:]),
                f"{(step['full'] - plain) / found['floor_s']:.2f}×",
                f"{found['hashed_bytes'] / 2**20:.0f} MiB",
                *(f"{found['bytes_per_step'][m]:,.0f} B" for m in MODES[1:]),
                " / ".join(f"{memory[m]['peak_mib']:.0f}" for m in MODES) + " MiB",
            ]
        )
    head = [
        "model",
        "parameters",
        "plain step",
        "full",
        "sparse",
        "every 10",
        "full's cost ÷ hash floor",
        "hashed per step",
        "trace, full",
        "trace, sparse",
        "trace, every 10",
        "peak RSS plain / full / sparse / every 10",
    ]
    print(table(head, rows, args.markdown))
    print()
    head = ["job", "2 plain runs", "audit, full", "audit, sparse", "audit, every 10"]
    print(table(head, whole_audits(2000, 3), args.markdown))


if __name__ == "__main__":
    main()
