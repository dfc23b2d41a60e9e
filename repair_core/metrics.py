"""Detection metrics: how well a ranking finds the corrupted training examples."""

from __future__ import annotations

import numpy as np
import torch

from repair_core.errors import ConfigError


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Return training indices from most to least harmful, shape (n_train,).

    Ties keep index order, so the ranking is deterministic.
    """
    return torch.as_tensor(
        np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    )


def _check(scores: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if scores.shape != mask.shape:
        raise ConfigError(
            f"Scores of shape {scores.shape} do not match the corruption mask of "
            f"shape {mask.shape}. Score the same training set the mask describes."
        )
    return scores, mask


def detection_curve(
    scores: torch.Tensor, mask: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Share of corrupted examples found against share of D inspected.

    Returns:
        (inspected, found), each shape (n_train + 1,), starting at (0, 0): after
        inspecting the top ``k`` examples, ``inspected[k] = k / n_train`` and
        ``found[k]`` is the share of all corrupted examples among them.
    """
    scores, mask = _check(scores, mask)
    hits = mask[np.asarray(ranking(torch.as_tensor(scores)))]
    total = max(int(mask.sum()), 1)
    found = np.concatenate([[0.0], np.cumsum(hits) / total])
    inspected = np.arange(len(scores) + 1) / max(len(scores), 1)
    return inspected, found


def found_at(scores: torch.Tensor, mask: torch.Tensor, fraction: float) -> float:
    """Share of all corrupted examples within the top ``fraction`` of the ranking."""
    scores, mask = _check(scores, mask)
    k = int(round(fraction * len(scores)))
    top = np.asarray(ranking(torch.as_tensor(scores)))[:k]
    return float(mask[top].sum() / max(int(mask.sum()), 1))


def precision_at(scores: torch.Tensor, mask: torch.Tensor, k: int) -> float:
    """Share of corrupted examples among the top ``k`` of the ranking."""
    scores, mask = _check(scores, mask)
    k = min(k, len(scores))
    top = np.asarray(ranking(torch.as_tensor(scores)))[:k]
    return float(mask[top].mean()) if k else float("nan")


def detection_summary(scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The detection figures reported for every ranking with ground truth."""
    return {
        "found_at_10pct": found_at(scores, mask, 0.10),
        "found_at_20pct": found_at(scores, mask, 0.20),
        "precision_at_100": precision_at(scores, mask, 100),
        "n_corrupted": int(np.asarray(mask, dtype=bool).sum()),
    }
