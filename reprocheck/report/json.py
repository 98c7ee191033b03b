"""The report as JSON: ``reprocheck.report/1``, strict JSON. The terminal view renders
this same dict, so what a person reads and what a machine reads never disagree.

The data is kept as it is (JSON escapes control characters itself), but a string longer than
4,096 characters, a 64 MiB name in a trace, is cut to its head and ``… (N characters)``
(report/safe.py)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .. import jsonout
from .safe import cut_all


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the JSON report atomically (a reader never sees half a file)."""
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            jsonout.dump(cut_all(report), handle, indent=2, default=str)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:  # (a full disk): no half a file left behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
