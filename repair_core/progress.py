"""Progress reporting shared by the algorithms, the CLI and the dashboard."""

from __future__ import annotations

from collections.abc import Callable

#: Called with (fraction done in [0, 1], a short message).
Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that ignores every report."""
