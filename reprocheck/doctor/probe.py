"""The doctor's checks: static ones on the config and environment, dynamic ones that run
a few steps in child processes (op scan, thread / hash-seed / worker sensitivity)."""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

from ..compare import first_divergence
from ..config import Config
from ..contract import Target
from ..trace import Trace, TraceError
from . import rules

# aten ops PyTorch documents as nondeterministic on CUDA (the list under
# `torch.use_deterministic_algorithms`, torch 2.13): op base name → what runs there.
CUDA_NONDETERMINISTIC_FROM = "torch 2.13 documentation of torch.use_deterministic_algorithms"
CUDA_NONDETERMINISTIC: dict[str, str] = {
    "index_add": "index_add_ accumulates with atomics",
    "scatter_add": "scatter_add_ accumulates with atomics",
    "scatter_reduce": "scatter_reduce accumulates with atomics",
    "index_put": "index_put_(accumulate=True) — the backward of advanced indexing",
    "_index_put_impl": "index_put_(accumulate=True) — the backward of advanced indexing",
    "put": "put_(accumulate=True)",
    "index_copy": "index_copy_",
    "embedding_dense_backward": "embedding backward accumulates rows",
    "_embedding_bag_backward": "embedding_bag backward",
    "_embedding_bag_dense_backward": "embedding_bag backward",
    "upsample_linear1d_backward": "interpolate(mode='linear') backward",
    "upsample_bilinear2d_backward": "interpolate(mode='bilinear') backward",
    "upsample_bicubic2d_backward": "interpolate(mode='bicubic') backward",
    "upsample_trilinear3d_backward": "interpolate(mode='trilinear') backward",
    "avg_pool3d_backward": "avg_pool3d backward",
    "adaptive_avg_pool2d_backward": "adaptive_avg_pool2d backward",
    "_adaptive_avg_pool2d_backward": "adaptive_avg_pool2d backward",
    "adaptive_avg_pool3d_backward": "adaptive_avg_pool3d backward",
    "_adaptive_avg_pool3d_backward": "adaptive_avg_pool3d backward",
    "adaptive_max_pool2d_backward": "adaptive_max_pool2d backward",
    "adaptive_max_pool3d_backward": "adaptive_max_pool3d backward",
    "fractional_max_pool2d_backward": "fractional_max_pool2d backward",
    "fractional_max_pool3d_backward": "fractional_max_pool3d backward",
    "max_pool3d_with_indices_backward": "max_pool3d backward",
    "max_unpool1d": "max_unpool1d",
    "max_unpool2d": "max_unpool2d",
    "max_unpool3d": "max_unpool3d",
    "reflection_pad1d_backward": "reflection padding backward",
    "reflection_pad2d_backward": "reflection padding backward",
    "reflection_pad3d_backward": "reflection padding backward",
    "replication_pad1d_backward": "replication padding backward",
    "replication_pad2d_backward": "replication padding backward",
    "replication_pad3d_backward": "replication padding backward",
    "nll_loss2d_forward": "NLLLoss on 2-d inputs",
    "_ctc_loss_backward": "CTC loss backward",
    "grid_sampler_2d_backward": "grid_sample backward",
    "grid_sampler_3d_backward": "grid_sample backward",
    "bincount": "bincount with weights",
    "histc": "histc",
    "kthvalue": "kthvalue",
    "median": "median with indices",
    "cumsum": "cumsum on CUDA (deterministic only with use_deterministic_algorithms)",
}


def _always(op: dict[str, Any]) -> bool:
    return True


# ops nondeterministic on CUDA only in one form, told apart by the captured op's inputs
ONLY_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {
    "bincount": lambda op: len(op.get("inputs") or ()) >= 2,  # with a weights tensor
}


def static_findings(config: Config) -> list[dict[str, Any]]:
    """What the config and environment alone say: each rule whose ``config`` way fires."""
    return [rule.fire("config") for rule in rules.RULES if rule.fires("config", config=config)]


