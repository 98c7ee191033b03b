"""The parent's stage results, as frozen values: each stage reads the ones before it and
adds its own (runs → first divergence → evidence → measurement and zoom → attribution →
report values). The first divergence itself is :class:`reprocheck.compare.Divergence`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..compare import Divergence


@dataclass(frozen=True)
class Evidence:
    """At the first divergence's step: every tensor with more than one digest, and the
    generator whose state differed at or before it (the likely cause)."""

    variability: tuple[dict[str, Any], ...] = ()
    generator: dict[str, Any] | None = None
    seeding: str | None = None  # the call that made the generator differ, with its line
    seeding_call: dict[str, Any] | None = None  # that call as the trace recorded it


@dataclass(frozen=True)
class Measurement:
    """From the replays of the divergent step: the numeric diff on the real tensors, and
    the zoom's first divergent op (module, op, source line, cause)."""

    diff: dict[str, Any] = field(default_factory=dict)
    zoom: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Latent:
    """Generators that differ between runs while nothing observable does."""

    divergence: Divergence
    generators: tuple[str, ...]
