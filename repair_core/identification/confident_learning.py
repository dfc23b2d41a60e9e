"""Confident learning (Northcutt et al. 2021) through cleanlab.

Out-of-sample predicted probabilities come from K-fold training: each fold
model starts fresh and is trained with ``train_model`` on the other folds,
then predicts its held-out fold. cleanlab's label quality score then ranks
the examples, and the score is 1 - quality, so likely label errors rank high.
The ranking does not use the failures F_q at all: it finds label issues
anywhere in the training set, whether or not they caused these failures.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification.base import (
    MAX_SEED,
    IdentificationContext,
    check_finite,
    check_setting_types,
    option,
)
from repair_core.inference import model_device, predict_logits
from repair_core.progress import Progress
from repair_core.training import TrainConfig, train_model

logger = logging.getLogger(__name__)


@dataclass
class ConfidentLearningConfig:
    """Settings of confident learning."""

    n_folds: int = option(5, "Number of cross-validation folds K.")
    max_epochs: int | None = option(
        None, "Epoch limit of each fold model; None keeps the train config's."
    )
    seed: int = option(0, "Seed of the fold split and of fold training.")

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.n_folds < 2:
            raise ConfigError(f"n_folds {self.n_folds} must be at least 2.")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be at least 1.")


def _fresh_model(model: nn.Module, context: IdentificationContext) -> nn.Module:
    if context.model_factory is not None:
        return context.model_factory()
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


#: scikit-learn takes seeds in 0..2**32 - 1, so larger seeds are folded into it.
SKLEARN_SEEDS = 2**32


def _folds(labels: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    if counts[counts > 0].min() >= n_folds:
        splitter = StratifiedKFold(
            n_splits=n_folds, shuffle=True, random_state=seed % SKLEARN_SEEDS
        )
    else:
        splitter = KFold(
            n_splits=n_folds, shuffle=True, random_state=seed % SKLEARN_SEEDS
        )
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels)]


def out_of_sample_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ConfidentLearningConfig,
    context: IdentificationContext,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Return K-fold predicted probabilities, float64 (N, K classes), on the CPU."""
    if len(labels) < config.n_folds:
        raise ConfigError(
            f"{len(labels)} training examples cannot fill {config.n_folds} folds. "
            "Use fewer folds."
        )
    device = model_device(model)
    base = context.train_config or TrainConfig()
    overrides = {"seed": config.seed, "record_trajectory": False}
    if config.max_epochs is not None:
        overrides["max_epochs"] = config.max_epochs
    train_config = dataclasses.replace(base, **overrides)
    labels_np = labels.cpu().numpy()
    probs = None
    folds = _folds(labels_np, config.n_folds, config.seed)
    for k, held in enumerate(folds):
        held_t = torch.as_tensor(held, dtype=torch.long)
        mask = torch.ones(len(labels), dtype=torch.bool)
        mask[held_t] = False
        fold_model = _fresh_model(model, context).to(device)
        torch.manual_seed((config.seed + k) % (MAX_SEED + 1))
        train_model(
            fold_model,
            images,
            labels,
            train_config,
            subset=torch.nonzero(mask).flatten(),
            device=device,
        )
        fold_probs = predict_logits(fold_model, images[held_t]).double().softmax(1)
        if probs is None:
            probs = torch.zeros(len(labels), fold_probs.shape[1], dtype=torch.float64)
        probs[held_t] = fold_probs
        if progress is not None:
            progress((k + 1) / len(folds), f"Confident learning: fold {k + 1}")
    return probs


def score_confident_learning(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: ConfidentLearningConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Return 1 - cleanlab label quality, float64 (N,), and the label-issue mask."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = out_of_sample_probabilities(
        model, train_images, train_labels, config, context, progress
    )
    labels_np = train_labels.cpu().numpy()
    probs_np = probs.numpy()
    quality = get_label_quality_scores(labels_np, probs_np)
    issues = find_label_issues(labels_np, probs_np)
    scores = check_finite(
        1.0 - torch.as_tensor(quality, dtype=torch.float64),
        "Confident learning",
        "Check that every fold model trained to finite outputs.",
    )
    resolved = {}
    if config.max_epochs is None:
        base = context.train_config or TrainConfig()
        resolved["max_epochs"] = base.max_epochs
    return scores, {
        "pred_probs": probs,
        "label_issues": torch.as_tensor(issues, dtype=torch.bool),
        "resolved": resolved,
    }
