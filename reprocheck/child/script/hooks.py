"""The global hooks that record a script, installed once per interpreter before its first line:
module calls, optimizer steps, creation order, DataLoader batches, ``backward()``; each asks
for this process's recorder."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

import torch

from .collectives import watch_collectives
from .compile import _is_compiling, compile_controls, optimizer_created
from .observations import watch_controls, watch_seeding, watch_writes
from .processes import name_forks, name_subprocesses
from .saves import watch_saves
from .window import pause, resume

if TYPE_CHECKING:
    from .session import Session


def install(session: Session) -> None:
    """Install the global hooks; call before the script's first line."""
    optim = importlib.import_module("torch.optim.optimizer")
    if not hasattr(optim, "register_optimizer_step_pre_hook"):
        raise RuntimeError(f"torch {torch.__version__} has no global optimizer hooks (need ≥ 2.0)")
    compile_controls(session)
    watch_collectives(session)

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
                optimizer_created(session, obj)

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
            pause(rec)
        try:
            batch = original_next(self_iter)
            if session.saves.skips_batch(rec):  # a resume control: the stream one batch on
                batch = original_next(self_iter)
        finally:
            if stage is not None:
                resume(rec, stage)
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
    name_forks(session)
    name_subprocesses(session)
    watch_seeding(session)
    watch_controls(session)
    watch_writes(session)
    watch_saves(session)
