"""Tiny seeded models and data sets, built inside each test."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def blobs(
    n: int,
    *,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    spread: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: features (n, n_features) and labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, n_features, generator=generator) * spread
    labels = torch.arange(n) % n_classes
    noise = torch.randn(n, n_features, generator=generator)
    return (centres[labels] + noise).to(dtype), labels


def tiny_images(
    n: int, *, channels: int = 1, size: int = 8, n_classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, channels, size, size) in [0, 1] whose mean brightness pattern
    depends on the class, and labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(n_classes, channels, size, size, generator=generator)
    labels = torch.arange(n) % n_classes
    noise = 0.2 * torch.rand(n, channels, size, size, generator=generator)
    return (0.8 * patterns[labels] + noise).clamp(0, 1), labels


def mlp(
    n_in: int = 4, n_classes: int = 3, *, seed: int = 0, hidden: int = 8
) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)
    )


class TinyCNN(nn.Module):
    """Conv, optional BatchNorm and Dropout, global pooling, linear head."""

    def __init__(
        self,
        channels: int = 1,
        n_classes: int = 3,
        *,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))
        return self.head(self.drop(h.mean((2, 3))))


def tiny_cnn(*, seed: int = 0, **kwargs) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(**kwargs)


def train_briefly(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 0.05,
    seed: int = 0,
) -> nn.Module:
    """Full-batch Adam for a few steps, enough to make gradients non-trivial."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=lr
    )
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the big-endian IDX format that MNIST uses."""
    magic = 0x0800 + array.ndim  # 2049 for labels, 2051 for images
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_idx_files(root: Path, folder: str, n_train: int, n_test: int) -> dict:
    """Write random IDX files with a balanced label sequence and return the arrays."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def write_digit_folder(root: Path, per_class: int = 6) -> None:
    """Write train/ and test/ ImageFolder trees of random 28x28 greyscale PNGs
    in the classes a and b."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for part in ("train", "test"):
        for name in ("a", "b"):
            folder = root / part / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = torch.randint(0, 256, (28, 28), generator=generator)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(
                    folder / f"{index}.png"
                )
