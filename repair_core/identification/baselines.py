"""Reference rankings: training loss, random order and the ground-truth oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification.base import (
    IdentificationContext,
    check_finite,
    check_setting_types,
    log_likelihoods,
    option,
)
from repair_core.progress import Progress


@dataclass
class TrainingLossConfig:
    """Settings of the training-loss ranking."""

    batch_size: int = option(512, "Examples per forward pass.")

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size {self.batch_size} must be at least 1.")


@dataclass
class RandomConfig:
    """Settings of the random ranking."""

    seed: int = option(0, "Seed of the uniform scores.")

    def __post_init__(self) -> None:
        check_setting_types(self)


@dataclass
class OracleConfig:
    """Settings of the oracle ranking."""

    seed: int = option(0, "Seed of the tie-breaking noise.")
    tie_break: float = option(
        1e-6, "Amplitude of the uniform noise that orders examples within a group."
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        if not 0 <= self.tie_break < 0.5:
            raise ConfigError(
                f"tie_break {self.tie_break} must lie in [0, 0.5) so the groups "
                "stay apart."
            )


def score_training_loss(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: TrainingLossConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Score each example by its loss -log p(z | theta-hat); ignores the failures."""
    scores = -log_likelihoods(
        model,
        train_images,
        train_labels,
        log_likelihood=context.log_likelihood,
        batch_size=config.batch_size,
    )
    check_finite(scores, "Training loss", "Check the model for non-finite outputs.")
    return scores, {}


def score_random(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: RandomConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Score each example with a seeded uniform draw in [0, 1)."""
    generator = torch.Generator().manual_seed(config.seed)
    scores = torch.rand(len(train_labels), generator=generator, dtype=torch.float64)
    return scores, {}


def score_oracle(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: OracleConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Score each known corrupted example in [1 - tie_break, 1) and each clean
    one in [-tie_break, 0), so exactly the corrupted examples score above 0.

    Seeded uniform noise of amplitude ``tie_break`` orders examples within
    each group. With ``tie_break`` 0 every clean example scores exactly 0.
    """
    mask = context.corrupted_mask
    if mask is None:
        raise ConfigError(
            "The oracle needs to know which training examples were corrupted, "
            "and that is only known for a run trained with a noise scenario "
            "(train --scenario label-flip, input-noise or fgsm). From Python, "
            "pass the mask as IdentificationContext.corrupted_mask."
        )
    mask = torch.as_tensor(mask).cpu()
    if mask.shape != (len(train_labels),):
        raise ConfigError(
            f"corrupted_mask has shape {tuple(mask.shape)} but there are "
            f"{len(train_labels)} training examples. Pass one flag per example."
        )
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.rand(len(train_labels), generator=generator, dtype=torch.float64)
    # noise - 1 lies in [-1, 0), so clean examples stay at or below 0 and the
    # order within each group is the order of the noise.
    scores = mask.bool().double() + config.tie_break * (noise - 1)
    return scores, {}
