"""torch.compile in a script: its calls noted, turned off or sent down the backend ladder on a
compile leg (``--compile``), and a model compiled in place where the script compiles none."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...compiled import resolve as resolve_backend
from .naming import _caller, outermost

if TYPE_CHECKING:
    from .session import Session


def compile_controls(session: Session) -> None:
    """The script's torch.compile calls are noted (where, and the mode and options that
    change what it generates: RC026, RC027); ``--compile off``: torch.compile and
    Module.compile do nothing; ``on``: the script's own calls stand."""
    original = torch.compile
    session.original_compile = original

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
        return original(model, *args, **kwargs) if model is not None else original(*args, **kwargs)

    torch.compile = compile
    if not session.compile_mode and hasattr(torch.nn.Module, "compile"):
        torch.nn.Module.compile = lambda module, *a, **k: None  # type: ignore[method-assign]


def optimizer_created(session: Session, optimizer: torch.optim.Optimizer) -> None:
    """``--compile on``: the models this optimizer trains are compiled in place at
    their first call, unless the script has called torch.compile by then (nanoGPT
    compiles after building its optimizer: its own compile then stands)."""
    if not session.compile_mode or session.compile_calls or not hasattr(torch.nn.Module, "compile"):
        return
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    pending = {
        id(m): m
        for m in outermost(session.created.of_type(torch.nn.Module))
        if getattr(m, "_compiled_call_impl", None) is None
        and id(m) not in session.compiled_in_place
        and any(id(p) in wanted for p in m.parameters())
    }
    if not pending:
        return
    module_type = torch.nn.Module
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
