"""A warm process pool: runs start as forks of a server that has already imported torch.

A fresh worker spends seconds before the user's first line: importing torch, NumPy and
reprocheck, and ``torch._dynamo`` (pulled in by the first ``optimizer.step()``). A *zygote*
— ``python -m reprocheck.runner.pool``, started with a run's environment — does that once;
each run it is asked for is a ``fork()`` of it that then executes
``reprocheck.runner.worker SPEC`` as a fresh worker would.

A fork inherits more than a fresh interpreter starts with, and each difference could hide
a divergence a fresh process shows:

- **the environment and the hash seed**: what is read while an interpreter starts and
  torch loads is fixed in the zygote, so a zygote serves one value of those variables
  (:data:`STARTUP_PREFIXES`: ``PYTHONHASHSEED``, thread variables,
  ``CUBLAS_WORKSPACE_CONFIG``, ``REPROCHECK_HASHER`` …); the rest of the run's environment
  is set in the fork. A run whose hash seed is random (``PYTHONHASHSEED`` unset) never
  forks — its forks would share one seed;
- **the generators' entropy**: torch, ``random`` and NumPy seed themselves from entropy
  at import, so every fork would draw the same; each fork re-seeds all three from
  entropy before anything else runs;
- **the memory layout**: forks of one parent allocate at the same addresses, so a script
  that iterates a ``set`` of modules or tensors (address order) would draw identically in
  every fork. Each fork first keeps a random number of blocks in every small-object size
  class (and frees as many others, in random order, leaving holes), a few random-sized
  heap blocks and a random-sized anonymous mapping, which moves the addresses of
  everything allocated after them. Measured on ``tests/scripts/set_init.py``
  (``benchmarks/bench_address_order.py``): two forks of one zygote drew the same order
  0.2–0.5% of the time, two fresh interpreters of one hash seed 0.6–1.0%, a fork and a
  fresh interpreter never (0 of 7,200 pairs; 0 of 28,800 in a measurement by hand);
- **the thread count**: read at start-up, so keyed like the rest — except where both
  :data:`THREAD_VARS` name one number: the fork then calls ``torch.set_num_threads`` with
  it, which gives that count's own bits whatever the zygote's (measured, and tested);
- **CUDA** cannot be used in a fork of a process that initialised it: only CPU runs fork
  (the zygote never touches CUDA), a CUDA leg always starts fresh; and only on Linux
  (elsewhere a fork of a process that loaded torch's native libraries is not safe).

Of the runs whose comparison *is* the verdict, run 0 of each leg starts a fresh
interpreter and the others fork (:class:`~reprocheck.runner.launch.Launcher`), so every
fork is compared with a fresh process and nothing a fork inherits can make the runs agree
with one another; ``REPROCHECK_POOL=all`` forks run 0 too (the test suite's setting). The
replays, attribution controls, doctor probes and the measurement of what replays kept
(:mod:`.analysis`) fork. The tests check forks against fresh runs (a forked run's digests
equal a fresh one's; a planted address-order case diverges under every attribution
control). ``REPROCHECK_POOL=0`` starts every run fresh.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

# REPROCHECK_POOL: "1" (default) every run forks but run 0 of each leg of a verdict; "all":
# that one too (faster; address order then rests on the fork's padding alone); "0": every
# run in a fresh interpreter
POOL_ENV = "REPROCHECK_POOL"
# a leg run by another Python (``--python PATH``): never a fork of this one's zygote
PYTHON_ENV = "REPROCHECK_PYTHON"
READY_TIMEOUT_S = 120.0
MAX_ZYGOTES = 4  # warm servers kept at once (each holds torch: ~300 MB, shared with forks)

# Variables read while an interpreter starts or torch, NumPy and their libraries load:
# they key the zygote. Every other variable is the run's own and set in the fork.
STARTUP_PREFIXES = (
    "PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "BLIS", "DNNL", "ONEDNN",
    "TORCH", "PYTORCH", "ATEN_", "CUDA", "CUBLAS", "CUDNN", "NCCL", "NVIDIA", "LD_",
    "MALLOC", "NPY_", "NUMPY", "REPROCHECK",
)  # fmt: skip


# The thread count is read at start-up too, but a fork sets it (``torch.set_num_threads``,
# which sets OpenMP's and MKL's): a run of n threads forked from a zygote of m computes
# what a fresh interpreter of n does, bit for bit (measured: 1 and 2 threads sum a 4M
# tensor and multiply 512×512 matrices differently; forks of either zygote give each
# count's own bits). One zygote then serves every count (a one-thread control, a
# threads: [1, 2] config) where both variables are set to one number.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _threads(env: dict[str, str]) -> int | None:
    """The run's thread count where both thread variables name the same one."""
    values = {env.get(name, "") for name in THREAD_VARS}
    value = values.pop() if len(values) == 1 else ""
    return int(value) if value.isdigit() and int(value) > 0 else None


