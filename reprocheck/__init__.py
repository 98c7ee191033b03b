"""reprocheck: audit PyTorch training for bitwise reproducibility.

Public API: :func:`fingerprint` (a tensor's exact digest), :func:`sketch` (its float64
statistics), :class:`Recorder` (fingerprint a loop of your own) and :func:`audit` (run a
training function N times and get the report); the command line is ``reprocheck``.

Importing the package imports no torch: the four names are bound on first use, so that
``reprocheck --help`` and a mistyped option answer at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["Recorder", "__version__", "audit", "fingerprint", "sketch"]

_PUBLIC = {
    "Recorder": "api",
    "audit": "api",
    "fingerprint": "fingerprint",
    "sketch": "fingerprint",
}


def _bind() -> None:
    for name, module in _PUBLIC.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        _bind()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    """`reprocheck.fingerprint` is the public function, not the submodule of that name
    (reached by its full name: ``importlib.import_module("reprocheck.fingerprint")``):
    the import system's binding of a submodule under a public name is dropped."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
