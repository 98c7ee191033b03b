"""One run, in its own process: ``python -m reprocheck.child.worker SPEC.json``.

The spec (a :class:`~reprocheck.contract.RunSpec`, written by the parent) names the
config, the target, the leg (device, threads), the run index and the trace path. Exit
status: 0 complete, 2 config error, 3 the training raised, :data:`EXIT_NO_SPACE` the disk
holding the trace is full (the trace may not have been able to say so itself). Otherwise,
the trace says so in ``meta.status`` (:class:`reprocheck.child.context.RunContext` owns
that, and a replay's capture); this module picks the driver — the config loop, or an
unchanged script.
"""

from __future__ import annotations

import contextlib
import os
import sys

from ..contract import EXIT_NO_SPACE, OBSERVED, RunSpec
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
            resume=capture.resume
            if capture
            else (spec.resume_run.start_from if spec.resume_run else None),
            disturb=spec.resume_run.disturb if spec.resume_run and not capture else None,
            resume_point=spec.resume_run is not None and not capture,
            compile=bool(spec.compile),
            backend=capture.backend if capture else None,
            canary=canary,
        )
        if canary is not None and "planted" in canary:
            context.writer.set_meta(canary=canary["planted"])
        if capture:
            context.save_capture(capture, ops)

    return context.run(body)


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
