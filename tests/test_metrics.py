"""Detection metrics on rankings whose results are worked out by hand."""

import torch

from repair_core.metrics import detection_summary, implicated_mask

# Six training examples: 0 is a 1 labelled 7, 3 is a 6 labelled 9, 4 is a 9
# labelled 6, 5 had its image corrupted but kept its label.
CLEAN = torch.tensor([1, 7, 1, 6, 9, 3])
GIVEN = torch.tensor([7, 7, 1, 9, 6, 3])
MASK = torch.tensor([True, False, False, True, True, True])


def test_flip_implicated_by_matching_failure():
    one_as_seven = implicated_mask(
        MASK, GIVEN, CLEAN, torch.tensor([1, 1]), torch.tensor([7, 7])
    )
    assert one_as_seven.tolist() == [True, False, False, False, False, False]

    two_kinds = implicated_mask(
        MASK, GIVEN, CLEAN, torch.tensor([9, 1, 2]), torch.tensor([6, 7, 3])
    )
    assert two_kinds.tolist() == [True, False, False, False, True, False]


def test_reverse_failure_implicates_nothing():
    # A 7 predicted as 1 is not what a 1 labelled 7 teaches the model.
    reverse = implicated_mask(MASK, GIVEN, CLEAN, torch.tensor([7]), torch.tensor([1]))
    assert not reverse.any()


def test_unchanged_labels_give_none():
    assert (
        implicated_mask(MASK, CLEAN, CLEAN, torch.tensor([1]), torch.tensor([7]))
        is None
    )


def test_summary_counts_implicated_in_top_fifth():
    n = 20
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 1, 2, 3]] = True
    implicated = torch.zeros(n, dtype=torch.bool)
    implicated[[2, 3]] = True
    scores = torch.zeros(n)
    scores[[0, 2, 10, 11]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # top 4 = top 20%

    summary = detection_summary(scores, mask, implicated)

    assert summary["n_implicated"] == 2
    assert summary["implicated_found_at_20pct"] == 0.5
    assert summary["found_at_20pct"] == 0.5
    assert "n_implicated" not in detection_summary(scores, mask)


def test_summary_without_implicated_is_none():
    mask = torch.tensor([True, False, False, False, False])
    summary = detection_summary(torch.arange(5.0), mask, torch.zeros(5, dtype=bool))

    assert summary["n_implicated"] == 0
    assert summary["implicated_found_at_20pct"] is None


def test_summary_without_corrupted_examples_has_no_shares():
    mask = torch.zeros(5, dtype=torch.bool)
    summary = detection_summary(torch.arange(5.0), mask, torch.zeros(5, dtype=bool))

    assert summary["n_corrupted"] == 0
    for key in ("found_at_10pct", "found_at_20pct", "precision_at_100"):
        assert summary[key] is None, key
    assert summary["implicated_found_at_20pct"] is None
