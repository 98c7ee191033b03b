"""Read JSON the way a strict parser (JavaScript's ``JSON.parse``, ``jq``) does: a bare
``Infinity``, ``-Infinity`` or ``NaN`` is an error, never a float."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _refuse(constant: str) -> Any:
    raise ValueError(f"not strict JSON: bare {constant}")


def load_strict(path_or_text: str | bytes | os.PathLike) -> Any:
    """Parse a JSON file (a path) or JSON text; ValueError on a non-finite constant."""
    if isinstance(path_or_text, os.PathLike):
        text = Path(path_or_text).read_text(encoding="utf-8")
    elif isinstance(path_or_text, bytes):
        text = path_or_text.decode("utf-8")
    elif path_or_text.lstrip()[:1] not in ("{", "[", '"') and os.path.isfile(path_or_text):
        text = Path(path_or_text).read_text(encoding="utf-8")
    else:
        text = path_or_text
    return json.loads(text, parse_constant=_refuse)
