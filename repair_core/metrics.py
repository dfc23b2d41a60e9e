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


def implicated_mask(
    mask: torch.Tensor,
    given_labels: torch.Tensor,
    clean_labels: torch.Tensor,
    failure_labels: torch.Tensor,
    failure_predictions: torch.Tensor,
) -> torch.Tensor | None:
    """Corrupted examples whose label change matches a failure of the query.

    A training image of class a labelled b pushes the model to predict b on
    images like it, so the test failures it is expected to cause are of true
    class a predicted as b. When the failures hold no such pair, a ranking
    built from them has little to single that example out, so the share of
    *implicated* examples found measures a ranking on the part of the
    corruption its failures can reveal.

    Args:
        mask: bool, (n_train,), the corrupted examples.
        given_labels: (n_train,), the labels the model was trained on.
        clean_labels: (n_train,), the labels before corruption.
        failure_labels: true labels of the failures the ranking was built
            from (F_q).
        failure_predictions: the model's predictions on those failures.

    Returns:
        bool, (n_train,), or None when no corrupted example had its label
        changed (input noise keeps labels, so the idea does not apply).
    """
    mask = torch.as_tensor(mask, dtype=torch.bool)
    given = torch.as_tensor(given_labels).long()
    clean = torch.as_tensor(clean_labels).long()
    changed = mask & (given != clean)
    if not bool(changed.any()):
        return None
    n_classes = int(torch.cat([given, clean]).max()) + 1
    pairs = torch.zeros(n_classes, n_classes, dtype=torch.bool)
    truth = torch.as_tensor(failure_labels).long()
    predicted = torch.as_tensor(failure_predictions).long()
    inside = (truth < n_classes) & (predicted < n_classes)
    pairs[truth[inside], predicted[inside]] = True
    return changed & pairs[clean, given]


def detection_summary(
    scores: torch.Tensor,
    mask: torch.Tensor,
    implicated: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Return the detection figures reported for every ranking with ground truth.

    With ``implicated`` (see ``implicated_mask``), also the number of
    implicated examples and the share of them in the top 20%. Without a
    corrupted example there is nothing to find, so the shares are None.
    """
    n_corrupted = int(np.asarray(mask, dtype=bool).sum())
    summary = {
        "found_at_10pct": found_at(scores, mask, 0.10) if n_corrupted else None,
        "found_at_20pct": found_at(scores, mask, 0.20) if n_corrupted else None,
        "precision_at_100": precision_at(scores, mask, 100) if n_corrupted else None,
        "n_corrupted": n_corrupted,
    }
    if implicated is not None:
        n_implicated = int(np.asarray(implicated, dtype=bool).sum())
        summary["n_implicated"] = n_implicated
        summary["implicated_found_at_20pct"] = (
            found_at(scores, implicated, 0.20) if n_implicated else None
        )
    return summary
