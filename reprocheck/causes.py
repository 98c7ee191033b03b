"""The causes the zoom names for a first divergent op, as one enum.

A cause is a ``str`` (its value is the text reports show, and JSON writes it as one), so a
cause read back from a report or a replay's JSON compares equal to its member. The zoom
(:mod:`reprocheck.localize`) makes them, the report of a divergence
(:mod:`reprocheck.compare`) may add one, and the rule catalog
(:mod:`reprocheck.doctor.rules`) maps them to the rule reported when nothing more specific
fired.
"""

from __future__ import annotations

from enum import Enum


class Cause(str, Enum):
    PYTHON_VALUE = "a Python value differs"
    NONDETERMINISTIC_OP = "nondeterministic op"
    RNG = "unseeded or re-seeded RNG"
    DATA = "data pipeline"
    INITIALISATION = "initialisation"
    EARLIER_STATE = "earlier state"

    def __str__(self) -> str:  # the text, wherever it is formatted (not "Cause.RNG")
        return self.value
