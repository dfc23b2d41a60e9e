"""Retraining from scratch on D\\C: the expensive reference for deletion.

The fresh model comes from a model factory when one is given. Otherwise it
is a copy of θ̂ where every submodule that owns a trainable parameter calls
its ``reset_parameters``. Torch is seeded with the treatment's seed first.

On both paths the fresh model keeps what training on D\\C would not change:

* Frozen parameters (``requires_grad=False``, such as a pretrained stem)
  keep θ̂'s values and stay frozen.
* Buffers such as an input mean keep θ̂'s values, except the running
  statistics of normalisation layers (``running_mean``, ``running_var`` and
  ``num_batches_tracked`` of BatchNorm and InstanceNorm). Those describe θ̂'s
  training run, so they start fresh and are estimated again on D\\C.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repair_core.devices import seeded
from repair_core.errors import ConfigError
from repair_core.identification.base import check_setting_types, option
from repair_core.inference import model_device
from repair_core.progress import Progress
from repair_core.training import TrainConfig
from repair_core.treatments.base import TreatmentConfig, copy_training_flags
from repair_core.treatments.finetune import effective_train_config, train_without

logger = logging.getLogger(__name__)


@dataclass
class RetrainConfig(TreatmentConfig):
    """Settings of retraining on D\\C; ``seed`` sets the initial weights, the
    validation split, shuffling and dropout."""

    max_epochs: int | None = option(
        None, "Upper bound on epochs; the training settings' value when None."
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be at least 1.")


def fresh_model(
    model: nn.Module,
    *,
    seed: int,
    model_factory: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Build an untrained model of the same architecture, on ``model``'s device.

    Trainable parameters get new values. Frozen parameters and buffers other
    than normalisation statistics keep ``model``'s values, as the module
    docstring describes.

    Raises:
        ConfigError: no factory is given and no submodule with trainable
            parameters has ``reset_parameters``, or the factory's model lacks
            a frozen parameter or buffer of ``model`` or has it in another
            shape.
    """
    with seeded(seed):
        if model_factory is not None:
            fresh = model_factory().to(model_device(model))
        else:
            fresh = _reset_copy(model)
    for module in fresh.modules():
        if _has_running_stats(module):
            module.reset_running_stats()
    # reset_parameters also redraws frozen parameters of a layer that owns a
    # trainable one, so the copy comes after the reset on both paths.
    copy_fixed_state(model, fresh)
    return fresh


def _reset_copy(model: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(model)
    reset = 0
    for module in fresh.modules():
        owns_trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if owns_trainable and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            reset += 1
    if reset == 0:
        raise ConfigError(
            f"No layer of {type(model).__name__} has reset_parameters, so it cannot "
            "be reinitialised for retraining. Pass a model factory instead."
        )
    return fresh


def copy_fixed_state(trained: nn.Module, fresh: nn.Module) -> None:
    """Copy ``trained``'s frozen parameters and its buffers into ``fresh``.

    The copied parameters are frozen in ``fresh`` too. Buffers of
    normalisation layers are running statistics and are not copied.

    Raises:
        ConfigError: ``fresh`` lacks one of these tensors, or has it in
            another shape.
    """
    fresh_parameters = dict(fresh.named_parameters())
    fresh_buffers = dict(fresh.named_buffers())
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if parameter.requires_grad:
                continue
            target = _matching_tensor(
                fresh_parameters, name, parameter, "frozen parameter", fresh
            )
            target.copy_(parameter)
            target.requires_grad_(False)
        for module_name, module in trained.named_modules():
            if _has_running_stats(module):
                continue
            for buffer_name, buffer in module.named_buffers(recurse=False):
                name = f"{module_name}.{buffer_name}" if module_name else buffer_name
                target = _matching_tensor(fresh_buffers, name, buffer, "buffer", fresh)
                target.copy_(buffer)


def _has_running_stats(module: nn.Module) -> bool:
    # In torch only BatchNorm and InstanceNorm layers define reset_running_stats.
    return callable(getattr(module, "reset_running_stats", None))


def _matching_tensor(
    tensors: dict[str, torch.Tensor],
    name: str,
    source: torch.Tensor,
    kind: str,
    fresh: nn.Module,
) -> torch.Tensor:
    target = tensors.get(name)
    if target is None:
        raise ConfigError(
            f"The model factory built a {type(fresh).__name__} without the "
            f"{kind} {name!r} of the trained model, so its value cannot be kept "
            "for retraining. Pass a factory that builds the trained architecture."
        )
    if target.shape != source.shape:
        raise ConfigError(
            f"The model factory built {kind} {name!r} with shape "
            f"{tuple(target.shape)}, but the trained model's has shape "
            f"{tuple(source.shape)}. Pass a factory that builds the trained "
            "architecture."
        )
    return target


def retrain(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: torch.Tensor,
    config: RetrainConfig,
    *,
    train_config: TrainConfig | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a freshly initialised model on D\\C with Adam and early stopping.

    Args:
        model: θ̂, left unchanged; it supplies the architecture and device.
        train_images: D's images, shape (N, C, H, W).
        train_labels: D's labels, shape (N,).
        causes: training indices of C to leave out, shape (|C|,); may be empty.
        config: seed and epoch limit.
        train_config: optimiser and early-stopping settings.
        model_factory: builds the untrained network; see :func:`fresh_model`.

    Returns:
        The retrained model, with each submodule's train or eval mode as
        ``model``, and a record as for fine-tuning.
    """
    settings = effective_train_config(
        train_config, seed=config.seed, max_epochs=config.max_epochs
    )
    start = fresh_model(model, seed=config.seed, model_factory=model_factory)
    trained, _, record = train_without(
        start,
        train_images,
        train_labels,
        causes,
        settings,
        name="Retraining",
        progress=progress,
    )
    # Training leaves every submodule in train mode.
    copy_training_flags(model, trained)
    return trained, record
