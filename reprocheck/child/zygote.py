"""The zygote: a warm server that forks runs (the parent's client: :mod:`reprocheck.parent.pool`,
whose notes say what a fork inherits and how each difference is undone here).

``python -m reprocheck.child.zygote``, started with a run's environment, imports torch,
NumPy and reprocheck once; each request on its stdin is a ``fork()`` that executes
``reprocheck.child.worker SPEC`` (or the request's module) as a fresh worker would.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import json
import os
import select
import signal
import sys
import threading
from typing import Any

from ..contract import DEATH_ENV, thread_count


def die_with_parent() -> None:
    """At the start of a process the audit started: die with the audit, where it asked for
    that (:func:`audit_env`); the variable is not passed on to this process's children."""
    parent = os.environ.pop(DEATH_ENV, "")
    if parent.isdigit():
        _die_with(int(parent))


def _warm() -> None:
    """What every run imports before its first step (never CUDA: forks could not use it)."""
    import numpy  # noqa: F401
    import torch
    import torch.utils.data

    with contextlib.suppress(Exception):  # what the first optimizer.step() imports
        import torch._dynamo
    for module in ("fingerprint", "localize", "recorder", "trace", "analysis"):
        importlib.import_module(f"reprocheck.{module}")
    for module in ("script.run", "loop", "worker"):
        importlib.import_module(f"{__package__}.{module}")
    importlib.import_module("reprocheck.compare")

    torch.zeros(1).add_(1)  # one op: the dispatcher's first-call set-up, single-threaded


_KEEP: list[Any] = []  # the fork's padding, alive for the run's lifetime
_EXITS: dict[int, int] = {}  # the zygote's pidfd of each fork (readable once it ended) → pid


def _vary() -> None:
    """Give this fork what a fresh interpreter would have of its own: generators seeded
    from entropy, and addresses that differ from its siblings'."""
    import mmap
    import random

    import numpy as np
    import torch

    chance = random.SystemRandom()
    for size in range(0, 513, 16):  # every obmalloc size class: a random count of blocks,
        blocks = [bytes(max(size - 33, 0)) for _ in range(chance.randrange(16, 256))]
        chance.shuffle(blocks)
        _KEEP.extend(blocks[: len(blocks) // 2])
        del blocks  # and holes in random places, which the next objects fill
    for _ in range(chance.randrange(1, 16)):  # the heap beyond the small-object arenas
        _KEEP.append(bytearray(chance.randrange(513, 1 << 18)))
    _KEEP.append(mmap.mmap(-1, chance.randrange(1, 4096) * mmap.PAGESIZE))  # mmap's base
    random.seed()
    np.random.seed()
    torch.seed()


def _die_with(parent: int) -> None:
    """Be killed when the zygote ends (Linux's ``PR_SET_PDEATHSIG``): a run the launcher
    can no longer hear the end of must not run on unseen."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it had ended already
        os._exit(128 + signal.SIGKILL)


def _child(request: dict[str, Any], parent: int) -> int:
    _die_with(parent)
    for fd in _EXITS:  # its siblings' pidfds are the zygote's, not the run's
        with contextlib.suppress(OSError):
            os.close(fd)
    _EXITS.clear()
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:  # a full disk: its output goes nowhere, its trace says the rest
        if exc.errno != errno.ENOSPC:
            raise
        log = os.open(os.devnull, os.O_WRONLY)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own descriptors
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    count = thread_count(request["env"])
    if count is not None and count != thread_count(dict(os.environ)):
        import torch  # a zygote of another count: torch's as the run's variables say

        torch.set_num_threads(count)
    os.environ.clear()  # the run's own environment (its start-up part is the zygote's)
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m reprocheck.child.worker` has it
    _vary()
    program = importlib.import_module(request.get("module") or f"{__package__}.worker")
    sys.argv = [program.__file__, request["spec"]]
    try:
        code = program.main([request["spec"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # an interpreter's exit, in its order: non-daemon threads, atexit, the streams
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> None:
    """The zygote's loop: one JSON request per line on stdin → fork; pids and exit codes
    as JSON lines on stdout. Ends at the end of its input."""
    die_with_parent()
    out = sys.stdout.buffer
    _warm()

    def say(message: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):  # the launcher has gone
            out.write((json.dumps(message) + "\n").encode())
            out.flush()

    say({"ready": True})
    pending = b""
    running: set[int] = set()
    exits = _EXITS
    stdin = sys.stdin.buffer.fileno()
    open_input = True
    while open_input or running:  # at the end of input: once its forks have ended
        # woken by a request or a fork's end; without pidfds, a fork's end is seen by polling
        watched = [stdin] if open_input else []
        timeout = 0.5 if len(exits) == len(running) else 0.02
        readable, _, _ = select.select(watched + list(exits), [], [], timeout)
        if stdin in readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                open_input = False
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                request = json.loads(line)
                sys.stdout.flush()
                parent = os.getpid()
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(request, parent)
                    finally:
                        os._exit(code if 0 <= code < 256 else 1)
                running.add(pid)
                with contextlib.suppress(AttributeError, OSError):
                    exits[os.pidfd_open(pid)] = pid
                say({"pid": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                for fd in [fd for fd, each in exits.items() if each == pid]:
                    os.close(fd)
                    del exits[fd]
                say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
