"""Seeded tiny classification problems for the treatment and evaluation tests.

Every factory builds its data when called, so nothing is created at import.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from repair_core.failures import FailureSplit, split_failures
from repair_core.inference import predict_logits
from repair_core.training import TrainConfig, train_model

N_CLASSES = 4
SIDE = 6


def blob_images(n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images (n, 1, SIDE, SIDE) in [0, 1] and balanced labels (n,).

    Each class has a fixed random template; examples are that template plus
    Gaussian noise, so a small network separates most but not all of them.
    """
    templates = torch.rand(
        N_CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1234)
    )
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES
    labels = labels[torch.randperm(n, generator=generator)]
    noise = 0.35 * torch.randn(n, 1, SIDE, SIDE, generator=generator)
    return (templates[labels] + noise).clamp(0, 1), labels


def tiny_classifier(seed: int = 0) -> nn.Module:
    """Return an untrained two-layer network for SIDE x SIDE greyscale images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(SIDE * SIDE, 16),
        nn.ReLU(),
        nn.Linear(16, N_CLASSES),
    )


@dataclass
class TinyProblem:
    """A trained tiny model with noisy training labels and its failure split."""

    model: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    flipped: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    split: FailureSplit
    train_config: TrainConfig

    @property
    def query_images(self) -> torch.Tensor:
        return self.test_images[self.split.query]

    @property
    def query_labels(self) -> torch.Tensor:
        return self.test_labels[self.split.query]


def tiny_problem(
    *, n_train: int = 300, n_test: int = 200, flip_fraction: float = 0.3
) -> TinyProblem:
    """Return a fresh copy of a tiny classifier trained on noisy labels.

    Class 0 is marked as 1 in about ``flip_fraction`` of its training
    examples. The first call with given sizes trains the model; later calls
    copy that result, so every test gets its own tensors and model.

    Returns:
        The trained model and data; ``flipped`` holds the training indices
        whose label was changed from 0 to 1, shape (n_flipped,).
    """
    return copy.deepcopy(_trained_problem(n_train, n_test, flip_fraction))


@functools.lru_cache(maxsize=2)
def _trained_problem(n_train: int, n_test: int, flip_fraction: float) -> TinyProblem:
    train_images, clean = blob_images(n_train, seed=1)
    test_images, test_labels = blob_images(n_test, seed=2)
    generator = torch.Generator().manual_seed(3)
    flip = (clean == 0) & (torch.rand(n_train, generator=generator) < flip_fraction)
    train_labels = clean.clone()
    train_labels[flip] = 1
    config = TrainConfig(max_epochs=15, patience=15, batch_size=32, lr=1e-2, seed=0)
    model = train_model(tiny_classifier(0), train_images, train_labels, config).model
    predictions = predict_logits(model, test_images).argmax(1)
    split = split_failures(predictions, test_labels, seed=0)
    return TinyProblem(
        model=model,
        train_images=train_images,
        train_labels=train_labels,
        flipped=torch.nonzero(flip).flatten(),
        test_images=test_images,
        test_labels=test_labels,
        split=split,
        train_config=TrainConfig(max_epochs=2, patience=2, batch_size=32, seed=0),
    )


class FrozenStemNet(nn.Module):
    """A classifier with a frozen pretrained-style stem and mode-dependent layers.

    The input mean is a buffer. The stem (a linear layer and BatchNorm) has
    ``requires_grad=False``, and Dropout sits before the trainable head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(1, 1, SIDE, SIDE))
        self.stem = nn.Sequential(nn.Linear(SIDE * SIDE, 16), nn.BatchNorm1d(16))
        self.stem.requires_grad_(False)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem((x - self.input_mean).flatten(1))
        return self.head(self.dropout(torch.relu(features)))


def frozen_stem_net(seed: int | None = None) -> FrozenStemNet:
    """Return an untrained FrozenStemNet; None draws from torch's current seed."""
    if seed is not None:
        torch.manual_seed(seed)
    return FrozenStemNet()


def frozen_stem_problem() -> TinyProblem:
    """Return the tiny problem with a trained FrozenStemNet in place of its model.

    The stem is drawn with seed 100 and the input mean is the training-image
    mean, so neither matches what a fresh FrozenStemNet holds. The failure
    split is still the one of the tiny classifier.
    """
    return copy.deepcopy(_trained_frozen_stem_problem())


@functools.lru_cache(maxsize=1)
def _trained_frozen_stem_problem() -> TinyProblem:
    problem = tiny_problem()
    model = frozen_stem_net(seed=100)
    model.input_mean.copy_(problem.train_images.mean(0, keepdim=True))
    config = TrainConfig(max_epochs=3, patience=3, batch_size=32, lr=1e-2, seed=0)
    train_model(model, problem.train_images, problem.train_labels, config)
    problem.model = model
    return problem
