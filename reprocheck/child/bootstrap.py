"""Record an unchanged training script (``reprocheck exec``) or function (``audit``).

The run's process starts here, not in the script: the determinism preset is applied
before the script's first line, then global hooks record what the script does —

* every DataLoader batch (``_BaseDataLoaderIter.__next__``)   → ``data``
* the output of each outermost call of a model in training mode → ``outputs``
* the scalar ``backward()`` is called on                       → ``loss``
* the gradients of the trained parameters                      → ``grads``
* after the update: parameters, buffers, optimizer state       → ``weights``, ``optimizer``
* the generators' states (kept apart: latent, not observable)  → ``rng``

**Steps.** Step k is the k-th optimizer step (``optimizer.step()``, any optimizer). A
closure optimizer (``opt.step(closure)``, LBFGS) evaluates the closure inside its step:
those evaluations' outputs, losses and gradients are recorded in the step that made them.
A script that updates its parameters by hand (``p.data.add_(...)``, or ``p.add_`` under
``no_grad``) makes a step each time the trained parameters — the leaves ``backward()``
accumulated gradients into, held by no optimizer — change between one ``backward()`` and
the next outermost model call or ``backward()``. ``.data`` updates leave the parameters'
version counters unchanged, so the change is found from the parameters' digests taken
when ``backward()`` returns. Gradient accumulation (several backward calls per update)
keeps one step per update. Step 0 (the state before the first forward) is taken at the
first step's pre-hook, or, for hand-written updates, when the first ``backward()`` returns,
with the buffers each model's first outermost call found (a forward moves batch norm's
running statistics: that belongs to step 1).

**Models** are the outermost modules that own trained parameters (parameters in an
optimizer, or leaves that received gradients): a loss module, a frozen copy loaded for
evaluation, or a teacher in ``eval()`` is not one. With more than one, models and
optimizers are numbered by creation order (``model0.fc.weight``, ``opt1.``); the numbering
is fixed at step 0, and a model or optimizer first seen later gets the next number.

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

import atexit
import contextlib
import functools
import importlib
import itertools
import os
import runpy
import subprocess
import sys
import time
import traceback
import weakref
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..compiled import resolve as resolve_backend
from ..config import PHASES, DeterminismConfig
from ..contract import (
    MAIN,
    OBSERVED,
    PROCESS_ENV,
    Capture,
    ChildSettings,
    Function,
    ProcessName,
    RunSpec,
    process_trace,
    run_stem,
)
from ..fingerprint import fingerprint
from ..recorder import (
    StepRecorder,
    batch_tensors,
    flatten,
    optimizer_tensors,
    rng_states,
)
from .context import RunContext, StepLimitReached

if TYPE_CHECKING:
    from ..localize import OpCapture


MAX_WRITTEN = 1000  # files noted per process (a bound on the trace's meta)
MAX_PENDING_OUTPUTS = 256  # outputs kept for a step that has not come yet (a bound on memory)


# A bare ``os.fork()`` child's name, set in the child by the fork hooks that
# :meth:`Session.install` registers: ``name`` (``fork1``, ``fork1-2``, ``rank0.fork1``),
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


# wrappers a framework puts around the user's model, and the attribute holding it
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",
    "_FabricModule": "_original_module",  # Lightning Fabric's setup()
    "DeepSpeedEngine": "module",
}


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module a wrapper trains: ``torch.compile``'s ``_orig_mod``, DDP's ``module``,
    Fabric's ``_original_module``: every phase names a tensor by the user's model. Read
    from the instance's own ``__dict__``/``_modules`` (no ``__getattr__`` of the wrapper)."""
    while True:
        attribute = _WRAPPERS.get(type(module).__name__)
        if attribute is None and "_orig_mod" in module._modules:
            attribute = "_orig_mod"
        inner = None
        if attribute is not None:
            inner = module._modules.get(attribute, module.__dict__.get(attribute))
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


def _trained_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors a ``backward()`` from ``tensor`` accumulates gradients into, in
    graph order (first reached first)."""
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
            continue
        stack.extend(reversed([next_node for next_node, _ in node.next_functions]))
    return leaves


class LaunchFailed(SystemExit):
    """The command a run launched (``bash run.sh``, ``accelerate launch …``) exited with a
    failure status: the run failed as a script's ``sys.exit(status)`` fails it."""

    def __init__(self, program: str, code: int) -> None:
        super().__init__(code)
        self.who = program


class Created:
    """The modules and optimizers made so far, in creation order, held by identity.

    The registry is written from the ``__init__`` hook *before* the subclass's own
    ``__init__`` has run, so it must never call anything of the object's: no ``__hash__``
    or ``__eq__`` (torchmetrics' metrics hash their state, which does not exist yet), no
    ``__getattr__``, no ``__bool__``. Entries are keyed by ``id()`` and dropped by a weak
    reference's callback when the object dies, so a recycled id never names a dead object.
    An object that takes no weak reference (``__slots__`` without ``__weakref__``) is left
    unnumbered."""

    def __init__(self) -> None:
        # id → (a weak reference, its serial, the user's line that made it)
        self._entries: dict[int, tuple[weakref.ReferenceType[Any], int, str | None]] = {}
        self.count = 0  # how many were made so far (the next serial)

    def add(self, obj: Any) -> None:
        key = id(obj)
        if key in self._entries:  # a subclass's __init__ calling its parent's: made once
            return
        entries = self._entries

        def forget(ref: weakref.ReferenceType[Any], key: int = key) -> None:
            found = entries.get(key)
            if found is not None and found[0] is ref:
                del entries[key]

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return
        entries[key] = (ref, self.count, _construction_line(obj))
        self.count += 1

    def _live(self, kind: type, since: int = 0) -> list[tuple[Any, str | None]]:
        """(object, its line) of the live objects of ``kind`` made at or after serial
        ``since``, oldest first (``type()`` and the MRO only)."""
        found = []
        for ref, serial, where in sorted(self._entries.values(), key=lambda entry: entry[1]):
            obj = ref() if serial >= since else None
            if obj is not None and issubclass(type(obj), kind):
                found.append((obj, where))
        return found

    def of_type(self, kind: type) -> list[Any]:
        """The live objects of ``kind``, oldest first."""
        return [obj for obj, _ in self._live(kind)]

    def made_since(self, serial: int, kind: type) -> list[tuple[Any, str | None]]:
        """The live outermost objects of ``kind`` made at or after ``serial``, oldest
        first, with the user's line that made each."""
        made = self._live(kind, serial)
        roots = {id(m) for m in outermost([m for m, _ in made])}
        return [(obj, where) for obj, where in made if id(obj) in roots]


