"""The report as JSON: ``reprocheck.report/1``, strict JSON. The terminal view renders
this same dict, so what a person reads and what a machine reads never disagree."""

from __future__ import annotations

import os
from typing import Any

from .. import jsonout


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the JSON report atomically (a reader never sees half a file)."""
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        jsonout.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(temporary, path)
