"""Recording in the Python processes a recorded script starts.

A forked child inherits the hooks of :mod:`reprocheck.child.script` with its parent's
memory. A process that starts a fresh interpreter (``torch.multiprocessing.spawn``,
``multiprocessing`` with ``spawn``/``forkserver``, ``subprocess`` running Python, a
``torchrun`` rank) gets them from the ``sitecustomize`` module in this folder, which
:func:`export` puts first on ``PYTHONPATH`` together with the run's settings in
:data:`~reprocheck.contract.CHILD_ENV`. The hooks are installed once the child
imports torch, so a Python child that never does (a helper script) pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

from ...contract import CHILD_ENV, ChildSettings

HERE = os.path.dirname(os.path.abspath(__file__))


def export(settings: ChildSettings) -> None:
    """Make every Python process started from now on record itself under ``settings``."""
    os.environ[CHILD_ENV] = settings.export()
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, path) if p)


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after ``import torch`` has finished, once."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            callback()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def activate(text: str) -> None:
    """In a fresh child interpreter (from ``sitecustomize``): record once torch is in."""
    settings = ChildSettings.imported(text)

    def start() -> None:
        from ..script.run import start_child

        start_child(settings)

    if "torch" in sys.modules:
        start()
    else:
        sys.meta_path.insert(0, _AfterTorchImport(start))
