"""Retraining from scratch on D\\C: the expensive reference for deletion.

The fresh model comes from a model factory when one is given. Otherwise it
is a copy of θ̂ where every submodule that owns a trainable parameter calls
its ``reset_parameters``, after seeding torch with the treatment's seed.
Frozen submodules and buffers such as the input mean keep their values.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification.base import option
from repair_core.inference import model_device
from repair_core.progress import Progress
from repair_core.training import TrainConfig
from repair_core.treatments.base import TreatmentConfig
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
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be at least 1.")


def fresh_model(
    model: nn.Module,
    *,
    seed: int,
    model_factory: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Return an untrained model of the same architecture, on ``model``'s device.

    Raises:
        ConfigError: no factory is given and no submodule with trainable
            parameters has ``reset_parameters``.
    """
    torch.manual_seed(seed)
    if model_factory is not None:
        return model_factory().to(model_device(model))
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
        The retrained model and a record as for fine-tuning.
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
    return trained, record
