"""Fingerprint throughput: ours vs memory-read and hashing baselines, side by side.

Every number is a median of repeats measured in this one process, with torch on one
thread; the ratios are what to compare across machines.

    python benchmarks/bench_fingerprint.py [--full] [--markdown] [--repeats N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from typing import Callable

import torch

from reprocheck.determinism import cpu_model
from reprocheck.fingerprint import StepHasher, _torchmix_device, fingerprint

MiB = 2**20


def timeit(fn: Callable[[], object], repeats: int, min_time: float = 0.02) -> float:
    """Median seconds per call over ``repeats`` batches of calls lasting ≥ ``min_time``."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        calls += 1
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def make(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    size = torch.tensor([], dtype=dtype).element_size()
    numel = nbytes // size
    if dtype == torch.bool:
        return torch.rand(numel) > 0.5
    if dtype.is_floating_point:
        return torch.randn(numel).to(dtype)
    return torch.randint(-(2**31), 2**31, (numel,), dtype=dtype)


def baselines(t: torch.Tensor) -> dict[str, Callable[[], object]]:
    raw = t.view(torch.uint8).numpy()
    out: dict[str, Callable[[], object]] = {
        "reprocheck": lambda: fingerprint(t),
        "torch.sum": lambda: t.sum(),
        "clone": lambda: t.clone(),
        "sha256": lambda: hashlib.sha256(raw).digest(),
        "blake2b": lambda: hashlib.blake2b(raw, digest_size=16).digest(),
        "torchmix (CUDA path)": lambda: _torchmix_device(t),
    }
    if hasattr(torch, "hash_tensor"):
        try:
            torch.hash_tensor(t)
            out["torch.hash_tensor"] = lambda: torch.hash_tensor(t)
        except (RuntimeError, TypeError):
            pass
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions timed in turn within each
    repeat (so drift in the machine's speed hits them all alike)."""
    calls = {}
    for name, fn in fns.items():
        fn()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.01:
            fn()
            count += 1
        calls[name] = count
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def throughput(sizes: list[int], dtypes: list[torch.dtype], repeats: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for nbytes in sizes:
            t = make(nbytes, dtype)
            fns = {
                name: fn
                for name, fn in baselines(t).items()
                # slow baselines: their ratio is stable by 64 MiB
                if nbytes <= 64 * MiB or name not in ("sha256", "blake2b", "torchmix (CUDA path)")
            }
            seconds = interleaved(fns, repeats)
            gbps = {name: nbytes / s / 1e9 for name, s in seconds.items()}
            rows.append({"dtype": str(dtype)[6:], "bytes": nbytes, "gbps": gbps})
    return rows


def tiny_overhead(repeats: int) -> dict[str, float]:
    tensors = [torch.randn(4) for _ in range(1000)]

    def one_by_one() -> None:
        for t in tensors:
            fingerprint(t)

    def step_hasher() -> None:
        hasher = StepHasher()
        for t in tensors:
            hasher.add(t)
        hasher.finish()

    return {
        "fingerprint(t)": timeit(one_by_one, repeats) / 1000 * 1e6,
        "StepHasher.add": timeit(step_hasher, repeats) / 1000 * 1e6,
        "torch.sum(t)": timeit(lambda: [t.sum() for t in tensors], repeats) / 1000 * 1e6,
    }


def human(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // 1024} KiB"


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}, torch threads {torch.get_num_threads()}"
    )


def render(rows: list[dict], tiny: dict[str, float], markdown: bool) -> str:
    names = [
        "reprocheck",
        "torch.sum",
        "clone",
        "sha256",
        "blake2b",
        "torch.hash_tensor",
        "torchmix (CUDA path)",
    ]
    lines = []
    if markdown:
        lines.append(
            "| dtype | size | "
            + " | ".join(f"{n} GB/s" for n in names)
            + " | ours ÷ sum | ours ÷ sha256 | ours ÷ hash_tensor |"
        )
        lines.append("|---" * (len(names) + 5) + "|")
    else:
        lines.append(
            f"{'dtype':9}{'size':>9} "
            + "".join(f"{n[:12]:>13}" for n in names)
            + "   ÷sum  ÷sha256  ÷hash_t"
        )
    for row in rows:
        g = row["gbps"]
        ours = g["reprocheck"]

        def ratio(name: str, g: dict = g, ours: float = ours) -> str:
            return f"{ours / g[name]:.2f}×" if name in g else "–"

        cells = [f"{g[n]:.2f}" if n in g else "–" for n in names]
        if markdown:
            lines.append(
                f"| {row['dtype']} | {human(row['bytes'])} | "
                + " | ".join(cells)
                + f" | {ratio('torch.sum')} | {ratio('sha256')} | {ratio('torch.hash_tensor')} |"
            )
        else:
            lines.append(
                f"{row['dtype']:9}{human(row['bytes']):>9} "
                + "".join(f"{c:>13}" for c in cells)
                + f"  {ratio('torch.sum'):>6} {ratio('sha256'):>7} {ratio('torch.hash_tensor'):>7}"
            )
    lines.append("")
    lines.append(
        "Per-tensor cost, 1,000 tensors of 4 float32 (µs per tensor): "
        + ", ".join(f"{k} {v:.2f}" for k, v in tiny.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 256 MiB tensors")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [4 * 1024, 64 * 1024, MiB, 16 * MiB, 64 * MiB] + ([256 * MiB] if args.full else [])
    rows = throughput(sizes, [torch.float32, torch.bfloat16, torch.int64, torch.bool], args.repeats)
    tiny = tiny_overhead(args.repeats)
    print(f"machine: {machine()}")
    print(render(rows, tiny, args.markdown))


if __name__ == "__main__":
    main()