def _base(op: str) -> str:
    name = op.split(".")[1] if op.startswith("aten.") else op.split(".")[0]
    return name.rstrip("_") if name.rstrip("_") in CUDA_NONDETERMINISTIC else name


def gpu_risk_findings(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every captured op on the CUDA-nondeterministic list, once per (op, source line)."""
    seen: dict[tuple[str, str | None], dict[str, Any]] = {}
    for op in ops:
        base = _base(op["op"])
        if base not in CUDA_NONDETERMINISTIC or not ONLY_WHEN.get(base, _always)(op):
            continue
        key = (base, op["source"])
        if key in seen:
            continue
        seen[key] = rules.RC006.fire(
            "op",
            {
                "op": f"aten.{base}",
                "stage": op["stage"],
                "source": op["source"],
                "code": op.get("code"),
                "module": op.get("module"),
                "from": CUDA_NONDETERMINISTIC_FROM,
            },
            op=base,
            does=CUDA_NONDETERMINISTIC[base],
            source=op["source"],
            backward=bool(op.get("forward_line")),
        )
    return list(seen.values())


class Auditor(Protocol):
    """What probes and attribution rerun (``reprocheck.parent.audit.Auditor``): given to
    them by their caller, so the doctor imports no runner. ``target``: what each run
    executes (:mod:`reprocheck.contract`)."""

    target: Target

    def audit(self, config: Config, out: str | os.PathLike, fail_fast: bool = True) -> dict:
        """The report of an audit of ``config`` into ``out``."""
        ...

    def capture_ops(self, config: Config, folder: str | os.PathLike) -> tuple[str | None, str]:
        """Step 1's op capture of run 0: (its path or None, the replay's trace)."""
        ...


Variant = Callable[[Config, str], dict[str, Any]]


class ProbeError(Exception):
    """A probe's run of the config failed: no finding can be drawn from it (exit 3)."""


def _run_failure(label: str, run: dict[str, Any]) -> ProbeError:
    where = f" (log: {run['log']})" if run.get("log") else ""
    error = run.get("error") or run["status"]
    return ProbeError(f"probe '{label}': the run failed — {error}{where}")


def sensitivity(
    audit: Variant, a: Config, b: Config, label: str
) -> tuple[bool, dict[str, Any] | None]:
    """Run each variant (once, or ``repeats`` times) and compare their first runs bit for
    bit: (differ, where). A variant run more than once must reproduce itself, else the
    probe cannot tell its difference from the script's own nondeterminism and finds
    nothing. A run that fails raises :class:`ProbeError`: a probe that ran nothing has
    found nothing."""
    reports = [audit(variant, f"{label}-{index}") for index, variant in enumerate((a, b))]
    traces = []
    for report in reports:
        runs = [r for leg in report["legs"] for r in leg["runs"]]
        if not runs:
            raise ProbeError(f"probe '{label}': no run started")
        if runs[0]["status"] != "complete":
            raise _run_failure(label, runs[0])
        if len(runs) > 1 and report["verdict"] != "reproducible":
            return False, None
        traces.append(runs[0]["trace"])
    found = first_divergence(traces, own=True)
    if found is None:
        return False, None
    return True, {"step": found.step, "phase": found.phase, "tensor": found.tensor}


def _uninitialized_variants(config: Config) -> tuple[Config, Config] | None:
    """Deterministic algorithms on (warn only: an op without a deterministic kernel must
    not stop the probe), uninitialized memory filled and left as it is. None where this
    torch has no ``fill_uninitialized_memory``."""
    import torch.utils

    if not hasattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory"):
        return None
    det = config.determinism.deterministic_algorithms or "warn"

    def variant(fill: bool) -> Config:
        controls = dataclasses.replace(
            config.determinism, deterministic_algorithms=det, fill_uninitialized_memory=fill
        )
        return dataclasses.replace(config, determinism=controls)

    return variant(True), variant(False)


def _twice(config: Config) -> Config:
    return dataclasses.replace(config, repeats=2)


