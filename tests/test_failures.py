"""The failure split."""

import pytest
import torch

from repair_core.errors import ConfigError, EmptyFailureSetError
from repair_core.failures import split_failures


def _predictions_with_failures(n=100, n_wrong=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    predictions = labels.clone()
    wrong = torch.randperm(n, generator=generator)[:n_wrong]
    predictions[wrong] = (labels[wrong] + 1) % 10
    return predictions, labels, wrong.sort().values


def test_split_partitions_failures():
    predictions, labels, wrong = _predictions_with_failures()

    split = split_failures(predictions, labels, query_fraction=0.5, seed=3)

    assert torch.equal(split.failures, wrong)
    assert len(split.query) == 15
    assert len(split.holdout) == 15
    union = torch.cat([split.query, split.holdout]).sort().values
    assert torch.equal(union, wrong)
    assert len(split.remaining) == 70
    assert not set(split.remaining.tolist()) & set(wrong.tolist())


def test_split_is_seeded():
    predictions, labels, _ = _predictions_with_failures()

    first = split_failures(predictions, labels, seed=1)
    again = split_failures(predictions, labels, seed=1)
    other = split_failures(predictions, labels, seed=2)

    assert torch.equal(first.query, again.query)
    assert not torch.equal(first.query, other.query)


def test_split_of_chosen_candidates():
    predictions, labels, wrong = _predictions_with_failures()

    split = split_failures(predictions, labels, candidates=wrong[:10], seed=0)

    assert torch.equal(split.failures, wrong[:10])
    assert len(split.query) + len(split.holdout) == 10


def test_empty_failure_set_is_clear_error():
    labels = torch.arange(10)

    with pytest.raises(
        EmptyFailureSetError, match="no failure to repair. Study a model that makes"
    ):
        split_failures(labels.clone(), labels)
    with pytest.raises(
        EmptyFailureSetError, match="^No test example was chosen, so there is no"
    ):
        split_failures(labels.clone(), labels, candidates=torch.zeros(0))


def test_correct_candidate_rejected():
    predictions, labels, wrong = _predictions_with_failures()
    correct = next(i for i in range(100) if i not in set(wrong.tolist()))

    with pytest.raises(ConfigError, match=f"Test example {correct} is classified"):
        split_failures(predictions, labels, candidates=torch.tensor([correct]))


def test_bad_query_fraction():
    predictions, labels, _ = _predictions_with_failures()

    with pytest.raises(ConfigError, match="Query fraction 1.5"):
        split_failures(predictions, labels, query_fraction=1.5)
