"""The processes a script starts, and their names: ranks, spawned and ``multiprocessing``
children, ``subprocess`` children and bare forks.

**Processes.** Every Python process the script starts that trains writes a trace of its
own beside the run's (``<run>-<process>.sqlite``): forked children inherit these hooks;
spawned ones (``torch.multiprocessing.spawn``, ``multiprocessing`` with ``spawn`` or
``forkserver``, ``subprocess`` running Python, ``torchrun`` ranks) install them at start-up
through the ``sitecustomize`` of :mod:`reprocheck.child.spawned`. A process is named by
its rank (``rank0``: ``RANK`` in its environment), its index in
``torch.multiprocessing.spawn`` (``spawn0``), its ``multiprocessing`` identity (``mp1``,
``mp1-2``) or its creation order among the ``subprocess`` children of its parent
(``sub1``). A bare ``os.fork()`` child is named by its creation order among its parent's
bare forks (``fork1``, ``fork2``; a fork of ``fork1``: ``fork1-2``; of another child:
``rank0.fork1``); forks that ``multiprocessing`` makes keep their ``mp`` names. A bare
fork ends through ``os._exit``, which closes its trace; at ``--steps`` it runs on to its
end unrecorded (it has no process object to end it cleanly). DataLoader workers never
train and write none.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from ...contract import MAIN, PROCESS_ENV, ProcessName

if TYPE_CHECKING:
    from .session import Session


# A bare ``os.fork()`` child's name, set in the child by the fork hooks that
# :func:`name_forks` registers: ``name`` (``fork1``, ``fork1-2``, ``rank0.fork1``),
# ``pending`` (the parent's name for the fork now under way), ``made`` (the bare forks this
# process has made), ``hooked`` (the hooks are registered in this interpreter).
_FORKS: dict[str, Any] = {"name": None, "pending": None, "made": 0, "hooked": False}


def process_key() -> str:
    """This process's name among the run's processes (see the module's notes)."""
    if _FORKS["name"] is not None:  # a bare os.fork() child: no other name is its own
        return _FORKS["name"]
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessName.rank_name(env["RANK"])
    import multiprocessing

    process = multiprocessing.current_process()
    target, args = getattr(process, "_target", None), getattr(process, "_args", ())
    if (
        getattr(target, "__module__", "") == "torch.multiprocessing.spawn"
        and len(args) > 1
        and isinstance(args[1], int)
    ):
        return ProcessName.spawn_name(args[1])  # torch.multiprocessing.spawn's index (rank)
    if process._identity:
        return ProcessName.multiprocessing_name(process._identity)
    return env.get(PROCESS_ENV) or f"pid{os.getpid()}"


def _in_dataloader_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def name_forks(session: Session) -> None:
    """Each bare ``os.fork()`` child gets its name by creation order among its parent's
    (``fork1``, ``fork2`` …; a fork of ``fork1``: ``fork1-2``; of another child:
    ``rank0.fork1``). A fork made by ``multiprocessing`` (its processes, DataLoader
    workers) or by ``subprocess`` (a ``preexec_fn``) is not counted: those have names
    of their own, or never train. Registered once per interpreter: a forked child
    inherits the hooks."""
    if _FORKS["hooked"] or not hasattr(os, "register_at_fork"):
        return
    _FORKS["hooked"] = True

    def before() -> None:
        _FORKS["pending"] = None
        caller = sys._getframe(1)
        module = caller.f_globals.get("__name__", "") if caller is not None else ""
        if module.startswith("multiprocessing") or module == "subprocess":
            return
        _FORKS["made"] += 1
        made = _FORKS["made"]
        if _FORKS["name"] is not None:
            _FORKS["pending"] = f"{_FORKS['name']}-{made}"
            return
        rec = session.recorders.get(os.getpid())
        parent = rec.key if rec is not None else process_key()
        _FORKS["pending"] = ProcessName.fork_name(parent, made)

    def after_in_child() -> None:
        _FORKS["name"], _FORKS["pending"], _FORKS["made"] = _FORKS["pending"], None, 0

    def after_in_parent() -> None:
        _FORKS["pending"] = None

    os.register_at_fork(
        before=before, after_in_child=after_in_child, after_in_parent=after_in_parent
    )
    original_exit = os._exit

    @functools.wraps(original_exit)
    def _exit(code: int) -> None:
        # a bare fork ends through os._exit: no atexit, no multiprocessing finalizers
        rec = session.recorders.get(os.getpid()) if _FORKS["name"] is not None else None
        if rec is not None and not rec.finished:
            with contextlib.suppress(Exception):
                if code == 0:
                    rec.finish("complete")
                elif rec.context is not None:
                    rec.finished = True
                    rec.context.finish(
                        "failed",
                        f"{rec.key} exited with status {code}",
                        error_kind="exit",
                        failed_step=rec.context.step_in_progress,
                        failed_at=time.time(),
                    )
        original_exit(code)

    os._exit = _exit


def name_subprocesses(session: Session) -> None:
    """Each ``subprocess`` child gets its name (``sub1``, ``sub2`` … per parent) in its
    environment, so a Python child that trains writes a trace named by it."""
    original_init = subprocess.Popen.__init__

    @functools.wraps(original_init)
    def __init__(popen, args, *rest, **kwargs):
        parent = session.recorders.get(os.getpid())
        prefix = f"{parent.key}." if parent is not None and parent.key != MAIN else ""
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
        env[PROCESS_ENV] = prefix + ProcessName.subprocess_name(next(session.subprocesses))
        kwargs["env"] = env
        original_init(popen, args, *rest, **kwargs)

    subprocess.Popen.__init__ = __init__