def startup_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of an environment a zygote must have been started with."""
    general = _threads(env) is not None  # a count the fork sets: any zygote's will do
    return tuple(
        sorted(
            (k, "n" if general and k in THREAD_VARS else v)
            for k, v in env.items()
            if k.startswith(STARTUP_PREFIXES)
        )
    )


def forks_audited_runs() -> bool:
    """``REPROCHECK_POOL=all``: the runs a verdict compares fork too."""
    return os.environ.get(POOL_ENV) == "all"


def usable(env: dict[str, str], device: str) -> bool:
    """May a run with this environment, on this device, start as a fork?"""
    if env.get(POOL_ENV, os.environ.get(POOL_ENV, "1")) == "0":
        return False
    if not sys.platform.startswith("linux"):  # fork after torch's import: Linux only
        return False
    if env.get(PYTHON_ENV):  # another interpreter's leg: its own processes
        return False
    seed = env.get("PYTHONHASHSEED", "")
    return device == "cpu" and seed.isdigit()  # a random hash seed needs its own start


class PooledProcess:
    """A forked run, as the launcher sees a ``subprocess.Popen``: pid, poll, wait."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.pump()
            self.returncode = self.zygote.exited.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if not self.zygote.alive():
                self.returncode = -signal.SIGKILL  # the server went: its child with it
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("pooled run", timeout or 0)
            self.zygote.pump(wait=0.05)
        return self.returncode  # type: ignore[return-value]


