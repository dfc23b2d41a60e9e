"""The failure split of a test set: F, its query and holdout halves, and T\\F."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repair_core.errors import ConfigError, EmptyFailureSetError


@dataclass
class FailureSplit:
    """Test-set indices of the failures and of the remaining examples.

    ``failures`` are the misclassified test examples (F), split at random into
    ``query`` (F_q, used to find causes and for early stopping) and ``holdout``
    (F_h, used only to measure whether a repair generalises). ``remaining``
    are the correctly classified test examples (T\\F). All are sorted int64
    tensors of test-set indices.
    """

    failures: torch.Tensor
    query: torch.Tensor
    holdout: torch.Tensor
    remaining: torch.Tensor
    query_fraction: float
    seed: int

    def counts(self) -> dict[str, int]:
        return {
            "n_failures": len(self.failures),
            "n_query": len(self.query),
            "n_holdout": len(self.holdout),
            "n_remaining": len(self.remaining),
        }


def query_size(n_failures: int, query_fraction: float) -> int:
    """Return how many of ``n_failures`` failures form F_q. Two query fractions
    with the same size and seed split the same failures alike."""
    return max(1, int(round(n_failures * query_fraction)))


def split_failures(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    *,
    query_fraction: float = 0.5,
    seed: int = 0,
    candidates: torch.Tensor | None = None,
) -> FailureSplit:
    """Split the test set by whether the model got each example right.

    Args:
        predictions: predicted classes on the test set, shape (n_test,).
        labels: true classes, shape (n_test,).
        query_fraction: share of the failures that go to the query set.
        seed: seed of the random query/holdout split.
        candidates: test indices the user chose as failures (for example one
            class pair); they must all be misclassified. All failures when None.

    Raises:
        EmptyFailureSetError: no test example is misclassified.
        ConfigError: a bad fraction, or a chosen index that is not a failure.
    """
    if not 0 < query_fraction <= 1:
        raise ConfigError(
            f"Query fraction {query_fraction} must lie in (0, 1]. Use 0.5 to split "
            "the failures in half."
        )
    wrong = predictions.cpu() != labels.cpu()
    all_failures = torch.nonzero(wrong).flatten()
    if candidates is None:
        failures = all_failures
    else:
        failures = torch.as_tensor(candidates, dtype=torch.long).unique()
        bad = failures[(failures < 0) | (failures >= len(labels))]
        if len(bad):
            raise ConfigError(
                f"Test index {bad[0].item()} is out of range 0..{len(labels) - 1}. "
                "Choose failures from this test set."
            )
        correct = failures[~wrong[failures]]
        if len(correct):
            raise ConfigError(
                f"Test example {correct[0].item()} is classified correctly, so it "
                "cannot be a failure. Choose only misclassified examples."
            )
    if len(failures) == 0 and candidates is None:
        raise EmptyFailureSetError(
            "The model classifies every test example correctly, so there is no "
            "failure to repair. Study a model that makes mistakes: one trained "
            "with a noise scenario, on fewer images or for fewer epochs."
        )
    if len(failures) == 0:
        raise EmptyFailureSetError(
            "No test example was chosen, so there is no failure to repair. Choose "
            "misclassified test examples."
        )

    generator = torch.Generator().manual_seed(seed)
    order = failures[torch.randperm(len(failures), generator=generator)]
    n_query = query_size(len(failures), query_fraction)
    remaining = torch.nonzero(~wrong).flatten()
    return FailureSplit(
        failures=failures.sort().values,
        query=order[:n_query].sort().values,
        holdout=order[n_query:].sort().values,
        remaining=remaining,
        query_fraction=query_fraction,
        seed=seed,
    )
