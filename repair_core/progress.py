"""Progress reporting shared by the algorithms, the CLI and the dashboard."""

from __future__ import annotations

from collections.abc import Callable

#: Called with (fraction done in [0, 1], a short message).
Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that ignores every report."""


def scaled_progress(
    progress: Progress | None, low: float, high: float
) -> Progress | None:
    """Map a sub-task's progress in [0, 1] onto [low, high] of the caller's bar."""
    if progress is None:
        return None

    def report(fraction: float, message: str) -> None:
        progress(low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    return report
