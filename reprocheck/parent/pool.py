"""A warm process pool: runs start as forks of a server that has already imported torch.

A fresh worker spends seconds before the user's first line: importing torch, NumPy and
reprocheck, and ``torch._dynamo`` (pulled in by the first ``optimizer.step()``). A *zygote*
— ``python -m reprocheck.parent.pool``, started with a run's environment — does that once;
each run it is asked for is a ``fork()`` of it that then executes
``reprocheck.child.worker SPEC`` as a fresh worker would.

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
- **the thread count**: keyed like the rest. ``torch.set_num_threads`` in a fork gives
  torch's ops the count's own bits (measured), but NumPy's OpenBLAS, loaded by ``import
  torch``, sized its pool from ``OMP_NUM_THREADS`` in the zygote: a fork of a 2-thread
  zygote asked for 1 thread multiplies NumPy matrices with 2 (measured), so a ``threads:
  [1, 2]`` audit would part its fresh run 0 from its forked run 1. Only an attribution
  control (``any_threads``), whose two runs are compared with each other alone, forks
  from a live zygote of another count and sets torch's count: both its runs then share
  NumPy's count, whose splitting is fixed run to run, and torch runs at the control's;
- **the zygote's end**: a fork dies with it (``PR_SET_PDEATHSIG``), and is reported
  killed, rather than running on unseen; the zygote dies with the audit, and a *reaper*
  ends whatever the audit's runs started once the audit has gone, SIGKILL included
  (:func:`audit_env`; docs/architecture.md, "When the audit dies");
- **CUDA** cannot be used in a fork of a process that initialised it: only CPU runs fork
  (the zygote never touches CUDA), a CUDA leg always starts fresh; and only on Linux
  (elsewhere a fork of a process that loaded torch's native libraries is not safe).

Of the runs whose comparison *is* the verdict, run 0 of each leg starts a fresh
interpreter and the others fork (:class:`~reprocheck.parent.launch.Launcher`), so every
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
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from ..contract import (
    AS_IS_ENV,
    AUDIT_ENV,
    CANARY_ENV,
    DEATH_ENV,
    HASH_THREAD_ENV,
    OBSERVER_ENV,
    POOL_ENV,
    PYTHON_ENV,
    THREAD_VARS,
    thread_count,
)

READY_TIMEOUT_S = 120.0
SWEEP_S = 10.0  # the reaper's longest sweep
MAX_ZYGOTES = 4  # warm servers kept at once (each holds torch: ~300 MB, shared with forks)

# Variables read while an interpreter starts or torch, NumPy and their libraries load:
# they key the zygote. Every other variable is the run's own and set in the fork.
STARTUP_PREFIXES = (
    "PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "BLIS", "DNNL", "ONEDNN",
    "TORCH", "PYTORCH", "ATEN_", "CUDA", "CUBLAS", "CUDNN", "NCCL", "NVIDIA", "LD_",
    "MALLOC", "NPY_", "NUMPY", "REPROCHECK",
)  # fmt: skip


# the audit's own switches, read by the audit's process alone: a run never sees them start
PARENT_ONLY = frozenset((POOL_ENV, CANARY_ENV, OBSERVER_ENV, AS_IS_ENV, HASH_THREAD_ENV))


def startup_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of an environment a zygote must have been started with."""
    return tuple(
        sorted(
            (k, v)
            for k, v in env.items()
            if k.startswith(STARTUP_PREFIXES) and k not in PARENT_ONLY
        )
    )


def _any_count(key: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, "n" if k in THREAD_VARS else v) for k, v in key)


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


# ---------------------------------------------------------------- the audit's end
#
# Whatever the audit's process starts must not outlive it, SIGKILL of it included. The
# processes it starts itself (a zygote, a fresh run) die with it by PR_SET_PDEATHSIG, and
# a zygote's forks with the zygote; that is the kernel's, instant, and needs nothing of
# the audit. What they start in turn (a torchrun agent and its ranks, each in a session of
# its own; a script's subprocesses) is ended by the *reaper*: a small process of the
# audit's, holding the read end of a pipe whose write end only the audit holds. At the
# pipe's end (the audit has exited, or was killed) it kills every process that carries
# the audit's token in its environment (:data:`AUDIT_ENV`) and every member of the
# sessions of the runs, sweeping until a few rounds find none. Where there is no /proc
# (not Linux) it kills the process groups the audit named to it (:func:`track`), and
# where there is no prctl the reaper alone ends them.

_LIFELINE: dict[str, Any] = {"fd": None, "token": None, "owner": None, "process": None}
_LIFELINE_LOCK = threading.Lock()


