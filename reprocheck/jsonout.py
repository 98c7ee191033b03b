"""Strict JSON for everything reprocheck writes: no bare ``Infinity`` or ``NaN``.

Python's ``json`` writes non-finite floats as ``Infinity``/``NaN``, which JavaScript's
``JSON.parse``, ``jq`` and most other readers refuse. Here a non-finite number is written
as ``null``; inside an object its key gets a sibling ``<key>_nonfinite`` holding
``"inf"``, ``"-inf"`` or ``"nan"``, so nothing is lost (a list item just becomes
``null``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import IO, Any


def _nonfinite(value: Any) -> str | None:
    """``"inf"``, ``"-inf"`` or ``"nan"`` for a non-finite float, else None."""
    if not isinstance(value, float):
        return None
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def strict(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by None (see the module)."""
    if isinstance(obj, Mapping):  # a dict, or a read-only view of one (config kwargs)
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            kind = _nonfinite(value)
            if kind is None:
                out[key] = strict(value)
            else:
                out[key] = None
                out[f"{key}_nonfinite"] = kind
        return out
    if isinstance(obj, list):
        return [strict(item) for item in obj]
    if isinstance(obj, tuple):
        return tuple(strict(item) for item in obj)
    if _nonfinite(obj) is not None:
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``strict(obj)``; refuses any non-finite number left over."""
    kwargs["allow_nan"] = False
    return json.dumps(strict(obj), **kwargs)


def dump(obj: Any, handle: IO[str], **kwargs: Any) -> None:
    """``json.dump`` of ``strict(obj)``; refuses any non-finite number left over."""
    kwargs["allow_nan"] = False
    json.dump(strict(obj), handle, **kwargs)
