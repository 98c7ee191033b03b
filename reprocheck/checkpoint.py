"""Checkpoints that let a replay start near the divergent step instead of at step 0.

A run of a config saves, every ``every`` steps, the model's and the optimizer's state
dicts and the state of every generator (torch, CUDA, NumPy, Python) after committing the
step; it keeps the newest of them, as many as fit in :data:`BUDGET_BYTES`. To zoom into
step *k*, a replay loads the newest checkpoint *c* ≤ *k* − 2, rebuilds the data stream
and draws *c* batches from it, restores the generators, and trains steps *c*+1…*k*.

Such a resume is trusted only when it is proven: the parent compares the replay's
records of steps *c*+1…*k*−1, and of step *k* up to the divergent record, with the
original run's trace, and replays from step 0 when any differs — or when the resumed
pair shows no divergence at step *k*. State a checkpoint cannot hold (a sampler shuffled
from the global generator, a custom step's own counters) shows up there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
from typing import TYPE_CHECKING, Any

from .contract import CheckpointPlan

if TYPE_CHECKING:  # the runs save and load; the parent that plans them imports no torch
    import torch

CHECKPOINTS_PER_RUN = 16  # checkpoints are spaced steps/16 apart ...
BUDGET_BYTES = 512 * 2**20  # ... and as many kept per run as fit in this (all, if small)
# and in an eighth of the disk's free space
# what a checkpoint holds: the step, the model's and the optimizer's state dicts, the
# generators (the data stream is rebuilt and advanced by the step)
SAVED_KEYS = ("step", "model", "optimizer", "rng")
MIN_KEEP = 2  # a state too large to keep two of is not checkpointed (replays from step 0)


def plan(steps: int, prefix: str, runs: int = 1) -> CheckpointPlan | None:
    """The spec entry of a run: every how many steps, how many kept, file prefix, and how
    many runs of the audit share the disk (each keeps to its part of the free space)."""
    if steps < 3:  # a resume needs c ≤ k − 2 with c ≥ 1
        return None
    every = max(1, -(-steps // CHECKPOINTS_PER_RUN))
    return CheckpointPlan(every=every, keep=CHECKPOINTS_PER_RUN, prefix=prefix, runs=runs)


def path_for(prefix: str, step: int) -> str:
    return f"{prefix}{step}.pt"


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves the run's state every ``every`` steps, keeping the newest ``keep`` (fewer if
    the budget holds fewer; none if it holds less than two)."""

    @classmethod
    def planned(cls, plan: CheckpointPlan) -> Checkpointer:
        """The saver a run's spec asks for (:func:`plan`)."""
        return cls(plan.every, plan.keep, plan.prefix, plan.runs)

    def __init__(self, every: int, keep: int, prefix: str, runs: int = 1) -> None:
        self.every, self.keep, self.prefix = every, keep, prefix
        self.runs = max(1, runs)  # the audit's runs: together they keep to 1/8 of the disk
        self.saved: list[int] = []
        self.enabled = True

    def after_step(
        self, step: int, last: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.enabled or step % self.every or step >= last:
            return
        import torch

        path = path_for(self.prefix, step)
        state = dict(
            zip(SAVED_KEYS, (step, model.state_dict(), optimizer.state_dict(), _rng_state()))
        )
        try:
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # a killed run never leaves half a checkpoint
        except (OSError, RuntimeError):  # a full disk: the audit goes on, replays start at 0
            self.enabled = False
            for leftover in (path + ".tmp", path):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
            return
        if not self.saved:  # the first one tells the size: keep what fits the budget,
            size = max(1, os.path.getsize(path))  # and the run's share of 1/8 of the disk
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
            self.keep = min(self.keep, BUDGET_BYTES // size, free // (8 * self.runs * size))
            if self.keep < MIN_KEEP:
                self.enabled = False
                os.remove(path)
                return
        self.saved.append(step)
        while len(self.saved) > self.keep:
            old = path_for(self.prefix, self.saved.pop(0))
            if os.path.exists(old):
                os.remove(old)


def newest(prefix: str, before: int) -> tuple[int, str] | None:
    """The newest checkpoint of a run at step ≤ ``before``: (step, path)."""
    found = []
    for path in glob.glob(glob.escape(prefix) + "*.pt"):
        match = re.fullmatch(re.escape(prefix) + r"(\d+)\.pt", path)
        if match and int(match.group(1)) <= before:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def load(path: str) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch without weights_only
        return torch.load(path, map_location="cpu")


def restore(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Model and optimizer state (on the model's device), then the generators: call after
    the data stream has been advanced, so the generators are what the step will see."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])


def reseed_from_entropy() -> None:
    """A resume control (``reprocheck resume --control rng``): every global generator
    re-seeded from entropy, through the generators themselves (a script's seeding calls,
    which the hooks note, stay its own)."""
    import sys

    import torch

    seed = torch.default_generator.seed()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.default_generators[index].manual_seed(seed + index)
    random._inst.seed()  # type: ignore[attr-defined]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.mtrand._rand.seed()


def zero_optimizer_state(optimizers: list[torch.optim.Optimizer]) -> int:
    """A resume control (``--control optimizer``): every tensor the optimizers hold in
    their state zeroed; how many."""
    import torch

    count = 0
    with torch.no_grad():
        for optimizer in optimizers:
            for state in dict.values(optimizer.state):
                for value in dict.values(state):
                    if isinstance(value, torch.Tensor) and value.numel():
                        value.zero_()
                        count += 1
    return count


def remove_all(folder: str) -> None:
    """Delete a finished audit's checkpoints (they serve its replays only)."""
    for path in glob.glob(os.path.join(glob.escape(folder), "*.ckpt-*.pt*")):
        with contextlib.suppress(OSError):
            os.remove(path)
