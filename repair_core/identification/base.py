"""Shared types and batched helpers of the cause identification methods.

Every method scores all N training examples; a higher score means the example
conflicts more with the query failures F_q, so removing it is expected to
raise log p(F_q | theta).
"""

from __future__ import annotations

import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.fisher import (
    LogLikelihood,
    batch_log_likelihood,
    detached_parameters,
    per_example_gradients_at,
)
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress

if TYPE_CHECKING:
    from repair_core.training import TrainConfig, Trajectory


MAX_SEED = 2**63 - 1
"""Largest seed torch.Generator.manual_seed accepts."""


def option(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """Declare a config dataclass field with help text in its metadata, and
    for a text setting the values it accepts, which the dashboard offers in a
    list."""
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


#: Description of the values each plain setting type accepts, for error messages.
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _checked_setting(config_class: type, name: str, value: Any, kind: Any) -> Any:
    """Return ``value`` as a setting of type ``kind``, or raise ConfigError.

    Values from JSON or a dict get the checks that typed command-line values
    get: an int for an int setting, true or false for a flag, a number for a
    float (an int becomes a float), a dict or the class itself for a group.
    Types other than these are passed through.
    """
    options = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        plain = [option for option in options if option is not type(None)]
        if len(plain) != 1:
            return value
        kind = plain[0]
    if is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, dict):
            try:
                return settings_from_dict(kind, value)
            except ConfigError as error:
                raise ConfigError(f"In the group {name!r}: {error}") from None
        # The example is the group's first setting other than its seed, which
        # a treatment made of steps replaces with its own.
        example = next(entry for entry in fields(kind) if entry.name != "seed")
        sample = json.dumps({example.name: getattr(kind(), example.name)})
        raise ConfigError(
            f"Setting {name!r} of {config_class.__name__} is {value!r}. Give a "
            f"JSON object of {kind.__name__} settings, such as {sample}."
        )
    if kind not in _EXPECTED:
        return value
    # numbers.Real and Integral also admit NumPy's scalars, such as np.int64,
    # which become plain Python numbers.
    flag = isinstance(value, bool | np.bool_)
    if kind is float and isinstance(value, numbers.Real) and not flag:
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not flag:
        return int(value)
    if kind is bool and flag:
        return bool(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"Setting {name!r} of {config_class.__name__} is {value!r}, not "
        f"{_EXPECTED[kind]}."
    )


def check_setting_types(config: Any) -> None:
    """Check every setting of the dataclass ``config`` as a setting from a dict
    is checked, and raise ConfigError at the first wrong one.

    An int given for a float setting is stored as a float, a float setting
    must be finite, and a ``seed`` must be one torch's generators accept.
    Config classes call this first in ``__post_init__``, so that a value of
    the wrong type is named when the config is built instead of failing later
    inside a computation.
    """
    config_class = type(config)
    kinds = typing.get_type_hints(config_class)
    for entry in fields(config):
        value = getattr(config, entry.name)
        checked = _checked_setting(config_class, entry.name, value, kinds[entry.name])
        if isinstance(checked, float) and not math.isfinite(checked):
            raise ConfigError(
                f"Setting {entry.name!r} of {config_class.__name__} is {checked}; "
                "give a finite number."
            )
        if checked is not value:
            setattr(config, entry.name, checked)
    if "seed" in kinds:
        check_seed(config.seed)


def settings_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Build ``config_class`` from a dict, rejecting an unknown key by name and
    a value of the wrong type."""
    known = {entry.name for entry in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"Unknown setting {unknown[0]!r} for {config_class.__name__}. Use one "
            f"of {', '.join(sorted(known))}."
        )
    if "seed" in values:
        check_seed(values["seed"])
    kinds = typing.get_type_hints(config_class)
    checked = {
        name: _checked_setting(config_class, name, value, kinds.get(name))
        for name, value in values.items()
    }
    return config_class(**checked)


def changed_settings(
    config: dict[str, Any], defaults: dict[str, Any], skip: Iterable[str] = ()
) -> list[tuple[str, Any]]:
    """List (name, value) for each setting in ``config`` that differs from
    ``defaults``, in the order of ``config``.

    A group of settings (a dict) lists its changed settings under dotted
    names such as ``deletion.gamma``. Settings missing from ``defaults`` and
    those named in ``skip``, at any depth, are left out.
    """
    skipped = set(skip)
    changed = []
    for name, value in config.items():
        if name in skipped or name not in defaults or defaults[name] == value:
            continue
        if isinstance(value, dict) and isinstance(defaults[name], dict):
            changed += [
                (f"{name}.{inner}", inner_value)
                for inner, inner_value in changed_settings(value, defaults[name], skip)
            ]
        else:
            changed.append((name, value))
    return changed


def check_seed(seed: Any) -> int:
    """Return ``seed`` when torch's generators accept it, else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed {seed!r} is not an integer; give a whole number.")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"seed {seed} is outside 0..{MAX_SEED}; choose a seed in that range."
        )
    return seed


