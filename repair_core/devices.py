"""Device selection: CUDA first, then Apple's MPS, then the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from repair_core.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def select_device(preference: str | torch.device | None = "auto") -> torch.device:
    """Return the device to run on.

    Args:
        preference: "auto" (or None) picks CUDA, then MPS, then CPU. "cpu",
            "cuda", "cuda:1" or "mps" force a device, which must be available.

    Raises:
        ConfigError: the forced device is unknown or not available here.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    if not (preference is None or isinstance(preference, str)):
        raise ConfigError(
            f"Device {preference!r} is of type {type(preference).__name__}. Give "
            "a name such as 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'."
        )
    if preference in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    kind = preference.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(
            f"Unknown device {preference!r}. Use one of {', '.join(DEVICE_CHOICES)}."
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {preference!r} was requested but CUDA is not available on this "
            "machine. Use --device auto or --device cpu."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"Device {preference!r} was requested but MPS is not available on this "
            "machine. Use --device auto or --device cpu."
        )
    return torch.device(preference)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generators for the block, then put back the states
    they had, so a seeded method leaves the caller's random stream as it was.

    The CPU generator is always restored; CUDA and MPS generators are restored
    when that backend is already in use.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps = (
        torch.mps.get_rng_state()
        if torch.backends.mps.is_available() and torch.backends.mps.is_built()
        else None
    )
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if mps is not None:
            torch.mps.set_rng_state(mps)
