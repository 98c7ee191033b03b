"""How a run's process starts a script or function under the hooks (``reprocheck exec``,
``audit``), and how a Python child the script started joins the run."""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import subprocess
import sys
from dataclasses import replace
from typing import Any

from ...config import DeterminismConfig
from ...contract import MAIN, OBSERVED, ChildSettings, Function, RunSpec, run_stem
from ...fingerprint import fingerprint
from ...recorder import rng_states
from .hooks import install
from .recorder import ProcessRecorder
from .session import Session
from .window import pause, resume


class LaunchFailed(SystemExit):
    """The command a run launched (``bash run.sh``, ``accelerate launch …``) exited with a
    failure status: the run failed as a script's ``sys.exit(status)`` fails it."""

    def __init__(self, program: str, code: int) -> None:
        super().__init__(code)
        self.who = program


def rng_start() -> dict[str, str]:
    """Each generator's state digest (hex), as the trace's rng records would hold it."""
    return {name: fingerprint(state).value.hex() for name, state in rng_states()}


def run_script(spec: RunSpec) -> int:
    """The worker's path for ``reprocheck exec`` / ``audit``: 0 complete, 3 the script failed."""
    from ...determinism import apply_controls_for
    from .. import spawned

    target = spec.target
    workdir = spec.resume_run.cwd if spec.resume_run else None
    if workdir:  # a resume audit's run, in its own folder (the command's paths are absolute)
        sys.path.insert(0, os.getcwd())  # `-m package.train` imports from the user's folder
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    controls = DeterminismConfig(**spec.config["determinism"])
    applied = apply_controls_for(controls, spec.config["seed"], spec.threads)
    capture = spec.capture
    settings = ChildSettings(
        trace=spec.trace,
        meta={**spec.meta, "command": list(getattr(target, "argv", ()))},
        controls=spec.config["determinism"],
        seed=spec.config["seed"],
        applied=applied,
        # a replay ends with the captured step; one of a child's step runs the script to
        # its end: a worker stopped early never hands its parent what it waits for
        max_steps=capture.step if capture and capture.process == MAIN else target.max_steps,
        with_sketch=spec.with_sketch,
        threads=spec.threads,
        capture=capture,
        compile=spec.compile,
        # a compiled leg's replay down the ladder: its torch.compile calls use this backend
        compile_backend=capture.backend if capture else None,
        # the canary run: every process flips one bit before this step's weights
        canary=spec.canary,
        record=OBSERVED if spec.observer else None,
        resume_run=spec.resume_run,
    )
    session = Session(settings)
    context = session.context(MAIN, spec.trace)
    recorder = ProcessRecorder(session, MAIN, context)
    session.recorders[os.getpid()] = recorder
    install(session)
    # the generators as the script finds them: one it never moves explains no divergence
    context.writer.set_meta(rng_start=rng_start())
    spawned.export(settings)  # its children record themselves too (and capture, if theirs)
    atexit.register(recorder.finish, "complete")  # a script that calls os-level exit paths
    argv = run_arguments(list(getattr(target, "argv", ())), spec.trace, target.run_prefix, workdir)
    if recorder.zoom_step is not None and recorder.zoom_step <= 1:
        # step 0 is committed only once step 1 has run its forward and backward (at its
        # optimizer step): a zoom of step 0 or 1 captures from the script's first line
        from ...localize import OpCapture

        recorder.ops = OpCapture(None)
        resume(recorder, "forward")

    def body() -> None:
        if isinstance(target, Function):
            from ...usercode import resolve_callable

            resolve_callable(target.function, spec.base_dir)()
        elif target.launch:  # any command: what it starts records itself
            # `python`, `torchrun`, `accelerate` in the command are this interpreter's,
            # as `-- python train.py` runs with it
            from ...script import launch_path

            code = subprocess.call(argv, env={**os.environ, "PATH": launch_path()})
            if code != 0:
                raise LaunchFailed(os.path.basename(argv[0]), code)
        elif target.notebook:  # its code cells, in order, in this process
            from ...notebook import run_notebook

            run_notebook(argv[0], argv[1:])
        elif argv and argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")

    code = context.run(body)
    if capture and code == 0 and recorder.window is not None:
        pause(recorder)
        context.save_capture(capture, recorder.zoom_ops)
    return code


def run_arguments(
    argv: list[str], trace: str, prefix: str = "", workdir: str | None = None
) -> list[str]:
    """The command's arguments for this run: ``{run}`` becomes the run's name (``cpu-r0``;
    a replay's is its own, ``cpu-r0.replay-s1``; a run of the audit's as-is pair or of an
    attribution control is ``prefix``ed with its folder's name, ``as-is-cpu-r0``) and
    ``{run_dir}`` a folder of its own in the audit's folder (made here), so runs that write
    and read back files keep them apart (``--output_dir out/{run}``); ``{port}`` a free
    TCP port (a rendezvous port per run). A resume audit's run has its own working folder
    (``workdir``): its ``{run_dir}`` is that folder (the resumed run's is the stopped
    run's)."""
    if not any("{run" in word or "{port}" in word for word in argv):
        return argv
    stem = prefix + run_stem(trace)
    folder = workdir or os.path.join(os.path.dirname(trace), "workdirs", stem)
    if any("{run_dir}" in word for word in argv):
        os.makedirs(folder, exist_ok=True)
    port = _free_port() if any("{port}" in word for word in argv) else 0
    return [
        word.replace("{run_dir}", folder).replace("{run}", stem).replace("{port}", str(port))
        for word in argv
    ]


def _free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick): ``{port}`` in a command,
    so runs side by side each get their own rendezvous port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_child(settings: ChildSettings) -> None:
    """In a Python process the script started (spawned, not forked): apply the controls
    and install the hooks; it records itself once it trains."""
    from ...determinism import apply_controls_for

    controls = DeterminismConfig(**settings.controls)
    applied = apply_controls_for(controls, settings.seed, settings.threads)
    settings = replace(settings, applied=applied, rng_start=rng_start())
    session = Session(settings)
    install(session)
    atexit.register(session.finish_all, "complete")
    original_hook = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        rec = session.recorders.get(os.getpid())
        if rec is not None:
            with contextlib.suppress(Exception):  # the error is printed whatever happens
                rec.fail(exc)
        original_hook(kind, exc, tb)

    sys.excepthook = excepthook
