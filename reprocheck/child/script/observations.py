"""What a script does that a rule names: its seeding calls and entropy generators, the controls
it sets itself, the files it writes, an evaluation in training mode, dropout in a compiled
model."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Any, Callable

import torch

from .naming import _caller, _unwrapped
from .saves import file_path

if TYPE_CHECKING:
    from .recorder import ProcessRecorder
    from .session import Session


MAX_WRITTEN = 1000  # files noted per process (a bound on the trace's meta)


def watch_seeding(session: Session) -> None:
    """Record every call that seeds or re-seeds a global generator (or builds a NumPy
    generator from entropy), with the user's line and the value: the evidence that
    names *which call* made two runs' generators differ. A ``torch.Generator``'s own
    ``manual_seed`` is a method of a C type and cannot be wrapped: it stays unseen."""
    import random

    import numpy as np

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
                last.update(state=torch.default_generator.get_state(), made=session.created.count)
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


def watch_controls(session: Session) -> None:
    """Record the script's own calls that set what a control sets — its
    ``torch.set_num_threads``, ``torch.use_deterministic_algorithms`` — with their
    lines: a control the script overrides is no control (attribution says so)."""

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


def watch_writes(session: Session) -> None:
    """Note every file the script opens for writing (``open``/``io.open`` in a write
    mode, so ``torch.save`` and ``np.save`` to a path too), by absolute path, outside
    the audit's own folder: runs that write the same path share a working directory,
    and a script that reads back what it wrote (a resume, a best-model reload) may
    read the other run's file."""
    import builtins
    import io

    original = builtins.open
    own = os.path.dirname(os.path.abspath(session.settings.trace)) + os.sep

    def note(file: Any) -> None:
        path = file_path(file)
        if path is None:
            return
        session.saves.opened_for_writing(path)  # a resume audit's checkpoint file
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


def controls_in_effect(session: Session) -> dict[str, Any]:
    """What the controls are once the script has set itself up (at step 0, and again
    at the end), and the script's own calls that set them."""
    fill = getattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None)
    return {
        "effective": {
            "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "fill_uninitialized_memory": fill,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "overrides": session.overrides.get(os.getpid(), []),
    }


def note_compiled_random_ops(rec: ProcessRecorder) -> None:
    """A compiled model with dropout in training mode while inductor draws its own
    random numbers (``fallback_random`` off): compiled and eager runs draw different
    masks from the same seed (rule RC028). Noted once per model, at step 0."""
    import sys

    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and getattr(inductor, "fallback_random", False):
        return
    for model in rec.models:
        inner = _unwrapped(model)
        layers = [
            f"{name} ({type(m).__name__})"
            for name, m in inner.named_modules()
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
        ]
        if layers:
            rec.observations.append(
                {
                    "rule": "compiled-random-ops",  # the parent's catalog maps the name
                    "model": type(inner).__name__,
                    "layers": layers,
                    "where": None,
                    "step": 0,
                }
            )


def note_training_mode_eval(rec: ProcessRecorder, module: torch.nn.Module) -> None:
    """An outermost forward under ``no_grad``/``inference_mode`` (an evaluation) of a
    model whose dropout or batch norm is in training mode: it drops units, uses batch
    statistics and moves the running ones (rule RC019). Noted once per model and line."""
    layers = rec.stochastic.get(id(module))
    if layers is None:
        kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
        layers = [
            (name, m)
            for name, m in module.named_modules()
            if isinstance(m, kinds) and getattr(m, "p", 1) != 0
        ]
        rec.stochastic[id(module)] = layers
    active = [
        f"{name or type(m).__name__} ({type(m).__name__})" for name, m in layers if m.training
    ]
    if not active:
        return
    where = _caller()
    key = (id(module), where)
    if key in rec.eval_noted:
        return
    rec.eval_noted.add(key)
    rec.observations.append(
        {
            "rule": "eval-in-training-mode",  # the parent's catalog maps the name
            "model": type(_unwrapped(module)).__name__,
            "layers": active,
            "where": where,
            "step": rec.step if rec.started else None,
        }
    )
    if rec.context is not None:  # said now: a run stopped by fail-fast never closes
        rec.context.writer.set_meta(observations=rec.observations)


def _first_argument(args: tuple, kwargs: dict[str, Any]) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)
