"""Exit codes and the verdict policy (README "Exit codes", DESIGN.md "The verdict"):
what every command answers with, decided in one place."""

from __future__ import annotations

EXIT_REPRODUCIBLE, EXIT_DIVERGED, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

FAILED_RUN = ("failed", "timeout", "killed", "interrupted", "config_error")


def decide(
    *,
    runs: int,
    interrupted: bool = False,
    config_error: bool = False,
    failed: bool = False,
    untrained: str | None = None,
    diverged: bool = False,
    not_comparable: str | None = None,
    not_verified: str | None = None,
) -> tuple[str, int, str | None]:
    """(verdict, exit code, reason) from what the audit found, strongest first: an
    interruption, a config error, a failed run, no training seen, a divergence (between
    runs, legs or against a golden), a comparison that could not be made, no run at all."""
    if interrupted:
        return "failed", EXIT_INTERRUPTED, None
    if config_error:
        return "failed", EXIT_USAGE, None
    if failed:
        return "failed", EXIT_FAILED, None
    if untrained:
        return "failed", EXIT_FAILED, untrained  # an audit that saw no training never passes
    if diverged:
        return "diverged", EXIT_DIVERGED, None
    if not_comparable:
        return "failed", EXIT_FAILED, not_comparable
    if not runs:
        return "failed", EXIT_USAGE, None
    if not_verified:  # the runs agreed, but the audit could not have seen them differ
        return "not_verified", EXIT_FAILED, not_verified
    return "reproducible", EXIT_REPRODUCIBLE, None
