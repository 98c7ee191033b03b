"""A process's ``torch.distributed`` collectives (their tensors' digests, step by step) and its
place in its process group."""

from __future__ import annotations

import functools
import importlib
import os
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...fingerprint import fingerprint
from .compile import _is_compiling
from .naming import _freed, _unwrapped

if TYPE_CHECKING:
    from .recorder import ProcessRecorder
    from .session import Session


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


def watch_collectives(session: Session) -> None:
    """The ``torch.distributed`` collectives a step makes: the digests of their inputs
    before the call and of their outputs after it (a synchronous call; an
    ``async_op=True`` one's outputs are final only at ``wait()``: its inputs alone), so
    a divergence is placed before, in or after communication. DDP's bucketed
    all-reduce runs in its C++ reducer, not through these functions, and is not seen."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available():
        return
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    compiling = _is_compiling()
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
            note_comm(rec, f"{_name}:{index}.in", _tensors_of(bound, _in))
            result = _original(*args, **kw)
            if not bound.get("async_op"):
                note_comm(rec, f"{_name}:{index}.out", _tensors_of(bound, _out))
            return result

        setattr(c10d, name, call)
        if getattr(dist, name, None) is original:
            setattr(dist, name, call)


def note_comm(rec: ProcessRecorder, name: str, tensors: list[torch.Tensor]) -> None:
    """A collective's tensors, digested now (its in-place output overwrites them)."""
    several = len(tensors) > 1
    for index, tensor in enumerate(tensors):
        if tensor.layout != torch.strided or _freed(tensor):
            continue
        rec.comm.append(
            (
                f"{name}{index}" if several else name,
                tuple(tensor.shape),
                str(tensor.dtype)[6:],
                fingerprint(tensor.detach()).value,
            )
        )


def distributed(rec: ProcessRecorder) -> dict[str, Any] | None:
    """A rank's place in its process group (None outside one), and which recorded
    weights are buffers (a replica check tells buffers from parameters)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    devices = {str(p.device) for model in rec.models for p in model.parameters()}
    return {
        "backend": str(dist.get_backend()),
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None,
        "device": sorted(devices)[0] if len(devices) == 1 else sorted(devices),
        "wrappers": sorted({type(model).__name__ for model in rec.models}),
        # DDP's buffer sync: rank 0's buffers copied to every rank at each forward (so
        # after a step each rank holds its own update of them), or never
        "sync_buffers": _ddp_buffer_sync(rec.models),
        "buffers": [
            rec.tags[id(model)] + name
            for model in rec.models
            for name, _ in _unwrapped(model).named_buffers()
        ],
    }


def _ddp_buffer_sync(models: list[torch.nn.Module]) -> bool | None:
    """Whether the models' DDP wrappers broadcast buffers at each forward (None: no DDP)."""
    flags = [
        bool(getattr(m, "forward_sync_buffers", getattr(m, "broadcast_buffers", False)))
        for m in models
        if type(m).__name__ == "DistributedDataParallel"
    ]
    return all(flags) if flags else None