def outermost(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules none of the others holds as a direct child, in their order."""
    inner = {id(child) for m in modules for child in m._modules.values() if child is not None}
    return [m for m in modules if id(m) not in inner]


def _construction_line(obj: Any) -> str | None:
    """The user's line that constructed ``obj``: the innermost user frame outside the
    ``__init__`` methods running on it (``model = Net()``, not ``super().__init__()``
    inside ``Net``); compared by identity alone."""
    from ..localize import _caller as user_line

    def constructing(frame: Any) -> bool:
        return frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj

    return user_line(skip=constructing)[0]


class Session:
    """What every recording process of one run shares: where traces go, the controls,
    the step limit. The script's own process creates it from the launcher's spec; a child
    process from the settings its parent left in the environment (:mod:`.child`)."""

    def __init__(self, settings: ChildSettings) -> None:
        self.settings = settings
        self.trace = settings.trace
        self.max_steps = settings.max_steps
        self.with_sketch = settings.with_sketch
        # a replay (the zoom): keep the named tensors of step k, and every op of it
        self.capture: Capture | None = settings.capture
        self.recorders: dict[int, ProcessRecorder | None] = {}  # pid → its recorder
        self.subprocesses = itertools.count(1)
        self.seeding: dict[int, list[dict[str, Any]]] = {}  # pid → its seeding calls
        self.written: dict[int, set[str]] = {}  # pid → the files it opened for writing
        # pid → the script's own calls that set a control (threads, deterministic algorithms)
        self.overrides: dict[int, list[dict[str, Any]]] = {}
        self.created = Created()  # modules and optimizers, by identity, in creation order
        # a compile leg (``--compile``): None (not asked: the script runs as written), False
        # (torch.compile returns its argument unchanged) or True (the script's compile
        # runs; a model the script never compiles is compiled in place with its optimizer)
        self.compile_mode: bool | None = settings.compile
        self.compile_backend: str | None = settings.compile_backend
        self.cache_warm: bool | None = None
        if self.compile_mode:
            from ..determinism import compile_cache_warm

            self.cache_warm = compile_cache_warm()
        self.compile_calls: list[str] = []  # where the script called torch.compile
        self.compile_options: list[dict[str, Any]] = []  # those with a mode or options
        self.compiled_in_place: set[int] = set()  # models whose forward --compile on compiled
        self.original_compile: Callable[..., Any] = torch.compile

    def _compile_controls(self) -> None:
        """The script's torch.compile calls are noted (where, and the mode and options that
        change what it generates: RC026, RC027); ``--compile off``: torch.compile and
        Module.compile do nothing; ``on``: the script's own calls stand."""
        session, original = self, torch.compile
        self.original_compile = original

        @functools.wraps(original)
        def compile(model: Any = None, *args: Any, **kwargs: Any) -> Any:
            where = _caller() or "?"
            session.compile_calls.append(where)
            if kwargs.get("mode") or kwargs.get("options"):
                session.compile_options.append(
                    {
                        "where": where,
                        "mode": kwargs.get("mode"),
                        "options": {k: repr(v) for k, v in (kwargs.get("options") or {}).items()},
                    }
                )
            if session.compile_mode is False:  # --compile off: the argument unchanged
                return (lambda fn: fn) if model is None else model  # (or as a decorator)
            if session.compile_mode and session.compile_backend:
                kwargs["backend"] = resolve_backend(session.compile_backend)  # the ladder
                kwargs.pop("mode", None)  # inductor's options mean nothing to another
                kwargs.pop("options", None)
            # no compile legs, or --compile on: the script's own call
            return (
                original(model, *args, **kwargs) if model is not None else original(*args, **kwargs)
            )

        torch.compile = compile
        if not self.compile_mode and hasattr(torch.nn.Module, "compile"):
            torch.nn.Module.compile = lambda module, *a, **k: None  # type: ignore[method-assign]

    def _watch_collectives(self) -> None:
        """The ``torch.distributed`` collectives a step makes: the digests of their inputs
        before the call and of their outputs after it (a synchronous call; an
        ``async_op=True`` one's outputs are final only at ``wait()``: its inputs alone), so
        a divergence is placed before, in or after communication. DDP's bucketed
        all-reduce runs in its C++ reducer, not through these functions, and is not seen."""
        dist = getattr(torch, "distributed", None)
        if dist is None or not dist.is_available():
            return
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        session, compiling = self, _is_compiling()
        for name, (inputs, outputs) in _COLLECTIVES.items():
            original = getattr(c10d, name, None)
            if original is None:
                continue

            @functools.wraps(original)
            def call(*args: Any, _original=original, _name=name, _in=inputs, _out=outputs, **kw):
                rec = None if compiling() else session.recorders.get(os.getpid())
                if rec is None or rec.finished:
                    return _original(*args, **kw)
                index = rec.comm_calls
                rec.comm_calls += 1
                bound = _bind(_original, args, kw)
                rec.note_comm(f"{_name}:{index}.in", _tensors_of(bound, _in))
                result = _original(*args, **kw)
                if not bound.get("async_op"):
                    rec.note_comm(f"{_name}:{index}.out", _tensors_of(bound, _out))
                return result

            setattr(c10d, name, call)
            if getattr(dist, name, None) is original:
                setattr(dist, name, call)

    def optimizer_created(self, optimizer: torch.optim.Optimizer) -> None:
        """``--compile on``: the models this optimizer trains are compiled in place at
        their first call, unless the script has called torch.compile by then (nanoGPT
        compiles after building its optimizer: its own compile then stands)."""
        if not self.compile_mode or self.compile_calls or not hasattr(torch.nn.Module, "compile"):
            return
        wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
        pending = {
            id(m): m
            for m in outermost(self.created.of_type(torch.nn.Module))
            if getattr(m, "_compiled_call_impl", None) is None
            and id(m) not in self.compiled_in_place
            and any(id(p) in wanted for p in m.parameters())
        }
        if not pending:
            return
        session, module_type = self, torch.nn.Module
        original = module_type.__call__

        def __call__(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            found = pending.pop(id(module), None)
            if found is not None and not session.compile_calls:
                # its forward compiled, not the whole call: the call's hooks (reprocheck's
                # outputs) stay eager, around the compiled code; names stay the same
                backend = (
                    {"backend": resolve_backend(session.compile_backend)}
                    if session.compile_backend
                    else {}
                )
                found.forward = session.original_compile(found.forward, **backend)
                session.compiled_in_place.add(id(found))
            if not pending or session.compile_calls:
                module_type.__call__ = original  # every model called once: no more checks
                pending.clear()
            return original(module, *args, **kwargs)

        module_type.__call__ = __call__  # type: ignore[method-assign]

    def window(self, key: str) -> Capture | None:
        """A replay's capture, if it is this process's (``main``, or the child that
        diverged: ``spawn1``, ``rank0`` …)."""
        capture = self.capture
        return capture if capture and capture.process == key else None

    def recorder(self) -> ProcessRecorder | None:
        """This process's recorder; a child that trains gets one (and a trace) now."""
        pid = os.getpid()
        found = self.recorders.get(pid, False)
        if found is False:
            found = None if _in_dataloader_worker() else ProcessRecorder(self, process_key())
            self.recorders[pid] = found
        return found

    def context(self, key: str, path: str | None = None) -> RunContext:
        """The run context (trace and step recorder) of this process, named ``key``."""
        from ..determinism import environment_snapshot

        env = os.environ
        meta = {
            **self.settings.meta,
            "process": key,
            "rank": int(env["RANK"]) if "RANK" in env else None,
            "local_rank": int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None,
            "world_size": int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None,
            "steps_planned": self.max_steps,
            "environment": environment_snapshot(self.settings.applied),
            # a spawned child's generators at its start (a fork's are its parent's: unknown)
            "rng_start": self.settings.rng_start,
            # a compile leg: was inductor's cache warm when this process started
            "compile_cache_warm": self.cache_warm,
        }
        path = path or process_trace(self.trace, key)
        window = self.window(key)
        return RunContext(
            path,
            meta,
            # a script's collectives, where it makes any; the observer run (reprocheck's
            # check that recording leaves training alone): weights and optimizer alone
            tuple(self.settings.record or (*PHASES, "comm")),
            with_sketch=self.with_sketch,
            capture=(window.step, window.tensors) if window else None,
        )

    # -- hooks: installed once per interpreter, each asks for this process's recorder ----
    def install(self) -> None:
        """Install the global hooks; call before the script's first line."""
        optim = importlib.import_module("torch.optim.optimizer")
        if not hasattr(optim, "register_optimizer_step_pre_hook"):
            raise RuntimeError(
                f"torch {torch.__version__} has no global optimizer hooks (need ≥ 2.0)"
            )
        session = self
        self._compile_controls()
        self._watch_collectives()

        compiling = _is_compiling()

        def enter(module: torch.nn.Module, inputs: Any) -> None:
            if compiling():  # traced into a compiled graph: nothing to do, no graph break
                return
            rec = session.recorder()
            if rec is not None:
                rec.enter_module(module)

        def leave(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if compiling():
                return
            rec = session.recorder()
            if rec is not None:
                rec.leave_module(module, output)

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            rec = session.recorder()
            if rec is not None:
                rec.before_step(optimizer, args, kwargs)

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            rec = session.recorder()
            if rec is not None:
                rec.after_step(optimizer)

        hooks = torch.nn.modules.module
        hooks.register_module_forward_pre_hook(enter)
        # always_call: a forward that raises still leaves, so the depth stays right
        hooks.register_module_forward_hook(leave, always_call=True)
        optim.register_optimizer_step_pre_hook(before_step)
        optim.register_optimizer_step_post_hook(after_step)

        for cls in (torch.nn.Module, torch.optim.Optimizer):  # creation order, for the names
            original_init = cls.__init__

            def __init__(obj, *args, _original=original_init, _cls=cls, **kwargs):
                # by identity, before the subclass's __init__ has run: nothing of the
                # object's own (its __hash__, __eq__, __getattr__) is called
                session.created.add(obj)
                _original(obj, *args, **kwargs)
                if _cls is torch.optim.Optimizer:
                    session.optimizer_created(obj)

            cls.__init__ = functools.wraps(original_init)(__init__)

        loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
        original_next = loader_iter.__next__

        def __next__(self_iter):
            rec = session.recorder()
            # a batch from worker processes is made there: here its tensors are only
            # unpickled into shared storage (`set_`, `empty`, in an order the workers'
            # timing decides), no op of the training step; the capture skips them and the
            # batch is compared as data
            stage = rec.stage if rec is not None and getattr(self_iter, "_num_workers", 0) else None
            if stage is not None:
                rec._pause()
            try:
                batch = original_next(self_iter)
            finally:
                if stage is not None:
                    rec._resume(stage)
            if rec is not None:
                rec.batches.append(batch)
            return batch

        loader_iter.__next__ = __next__
        original_backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            rec = session.recorder()
            if rec is None:
                return original_backward(tensor, *args, **kwargs)
            rec.before_backward(tensor)
            result = original_backward(tensor, *args, **kwargs)
            rec.after_backward()
            return result

        torch.Tensor.backward = backward
        self._name_forks()
        self._name_subprocesses()
        self._watch_seeding()
        self._watch_controls()
        self._watch_writes()

    def _watch_seeding(self) -> None:
        """Record every call that seeds or re-seeds a global generator (or builds a NumPy
        generator from entropy), with the user's line and the value: the evidence that
        names *which call* made two runs' generators differ. A ``torch.Generator``'s own
        ``manual_seed`` is a method of a C type and cannot be wrapped: it stays unseen."""
        import random

        import numpy as np

        session = self

        # torch's CPU generator as the last seeding (or the start) left it, and what had
        # been made by then: a seeding call that finds it moved says what drew from it
        # before it was seeded (a model built one line too early)
        last = {"state": torch.default_generator.get_state(), "made": session.created.count}

        def drawn_before() -> dict[str, Any] | None:
            if torch.equal(torch.default_generator.get_state(), last["state"]):
                return None
            made = session.created.made_since(last["made"], torch.nn.Module)
            owners = [(m, where) for m, where in made if next(m.parameters(), None) is not None]
            model, where = owners[0] if owners else (None, None)
            return {"model": type(model).__name__ if model is not None else None, "where": where}

        def note(call: str, value: Any, drawn: Any = None, before: Any = None) -> None:
            rec = session.recorders.get(os.getpid())
            entry = {"call": call, "value": value, "seed": drawn, "where": _caller()}
            # the step in progress when it was made (None: before the process trained)
            entry["step"] = rec.step if rec is not None and rec.started else None
            if before is not None:
                entry["drawn_before"] = before
            calls = session.seeding.setdefault(os.getpid(), [])
            calls.append(entry)
            # into the trace as it happens: a run stopped by fail-fast, killed or crashed
            # keeps the calls it made (a child's trace begins at its first step: then)
            if rec is not None and rec.context is not None and not rec.finished:
                with contextlib.suppress(Exception):
                    rec.context.writer.set_meta(seeding=calls)

        def plain(value: Any) -> Any:
            return value if value is None or isinstance(value, (int, float, str)) else repr(value)

        inside: list[bool] = []  # torch.manual_seed seeds CUDA too: one call, one record

        def wrap(owner: Any, name: str, call: str, entropy: Callable[..., bool]) -> None:
            original = getattr(owner, name, None)
            if original is None:
                return

            torch_cpu = call in ("torch.manual_seed", "torch.seed")

            @functools.wraps(original)
            def seeded(*args: Any, **kwargs: Any) -> Any:
                if inside:
                    return original(*args, **kwargs)
                before = drawn_before() if torch_cpu else None
                inside.append(True)
                try:
                    result = original(*args, **kwargs)
                finally:
                    inside.pop()
                if torch_cpu:
                    last.update(
                        state=torch.default_generator.get_state(), made=session.created.count
                    )
                if entropy(*args, **kwargs):
                    note(call, "entropy", result if isinstance(result, int) else None, before)
                else:
                    note(call, plain(_first_argument(args, kwargs)), None, before)
                return result

            setattr(owner, name, seeded)

        def never(*args: Any, **kwargs: Any) -> bool:
            return False

        def always(*args: Any, **kwargs: Any) -> bool:
            return True

        def unseeded(*args: Any, **kwargs: Any) -> bool:
            return _first_argument(args, kwargs) is None

        wrap(torch, "manual_seed", "torch.manual_seed", never)
        wrap(torch, "seed", "torch.seed", always)
        wrap(torch.random, "manual_seed", "torch.manual_seed", never)
        wrap(torch.random, "seed", "torch.seed", always)
        wrap(torch.cuda, "manual_seed", "torch.cuda.manual_seed", never)
        wrap(torch.cuda, "manual_seed_all", "torch.cuda.manual_seed_all", never)
        wrap(torch.cuda, "seed", "torch.cuda.seed", always)
        wrap(torch.cuda, "seed_all", "torch.cuda.seed_all", always)
        wrap(random, "seed", "random.seed", unseeded)
        wrap(np.random, "seed", "np.random.seed", unseeded)
        wrap(np.random, "default_rng", "np.random.default_rng", unseeded)
        wrap(np.random, "SeedSequence", "np.random.SeedSequence", unseeded)

    def _watch_controls(self) -> None:
        """Record the script's own calls that set what a control sets — its
        ``torch.set_num_threads``, ``torch.use_deterministic_algorithms`` — with their
        lines: a control the script overrides is no control (attribution says so)."""
        session = self

        def wrap(name: str) -> None:
            original = getattr(torch, name, None)
            if original is None:
                return

            @functools.wraps(original)
            def setting(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                value = _first_argument(args, kwargs)
                session.overrides.setdefault(os.getpid(), []).append(
                    {
                        "call": f"torch.{name}",
                        "value": value if isinstance(value, (bool, int, str)) else repr(value),
                        "where": _caller(),
                    }
                )
                return result

            setattr(torch, name, setting)

        wrap("set_num_threads")
        wrap("use_deterministic_algorithms")

    def _name_forks(self) -> None:
        """Each bare ``os.fork()`` child gets its name by creation order among its parent's
        (``fork1``, ``fork2`` …; a fork of ``fork1``: ``fork1-2``; of another child:
        ``rank0.fork1``). A fork made by ``multiprocessing`` (its processes, DataLoader
        workers) or by ``subprocess`` (a ``preexec_fn``) is not counted: those have names
        of their own, or never train. Registered once per interpreter: a forked child
        inherits the hooks."""
        if _FORKS["hooked"] or not hasattr(os, "register_at_fork"):
            return
        _FORKS["hooked"] = True
        session = self

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

    def _watch_writes(self) -> None:
        """Note every file the script opens for writing (``open``/``io.open`` in a write
        mode, so ``torch.save`` and ``np.save`` to a path too), by absolute path, outside
        the audit's own folder: runs that write the same path share a working directory,
        and a script that reads back what it wrote (a resume, a best-model reload) may
        read the other run's file."""
        import builtins
        import io

        session, original = self, builtins.open
        own = os.path.dirname(os.path.abspath(self.settings.trace)) + os.sep

        def note(file: Any) -> None:
            with contextlib.suppress(TypeError, ValueError):
                if isinstance(file, (str, bytes, os.PathLike)):
                    path = os.path.abspath(os.fsdecode(file))
                    if not path.startswith(own):
                        written = session.written.setdefault(os.getpid(), set())
                        if len(written) < MAX_WRITTEN:
                            written.add(path)

        @functools.wraps(original)
        def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = original(file, mode, *args, **kwargs)
            if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
                note(file)
            return handle

        builtins.open = opened
        io.open = opened
        save = torch.save  # its zip writer opens the path in C++, past `open`

        @functools.wraps(save)
        def saved(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            result = save(obj, f, *args, **kwargs)
            note(f)
            return result

        torch.save = saved
        torch.serialization.save = saved

    def _name_subprocesses(self) -> None:
        """Each ``subprocess`` child gets its name (``sub1``, ``sub2`` … per parent) in its
        environment, so a Python child that trains writes a trace named by it."""
        original_init = subprocess.Popen.__init__
        session = self

        @functools.wraps(original_init)
        def __init__(popen, args, *rest, **kwargs):
            parent = session.recorders.get(os.getpid())
            prefix = f"{parent.key}." if parent is not None and parent.key != MAIN else ""
            env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
            env[PROCESS_ENV] = prefix + ProcessName.subprocess_name(next(session.subprocesses))
            kwargs["env"] = env
            original_init(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = __init__

    def finish_all(self, status: str) -> None:
        rec = self.recorders.get(os.getpid())
        if rec is not None:
            rec.finish(status)


class ProcessRecorder:
    """The steps of one training process: what the hooks saw, and its trace.

    The script's own process writes its trace from the start (it holds the run's status);
    a child's trace is created at its first step, so a child that never trains (a
    DataLoader worker, a tool run through ``subprocess``) leaves none.
    """

    def __init__(self, session: Session, key: str, context: RunContext | None = None) -> None:
        self.session = session
        self.key = key
        self.context: RunContext | None = None
        if context is not None:
            self._attach(context)
        self.step = 0
        self.called: set[int] = set()  # modules called (outermost) before step 0
        self.first_buffers: dict[int, torch.Tensor] = {}  # id → its value before a forward
        self.canary_planted = False  # the canary run's flipped bit (settings.canary)
        self.started = False  # step 0 committed
        self.optimizer_seen = False  # steps are optimizer steps (else: hand-written updates)
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.tags: dict[int, str] = {}  # id(model or optimizer) → its prefix, once fixed
        self.loose: dict[int, tuple[str, torch.Tensor]] = {}  # trained tensors no model owns
        self.trained: dict[int, torch.Tensor] = {}  # leaves backward() accumulated into
        self.batches: list[Any] = []
        self.outputs: list[tuple[torch.nn.Module, Any]] = []
        self.losses: list[torch.Tensor] = []
        self.depth = 0  # module calls in progress: only outermost calls are outputs
        self.closure_step = False  # this step's closure evaluations are recorded after it
        self.last_loss: torch.Tensor | None = None
        self.snapshot: tuple[list[bytes], list[tuple[str, torch.Tensor]]] | None = None
        self.finished = False
        self.zoom_ops: list[Any] = []
        self.graphs_at_step1: int | None = None  # dynamo's graphs once step 1 was done
        # the step's collectives: (name, shape, dtype, digest) taken at the call
        self.comm: list[tuple[str, tuple[int, ...], str, bytes]] = []
        self.comm_calls = 0
        # what the run did that a rule names (an evaluation in training mode …)
        self.observations: list[dict[str, Any]] = []
        self.eval_noted: set[tuple[int, str | None]] = set()
        self.stochastic: dict[int, list[tuple[str, torch.nn.Module]]] = {}
        # a replay's op capture of one step, in the process that diverged: the window, and
        # its stage
        self.window = session.window(key)
        self.zoom_step = self.window.step if self.window and self.window.ops else None
        self.ops: OpCapture | None = None
        self.stage: str | None = None
        if key != MAIN and self.zoom_step is not None and self.zoom_step <= 1:
            # a child's steps 0 and 1: from its first hook on (its recorder is made there)
            from ..localize import OpCapture

            self.ops = OpCapture(None)
            self._resume("forward")
        if key != MAIN:
            # a forked child ends through os._exit (no atexit): multiprocessing's
            # finalizers still run; a spawned child or subprocess ends through atexit
            import multiprocessing.util

            multiprocessing.util.Finalize(None, self.finish, args=("complete",), exitpriority=0)
            atexit.register(self.finish, "complete")

    # -- the trace -----------------------------------------------------------------------
    def _attach(self, context: RunContext) -> None:
        self.context = context
        context.on_finish = self._closing
        calls = self.session.seeding.get(os.getpid())
        if calls:  # the calls made before this process's trace began
            context.writer.set_meta(seeding=calls)

    def _rec(self) -> StepRecorder:
        if self.context is None:  # a child's first step: its trace begins
            self._attach(self.session.context(self.key))
        return self.context.recorder  # type: ignore[union-attr]

    def _closing(self, status: str) -> dict[str, Any]:
        """Before the trace closes: the last hand-written update, and the names."""
        if status == "complete" and self.snapshot is not None:
            with contextlib.suppress(StepLimitReached):
                self._hand_update_step()  # the last hand-written update, before the end
        self.finished = True
        return {
            "exec": self.naming(),
            "seeding": self.session.seeding.get(os.getpid(), []),
            "compile": {"mode": self.session.compile_mode, "calls": self.session.compile_calls},
            "compile_options": self.session.compile_options,
            "dynamo_graphs": {"step1": self.graphs_at_step1, "end": _dynamo_graphs()},
            "observations": self.observations,
            # the files this process opened for writing: two runs writing one path share it
            "written": sorted(self.session.written.get(os.getpid(), ()))[:MAX_WRITTEN],
            **self._controls_in_effect(),
        }

    def _controls_in_effect(self) -> dict[str, Any]:
        """What the controls are once the script has set itself up (at step 0, and again
        at the end), and the script's own calls that set them."""
        fill = getattr(
            getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None
        )
        return {
            "effective": {
                "threads": torch.get_num_threads(),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "fill_uninitialized_memory": fill,
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
            },
            "overrides": self.session.overrides.get(os.getpid(), []),
        }

    def _distributed(self) -> dict[str, Any] | None:
        """A rank's place in its process group (None outside one), and which recorded
        weights are buffers (a replica check tells buffers from parameters)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        devices = {str(p.device) for model in self.models for p in model.parameters()}
        return {
            "backend": str(dist.get_backend()),
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "local_rank": int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None,
            "device": sorted(devices)[0] if len(devices) == 1 else sorted(devices),
            "wrappers": sorted({type(model).__name__ for model in self.models}),
            # DDP's buffer sync: rank 0's buffers copied to every rank at each forward (so
            # after a step each rank holds its own update of them), or never
            "sync_buffers": _ddp_buffer_sync(self.models),
            "buffers": [
                self.tags[id(model)] + name
                for model in self.models
                for name, _ in _unwrapped(model).named_buffers()
            ],
        }

    # -- what the hooks report -------------------------------------------------------------
    def enter_module(self, module: torch.nn.Module) -> None:
        if self.depth == 0:
            if not self.started and id(module) not in self.called:
                self._keep_buffers(module)
            if self.snapshot is not None:
                self._hand_update_step()
            if not torch.is_grad_enabled() and module.training:
                self._note_training_mode_eval(module)
            if self.stage not in (None, "forward"):  # a model call: the next forward
                self._pause()
                self._resume("forward")
        self.depth += 1

    def _keep_buffers(self, module: torch.nn.Module) -> None:
        """Step 0 is the state before the first forward: a forward moves buffers (batch
        norm's running statistics) before the first optimizer step takes step 0, so each
        module's buffers are kept as its first outermost call finds them, and step 0
        records those (the forward's change belongs to step 1)."""
        self.called.add(id(module))
        with torch.no_grad():
            for buffer in module.buffers():
                if id(buffer) not in self.first_buffers and buffer.is_floating_point():
                    self.first_buffers[id(buffer)] = buffer.detach().clone()

    def _note_compiled_random_ops(self) -> None:
        """A compiled model with dropout in training mode while inductor draws its own
        random numbers (``fallback_random`` off): compiled and eager runs draw different
        masks from the same seed (rule RC028). Noted once per model, at step 0."""
        import sys

        inductor = sys.modules.get("torch._inductor.config")
        if inductor is not None and getattr(inductor, "fallback_random", False):
            return
        for model in self.models:
            inner = _unwrapped(model)
            layers = [
                f"{name} ({type(m).__name__})"
                for name, m in inner.named_modules()
                if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
            ]
            if layers:
                self.observations.append(
                    {
                        "code": "RC028",
                        "model": type(inner).__name__,
                        "layers": layers,
                        "where": None,
                        "step": 0,
                    }
                )

    def _note_training_mode_eval(self, module: torch.nn.Module) -> None:
        """An outermost forward under ``no_grad``/``inference_mode`` (an evaluation) of a
        model whose dropout or batch norm is in training mode: it drops units, uses batch
        statistics and moves the running ones (rule RC019). Noted once per model and line."""
        layers = self.stochastic.get(id(module))
        if layers is None:
            kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
            layers = [
                (name, m)
                for name, m in module.named_modules()
                if isinstance(m, kinds) and getattr(m, "p", 1) != 0
            ]
            self.stochastic[id(module)] = layers
        active = [
            f"{name or type(m).__name__} ({type(m).__name__})" for name, m in layers if m.training
        ]
        if not active:
            return
        where = _caller()
        key = (id(module), where)
        if key in self.eval_noted:
            return
        self.eval_noted.add(key)
        self.observations.append(
            {
                "code": "RC019",
                "model": type(_unwrapped(module)).__name__,
                "layers": active,
                "where": where,
                "step": self.step if self.started else None,
            }
        )
        if self.context is not None:  # said now: a run stopped by fail-fast never closes
            self.context.writer.set_meta(observations=self.observations)

    def leave_module(self, module: torch.nn.Module, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if (
            self.depth == 0
            and module.training
            and torch.is_grad_enabled()  # a forward under no_grad evaluates, it trains nothing
            and output is not None
            and not self.finished
            and next(module.parameters(), None) is not None
        ):
            self.outputs.append((module, output))
            if len(self.outputs) > MAX_PENDING_OUTPUTS:
                del self.outputs[0]

    def before_backward(self, tensor: torch.Tensor) -> None:
        if self.finished:
            return
        self._pause()
        if self.snapshot is not None:
            self._hand_update_step()
        if tensor.numel() == 1:
            self.losses.append(tensor.detach())
        if not self.optimizer_seen and tensor.grad_fn is not None:
            for leaf in _trained_leaves(tensor):
                self.trained.setdefault(id(leaf), leaf)
        self._resume("backward")

    def after_backward(self) -> None:
        """With no optimizer holding the trained parameters, note their digests and
        gradients: a change before the next model call or backward() is a step."""
        self._pause()
        try:
            self._note_hand_update()
        finally:  # what follows a backward() with no optimizer is the update, by hand
            self._resume("update" if self.snapshot is not None else "forward")

    def _note_hand_update(self) -> None:
        if self.finished or self.optimizer_seen or not self.trained:
            return
        # a leaf whose storage is freed once backward is done is a framework's temporary
        # (FSDP2's unsharded parameter; its optimizer holds the shards): never a weight
        trained = [p for p in self.trained.values() if not _freed(p)]
        held = _parameters(self._optimizers_created())
        if not trained or any(id(p) in held for p in trained):
            return  # an optimizer will make the steps
        if not self.started:
            self._fix_names(None)
            self._begin_step0()
        names = self._names()
        order = {ident: index for index, ident in enumerate(names)}  # the models' order
        grads = [
            (names.get(id(p), f"param{i}"), p.grad.detach().clone())
            for i, p in sorted(enumerate(trained), key=lambda e: order.get(id(e[1]), e[0]))
            if p.grad is not None
        ]
        self.snapshot = ([fingerprint(p.detach()).value for p in trained], grads)

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.finished:
            return
        self._pause()
        try:
            self._before_step(optimizer, args, kwargs)
        finally:
            self._resume("optimizer")

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_seen, self.snapshot = True, None
        if not self.started:
            self._fix_names(optimizer)
            self._begin_step0()
        self._optimizer_seen(optimizer)
        self.step += 1
        self._rec().begin(self.step)
        closure = args[0] if args else kwargs.get("closure")
        self.closure_step = closure is not None
        if not self.closure_step:
            self._observed(self._optimizer_grads(optimizer))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.finished or not self.started:
            return
        self._pause()
        if self.closure_step:  # the closure's evaluations ran inside the step
            self._observed(self._optimizer_grads(optimizer))
        self._commit_state()

    # -- steps ---------------------------------------------------------------------------
    def _begin_step0(self) -> None:
        rec = self._rec()
        rec.begin(0)
        self._state()
        rec.commit(0, None)
        self.started = True
        self.first_buffers = {}  # step 0 is recorded: the first forward's copies go
        # a run stopped by fail-fast never closes its trace: what is in effect, said now
        rec.writer.set_meta(**self._controls_in_effect(), distributed=self._distributed())
        self._window_after(0)

    def _hand_update_step(self) -> None:
        """A step if the trained parameters changed since backward() returned."""
        digests, grads = self.snapshot  # type: ignore[misc]
        trained = list(self.trained.values())
        if [fingerprint(p.detach()).value for p in trained] == digests:
            return  # not updated yet (the next micro-batch of an accumulation)
        self.snapshot = None
        self.step += 1
        self._rec().begin(self.step)
        self._observed(grads)
        self._commit_state()

    def _observed(self, grads: list[tuple[str, torch.Tensor]]) -> None:
        """The step's data, outputs, losses and gradients, in phase order."""
        rec = self._rec()
        several = len(self.batches) > 1
        for index, batch in enumerate(self.batches):
            prefix = f"batch{index}." if several else ""
            rec.add_all("data", ((prefix + n, t) for n, t in batch_tensors(batch)))
        self._add_models(m for m, _ in self.outputs)
        outputs = [(m, out) for m, out in self.outputs if id(m) in self.tags]
        calls = Counter(id(module) for module, _ in outputs)
        seen: Counter[int] = Counter()
        for module, output in outputs:
            name = self.tags[id(module)] + "output"
            if calls[id(module)] > 1:  # the model ran more than once in this step
                name += str(seen[id(module)])
                seen[id(module)] += 1
            rec.add_all("outputs", flatten(output, name))
        self.last_loss = self.losses[-1] if self.losses else None
        for index, loss in enumerate(self.losses):
            rec.add_all("loss", [("loss" + (f"{index}" if len(self.losses) > 1 else ""), loss)])
        rec.add_digests("comm", self.comm)
        rec.add_all("grads", grads)
        self.batches, self.outputs, self.losses = [], [], []
        self.comm, self.comm_calls = [], 0

    def _commit_state(self) -> None:
        self._pause()
        self._state()
        self._rec().commit(self.step, self.last_loss)
        if self.step == 1:  # the graphs dynamo made for the first step (RC029 counts more)
            self.graphs_at_step1 = _dynamo_graphs()
        self._window_after(self.step)
        limit = self.session.max_steps
        if limit is not None and self.step >= limit:
            self.finish("complete")
            if _FORKS["name"] is not None and self.key == _FORKS["name"]:
                # a bare fork has no process object to end it cleanly (a SystemExit would
                # unwind through its parent's frames): it runs on to its end, unrecorded
                self.session.recorders[os.getpid()] = None
                return
            raise StepLimitReached(0)

    def _state(self) -> None:
        rec = self._rec()
        # the tensors themselves (keep_vars), not detached copies, then the trained tensors
        # no module owns
        weights = [
            (self.tags[id(model)] + name, value)
            for model in self.models
            for name, value in _unwrapped(model).state_dict(keep_vars=True).items()
        ]
        weights += self.loose.values()
        canary = self.session.settings.canary
        if canary and canary.step == self.step and not self.canary_planted:
            self._plant_canary(weights, canary.step)
        before = self.first_buffers if self.step == 0 else {}  # buffers before a forward
        rec.add_state("weights", ((name, before.get(id(v), v)) for name, v in weights))
        names = self._names()
        for optimizer in self.optimizers:
            tag = self.tags[id(optimizer)]
            rec.add_state("optimizer", optimizer_tensors(optimizer, names, tag))
        rec.add_state("rng", rng_states())

    def _plant_canary(self, weights: list[tuple[str, Any]], step: int) -> None:
        """The canary run (:mod:`reprocheck.canary`): the lowest bit of the first trained
        tensor of ``weights`` (what this process records, in order) flipped right before
        step ``step``'s weights are recorded; the trace says which."""
        from ..canary import plant

        self.canary_planted = True
        planted = plant(weights, step)
        if self.context is not None:  # (it exists: _state opened it)
            self.context.writer.set_meta(canary=planted)

    def _optimizer_grads(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, Any]]:
        names = self._names()
        return [
            (names.get(id(p), f"{self.tags[id(optimizer)]}param{i}"), p.grad)
            for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
            if p.grad is not None
        ]

    # -- a replay's op capture: the window is step k, from step k−1's commit to its own ----
    def _window_after(self, committed: int) -> None:
        """Open the op capture once step ``zoom_step − 1`` is committed (steps 0 and 1: from
        the start); close it for good once ``zoom_step`` is (a paused capture is resumed by
        the next hook)."""
        if self.zoom_step is None:
            return
        if self.ops is not None and self.models and committed == 0:
            self.ops.context.names.update(  # the model is known now: its modules' names
                (id(m), n or type(m).__name__)
                for n, m in _unwrapped(self.models[0]).named_modules()
            )
        if committed + 1 == self.zoom_step and self.ops is None:
            from ..localize import OpCapture

            model = _unwrapped(self.models[0]) if self.models else None
            self.ops = OpCapture(model)
            self._resume("forward")
        elif committed >= self.zoom_step and self.ops is not None:
            self._pause()
            self.zoom_ops, self.ops = self.ops.ops, None

    def _pause(self) -> None:
        """reprocheck's own recording is no part of the step: out of the capture."""
        if self.ops is not None and self.stage is not None:
            self.ops.__exit__(None, None, None)
            self.stage = None

    def _resume(self, stage: str) -> None:
        if self.ops is not None and self.stage is None and not self.finished:
            self.ops.context.stage = self.stage = stage
            self.ops.__enter__()

    # -- models and names ----------------------------------------------------------------
    def _optimizers_created(self) -> list[torch.optim.Optimizer]:
        return self.session.created.of_type(torch.optim.Optimizer)

    def _owners(self, wanted: set[int]) -> list[torch.nn.Module]:
        """The outermost modules (by creation order) that own any of these parameters."""
        roots = outermost(self.session.created.of_type(torch.nn.Module))
        return [m for m in roots if any(id(p) in wanted for p in m.parameters())]

    def _fix_names(self, optimizer: torch.optim.Optimizer | None) -> None:
        """At step 0: the models, optimizers and their prefixes."""
        optimizers = self._optimizers_created()
        if optimizer is not None and not _known(optimizer, optimizers):
            optimizers.append(optimizer)
        self.optimizers = optimizers if optimizer is not None else []
        wanted = set(_parameters(self.optimizers))
        wanted |= set(self.trained)
        self.models = self._owners(wanted)
        # for the doctor's compile finding (RC017)
        self._rec().compiled = any(
            type(m).__name__ == "OptimizedModule"
            or getattr(m, "_compiled_call_impl", None) is not None  # Module.compile()
            or id(m) in self.session.compiled_in_place  # --compile on
            for m in self.models
        )
        if self._rec().compiled:
            self._note_compiled_random_ops()
        for group in (self.models, self.optimizers):
            label = "model" if group is self.models else "opt"
            for index, item in enumerate(group):
                self.tags[id(item)] = f"{label}{index}." if len(group) > 1 else ""
        self._name_loose(wanted)

    def _add_models(self, modules: Any) -> None:
        """A model first called after step 0 that trains: the next number, prefixed."""
        for module in modules:
            if id(module) in self.tags or not self.started:
                continue
            named = self._names()
            if any(id(p) in named for p in module.parameters()) and not _known(module, self.models):
                continue  # a part of a model, called on its own: its model's records say it
            wanted = set(self.trained) | set(_parameters(self.optimizers))
            if any(id(p) in wanted for p in module.parameters()):
                self.models.append(module)
                self.tags[id(module)] = f"model{len(self.models) - 1}."
            else:
                self.tags.setdefault(-id(module), "")  # not trained: never asked again

    def _optimizer_seen(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self.tags:
            return
        self.optimizers.append(optimizer)  # created after step 0
        self.tags[id(optimizer)] = f"opt{len(self.optimizers) - 1}."
        wanted = set(_parameters([optimizer]))
        for module in self._owners(wanted):
            if not _known(module, self.models):
                self.models.append(module)
                self.tags[id(module)] = f"model{len(self.models) - 1}."
        self._name_loose(wanted)

    def _name_loose(self, wanted: set[int]) -> None:
        """Trained tensors no model owns (``W = torch.randn(..., requires_grad=True)``):
        named after the script's global that holds them, else ``param<i>``."""
        owned = {id(p) for m in self.models for p in m.parameters()}
        tensors = _parameters(self.optimizers)
        tensors.update(self.trained)
        main = vars(sys.modules["__main__"]) if "__main__" in sys.modules else {}
        globals_by_id = {id(v): k for k, v in main.items() if isinstance(v, torch.Tensor)}
        for ident in wanted:
            if ident in owned or ident in self.loose or ident not in tensors:
                continue
            if _freed(tensors[ident]):
                continue  # a framework's temporary (FSDP's unsharded parameter): no weight
            name = globals_by_id.get(ident) or f"param{len(self.loose)}"
            self.loose[ident] = (name, tensors[ident])

    def _names(self) -> dict[int, str]:
        names = {ident: name for ident, (name, _) in self.loose.items()}
        for model in self.models:
            tag = self.tags[id(model)]
            names.update({id(p): tag + n for n, p in _unwrapped(model).named_parameters()})
        return names

    def naming(self) -> dict[str, list[dict[str, str]]]:
        """What each prefix stands for: ``{"models": [{"prefix": "model0.", "type": ...}]}``."""
        return {
            group: [
                {"prefix": self.tags.get(id(item), ""), "type": type(_unwrapped(item)).__name__}
                if isinstance(item, torch.nn.Module)
                else {"prefix": self.tags.get(id(item), ""), "type": type(item).__name__}
                for item in items
            ]
            for group, items in (("models", self.models), ("optimizers", self.optimizers))
        }

    def finish(self, status: str) -> None:
        """Close the trace with this status (once, and only from this recorder's process;
        a child that never trained has none)."""
        if self.finished or self.session.recorders.get(os.getpid()) is not self:
            return
        if self.context is None:
            self.finished = True
            return
        if self.key != MAIN and self.window is not None and status == "complete":
            from .worker import save_capture  # a child's replay: its capture, at its end

            self._pause()
            save_capture(self.window, self.context.recorder, self.zoom_ops)
        self.context.finish(status)

    def note_comm(self, name: str, tensors: list[torch.Tensor]) -> None:
        """A collective's tensors, digested now (its in-place output overwrites them)."""
        several = len(tensors) > 1
        for index, tensor in enumerate(tensors):
            if tensor.layout != torch.strided or _freed(tensor):
                continue
            self.comm.append(
                (
                    f"{name}{index}" if several else name,
                    tuple(tensor.shape),
                    str(tensor.dtype)[6:],
                    fingerprint(tensor.detach()).value,
                )
            )

    def fail(self, exc: BaseException) -> None:
        """A child raised out of the script (a ``torchrun`` rank, a spawned worker): its
        trace ends failed with the error's line, and when (the first rank to fail is the
        one that raised; the others fail in the collective it left)."""
        if self.finished or self.context is None:
            return
        from .context import error_line

        self.finished = True
        self.context.finish(
            "failed",
            error_line(exc),
            error_kind="exception",
            failed_step=self.context.step_in_progress,
            failed_at=time.time(),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[
                -8000:
            ],
        )


# collective → (its input arguments, its output arguments); a broadcast's tensor is read
# only on the source rank, so only what it holds after the call is recorded
_COLLECTIVES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "all_reduce": (("tensor",), ("tensor",)),
    "broadcast": ((), ("tensor",)),
    "all_gather": (("tensor",), ("tensor_list",)),
    "all_gather_into_tensor": (("input_tensor",), ("output_tensor",)),
    "reduce_scatter": (("input_list",), ("output",)),
    "reduce_scatter_tensor": (("input",), ("output",)),
    "all_to_all_single": (("input",), ("output",)),
}


def _bind(function: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    import inspect

    try:
        return dict(inspect.signature(function).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {}


def _tensors_of(bound: dict[str, Any], names: tuple[str, ...]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for name in names:
        value = bound.get(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                found.append(item)
    return found


def _dynamo_graphs() -> int | None:
    """How many graphs dynamo has compiled in this process (None: it never ran)."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    if counters is None:
        return None
    return int(counters["stats"].get("unique_graphs", 0))


def _is_compiling() -> Callable[[], bool]:
    """``torch.compiler.is_compiling`` (dynamo folds it to True while it traces; any torch)."""
    compiler = getattr(torch, "compiler", None)
    found = getattr(compiler, "is_compiling", None)
    if found is None:
        found = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return found or (lambda: False)


def _freed(tensor: torch.Tensor) -> bool:
    """A tensor whose storage was freed under it (``storage.resize_(0)``: FSDP2 frees each
    unsharded parameter after backward); its bytes are no one's values."""
    try:
        needed = tensor.numel() * tensor.element_size()
        return needed > 0 and tensor.untyped_storage().nbytes() < needed
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _ddp_buffer_sync(models: list[torch.nn.Module]) -> bool | None:
    """Whether the models' DDP wrappers broadcast buffers at each forward (None: no DDP)."""
    flags = [
        bool(getattr(m, "forward_sync_buffers", getattr(m, "broadcast_buffers", False)))
        for m in models
        if type(m).__name__ == "DistributedDataParallel"
    ]
    return all(flags) if flags else None


def rng_start() -> dict[str, str]:
    """Each generator's state digest (hex), as the trace's rng records would hold it."""
    return {name: fingerprint(state).value.hex() for name, state in rng_states()}


def _caller() -> str | None:
    """``file:line`` of the innermost frame of user code now running."""
    from ..localize import library_frame, user_frame
    from .context import display_line

    stack = traceback.extract_stack()
    frame = user_frame(stack)
    if frame is None:
        return None
    where = display_line(frame.filename, frame.lineno)  # a notebook's: "nb.ipynb · cell 7, line 2"
    inner = library_frame(stack)  # the framework's own line (accelerate's set_seed …)
    if inner is not None and inner is not frame:
        where += f" (in {inner.name}, {_package_path(inner.filename)}:{inner.lineno})"
    return where


def _package_path(filename: str) -> str:
    """``accelerate/utils/random.py`` from its installed path."""
    parts = os.path.abspath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    return os.path.basename(filename)


def _parameters(optimizers: list[torch.optim.Optimizer]) -> dict[int, torch.Tensor]:
    """id → parameter, of every parameter the optimizers hold."""
    return {id(p): p for o in optimizers for group in o.param_groups for p in group["params"]}


def _first_argument(args: tuple, kwargs: dict[str, Any]) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)


def _known(item: Any, items: list[Any]) -> bool:
    return any(item is other for other in items)


def run_script(spec: RunSpec) -> int:
    """The worker's path for ``reprocheck exec`` / ``audit``: 0 complete, 3 the script failed."""
    from ..determinism import apply_controls_for
    from . import spawned

    target = spec.target
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
    )
    session = Session(settings)
    context = session.context(MAIN, spec.trace)
    recorder = ProcessRecorder(session, MAIN, context)
    session.recorders[os.getpid()] = recorder
    session.install()
    # the generators as the script finds them: one it never moves explains no divergence
    context.writer.set_meta(rng_start=rng_start())
    spawned.export(settings)  # its children record themselves too (and capture, if theirs)
    atexit.register(recorder.finish, "complete")  # a script that calls os-level exit paths
    argv = run_arguments(list(getattr(target, "argv", ())), spec.trace, target.run_prefix)
    if recorder.zoom_step is not None and recorder.zoom_step <= 1:
        # step 0 is committed only once step 1 has run its forward and backward (at its
        # optimizer step): a zoom of step 0 or 1 captures from the script's first line
        from ..localize import OpCapture

        recorder.ops = OpCapture(None)
        recorder._resume("forward")

    def body() -> None:
        if isinstance(target, Function):
            from ..usercode import resolve_callable

            resolve_callable(target.function, spec.base_dir)()
        elif target.launch:  # any command: what it starts records itself
            # `python`, `torchrun`, `accelerate` in the command are this interpreter's,
            # as `-- python train.py` runs with it
            from ..script import launch_path

            code = subprocess.call(argv, env={**os.environ, "PATH": launch_path()})
            if code != 0:
                raise LaunchFailed(os.path.basename(argv[0]), code)
        elif target.notebook:  # its code cells, in order, in this process
            from ..notebook import run_notebook

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
        from .worker import save_capture

        recorder._pause()
        save_capture(capture, context.recorder, recorder.zoom_ops)
    return code


def run_arguments(argv: list[str], trace: str, prefix: str = "") -> list[str]:
    """The command's arguments for this run: ``{run}`` becomes the run's name (``cpu-r0``;
    a replay's is its own, ``cpu-r0.replay-s1``; a run of the audit's as-is pair or of an
    attribution control is ``prefix``ed with its folder's name, ``as-is-cpu-r0``) and
    ``{run_dir}`` a folder of its own in the audit's folder (made here), so runs that write
    and read back files keep them apart (``--output_dir out/{run}``); ``{port}`` a free
    TCP port (a rendezvous port per run)."""
    if not any("{run" in word or "{port}" in word for word in argv):
        return argv
    stem = prefix + run_stem(trace)
    folder = os.path.join(os.path.dirname(trace), "workdirs", stem)
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
    from ..determinism import apply_controls_for

    controls = DeterminismConfig(**settings.controls)
    applied = apply_controls_for(controls, settings.seed, settings.threads)
    settings = replace(settings, applied=applied, rng_start=rng_start())
    session = Session(settings)
    session.install()
    atexit.register(session.finish_all, "complete")
    original_hook = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        rec = session.recorders.get(os.getpid())
        if rec is not None:
            with contextlib.suppress(Exception):  # the error is printed whatever happens
                rec.fail(exc)
        original_hook(kind, exc, tb)

    sys.excepthook = excepthook
