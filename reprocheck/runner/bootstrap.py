"""Record an unchanged training script (``reprocheck exec``) or function (``audit``).

The run's process starts here, not in the script: the determinism preset is applied
before the script's first line, then global hooks record what the script does —

* every DataLoader batch (``_BaseDataLoaderIter.__next__``)  → ``data``
* the output of each outermost call of a model (a module with parameters) → ``outputs``
* the tensor ``backward()`` is called on                      → ``loss``
* before each ``optimizer.step()``: gradients                 → ``grads``
* after it: parameters, buffers, optimizer state, RNG state   → ``weights``, ``optimizer``, ``rng``

Step k is the k-th optimizer step; step 0 (weights, optimizer, RNG before any update) is
taken at the first step's pre-hook. Models and optimizers are numbered by creation order
(``model0.fc.weight``, ``opt1.``) when there is more than one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import itertools
import os
import runpy
import sys
import traceback
import weakref
from collections import Counter
from typing import Any

import torch

from ..config import PHASES, DeterminismConfig
from ..recorder import (
    StepRecorder,
    batch_tensors,
    flatten,
    optimizer_tensors,
    rng_states,
)
from ..trace import TraceWriter


class StepLimitReached(SystemExit):
    """Raised after the last requested step: ends the script like ``sys.exit(0)``."""


class ScriptRecorder:
    """The global hooks and the trace of one run of a script.

    A *model* is an outermost module call on a module that owns parameters (a parameterless
    ``nn.CrossEntropyLoss()`` is not one). Models and optimizers are numbered by creation
    order; the numbering is fixed at the first optimizer step, where the prefixes
    (``model0.``, ``opt1.``) are given when there is more than one. One first seen later
    gets the next number, always with its prefix, so names never change within a run.
    """

    def __init__(self, writer: TraceWriter, max_steps: int | None) -> None:
        self.writer = writer
        self.recorder = StepRecorder(writer, PHASES)
        self.max_steps = max_steps
        self.step = 0
        self.pid = os.getpid()
        self.created: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._serial = itertools.count()
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.tags: dict[int, str] = {}  # id(model or optimizer) → its prefix, once fixed
        self.batches: list[Any] = []
        self.outputs: list[tuple[torch.nn.Module, Any]] = []
        self.losses: list[torch.Tensor] = []
        self.depth = 0  # module calls in progress: only outermost calls are outputs
        self.last_loss: torch.Tensor | None = None
        self.finished = False

    # -- hooks ---------------------------------------------------------------------
    def install(self) -> None:
        """Install the global hooks; call before the script's first line."""
        optim = importlib.import_module("torch.optim.optimizer")
        if not hasattr(optim, "register_optimizer_step_pre_hook"):
            raise RuntimeError(
                f"torch {torch.__version__} has no global optimizer hooks (need ≥ 2.0)"
            )
        hooks = torch.nn.modules.module
        hooks.register_module_forward_pre_hook(self._enter_module)
        # always_call: a forward that raises still leaves, so the depth stays right
        hooks.register_module_forward_hook(self._leave_module, always_call=True)
        optim.register_optimizer_step_pre_hook(self._before_step)
        optim.register_optimizer_step_post_hook(self._after_step)
        recorder = self

        for cls in (torch.nn.Module, torch.optim.Optimizer):  # creation order, for the names
            original_init = cls.__init__

            def __init__(obj, *args, _original=original_init, **kwargs):
                # an unhashable or unweakrefable subclass is left unnumbered
                with contextlib.suppress(TypeError):
                    recorder.created.setdefault(obj, next(recorder._serial))
                _original(obj, *args, **kwargs)

            cls.__init__ = functools.wraps(original_init)(__init__)

        loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
        original_next = loader_iter.__next__

        def __next__(self_iter):
            batch = original_next(self_iter)
            if os.getpid() == recorder.pid:
                recorder.batches.append(batch)
            return batch

        loader_iter.__next__ = __next__
        original_backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            if os.getpid() == recorder.pid and tensor.numel() == 1:
                recorder.losses.append(tensor.detach())
            return original_backward(tensor, *args, **kwargs)

        torch.Tensor.backward = backward

    def _enter_module(self, module: torch.nn.Module, inputs: Any) -> None:
        if (
            self.depth == 0
            and not _known(module, self.models)
            and next(module.parameters(), None) is not None
        ):
            self.models.append(module)
            if self.step > 0:  # the names are fixed: a newcomer gets the next number
                self.tags[id(module)] = f"model{len(self.models) - 1}."
        self.depth += 1

    def _leave_module(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if (
            self.depth == 0
            and module.training
            and output is not None
            and _known(module, self.models)
        ):
            self.outputs.append((module, output))

    def _fix_names(self, optimizer: torch.optim.Optimizer) -> None:
        """At the first step: number the models and optimizers seen so far by creation."""
        last = float("inf")
        self.models.sort(key=lambda m: self.created.get(m, last))
        created = sorted(
            (o for o in self.created if isinstance(o, torch.optim.Optimizer)),
            key=lambda o: self.created[o],
        )
        self.optimizers = created + ([] if _known(optimizer, created) else [optimizer])
        for group in (self.models, self.optimizers):
            label = "model" if group is self.models else "opt"
            for index, item in enumerate(group):
                self.tags[id(item)] = f"{label}{index}." if len(group) > 1 else ""

    def _optimizer_seen(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self.tags:  # created after the first step
            self.optimizers.append(optimizer)
            self.tags[id(optimizer)] = f"opt{len(self.optimizers) - 1}."

    def _names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for model in self.models:
            tag = self.tags[id(model)]
            names.update({id(p): tag + name for name, p in model.named_parameters()})
        return names

    def _state(self) -> None:
        rec = self.recorder
        for model in self.models:
            tag = self.tags[id(model)]
            state = model.state_dict(keep_vars=True)  # the tensors themselves, not detached copies
            rec.add_state("weights", ((tag + k, v) for k, v in state.items()))
        names = self._names()
        for optimizer in self.optimizers:
            tag = self.tags[id(optimizer)]
            rec.add_state("optimizer", optimizer_tensors(optimizer, names, tag))
        rec.add_state("rng", rng_states())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if os.getpid() != self.pid or self.finished:
            return
        rec = self.recorder
        if self.step == 0:
            self._fix_names(optimizer)
            rec.begin(0)
            self._state()
            rec.commit(0, None)
        self._optimizer_seen(optimizer)
        self.step += 1
        rec.begin(self.step)
        several = len(self.batches) > 1
        for index, batch in enumerate(self.batches):
            prefix = f"batch{index}." if several else ""
            rec.add_all("data", ((prefix + n, t) for n, t in batch_tensors(batch)))
        calls = Counter(id(module) for module, _ in self.outputs)
        seen: Counter[int] = Counter()
        for module, output in self.outputs:
            name = self.tags[id(module)] + "output"
            if calls[id(module)] > 1:  # the model ran more than once in this step
                name += str(seen[id(module)])
                seen[id(module)] += 1
            rec.add_all("outputs", flatten(output, name))
        self.last_loss = self.losses[-1] if self.losses else None
        for index, loss in enumerate(self.losses):
            rec.add_all("loss", [("loss" + (f"{index}" if len(self.losses) > 1 else ""), loss)])
        names = self._names()
        grads = [
            (names.get(id(p), f"{self.tags[id(optimizer)]}param{i}"), p.grad)
            for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
            if p.grad is not None
        ]
        rec.add_all("grads", grads)
        self.batches, self.outputs, self.losses = [], [], []

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if os.getpid() != self.pid or self.finished:
            return
        self._state()
        self.recorder.commit(self.step, self.last_loss)
        if self.max_steps is not None and self.step >= self.max_steps:
            self.finish("complete")
            raise StepLimitReached(0)

    def naming(self) -> dict[str, list[dict[str, str]]]:
        """What each prefix stands for: ``{"models": [{"prefix": "model0.", "type": ...}]}``."""
        return {
            group: [
                {"prefix": self.tags.get(id(item), ""), "type": type(item).__name__}
                for item in items
            ]
            for group, items in (("models", self.models), ("optimizers", self.optimizers))
        }

    def finish(self, status: str, error: str | None = None, **meta: Any) -> None:
        """Write the trace's final status (once, and only from the run's own process)."""
        if self.finished or os.getpid() != self.pid:
            return
        self.finished = True
        self.writer.finish(status, error, records=self.recorder.records, exec=self.naming(), **meta)


def _known(item: Any, items: list[Any]) -> bool:
    return any(item is other for other in items)


def run_script(spec: dict[str, Any]) -> int:
    """The worker's path for ``reprocheck exec`` / ``audit``: 0 complete, 3 the script failed."""
    from ..determinism import apply_controls_for, environment_snapshot
    from ..fingerprint import hasher_name
    from .worker import EXIT_FAILED, EXIT_OK, error_line, run_meta

    target = spec["exec"]
    controls = DeterminismConfig(**spec["config"]["determinism"])
    applied = apply_controls_for(controls, spec["config"]["seed"], spec.get("threads"))
    writer = TraceWriter(
        spec["trace"],
        {
            **run_meta(spec),
            "steps_planned": target.get("max_steps"),
            "phases": list(PHASES),
            "depth": "step",
            "hasher": hasher_name("cpu"),
            "environment": environment_snapshot(applied),
            "command": target["argv"],
        },
    )
    recorder = ScriptRecorder(writer, target.get("max_steps"))
    recorder.install()
    atexit.register(lambda: recorder.finish("complete"))  # a script that calls os-level exit paths
    argv = list(target["argv"])
    code = EXIT_OK
    try:
        if target.get("function"):
            from ..config import resolve_callable

            resolve_callable(target["function"], spec.get("base_dir", "."))()
        elif argv and argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        recorder.finish("complete")
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if status == 0 or isinstance(exc, StepLimitReached):
            recorder.finish("complete")
        else:
            recorder.finish(
                "failed",
                f"the script exited with status {exc.code}",
                error_kind="exit",
                failed_step=recorder.step + 1,
            )
            code = EXIT_FAILED
    except BaseException as exc:  # the script raised: record it, show its traceback
        traceback.print_exc()
        recorder.finish(
            "failed", error_line(exc), error_kind="exception", failed_step=recorder.step + 1
        )
        code = EXIT_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def describe_names(report: dict[str, Any]) -> None:
    """State in the report what the recorded names stand for: ``config.models`` and
    ``config.optimizers``, each ``[{"prefix": "model0.", "type": "Generator"}, ...]`` in
    creation order, as the first run with a trace recorded them."""
    from ..trace import Trace, TraceError

    for leg in report["legs"]:
        for run in leg["runs"]:
            if not run.get("trace") or not os.path.exists(run["trace"]):
                continue
            try:
                with Trace(run["trace"]) as trace:
                    names = trace.meta.get("exec")
            except TraceError:
                continue
            if names:
                report["config"].update(names)
                return