def _lifeline() -> str | None:
    """This audit's token, its reaper started on first use (None if it cannot be)."""
    with _LIFELINE_LOCK:
        if _LIFELINE["owner"] == os.getpid():
            return _LIFELINE["token"]
        token = f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            read, write = os.pipe()  # not inherited across exec: only this process writes
        except OSError:
            return None
        env = {k: v for k, v in os.environ.items() if k != DEATH_ENV}
        # isolated (-I -S): no sitecustomize, PYTHONPATH or .pth of the user's runs in it
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"import sys; sys.path.insert(0, {root!r}); from {__name__} import reap; reap"
        code += f"({token!r})"
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code],
                env=env,
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C to the audit's group spares it
            )
        except OSError:
            os.close(write)
            return None
        finally:
            os.close(read)
        os.set_blocking(write, False)  # a message it has no room for is dropped, not waited on
        _LIFELINE.update(fd=write, token=token, owner=os.getpid(), process=process)
        return token


def _forget_lifeline() -> None:
    """In a fork of the audit's process: the pipe is the audit's alone (a fork holding it
    would keep it open after the audit died); a fork that audits starts its own."""
    if _LIFELINE["fd"] is not None:
        with contextlib.suppress(OSError):
            os.close(_LIFELINE["fd"])
    _LIFELINE.update(fd=None, token=None, owner=None, process=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lifeline)


def audit_env(env: dict[str, str], die_with: bool = True) -> dict[str, str]:
    """``env`` for a process this audit starts: carrying the audit's token (the reaper finds
    it, and everything it starts, by that) and, with ``die_with`` and when started from the
    main thread, told to die with this process (:func:`die_with_parent`). Only the main
    thread: PR_SET_PDEATHSIG fires when the *thread* that started the process ends, and an
    attribution's threads end while the zygotes they started serve on."""
    out = dict(env)
    out.pop(DEATH_ENV, None)
    token = _lifeline()
    tokens = out.get(AUDIT_ENV, "").split()
    if token and token not in tokens:
        out[AUDIT_ENV] = " ".join([*tokens, token])
    if die_with and threading.current_thread() is threading.main_thread():
        out[DEATH_ENV] = str(os.getpid())
    return out


def _tell(message: str) -> None:
    fd = _LIFELINE["fd"] if _LIFELINE["owner"] == os.getpid() else None
    if fd is not None:
        with contextlib.suppress(OSError):  # full (dropped: /proc still finds it), or gone
            os.write(fd, message.encode() + b"\n")


def track(pid: int) -> None:
    """A run's process (a session of its own) for the reaper to end if the audit dies."""
    _tell(f"+{pid}")


def untrack(pid: int) -> None:
    """The run ended and was waited for (its pid may be reused from now on)."""
    _tell(f"-{pid}")


def reap(token: str) -> None:
    """The reaper's loop: read the groups the audit names until its end of the pipe closes
    (the audit has ended, however), then end everything of its audit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while True:
        try:
            chunk = os.read(0, 4096)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").strip()
            if text[1:].isdigit():
                (groups.add if text[0] == "+" else groups.discard)(int(text[1:]))
    _sweep(token, groups)


def _sweep(token: str, groups: set[int]) -> None:
    """Kill every process of the audit ``token`` names: its token in their environment, or
    in the sessions and groups of the runs; until three rounds in a row find none."""
    me = os.getpid()
    if not os.path.isdir("/proc"):  # no /proc: the groups the audit named, and no more
        for pid in groups:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(OSError):
                    kill(pid, signal.SIGKILL)
        return
    sessions = set(groups)
    quiet, deadline = 0, time.monotonic() + SWEEP_S
    while quiet < 3 and time.monotonic() < deadline:
        doomed = []
        for pid, (state, group, session) in _process_table().items():
            if pid == me or state in ("Z", "X"):  # (a zombie has ended: its parent reaps it)
                continue
            if session in sessions or group in sessions or _carries(pid, token):
                doomed.append(pid)
                if session == pid:  # a run, a rank: its session's members go with it
                    sessions.add(pid)
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        quiet = 0 if doomed else quiet + 1
        time.sleep(0.02)


def _process_table() -> dict[int, tuple[str, int, int]]:
    """pid → (state, process group, session) of every process, from /proc."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                table[int(entry)] = (fields[0].decode(), int(fields[2]), int(fields[3]))
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    return table


def _carries(pid: int, token: str) -> bool:
    """Does the process's environment (as it started) name the audit's token?"""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:  # ended, or not ours to read
        return False
    prefix = AUDIT_ENV.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return token.encode() in item[len(prefix) :].split()
    return False


