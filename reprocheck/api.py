"""The Python API for custom training loops.

Record one run yourself::

    with reprocheck.Recorder(model, optimizer, trace="run.sqlite") as rec:
        for batch in loader:
            ...                      # forward, backward, optimizer.step()
            rec.step(batch=batch, output=output, loss=loss)

and compare two such traces with ``reprocheck compare a.sqlite b.sqlite``. Or let
reprocheck run a training function N times, each in a fresh process, and get the report::

    report = reprocheck.audit(train, repeats=2)
    assert report["verdict"] == "reproducible", report["first_divergence"]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, Callable

import torch

from .config import PHASES
from .options import DEFAULT_OUT
from .recorder import StepRecorder, batch_tensors, flatten, parameter_names


class Recorder:
    """Fingerprint a training loop of your own, one ``step()`` per optimizer step.

    Step 0 (weights, optimizer and RNG state before training) is recorded on entry; each
    ``step()`` records the batch, output, loss, gradients (call it after
    ``optimizer.step()`` and before ``zero_grad()``), weights, optimizer and RNG state.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        trace: str | os.PathLike = "run.sqlite",
        phases: Iterable[str] = PHASES,
    ) -> None:
        unknown = set(phases) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}: choose from {', '.join(PHASES)}")
        self.model, self.optimizer, self.trace = model, optimizer, os.fspath(trace)
        self.phases = tuple(phases)
        self.steps = 0
        self._recorder: StepRecorder | None = None

    def __enter__(self) -> Recorder:
        from .child.context import RunContext
        from .determinism import environment_snapshot

        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._context = RunContext(
            self.trace,
            {
                "config": {"name": os.path.basename(sys.argv[0]) or "python"},
                "leg": device.type,
                "run": 0,
                "device": str(device),
                "environment": environment_snapshot(),
            },
            self.phases,
        )
        self._recorder = self._context.recorder
        self._names = parameter_names(self.model)
        self._recorder.begin(0)
        self._recorder.state(self.model, self._optimizers(), self._names)
        self._recorder.commit(0, None)
        return self

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] if self.optimizer is not None else []

    def step(self, batch: Any = None, output: Any = None, loss: torch.Tensor | None = None) -> int:
        """Record one optimizer step; returns its number."""
        if self._recorder is None:
            raise RuntimeError("Recorder.step() outside `with Recorder(...) as rec:`")
        rec = self._recorder
        self.steps += 1
        rec.begin(self.steps)
        if batch is not None:
            rec.add_all("data", batch_tensors(batch))
        if output is not None:
            rec.add_all("outputs", flatten(output, "output"))
        if loss is not None:
            rec.add_all("loss", [("loss", loss)])
        rec.grads(self.model)
        rec.state(self.model, self._optimizers(), self._names)
        rec.commit(self.steps, loss)
        return self.steps

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if self._recorder is None:
            return
        if error is None:
            self._context.finish("complete")
        else:  # the exception goes on to the caller; the trace says where it happened
            from .child.context import error_line

            self._context.finish(
                "failed",
                error_line(error),
                error_kind="exception",
                failed_step=self._context.step_in_progress,
            )
        self._recorder = None


def audit(
    train_fn: Callable[[], Any],
    repeats: int = 2,
    steps: int | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    preset: str = "seeded",
    seed: int = 0,
    threads: list[int] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``train_fn()`` ``repeats`` times, each in a fresh process under the preset, record
    every optimizer step through global hooks, and return the ``reprocheck.report/1`` dict.

    ``train_fn`` must be importable by name: a module-level function (of a module, or of the
    script that calls ``audit``; that script's ``if __name__ == "__main__"`` block does not
    run in the children).
    """
    from .config import PRESETS, Config, DataConfig, DeterminismConfig, FactoryConfig
    from .contract import Function
    from .options import LegOptions, audit_setup
    from .parent.audit import run_audit

    module = sys.modules.get(train_fn.__module__)
    if "<locals>" in train_fn.__qualname__ or module is None:
        raise ValueError(f"{train_fn.__qualname__} is not importable: define it at module level")
    if train_fn.__module__ == "__main__":
        target = f"{os.path.abspath(module.__file__)}:{train_fn.__qualname__}"
    else:
        target = f"{train_fn.__module__}:{train_fn.__qualname__}"
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose {', '.join(PRESETS)}")
    config = Config(
        name=train_fn.__name__,
        seed=seed,
        repeats=repeats,
        steps=steps or 0,
        threads=tuple(threads) if threads else (None,),
        determinism=DeterminismConfig(preset=preset, **PRESETS[preset]),
        model=FactoryConfig(factory="exec"),
        data=DataConfig(factory="exec"),
        path=target,
        base_dir=os.getcwd(),
    )
    config, options = audit_setup(
        config,
        LegOptions(out=os.fspath(out), timeout=timeout),
        target=Function(function=target, max_steps=steps),
        measure=False,
        zoom=False,
    )
    return run_audit(config, options)
