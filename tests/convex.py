"""L2-regularised multinomial logistic regression in float64, trained to convergence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.factories import blobs

L2 = 0.01


def fit_logistic(model: nn.Module, x, y, *, keep=None, l2: float = L2) -> nn.Module:
    """Minimise (1/N) sum_{i in keep} CE_i + (l2/2) ||theta||^2 with L-BFGS in place.

    N stays the full training size when ``keep`` drops examples, so removal
    matches the influence-function counterfactual."""
    n = len(y)
    xs, ys = (x, y) if keep is None else (x[keep], y[keep])
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xs), ys, reduction="sum") / n
        loss = loss + l2 / 2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def noisy_problem(n_train=150, n_test=300, seed=0, n_flips=15):
    """Blobs with some class-0 labels flipped to 1, and the test failures."""
    x, y = blobs(
        n_train + n_test,
        n_features=3,
        n_classes=3,
        seed=seed,
        dtype=torch.float64,
        spread=1.2,
    )
    train_x, train_y = x[:n_train], y[:n_train].clone()
    test_x, test_y = x[n_train:], y[n_train:]
    zeros = torch.nonzero(train_y == 0).flatten()[:n_flips]
    train_y[zeros] = 1
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[zeros] = True
    torch.manual_seed(seed)
    model = fit_logistic(nn.Linear(3, 3).double(), train_x, train_y)
    with torch.no_grad():
        wrong = model(test_x).argmax(1) != test_y
    return model, train_x, train_y, test_x[wrong], test_y[wrong], flipped


def query_log_likelihood(model, qx, qy) -> float:
    with torch.no_grad():
        return -F.cross_entropy(model(qx), qy, reduction="sum").item()
