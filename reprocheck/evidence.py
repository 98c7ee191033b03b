"""What N runs prove: exact binomial bounds on the rate at which a run diverges.

A verdict compares N runs of the same training. If a source of nondeterminism shows in a
fraction ``p`` of runs (1 in 23 for one field report), N agreeing runs happen with
probability ``(1 - p) ** N``; the exact one-sided upper bound on ``p`` at confidence
``C`` after 0 of N is ``1 - (1 - C) ** (1 / N)`` (about 3/N at 95%: the "rule of three").
After k of N it is the Clopper–Pearson interval. :func:`runs_for` is the N that makes the
bound fall below a rate: 59 runs for 5% at 95%.
"""

from __future__ import annotations

import math
from typing import Any


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def _solve(target: float, function: Any) -> float:
    """The p in [0, 1] where the decreasing ``function(p)`` equals ``target`` (bisection to
    1e-12: exact to the digits a report shows)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if function(middle) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def rate_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Clopper–Pearson interval of the divergence rate after ``k`` of ``n`` runs
    diverged; with ``k == 0`` the lower end is 0 and the upper end is the exact one-sided
    bound at ``confidence`` (``1 - (1 - C) ** (1 / n)``)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"k of n runs needs 0 ≤ k ≤ n and n ≥ 1 (got {k} of {n})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    alpha = 1 - confidence
    if k == 0:
        return 0.0, 1 - alpha ** (1 / n)
    if k == n:
        return alpha ** (1 / n), 1.0
    upper = _solve(alpha / 2, lambda p: _binomial_cdf(k, n, p))
    lower = _solve(1 - alpha / 2, lambda p: _binomial_cdf(k - 1, n, p))
    return lower, upper


def runs_for(rate: float, confidence: float = 0.95) -> int:
    """The fewest runs whose agreement bounds the divergence rate below ``rate``."""
    if not 0 < rate < 1:
        raise ValueError(f"--max-rate must be between 0 and 1 (got {rate})")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence must be between 0 and 1 (got {confidence})")
    return max(2, math.ceil(math.log(1 - confidence) / math.log(1 - rate)))


def percent(value: float) -> str:
    """``4.9%``, ``0.31%``: two significant digits at most."""
    scaled = value * 100
    if scaled >= 10:
        return f"{scaled:.0f}%"
    if scaled >= 1:
        return f"{scaled:.1f}".rstrip("0").rstrip(".") + "%"
    return f"{scaled:.2g}%"


def statement(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """The report's ``evidence``: runs, diverged, confidence, the interval, and the
    sentence a headline shows (``0 of 59 runs diverged: rate < 5% at 95%``)."""
    low, high = rate_interval(k, n, confidence)
    level = percent(confidence)
    if k == 0:
        text = f"0 of {n} runs diverged: rate < {percent(high)} at {level}"
    else:
        text = (
            f"{k} of {n} runs diverged: rate {percent(k / n)} "
            f"({percent(low)}–{percent(high)} at {level})"
        )
    return {
        "runs": n,
        "diverged": k,
        "confidence": confidence,
        "rate": k / n,
        "rate_lower": low,
        "rate_upper": high,
        "statement": text,
    }
