"""Planted nondeterminism with exactly known outcomes, one model per failure mode.

Each is a two-layer MLP (``fc1`` → ReLU → ``fc2``) that misbehaves from training step
``step`` on — its ``step``-th forward call in training mode, which the default loop makes
once per optimizer step — so an audit must report exactly:

==================  ============================================
forward_noise       step k · outputs · ``output``
backward_noise      step k · grads · ``fc1.weight``
unseeded_init       step 0 · weights · ``fc1.weight``
crash               run failed at step k, trace keeps steps < k
hang                run never finishes step k (for ``--timeout``)
killed              the process is SIGKILLed at step k, trace keeps steps < k
==================  ============================================
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn


def entropy_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy: different in every process."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class PlantedMLP(nn.Module):
    """fc1 → ReLU → fc2, counting its training-mode forward calls (= steps)."""

    def __init__(self, step: int = 3, in_features: int = 32, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.step = step
        self.calls = 0

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return torch.relu(self.fc1(x))

    # The call count is state: a checkpoint keeps it, so a replay resumed from one
    # misbehaves at the same step (it is recorded as ``weights · _extra_state``).
    def get_extra_state(self) -> int:
        return self.calls

    def set_extra_state(self, state: int) -> None:
        self.calls = int(state)

    @property
    def misbehaving(self) -> bool:
        return self.training and self.calls >= self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class ForwardNoise(PlantedMLP):
    def __init__(self, step: int = 3, **sizes: int):
        super().__init__(step, **sizes)
        self.entropy = entropy_generator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.misbehaving:
            h = h + 1e-3 * torch.randn(h.shape, generator=self.entropy)  # planted: unseeded noise
        return self.fc2(h)


class _GradNoise(torch.autograd.Function):
    """Identity forward; backward adds noise from an unseeded generator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, generator: torch.Generator, active: bool) -> torch.Tensor:
        ctx.generator, ctx.active = generator, active
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.active:
            grad = grad + 1e-6 * torch.randn(grad.shape, generator=ctx.generator)  # planted
        return grad, None, None


class BackwardNoise(PlantedMLP):
    def __init__(self, step: int = 3, **sizes: int):
        super().__init__(step, **sizes)
        self.entropy = entropy_generator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        h = _GradNoise.apply(h, self.entropy, self.misbehaving)
        return self.fc2(h)


class UnseededInit(PlantedMLP):
    def __init__(self, step: int = 0, **sizes: int):
        super().__init__(step, **sizes)
        entropy = entropy_generator()
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(0.1 * torch.randn(param.shape, generator=entropy))  # planted


class Crash(PlantedMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.misbehaving:
            raise RuntimeError(f"planted crash at step {self.calls}")
        return self.fc2(h)


class Hang(PlantedMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.misbehaving:
            time.sleep(3600)  # planted: a run that never finishes this step
        return self.fc2(h)


class Killed(PlantedMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.misbehaving:
            os.kill(os.getpid(), signal.SIGKILL)  # planted: killed from outside, mid-step
        return self.fc2(h)


def forward_noise(step: int = 3, **sizes: int) -> nn.Module:
    return ForwardNoise(step, **sizes)


def backward_noise(step: int = 3, **sizes: int) -> nn.Module:
    return BackwardNoise(step, **sizes)


def unseeded_init(**sizes: int) -> nn.Module:
    return UnseededInit(**sizes)


def crash(step: int = 3, **sizes: int) -> nn.Module:
    return Crash(step, **sizes)


def hang(step: int = 2, **sizes: int) -> nn.Module:
    return Hang(step, **sizes)


def killed(step: int = 3, **sizes: int) -> nn.Module:
    return Killed(step, **sizes)
