"""What a divergence's replays kept, measured where torch is already imported.

The audit's own process reads traces (digests) and never needs torch for a verdict; the
tensors a replay kept (``.pt``) and the ops it captured need it. Importing torch there
costs ~0.8 s of CPU, and doing it while replays or attribution controls train would take
CPU from runs whose thread races are the thing measured. So the measurement runs as a
fork of the leg's warm zygote (:meth:`~reprocheck.parent.launch.Launcher.analyse`,
``python -m reprocheck.analysis REQUEST``) and hands back JSON; where no zygote
can serve (CUDA, ``REPROCHECK_POOL=0``, a random hash seed) it runs in the audit's process.

A request names the replays' capture files and the record: ``{"captures": [a, b], "key":
"phase\\ttensor", "ops": [a.ops.json, b.ops.json] | None, "step": k, "phase": p}``. The
answer: ``found`` (both captures keep the tensor), ``diff`` (:func:`~reprocheck.compare.
numeric_diff`), each tensor's ``digests`` (hex) and ``sketches``, and ``located`` (the
first divergent op, :func:`~reprocheck.localize.localize`) where ops were captured.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _captured(path: str, key: str) -> Any:
    """The tensor a replay kept under ``key`` (None: the record keeps none)."""
    import torch

    return torch.load(path, map_location="cpu").get(key)


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Measure one request (see the module's docstring)."""
    from .compare import numeric_diff
    from .fingerprint import fingerprint, sketch
    from .localize import from_json, localize

    tensors = [_captured(path, request["key"]) for path in request["captures"]]
    found = len(tensors) == 2 and all(t is not None for t in tensors)
    answer: dict[str, Any] = {"found": found, "diff": {}, "located": None}
    if found:
        answer["diff"] = numeric_diff(tensors[0], tensors[1])
        answer["digests"] = [fingerprint(t).value.hex() for t in tensors]
        answer["sketches"] = [sketch(t).__dict__ for t in tensors]
    if request.get("ops"):
        ops = []
        for path in request["ops"]:
            with open(path, encoding="utf-8") as handle:
                ops.append(from_json(json.load(handle)))
        answer["located"] = localize(
            ops[0],
            ops[1],
            request["step"],
            request["phase"],
            request.get("tensor"),
            request.get("shape"),
        )
    return answer


def main(argv: list[str] | None = None) -> int:
    """``python -m reprocheck.analysis REQUEST``: the answer to ``REQUEST["out"]``."""
    (path,) = sys.argv[1:] if argv is None else argv
    with open(path, encoding="utf-8") as handle:
        request = json.load(handle)
    answer = measure(request)
    with open(request["out"] + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(answer, handle)
    os.replace(request["out"] + ".tmp", request["out"])  # whole, or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
