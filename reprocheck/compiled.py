"""What compiled code really computes: a ``torch.compile`` backend that compiles each
graph with inductor, as the default backend does, and digests every output of every call
of it. Two replays through it, compared call by call, name the first compiled graph
output that differs, with the user's line the FX node's stack trace keeps. Nothing runs
eagerly that ran compiled.

Used by the compile ladder (a compiled leg's divergence): ``capture["backend"] =
"reprocheck-digest"``; the replay's records are written beside its capture
(``.graphs.json``).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch

from .fingerprint import fingerprint

BACKEND = "reprocheck-digest"
RECORDS: list[dict[str, Any]] = []  # in call order: graph, call, output, digest, where
_GRAPHS = itertools.count()
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _user_line(stack: str | None) -> str | None:
    """``file:line`` of the innermost frame of user code in an FX node's stack trace."""
    from .localize import is_user_file

    found = None
    for path, line in _FRAME.findall(stack or ""):
        if is_user_file(path):
            found = f"{path}:{line}"
    return found


def digest_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """inductor's compile of ``gm``, each call's outputs digested into :data:`RECORDS`."""
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(gm, example_inputs)
    graph = next(_GRAPHS)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    nodes = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    where = [
        _user_line(getattr(node, "meta", {}).get("stack_trace")) if node is not None else None
        for node in nodes
    ]
    calls = itertools.count()

    def run(*args: Any) -> Any:
        out = compiled(*args)
        call = next(calls)
        values = out if isinstance(out, (list, tuple)) else [out]
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                RECORDS.append(
                    {
                        "graph": graph,
                        "call": call,
                        "output": index,
                        "digest": fingerprint(value.detach()).hex(),
                        "where": where[index] if index < len(where) else None,
                    }
                )
        return out

    return run


def resolve(backend: str | None) -> Any:
    """A backend name as ``torch.compile`` takes it (ours is a callable)."""
    return digest_backend if backend == BACKEND else backend


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """The first (graph, call, output) whose digest differs between two replays, or, where
    every one agrees, how many agreed (the difference is then in what no forward graph
    returns: a compiled backward, an optimizer step)."""
    for x, y in zip(a, b):
        if (x["graph"], x["call"], x["output"]) != (y["graph"], y["call"], y["output"]):
            return {**x, "differs": True, "note": "the runs compiled or called other graphs"}
        if x["digest"] != y["digest"]:
            return {**x, "differs": True}
    return {
        "differs": False,
        "outputs": min(len(a), len(b)),
        "note": "every output of the compiled forward graphs agrees: the difference is in "
        "code they do not return (the compiled backward, the optimizer)",
    }