class Zygote:
    """One server process for one environment; :meth:`fork` starts a run."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reprocheck.runner.pool"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops the runs
        )
        self.ready = False
        self.exited: dict[int, int] = {}
        self._buffer = b""
        self._lock = threading.Lock()  # attribution audits share a zygote across threads
        # one request at a time, from writing it to reading its pid: the server answers in
        # request order, and a pid taken by another thread would be another run's
        self._fork_lock = threading.Lock()
        self._started: list[int] = []
        self.outstanding: set[int] = set()  # forks whose exit has not been reported yet

    def alive(self) -> bool:
        return self.process.poll() is None

    def fileno(self) -> int | None:
        """The descriptor its messages arrive on (to wait on with ``select``)."""
        out = self.process.stdout
        try:
            return out.fileno() if out is not None and self.alive() else None
        except ValueError:  # closed
            return None

    def _lines(self, wait: float) -> list[dict[str, Any]]:
        out = self.process.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], wait)
        if not readable:
            return []
        chunk = os.read(out.fileno(), 65536)
        if not chunk:
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def pump(self, wait: float = 0.0) -> None:
        """Read what the server said: its readiness, started pids, exit codes."""
        with self._lock:
            for message in self._lines(wait):
                if "ready" in message:
                    self.ready = True
                elif "pid" in message:
                    self._started.append(message["pid"])
                    self.outstanding.add(message["pid"])
                elif "exit" in message:
                    self.exited[message["exit"]] = message["code"]
                    self.outstanding.discard(message["exit"])

    def fork(
        self, env: dict[str, str], spec_path: str, log_path: str, module: str | None = None
    ) -> PooledProcess | None:
        """Start a run (or ``module``'s ``main([spec_path])``); None if the server cannot
        (then the caller starts it fresh)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready:
            if not self.alive() or time.monotonic() > deadline:
                return None
            self.pump(wait=0.05)
        request = {
            "spec": spec_path,
            "log": log_path,
            "cwd": os.getcwd(),
            "env": env,
            "module": module,
        }
        with self._fork_lock:
            with self._lock:
                try:
                    assert self.process.stdin is not None
                    self.process.stdin.write((json.dumps(request) + "\n").encode())
                    self.process.stdin.flush()
                except (BrokenPipeError, OSError):
                    return None
            while True:
                with self._lock:
                    if self._started:
                        return PooledProcess(self, self._started.pop(0))
                if not self.alive():
                    return None
                self.pump(wait=0.05)

    def close(self) -> None:
        """End the server's input: it exits once the forks it started have ended (they
        are the launcher's to stop)."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(OSError):
            if self.process.stdout is not None:
                self.process.stdout.close()


_ZYGOTES: dict[tuple[tuple[str, str], ...], Zygote] = {}  # least recently used first
_REGISTRY_LOCK = threading.Lock()


def zygote(env: dict[str, str]) -> Zygote:
    """The zygote of this environment's start-up part, started now if there is none (it
    warms up while the caller goes on: :meth:`Zygote.fork` waits for it). Beyond
    :data:`MAX_ZYGOTES`, the least recently used one is stopped (its running forks go on)."""
    key = startup_key(env)
    stale = []
    with _REGISTRY_LOCK:
        found = _ZYGOTES.pop(key, None)
        if found is None or not found.alive():
            found = Zygote(env)
        _ZYGOTES[key] = found
        idle = [k for k, z in _ZYGOTES.items() if k != key and not z.outstanding]
        while len(_ZYGOTES) > MAX_ZYGOTES and idle:  # never one whose forks still run
            stale.append(_ZYGOTES.pop(idle.pop(0)))
    for each in stale:
        each.close()
    return found


def warming(env: dict[str, str]) -> bool:
    """Is this environment's zygote still importing (a fork would wait for it)? False
    once it is ready or gone (a fork then starts at once, or fresh)."""
    with _REGISTRY_LOCK:
        found = _ZYGOTES.get(startup_key(env))
    if found is None or not found.alive():
        return False
    found.pump()
    return not found.ready


def registered(env: dict[str, str]) -> Zygote | None:
    """This environment's live zygote, if one was started (none is started here)."""
    with _REGISTRY_LOCK:
        found = _ZYGOTES.get(startup_key(env))
    return found if found is not None and found.alive() else None


def spawn(
    env: dict[str, str], spec_path: str, log_path: str, module: str | None = None
) -> PooledProcess | None:
    """A run (or ``module``'s ``main``) as a fork of the environment's zygote, or None
    (start it fresh)."""
    return zygote(env).fork(env, spec_path, log_path, module)


@atexit.register
def shutdown() -> None:
    """Stop every zygote (their runs have ended or been killed by the launcher)."""
    with _REGISTRY_LOCK:
        zygotes = list(_ZYGOTES.values())
        _ZYGOTES.clear()
    for each in zygotes:
        each.close()


# ------------------------------------------------------------------------- the server


def _warm() -> None:
    """What every run imports before its first step (never CUDA: forks could not use it)."""
    import numpy  # noqa: F401
    import torch
    import torch.utils.data

    with contextlib.suppress(Exception):  # what the first optimizer.step() imports
        import torch._dynamo
    for module in ("fingerprint", "localize", "recorder", "trace", "runner.bootstrap"):
        importlib.import_module(f"reprocheck.{module}")
    for module in ("loop", "worker", "analysis"):
        importlib.import_module(f"reprocheck.runner.{module}")
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


def _child(request: dict[str, Any]) -> int:
    for fd in _EXITS:  # its siblings' pidfds are the zygote's, not the run's
        with contextlib.suppress(OSError):
            os.close(fd)
    _EXITS.clear()
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own descriptors
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()  # the run's own environment (its start-up part is the zygote's)
    os.environ.update(request["env"])
    threads = _threads(request["env"])
    if threads is not None:  # as a fresh interpreter reads it from the variables
        import torch

        torch.set_num_threads(threads)
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m reprocheck.runner.worker` has it
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
    out = sys.stdout.buffer
    _warm()
    atexit.unregister(shutdown)  # the zygote's own registry is empty; its forks inherit it

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
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(request)
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
