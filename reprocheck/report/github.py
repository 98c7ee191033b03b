"""GitHub Actions workflow commands: the failures as ``::error`` annotations.

Names and messages from the runs are made safe first (report/safe.py): no escape sequence
reaches the log, and each annotation stays one line."""

from __future__ import annotations

from typing import Any

from .junit import cases
from .safe import clean


def _escape(text: str) -> str:
    """Workflow-command escaping: %, CR and LF in the message; also : and , in properties."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def annotations(report: dict[str, Any]) -> list[str]:
    """One ``::error`` line per failing case, ``::notice`` for a passing audit."""
    report = clean(report)
    config = report["config"].get("path") or report["config"]["name"]
    lines = []
    for case in cases(report):
        if "failure" in case:
            lines.append(
                f"::error file={_property(str(config))},title={_property(case['name'])}::"
                f"{_escape(case['failure'])}"
            )
    if not lines:
        lines.append(
            f"::notice file={_property(str(config))},title=reprocheck::{_escape(report['verdict'])}"
        )
    return lines
