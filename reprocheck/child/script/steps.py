"""How a script's steps are found where no optimizer step says: updates made by hand, and
step 0's buffers.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...fingerprint import fingerprint
from .naming import _freed, _parameters, optimizers_created, tensor_names

if TYPE_CHECKING:
    from .recorder import ProcessRecorder


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


def keep_buffers(rec: ProcessRecorder, module: torch.nn.Module) -> None:
    """Step 0 is the state before the first forward: a forward moves buffers (batch
    norm's running statistics) before the first optimizer step takes step 0, so each
    module's buffers are kept as its first outermost call finds them, and step 0
    records those (the forward's change belongs to step 1)."""
    rec.called.add(id(module))
    with torch.no_grad():
        for buffer in module.buffers():
            if id(buffer) not in rec.first_buffers and buffer.is_floating_point():
                rec.first_buffers[id(buffer)] = buffer.detach().clone()


def note_hand_update(rec: ProcessRecorder) -> None:
    if rec.finished or rec.optimizer_seen or not rec.trained:
        return
    # a leaf whose storage is freed once backward is done is a framework's temporary
    # (FSDP2's unsharded parameter; its optimizer holds the shards): never a weight
    trained = [p for p in rec.trained.values() if not _freed(p)]
    held = _parameters(optimizers_created(rec))
    if not trained or any(id(p) in held for p in trained):
        return  # an optimizer will make the steps
    if not rec.started:
        rec._fix_names(None)
        rec._begin_step0()
    names = tensor_names(rec)
    order = {ident: index for index, ident in enumerate(names)}  # the models' order
    grads = [
        (names.get(id(p), f"param{i}"), p.grad.detach().clone())
        for i, p in sorted(enumerate(trained), key=lambda e: order.get(id(e[1]), e[0]))
        if p.grad is not None
    ]
    rec.snapshot = ([fingerprint(p.detach()).value for p in trained], grads)


def hand_update_step(rec: ProcessRecorder) -> None:
    """A step if the trained parameters changed since backward() returned."""
    digests, grads = rec.snapshot  # type: ignore[misc]
    trained = list(rec.trained.values())
    if [fingerprint(p.detach()).value for p in trained] == digests:
        return  # not updated yet (the next micro-batch of an accumulation)
    rec.snapshot = None
    rec.step += 1
    rec._rec().begin(rec.step)
    rec._observed(grads)
    rec._commit_state()
