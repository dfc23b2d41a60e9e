"""Fine-tuning on D\\C starting from θ̂: the practical reference for deletion.

Training uses ``train_model`` with ``subset=D\\C``, so the validation split for
early stopping and every minibatch are drawn from D\\C only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification.base import check_setting_types, option
from repair_core.inference import model_device
from repair_core.progress import Progress
from repair_core.training import TrainConfig, TrainProgress, TrainResult, train_model
from repair_core.treatments.base import (
    TreatmentConfig,
    complement,
    copy_training_flags,
    report,
)

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TreatmentConfig):
    """Settings of fine-tuning on D\\C; ``seed`` sets the validation split,
    shuffling and dropout, replacing the seed of the training settings."""

    max_epochs: int | None = option(
        None, "Upper bound on epochs; the training settings' value when None."
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be at least 1.")


def effective_train_config(
    train_config: TrainConfig | None, *, seed: int, max_epochs: int | None
) -> TrainConfig:
    """Return the training settings with the treatment's seed and epoch limit."""
    base = train_config or TrainConfig()
    return dataclasses.replace(
        base,
        seed=seed,
        max_epochs=base.max_epochs if max_epochs is None else max_epochs,
    )


def epoch_progress(progress: Progress | None, max_epochs: int, name: str):
    """Adapt a Progress callback to the per-epoch callback of ``train_model``."""
    if progress is None:
        return None

    def on_epoch(epoch: int, loss: float, val_acc: float) -> None:
        report(
            progress,
            epoch / max_epochs,
            f"{name} epoch {epoch}: loss {loss:.4f}, validation accuracy {val_acc:.3f}",
        )

    return on_epoch


def train_without(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: torch.Tensor,
    train_config: TrainConfig,
    *,
    name: str,
    progress: Progress | None = None,
) -> tuple[nn.Module, TrainResult, dict[str, Any]]:
    """Train ``model`` in place on D\\C and return it with its record."""
    subset = complement(causes, len(train_labels))
    on_epoch: TrainProgress | None = epoch_progress(
        progress, train_config.max_epochs, name
    )
    result = train_model(
        model,
        train_images,
        train_labels,
        train_config,
        subset=subset,
        device=model_device(model),
        progress=on_epoch,
    )
    record = {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "n_trained_on": len(subset),
        "train_config": train_config.to_dict(),
    }
    if result.trajectory is not None:
        record["trajectory"] = result.trajectory
    logger.info(
        "%s on %d examples (%d removed): best epoch %d of %d",
        name,
        len(subset),
        len(causes),
        result.best_epoch,
        result.epochs_run,
    )
    return result.model, result, record


def finetune(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: torch.Tensor,
    config: FinetuneConfig,
    *,
    train_config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``model`` on D\\C with Adam and early stopping.

    Args:
        model: θ̂, left unchanged.
        train_images: D's images, shape (N, C, H, W).
        train_labels: D's labels, shape (N,).
        causes: training indices of C to leave out, shape (|C|,); may be
            empty, which fine-tunes on all of D.
        config: seed and epoch limit.
        train_config: optimiser and early-stopping settings; the defaults of
            ``TrainConfig`` when None.

    Returns:
        The fine-tuned copy, with each submodule's train or eval mode as
        ``model``, and a record with ``best_epoch``, ``epochs_run``,
        ``n_trained_on`` and the resolved ``train_config``; with
        ``record_trajectory`` set, also ``trajectory``.
    """
    settings = effective_train_config(
        train_config, seed=config.seed, max_epochs=config.max_epochs
    )
    tuned, _, record = train_without(
        copy.deepcopy(model),
        train_images,
        train_labels,
        causes,
        settings,
        name="Fine-tuning",
        progress=progress,
    )
    # Training leaves every submodule in train mode.
    copy_training_flags(model, tuned)
    return tuned, record
