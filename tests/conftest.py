"""Shared fixtures: small seeded data sets and models, built per test."""

import pytest
import torch
from torch import nn


def make_blobs(n: int = 240, classes: int = 3, seed: int = 0, size: int = 8):
    """Return separable image-shaped data: (images (n, 1, size, size), labels)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.rand(classes, 1, size, size, generator=generator)
    noise = 0.15 * torch.randn(n, 1, size, size, generator=generator)
    images = (centres[labels] + noise).clamp(0, 1)
    return images, labels


def make_mlp(size: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(size * size, 16), nn.ReLU(), nn.Linear(16, classes)
    )


@pytest.fixture
def blobs():
    return make_blobs()
