"""L2-regularised multinomial logistic regression in float64, trained to convergence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev

from tests.factories import blobs

L2 = 0.01
#: Newton's method stops once the max-norm of the objective's gradient is below
#: this, a little above float64 round-off for these losses of order one.
GRADIENT_TOLERANCE = 1e-11
MAX_NEWTON_STEPS = 50
#: Armijo constant of the backtracking line search.
SUFFICIENT_DECREASE = 1e-4
#: Below this Newton decrement g^T H^-1 g the predicted decrease of the objective
#: is too small to compare in float64, so the full Newton step is taken unchecked.
RESOLVABLE_DECREMENT = 1e-10


def fit_logistic(model: nn.Module, x, y, *, keep=None, l2: float = L2) -> nn.Module:
    """Minimise (1/N) sum_{i in keep} CE_i + (l2/2) ||theta||^2 in place.

    N stays the full training size when ``keep`` drops examples, so removal
    matches the influence-function counterfactual. The objective is strongly
    convex, so Newton's method with a backtracking line search converges to the
    unique minimum from any start, in a few steps from a warm start.

    Raises:
        RuntimeError: the gradient is still above ``GRADIENT_TOLERANCE`` after
            ``MAX_NEWTON_STEPS`` steps.
    """
    n = len(y)
    xs, ys = (x, y) if keep is None else (x[keep], y[keep])
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params = {
            name: part.view(shape)
            for name, part, shape in zip(names, theta.split(sizes), shapes, strict=True)
        }
        logits = functional_call(model, params, (xs,))
        loss = F.cross_entropy(logits, ys, reduction="sum") / n
        return loss + l2 / 2 * theta.pow(2).sum()

    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for _ in range(MAX_NEWTON_STEPS):
        gradient = grad(objective)(theta)
        if gradient.abs().max().item() <= GRADIENT_TOLERANCE:
            break
        step = torch.linalg.solve(jacrev(grad(objective))(theta), gradient)
        decrement = torch.dot(gradient, step).item()
        size = 1.0
        if decrement > RESOLVABLE_DECREMENT:
            value = objective(theta).item()
            while (
                objective(theta - size * step).item()
                > value - SUFFICIENT_DECREASE * size * decrement
            ):
                size /= 2
        theta = theta - size * step
    else:
        largest = gradient.abs().max().item()
        raise RuntimeError(
            f"Newton's method did not reach gradient {GRADIENT_TOLERANCE} in "
            f"{MAX_NEWTON_STEPS} steps (max gradient {largest:.3g})."
        )
    with torch.no_grad():
        for param, part in zip(model.parameters(), theta.split(sizes), strict=True):
            param.copy_(part.view_as(param))
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


def fitted_slope(predicted, actual) -> float:
    """Least-squares slope of ``actual`` on ``predicted`` (with an intercept).

    Rank correlation ignores the scale of scores, and the slope checks it. A
    score that estimates a change in log-likelihood should match that change
    one for one.
    """
    predicted = torch.as_tensor(predicted, dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64)
    centred = predicted - predicted.mean()
    return float((centred * (actual - actual.mean())).sum() / centred.pow(2).sum())
