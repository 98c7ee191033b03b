"""One run, in its own process: ``python -m reprocheck.runner.worker SPEC.json``.

The spec (written by :mod:`reprocheck.runner.launch`) names the config, the leg (device,
threads), the run index and the trace path. Exit status: 0 complete, 2 config error,
3 the training raised. Whatever happens, the trace says so in ``meta.status``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

EXIT_OK, EXIT_CONFIG, EXIT_FAILED = 0, 2, 3


def error_line(exc: BaseException) -> str:
    """``RuntimeError: planted crash at step 3 (reprocheck/zoo/planted.py:61 in forward)``."""
    from ..localize import user_frame

    frame = user_frame(traceback.extract_tb(exc.__traceback__))
    where = f" ({display_path(frame.filename)}:{frame.lineno} in {frame.name})" if frame else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def display_path(path: str) -> str:
    """A path relative to the working folder when it is below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_meta(spec: dict[str, Any]) -> dict[str, Any]:
    """What every trace says about its run, from the launcher's spec."""
    return {
        "config": spec["config"],
        "config_path": spec.get("config_path"),
        "leg": spec["leg"],
        "run": spec["run"],
        "device": spec["device"],
        "threads": spec.get("threads"),
        "pid": os.getpid(),
    }


def run(spec: dict[str, Any]) -> int:
    import torch

    from ..config import ConfigError, config_from_dict
    from ..determinism import apply_controls, environment_snapshot
    from ..fingerprint import hasher_name
    from ..recorder import StepRecorder
    from ..trace import TraceWriter
    from .loop import train

    config = config_from_dict(
        spec["config"], path=spec.get("config_path"), base_dir=spec["base_dir"]
    )
    device = torch.device(spec["device"])
    applied = apply_controls(config, spec["device"], spec.get("threads"))
    writer = TraceWriter(
        spec["trace"],
        {
            **run_meta(spec),
            "steps_planned": spec["steps"],
            "phases": list(config.record),
            "depth": spec.get("depth", "step"),
            "hasher": hasher_name(device),
            "sketches": bool(spec.get("with_sketch")),
            "environment": environment_snapshot(applied),
        },
    )
    capture = spec.get("capture")
    depth = spec.get("depth", "step")
    recorder = StepRecorder(
        writer,
        config.record + (("forward", "backward") if depth != "step" else ()),
        with_sketch=bool(spec.get("with_sketch")),
        capture=(capture["step"], capture["tensors"]) if capture else None,
    )
    steps = capture["step"] if capture else spec["steps"]
    try:
        zoom_step = capture["step"] if capture and capture.get("ops") else None
        ops = train(
            config,
            device,
            recorder,
            steps,
            zoom_step=zoom_step,
            depth=depth,
            checkpoints=None if capture else spec.get("checkpoints"),
            resume=capture.get("resume") if capture else None,
        )
    except ConfigError as exc:
        writer.finish(
            "failed", f"config error: {exc}", error_kind="config", last_step=recorder.step - 1
        )
        print(f"reprocheck: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BaseException as exc:  # the user's training raised: record it, then report it
        traceback.print_exc()
        line = error_line(exc)
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "exception"
        writer.finish(
            "failed",
            line,
            error_kind=kind,
            failed_step=recorder.step,
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[
                -8000:
            ],
        )
        return EXIT_FAILED
    if capture:
        torch.save(
            {f"{phase}\t{name}": tensor for (phase, name), tensor in recorder.captured.items()},
            capture["out"],
        )
        if capture.get("ops"):
            from .. import jsonout
            from ..localize import to_json

            with open(capture["out"] + ".ops.json", "w", encoding="utf-8") as handle:
                jsonout.dump(to_json(ops), handle)
            with open(capture["out"] + ".env.json", "w", encoding="utf-8") as handle:
                jsonout.dump({"compiled": recorder.compiled}, handle)
    writer.finish("complete", records=recorder.records)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m reprocheck.runner.worker SPEC.json", file=sys.stderr)
        return EXIT_CONFIG
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    from ..config import ConfigError

    try:
        if "exec" in spec:  # `reprocheck exec` / `audit`: a script or function, unchanged
            from .bootstrap import run_script

            return run_script(spec)
        return run(spec)
    except ConfigError as exc:  # before the trace exists: the launcher reads our stderr
        print(f"reprocheck: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
