"""Put on PYTHONPATH by reprocheck for the processes a recorded script starts: a child
Python interpreter records its training too (see :mod:`reprocheck.child.spawned`). Any
other ``sitecustomize`` further down the path still runs."""

import importlib.machinery
import importlib.util
import os
import sys


def _record_this_process() -> None:
    try:
        from reprocheck.contract import CHILD_ENV
    except Exception:  # another interpreter, without reprocheck: nothing to record with
        return
    settings = os.environ.get(CHILD_ENV)
    if not settings:
        return
    try:
        from reprocheck.child.spawned import activate

        activate(settings)
    except Exception as exc:  # never break the user's child process
        print(f"reprocheck: this child process is not recorded: {exc}", file=sys.stderr)


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_record_this_process()
_chain()
