"""The steps and records of one training process (:class:`ProcessRecorder`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import traceback
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from ...contract import MAIN
from ...recorder import StepRecorder, batch_tensors, flatten, optimizer_tensors, rng_states
from ..context import RunContext, StepLimitReached
from .collectives import distributed
from .compile import _dynamo_graphs
from .naming import (
    _known,
    _parameters,
    _unwrapped,
    add_models,
    name_loose,
    name_optimizer,
    optimizers_created,
    owners,
    prefixes,
    tensor_names,
)
from .observations import (
    MAX_WRITTEN,
    controls_in_effect,
    note_compiled_random_ops,
    note_training_mode_eval,
)
from .processes import _FORKS
from .steps import _trained_leaves, hand_update_step, keep_buffers, note_hand_update
from .window import pause, resume, window_after

if TYPE_CHECKING:
    from ...localize import OpCapture
    from .session import Session


MAX_PENDING_OUTPUTS = 256  # outputs kept for a step that has not come yet (a bound on memory)


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
            from ...localize import OpCapture

            self.ops = OpCapture(None)
            resume(self, "forward")
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
                hand_update_step(self)  # the last hand-written update, before the end
        if status == "complete" and self.started:  # `--every M`: the last step's state
            self._rec().end(self._state)
        self.finished = True
        return {
            "exec": prefixes(self),
            "seeding": self.session.seeding.get(os.getpid(), []),
            "compile": {"mode": self.session.compile_mode, "calls": self.session.compile_calls},
            "compile_options": self.session.compile_options,
            "dynamo_graphs": {"step1": self.graphs_at_step1, "end": _dynamo_graphs()},
            "observations": self.observations,
            # the files this process opened for writing: two runs writing one path share it
            "written": sorted(self.session.written.get(os.getpid(), ()))[:MAX_WRITTEN],
            **controls_in_effect(self.session),
            **self.session.saves.closing(),
        }

    # -- what the hooks report -------------------------------------------------------------
    def enter_module(self, module: torch.nn.Module) -> None:
        if self.depth == 0:
            saves = self.session.saves
            saves.boundary(self)  # a resume audit's run ends after its checkpoint
            if not self.started:
                saves.before_forward(self, module)  # a resume control's disturbance
            if not self.started and id(module) not in self.called:
                keep_buffers(self, module)
            if self.snapshot is not None:
                hand_update_step(self)
            if not torch.is_grad_enabled() and module.training:
                note_training_mode_eval(self, module)
            if self.stage not in (None, "forward"):  # a model call: the next forward
                pause(self)
                resume(self, "forward")
        self.depth += 1

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
        self.session.saves.boundary(self)
        pause(self)
        if self.snapshot is not None:
            hand_update_step(self)
        if tensor.numel() == 1:
            self.losses.append(tensor.detach())
        if not self.optimizer_seen and tensor.grad_fn is not None:
            for leaf in _trained_leaves(tensor):
                self.trained.setdefault(id(leaf), leaf)
        resume(self, "backward")

    def after_backward(self) -> None:
        """With no optimizer holding the trained parameters, note their digests and
        gradients: a change before the next model call or backward() is a step."""
        pause(self)
        try:
            note_hand_update(self)
        finally:  # what follows a backward() with no optimizer is the update, by hand
            resume(self, "update" if self.snapshot is not None else "forward")

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.finished:
            return
        self.session.saves.boundary(self)
        pause(self)
        try:
            self._before_step(optimizer, args, kwargs)
        finally:
            resume(self, "optimizer")

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_seen, self.snapshot = True, None
        if not self.started:
            self._fix_names(optimizer)
            self._begin_step0()
        name_optimizer(self, optimizer)
        self.step += 1
        self._rec().begin(self.step)
        closure = args[0] if args else kwargs.get("closure")
        self.closure_step = closure is not None
        if not self.closure_step:
            self._observed(self._optimizer_grads(optimizer))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.finished or not self.started:
            return
        pause(self)
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
        rec.writer.set_meta(**controls_in_effect(self.session), distributed=distributed(self))
        window_after(self, 0)

    def _observed(self, grads: list[tuple[str, torch.Tensor]]) -> None:
        """The step's data, outputs, losses and gradients, in phase order."""
        rec = self._rec()
        several = len(self.batches) > 1
        for index, batch in enumerate(self.batches):
            prefix = f"batch{index}." if several else ""
            rec.add_all("data", ((prefix + n, t) for n, t in batch_tensors(batch)))
        add_models(self, (m for m, _ in self.outputs))
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
        pause(self)
        self._state()
        self._rec().commit(self.step, self.last_loss)
        if self.step == 1:  # the graphs dynamo made for the first step (RC029 counts more)
            self.graphs_at_step1 = _dynamo_graphs()
        window_after(self, self.step)
        limit = self.session.max_steps
        if limit is not None and self.step >= limit:
            self.stop()

    def stop(self) -> None:
        """End the run here, complete: after its last step, or (a resume audit's) after
        its checkpoint."""
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
        names = tensor_names(self)
        for optimizer in self.optimizers:
            tag = self.tags[id(optimizer)]
            rec.add_state("optimizer", optimizer_tensors(optimizer, names, tag))
        rec.add_state("rng", rng_states())

    def _plant_canary(self, weights: list[tuple[str, Any]], step: int) -> None:
        """The canary run (:mod:`reprocheck.canary`): the lowest bit of the first trained
        tensor of ``weights`` (what this process records, in order) flipped right before
        step ``step``'s weights are recorded; the trace says which."""
        from ...canary import plant

        self.canary_planted = True
        planted = plant(weights, step)
        if self.context is not None:  # (it exists: _state opened it)
            self.context.writer.set_meta(canary=planted)

    def _optimizer_grads(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, Any]]:
        names = tensor_names(self)
        return [
            (names.get(id(p), f"{self.tags[id(optimizer)]}param{i}"), p.grad)
            for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
            if p.grad is not None
        ]

    # -- models and names ----------------------------------------------------------------
    def _fix_names(self, optimizer: torch.optim.Optimizer | None) -> None:
        """At step 0: the models, optimizers and their prefixes."""
        optimizers = optimizers_created(self)
        if optimizer is not None and not _known(optimizer, optimizers):
            optimizers.append(optimizer)
        self.optimizers = optimizers if optimizer is not None else []
        wanted = set(_parameters(self.optimizers))
        wanted |= set(self.trained)
        self.models = owners(self, wanted)
        # for the doctor's compile finding (RC017)
        self._rec().compiled = any(
            type(m).__name__ == "OptimizedModule"
            or getattr(m, "_compiled_call_impl", None) is not None  # Module.compile()
            or id(m) in self.session.compiled_in_place  # --compile on
            for m in self.models
        )
        if self._rec().compiled:
            note_compiled_random_ops(self)
        for group in (self.models, self.optimizers):
            label = "model" if group is self.models else "opt"
            for index, item in enumerate(group):
                self.tags[id(item)] = f"{label}{index}." if len(group) > 1 else ""
        name_loose(self, wanted)

    def finish(self, status: str) -> None:
        """Close the trace with this status (once, and only from this recorder's process;
        a child that never trained has none)."""
        if self.finished or self.session.recorders.get(os.getpid()) is not self:
            return
        if self.context is None:
            self.finished = True
            return
        if self.key != MAIN and self.window is not None and status == "complete":
            pause(self)
            # a child's replay: its capture, at its end
            self.context.save_capture(self.window, self.zoom_ops)
        self.context.finish(status)

    def fail(self, exc: BaseException) -> None:
        """A child raised out of the script (a ``torchrun`` rank, a spawned worker): its
        trace ends failed with the error's line, and when (the first rank to fail is the
        one that raised; the others fail in the collective it left)."""
        if self.finished or self.context is None:
            return
        from ..context import error_line

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