@dataclass
class IdentificationContext:
    """What a method may need beyond the model and the data; every field is optional."""

    checkpoints: list[dict[str, torch.Tensor]] | None = None
    """State dicts saved during training, oldest first (TracIn)."""
    trajectory: Trajectory | None = None
    """Recorded minibatches, learning rates and epoch states (SGD-influence)."""
    corrupted_mask: torch.Tensor | None = None
    """Ground truth: True for each corrupted training example, bool (N,) (oracle)."""
    model_factory: Callable[[], nn.Module] | None = None
    """Builds a fresh untrained model (confident learning's K-fold training)."""
    train_config: TrainConfig | None = None
    """Settings the model was trained with (confident learning, SGD replay)."""
    fisher: dict[str, torch.Tensor] | None = None
    """Diagonal Fisher already computed at this model's parameters (EWC-influence)."""
    log_likelihood: LogLikelihood | None = None
    """Per-example log p(y | x) from (outputs, targets); softmax cross-entropy
    when None."""


@dataclass
class ScoreResult:
    """The scores of one identification run and how they were made."""

    scores: torch.Tensor
    """float64, shape (n_train,), on the CPU; higher means more harmful, and a
    positive score means the example conflicts with the failures."""
    method: str
    config: dict
    """The resolved config, JSON-serialisable."""
    seed: int | None
    """The config's seed; None for a method without randomness."""
    device: str
    seconds: float
    extras: dict = field(default_factory=dict)
    """Method-specific objects (a Fisher, a fitted state dict, a LiSSA scale);
    not JSON-serialisable in general."""
    resolved: dict = field(default_factory=dict)
    """The value used for each setting that ``config`` leaves None, by setting
    name, such as the LiSSA scale that the search chose or TracIn's training
    learning rate. JSON-serialisable; empty when no such setting was None."""


def log_likelihoods(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    log_likelihood: LogLikelihood | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Return log p(z | theta) per example, float64 (N,), on the CPU.

    Runs in eval mode in the model's own dtype, so float64 models keep their
    precision.
    """
    device = model_device(model)
    params = detached_parameters(model)
    out = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            ll = batch_log_likelihood(model, params, x, y, log_likelihood)
            out.append(ll.detach().double().cpu())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(out)


def summed_log_likelihood_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    params: dict[str, torch.Tensor] | None = None,
    log_likelihood: LogLikelihood | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Return the gradient of sum_z log p(z | params) over a set, by parameter name.

    ``params`` defaults to the model's trainable parameters. The caller puts
    the model in eval mode.
    """
    device = model_device(model)
    params = detached_parameters(model) if params is None else params
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)

        def batch_sum(p: dict[str, torch.Tensor], x=x, y=y) -> torch.Tensor:
            return batch_log_likelihood(model, p, x, y, log_likelihood).sum()

        for name, g in torch.func.grad(batch_sum)(params).items():
            total[name] += g.detach()
    return total


def gradient_dot_products(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: dict[str, torch.Tensor],
    *,
    params: dict[str, torch.Tensor] | None = None,
    log_likelihood: LogLikelihood | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    message: str = "Scoring",
) -> torch.Tensor:
    """Return <grad log p(z | params), vector> for every example, float64 (N,), CPU.

    Per-example gradients come from ``torch.func.vmap`` one batch at a time,
    so memory grows with ``batch_size``, not N. The caller puts the model in
    eval mode.
    """
    device = model_device(model)
    params = detached_parameters(model) if params is None else params
    n = len(labels)
    out = []
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        grads = per_example_gradients_at(
            model, params, x, y, log_likelihood=log_likelihood
        )
        dots = sum(
            (g.flatten(1) * vector[name].reshape(1, -1)).sum(1)
            for name, g in grads.items()
        )
        out.append(dots.detach().double().cpu())
        if progress is not None:
            done = min(start + batch_size, n)
            progress(done / n, f"{message}: {done}/{n} examples")
    return torch.cat(out)


def check_finite(scores: torch.Tensor, method: str, hint: str) -> torch.Tensor:
    """Return ``scores`` or raise FloatingPointError naming the method and a fix."""
    bad = (~torch.isfinite(scores)).sum().item()
    if bad:
        raise FloatingPointError(
            f"{method} produced {bad} non-finite scores out of {len(scores)}. {hint}"
        )
    return scores


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is positive (or zero when allowed)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{name} must be {bound}, got {value}.")