class PooledProcess:
    """A forked run, as the launcher sees a ``subprocess.Popen``: pid, poll, wait."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            found = self.zygote.exited.pop(self.pid, None)
            if found is None:
                alive = self.zygote.alive()  # asked first: its last words are read below
                self.zygote.pump()
                found = self.zygote.exited.pop(self.pid, None)
                if found is None and not alive:  # the server went: its fork with it
                    found = -signal.SIGKILL
            self.returncode = found
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("pooled run", timeout or 0)
            self.zygote.pump(wait=0.05)
        return self.returncode  # type: ignore[return-value]


class Zygote:
    """One server process for one environment; :meth:`fork` starts a run."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reprocheck.child.zygote"],
            env=audit_env(env),  # it dies with the audit (its forks die with it)
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
        self._abandoned = 0  # requests whose caller was interrupted before it took the pid
        self.outstanding: set[int] = set()  # forks whose exit has not been reported yet
        self.started = time.monotonic()

    def stuck(self) -> bool:
        """Still not ready :data:`READY_TIMEOUT_S` after it started: it is stopped (its
        runs then start fresh)."""
        if self.ready or time.monotonic() - self.started < READY_TIMEOUT_S:
            return False
        with contextlib.suppress(OSError):
            self.process.kill()
        return True

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
        if out is None or out.closed:  # closed by close(): nothing more to read
            return []
        waiting = select.poll()  # (no limit on descriptor numbers, unlike select())
        waiting.register(out.fileno(), select.POLLIN)
        if not waiting.poll(wait * 1000):
            return []
        chunk = os.read(out.fileno(), 65536)
        if not chunk:
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for line in lines:
            with contextlib.suppress(ValueError):  # a library's print while it imported
                message = json.loads(line)
                if isinstance(message, dict):
                    messages.append(message)
        return messages

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
        while not self.ready:
            if not self.alive() or self.stuck():
                return None
            self.pump(wait=0.05)
        request = {
            # absolute: the fork opens them before it moves into the caller's folder
            "spec": os.path.abspath(spec_path),
            "log": os.path.abspath(log_path),
            "cwd": os.getcwd(),
            "env": audit_env(env, die_with=False),  # (a fork dies with the zygote)
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
            try:
                while True:
                    with self._lock:
                        while self._started and self._abandoned:  # (answers come in order)
                            self._abandoned -= 1
                            with contextlib.suppress(ProcessLookupError, PermissionError):
                                os.kill(self._started.pop(0), signal.SIGKILL)
                        if self._started:
                            return PooledProcess(self, self._started.pop(0))
                    if not self.alive():
                        return None
                    self.pump(wait=0.05)
            except BaseException:  # Ctrl-C: the fork it asked for is not anybody's run
                with self._lock:
                    self._abandoned += 1
                raise

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


def _serving(env: dict[str, str], any_threads: bool) -> Zygote | None:
    """A live zygote that may serve ``env``: its own, or with ``any_threads`` one of any
    thread count (ready ones first). None where none was started."""
    key = startup_key(env)
    with _REGISTRY_LOCK:
        found = _ZYGOTES.get(key)
        if (found is None or not found.alive()) and any_threads and thread_count(env):
            others = [
                z
                for k, z in _ZYGOTES.items()
                if _any_count(k) == _any_count(key) and z.alive() and thread_count(z.env)
            ]
            found = max(others, key=lambda z: z.ready, default=None)
    return found if found is not None and found.alive() else None


def zygote(env: dict[str, str], any_threads: bool = False) -> Zygote:
    """This environment's zygote (with ``any_threads``: a live one of any thread count
    where there is one), started now if there is none."""
    found = _serving(env, any_threads) if any_threads else None
    return found if found is not None else _zygote(env)


def _zygote(env: dict[str, str]) -> Zygote:
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


def warming(env: dict[str, str], any_threads: bool = False) -> bool:
    """Is the zygote that would serve ``env`` still importing (a fork would wait for it)?
    False once it is ready, gone or stuck (a fork then starts at once, or fresh)."""
    found = _serving(env, any_threads)
    if found is None:
        return False
    found.pump()
    return not found.ready and not found.stuck()


def registered(env: dict[str, str], any_threads: bool = False) -> Zygote | None:
    """The live zygote that would serve ``env``, if one was started (none is started)."""
    return _serving(env, any_threads)


def spawn(
    env: dict[str, str],
    spec_path: str,
    log_path: str,
    module: str | None = None,
    any_threads: bool = False,
) -> PooledProcess | None:
    """A run (or ``module``'s ``main``) as a fork of the environment's zygote (with
    ``any_threads``: of any thread count, torch's then set to the run's), or None (start
    it fresh)."""
    return zygote(env, any_threads).fork(env, spec_path, log_path, module)


@atexit.register
def shutdown() -> None:
    """Stop every zygote (their runs have ended or been killed by the launcher)."""
    with _REGISTRY_LOCK:
        zygotes = list(_ZYGOTES.values())
        _ZYGOTES.clear()
    for each in zygotes:
        each.close()
