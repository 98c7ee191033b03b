"""One run, in its own process: ``python -m reprocheck.child.worker SPEC.json``.

The spec (written by :mod:`reprocheck.parent.launch`) names the config, the leg (device,
threads), the run index and the trace path. Exit status: 0 complete, 2 config error,
3 the training raised, :data:`EXIT_NO_SPACE` the disk holding the trace is full (the trace
may not have been able to say so itself). Otherwise, the trace says so in ``meta.status``
(:class:`reprocheck.child.context.RunContext` owns that); this module picks the driver —
the config loop, or an unchanged script — and saves what a replay captured.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from ..contract import EXIT_NO_SPACE, OBSERVED, Capture, RunSpec, capture_key
from ..verdict import EXIT_USAGE as EXIT_CONFIG


def quiet_output() -> None:
    """The run's log cannot take more (its disk is full): what the process still prints
    goes nowhere, so that no write fails again, nor the exit's flush (which would make the
    exit status 120)."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run(spec: RunSpec) -> int:
    """A config's run: the training recipe of :mod:`reprocheck.child.loop`."""
    import torch

    from ..configfile import config_from_dict
    from ..determinism import apply_controls, compile_cache_warm, environment_snapshot
    from ..fingerprint import hasher_name
    from .context import RunContext
    from .loop import train

    config = config_from_dict(spec.config, path=spec.config_path, base_dir=spec.base_dir)
    device = torch.device(spec.device)
    applied = apply_controls(config, spec.device, spec.threads)
    capture = spec.capture
    depth = spec.depth
    context = RunContext(
        spec.trace,
        {
            **spec.meta,
            "hasher": hasher_name(device),
            "environment": environment_snapshot(applied),
            # a compile leg: was inductor's cache warm when this run started
            **({"compile_cache_warm": compile_cache_warm()} if spec.compile else {}),
        },
        # the observer run records the state alone: it must end where the others do
        OBSERVED if spec.observer else config.record,
        with_sketch=spec.with_sketch,
        depth=depth,
        capture=(capture.step, capture.tensors) if capture else None,
        extra_phases=("forward", "backward") if depth != "step" else (),
    )

    # the loop notes in it what it planted (the trace's meta.canary)
    canary = {"step": spec.canary.step} if spec.canary else None

    def body() -> None:
        ops = train(
            config,
            device,
            context.recorder,
            capture.step if capture else spec.steps,
            zoom_step=capture.step if capture and capture.ops else None,
            depth=depth,
            checkpoints=None if capture else spec.checkpoints,
            resume=capture.resume if capture else None,
            compile=bool(spec.compile),
            backend=capture.backend if capture else None,
            canary=canary,
        )
        if canary is not None and "planted" in canary:
            context.writer.set_meta(canary=canary["planted"])
        if capture:
            save_capture(capture, context.recorder, ops)

    return context.run(body)


def save_capture(capture: Capture, recorder: Any, ops: list[Any]) -> None:
    """A replay's capture: the kept tensors (``.pt``) and, for a zoom, every op of the
    step (``.ops.json``) and what ran it (``.env.json``)."""
    import torch

    from .. import jsonout
    from ..localize import to_json

    torch.save(
        {capture_key(*record): tensor for record, tensor in recorder.captured.items()},
        capture.out,
    )
    if capture.backend == "reprocheck-digest":  # the compiled graphs' outputs
        from ..compiled import RECORDS

        with open(capture.out + ".graphs.json", "w", encoding="utf-8") as handle:
            jsonout.dump(RECORDS, handle)
    if capture.ops:
        with open(capture.out + ".ops.json", "w", encoding="utf-8") as handle:
            jsonout.dump(to_json(ops), handle)
        with open(capture.out + ".env.json", "w", encoding="utf-8") as handle:
            jsonout.dump({"compiled": recorder.compiled}, handle)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m reprocheck.child.worker SPEC.json", file=sys.stderr)
        return EXIT_CONFIG
    from .zygote import die_with_parent

    die_with_parent()  # a fresh run: it dies with the audit (a fork: with its zygote)
    spec = RunSpec.read(argv[0])
    from ..config import ConfigError
    from ..trace import TraceFull

    try:
        if spec.target.is_script:  # `reprocheck exec` / `audit`: a script or function, unchanged
            from .script.run import run_script

            return run_script(spec)
        return run(spec)
    except ConfigError as exc:  # before the trace exists: the launcher reads our stderr
        print(f"reprocheck: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TraceFull:  # the trace could not even be created: the exit status says why
        quiet_output()
        return EXIT_NO_SPACE


if __name__ == "__main__":
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the log's disk is full
        quiet_output()
    sys.exit(code)
