"""The canary: proof that an audit could have seen a difference.

Two runs that agree prove something only if the recording would have shown a
disagreement. So after a reproducible verdict one more run is made in which reprocheck
flips the lowest bit of one element of one trained tensor, right before the weights of a
chosen step ``c`` are recorded, in every process that trains. Compared with run 0, that
run must differ first at exactly step ``c`` · weights · that tensor (and usually reach the
outputs, loss and gradients of step ``c + 1``); where it does not, the hooks did not see
the training, and the verdict is NOT VERIFIED.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_SAME_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pick(named: Iterable[tuple[str, Any]]) -> tuple[str, torch.Tensor] | None:
    """The first floating-point tensor with an element, in record order."""
    for name, value in named:
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.numel() > 0
            and value.element_size() in _SAME_WIDTH
        ):
            return name, value
    return None


def flip(tensor: torch.Tensor) -> None:
    """Flip the lowest bit of the tensor's first element, in place (its storage: a
    parameter's value changes, its autograd history does not)."""
    with torch.no_grad():
        data = tensor.detach()
        first = data[(0,) * data.dim()]  # a view of the first element, any strides
        first.view(_SAME_WIDTH[data.element_size()]).bitwise_xor_(1)


def plant(named: Iterable[tuple[str, Any]], step: int) -> dict[str, Any]:
    """Flip the first eligible tensor of ``named``: what the trace's ``meta.canary`` says
    (the step, the tensor, or why none was flipped)."""
    found = pick(named)
    if found is None:
        return {"step": step, "tensor": None, "flipped": False, "why": "no floating tensor"}
    name, tensor = found
    flip(tensor)
    return {"step": step, "tensor": name, "flipped": True, "element": 0}
