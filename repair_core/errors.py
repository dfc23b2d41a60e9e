"""Exceptions raised for bad input. Each message names the value and the fix."""

from pathlib import Path


class RepairError(ValueError):
    """Base class for every error this package raises on bad input or state."""


class DataError(RepairError):
    """A data source is missing, empty, corrupt or inconsistent."""


class ConfigError(RepairError):
    """A configuration value is out of range or inconsistent with the data."""


class CheckpointError(RepairError):
    """A checkpoint or model factory does not match the expected model."""


class EmptyFailureSetError(RepairError):
    """The model makes no mistakes on the test set, so there is nothing to repair."""


class WorkspaceError(RepairError):
    """A workspace record or file is missing or unreadable."""


class DivergenceError(RepairError, ArithmeticError):
    """An iterative solver produced growing or non-finite values."""


def looked_up_as(path: Path) -> str:
    """Return " (looked up as /absolute/path)" for a relative ``path``, else
    "", so that a message about a missing file names where it was sought."""
    return "" if path.is_absolute() else f" (looked up as {path.absolute()})"
