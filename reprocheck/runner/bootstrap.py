"""Record an unchanged training script (``reprocheck exec``) or function (``audit``).

The run's process starts here, not in the script: the determinism preset is applied
before the script's first line, then global hooks record what the script does —

* every DataLoader batch (``_BaseDataLoaderIter.__next__``)  → ``data``
* the output of each outermost module call                   → ``outputs``
* the tensor ``backward()`` is called on                      → ``loss``
* before each ``optimizer.step()``: gradients                 → ``grads``
* after it: parameters, buffers, optimizer state, RNG state   → ``weights``, ``optimizer``, ``rng``

Step k is the k-th optimizer step; step 0 (weights, optimizer, RNG before any update) is
taken at the first step's pre-hook. Models and optimizers are named by creation order
(``model1.fc.weight``, ``opt1.``) when there is more than one.
"""

from __future__ import annotations

import atexit
import importlib
import os
import runpy
import sys
import traceback
from typing import Any

import torch

from ..config import PHASES, DeterminismConfig
from ..recorder import StepRecorder, batch_tensors, flatten, optimizer_tensors, rng_states
from ..trace import TraceWriter


class StepLimitReached(SystemExit):
    """Raised after the last requested step: ends the script like ``sys.exit(0)``."""


class ScriptRecorder:
    """The global hooks and the trace of one run of a script."""

    def __init__(self, writer: TraceWriter, max_steps: int | None) -> None:
        self.writer = writer
        self.recorder = StepRecorder(writer, PHASES)
        self.max_steps = max_steps
        self.step = 0
        self.pid = os.getpid()
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.batches: list[Any] = []
        self.outputs: list[Any] = []
        self.losses: list[torch.Tensor] = []
        self.depth = 0  # module calls in progress: only outermost calls are outputs
        self.last_loss: torch.Tensor | None = None
        self.finished = False
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------------
    def install(self) -> None:
        hooks = torch.nn.modules.module
        self._handles += [
            hooks.register_module_forward_pre_hook(self._enter_module),
            hooks.register_module_forward_hook(self._leave_module),
        ]
        optim = importlib.import_module("torch.optim.optimizer")
        if not hasattr(optim, "register_optimizer_step_pre_hook"):
            raise RuntimeError(
                f"torch {torch.__version__} has no global optimizer hooks (need ≥ 2.0)"
            )
        self._handles += [
            optim.register_optimizer_step_pre_hook(self._before_step),
            optim.register_optimizer_step_post_hook(self._after_step),
        ]
        loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
        original_next = loader_iter.__next__
        recorder = self

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
        if self.depth == 0 and not any(module is m for m in self.models):
            self.models.append(module)
        self.depth += 1

    def _leave_module(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and module.training:
            self.outputs.append((self._model_tag(module), output))

    def _model_tag(self, module: torch.nn.Module) -> str:
        index = next(i for i, m in enumerate(self.models) if m is module)
        return f"model{index}." if len(self.models) > 1 else ""

    def _opt_tag(self, optimizer: torch.optim.Optimizer) -> str:
        if not any(optimizer is o for o in self.optimizers):
            self.optimizers.append(optimizer)
        index = next(i for i, o in enumerate(self.optimizers) if o is optimizer)
        return f"opt{index}." if len(self.optimizers) > 1 else ""

    def _names(self) -> dict[int, str]:
        names = {}
        for index, model in enumerate(self.models):
            tag = f"model{index}." if len(self.models) > 1 else ""
            names.update({id(p): tag + name for name, p in model.named_parameters()})
        return names

    def _state(self) -> None:
        rec = self.recorder
        for index, model in enumerate(self.models):
            tag = f"model{index}." if len(self.models) > 1 else ""
            rec.add_all("weights", ((tag + k, v) for k, v in model.state_dict().items()))
        names = self._names()
        for optimizer in self.optimizers:
            rec.add_all("optimizer", optimizer_tensors(optimizer, names, self._opt_tag(optimizer)))
        rec.add_all("rng", rng_states())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if os.getpid() != self.pid or self.finished:
            return
        self._opt_tag(optimizer)
        rec = self.recorder
        if self.step == 0:
            rec.begin(0)
            self._state()
            rec.commit(0, None)
        self.step += 1
        rec.begin(self.step)
        several = len(self.batches) > 1
        for index, batch in enumerate(self.batches):
            prefix = f"batch{index}." if several else ""
            rec.add_all("data", ((prefix + n, t) for n, t in batch_tensors(batch)))
        for index, (tag, output) in enumerate(self.outputs):
            name = f"{tag}output" + (f"{index}" if len(self.outputs) > 1 else "")
            rec.add_all("outputs", flatten(output, name))
        self.last_loss = self.losses[-1] if self.losses else None
        for index, loss in enumerate(self.losses):
            rec.add_all("loss", [("loss" + (f"{index}" if len(self.losses) > 1 else ""), loss)])
        names = self._names()
        grads = [
            (names.get(id(p), f"param{i}"), p.grad)
            for i, group in enumerate(optimizer.param_groups)
            for p in group["params"]
            if p.grad is not None
        ]
        rec.add_all("grads", ((self._opt_tag(optimizer) + n, g) for n, g in grads))
        self.batches, self.outputs, self.losses = [], [], []

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if os.getpid() != self.pid or self.finished:
            return
        self._state()
        self.recorder.commit(self.step, self.last_loss)
        if self.max_steps is not None and self.step >= self.max_steps:
            self.finish("complete")
            raise StepLimitReached(0)

    def finish(self, status: str, error: str | None = None, **meta: Any) -> None:
        if self.finished or os.getpid() != self.pid:
            return
        self.finished = True
        described = {
            "models": [type(m).__name__ for m in self.models],
            "optimizers": [type(o).__name__ for o in self.optimizers],
        }
        self.writer.finish(status, error, records=self.recorder.records, exec=described, **meta)


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