def _capture_failure(trace: str) -> str:
    """Why an op-scan run produced nothing, from its trace (or its log)."""
    log = os.path.splitext(trace)[0] + ".log"
    try:
        with Trace(trace, own=True) as opened:
            error = opened.error or f"the run ended {opened.status}"
    except TraceError:
        error = "the run did not start"
    return f"{error} (log: {log})"


def dynamic_findings(
    auditor: Auditor, config: Config, folder: Path, steps: int = 2, jobs: int | None = None
) -> list[dict[str, Any]]:
    """Run a few steps in child processes through ``auditor``: op scan, and sensitivity to
    threads, hash seed, and worker count — up to ``jobs`` (default: the cores) at once."""
    found: list[dict[str, Any]] = []
    short = dataclasses.replace(
        config,
        steps=min(config.steps, steps),
        repeats=1,
        devices=("cpu",),
        threads=(config.threads[0],),
    )

    def hashseed(value: int) -> Config:
        return dataclasses.replace(
            short, determinism=dataclasses.replace(short.determinism, pythonhashseed=value)
        )

    # (label, rule, what differs, the two variants): each pair is run once, compared bitwise
    probes = [
        (
            "threads",
            "RC010",
            "1 and 2 threads",
            dataclasses.replace(short, threads=(1,)),
            dataclasses.replace(short, threads=(2,)),
        ),
        ("hashseed", "RC004", "PYTHONHASHSEED 1 and 2", hashseed(1), hashseed(2)),
    ]
    uninitialized = _uninitialized_variants(short)
    if uninitialized is not None:
        probes.append(
            (
                "uninit",
                "RC020",
                "uninitialized memory filled with NaN and left as it is",
                *uninitialized,
            )
        )
    if config.data.num_workers:
        probes.append(
            (
                "workers",
                "RC009",
                f"num_workers 0 and {config.data.num_workers}",
                dataclasses.replace(short, data=dataclasses.replace(short.data, num_workers=0)),
                short,
            )
        )
    # the first variant of each probe runs twice: it must repeat before its difference
    # from the second can be blamed on what the probe changed
    probes = [(label, code, what, _twice(a), b) for label, code, what, a, b in probes]
    pool = ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1))
    try:
        # the ops the model runs in one step, forward and backward, with their lines
        scan = pool.submit(auditor.capture_ops, short, folder) if short.steps else None
        reports = {
            f"{label}-{index}": pool.submit(
                auditor.audit, variant, folder / f"{label}-{index}", False
            )
            for label, _, _, *variants in probes
            for index, variant in enumerate(variants)
        }
        captured, replay = scan.result() if scan is not None else (None, "")
        if short.steps and captured is None:
            raise ProbeError(f"probe 'op scan': {_capture_failure(replay)}")
        if captured is not None:
            with open(captured + ".ops.json", encoding="utf-8") as handle:
                ops = json.load(handle)
            found += gpu_risk_findings(ops)
            with open(captured + ".env.json", encoding="utf-8") as handle:
                if rules.RC017.fires("op scan", env=json.load(handle)):
                    found.append(rules.RC017.fire("op scan"))

        def audit(variant: Config, label: str) -> dict[str, Any]:
            return reports[label].result()

        sensitive = []
        for label, code, what, a, b in probes:
            differ, where = sensitivity(audit, a, b, label)
            if differ:
                sensitive.append(rules.BY_CODE[code].fire("probe", where, what=what, where=where))
        if any(item["code"] == "RC020" for item in sensitive):
            # what uninitialized memory holds follows the process's whole allocation
            # history — thread count and hash seed among it: the other probes' differences
            # may be that memory's, and say nothing of their own (its message says so)
            sensitive = [item for item in sensitive if item["code"] == "RC020"]
        found += sensitive
    finally:  # a probe that failed leaves nothing to wait for: the others not yet started go
        pool.shutdown(wait=True, cancel_futures=True)
    return found
