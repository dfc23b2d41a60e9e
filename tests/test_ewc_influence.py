import copy

import pytest
import torch
from torch import nn

from repair_core.errors import ConfigError, DivergenceError
from repair_core.ewc import EWCPenalty
from repair_core.fisher import detached_parameters
from repair_core.identification import (
    EWCInfluenceConfig,
    IdentificationContext,
    fit_failures,
    identify,
)
from tests.factories import blobs, mlp, train_briefly

POSTERIOR_TOLERANCE = 1e-4
QUADRATIC_TOLERANCE = 1e-9


def gaussian_log_likelihood(outputs, targets):
    """log N(y; f(x), 1) up to its constant."""
    return -0.5 * (outputs.squeeze(-1) - targets).pow(2)


def orthogonal_regression(n=64, d=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(n, d, generator=generator, dtype=torch.float64)
    )
    x = basis * torch.tensor([8.0, 6.0, 4.0, 3.0], dtype=torch.float64)
    theta = torch.randn(d, generator=generator, dtype=torch.float64)
    y = x @ theta + torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def test_fit_equals_gaussian_posterior_mean():
    x, y = orthogonal_regression()
    n = len(y)
    theta_hat = torch.linalg.lstsq(x, y).solution
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta_hat)
    # Orthogonal features make X^T X diagonal, so the Laplace posterior
    # N(theta_hat, (X^T X)^-1) is exactly the diagonal EWC prior with the true
    # Fisher F = diag(X^T X) / N (unit noise variance).
    fisher = {"weight": (x.pow(2).sum(0) / n).reshape(1, -1)}
    generator = torch.Generator().manual_seed(1)
    new_x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    new_y = new_x @ torch.ones(4, dtype=torch.float64) * 3
    config = EWCInfluenceConfig(lr=0.05, max_steps=1000, min_steps=0, val_fraction=0.0)
    fitted = fit_failures(
        model, fisher, n, new_x, new_y, config, log_likelihood=gaussian_log_likelihood
    )
    all_x, all_y = torch.cat([x, new_x]), torch.cat([y, new_y])
    posterior_mean = torch.linalg.solve(all_x.T @ all_x, all_x.T @ all_y)
    assert torch.allclose(
        fitted.weight.detach().flatten(), posterior_mean, atol=POSTERIOR_TOLERANCE
    )
    assert torch.equal(model.weight.detach().flatten(), theta_hat)


def test_penalty_zero_at_anchor_and_quadratic():
    x, y = blobs(40, dtype=torch.float64)
    model = mlp().double()
    anchor = detached_parameters(model)
    fisher = {n: torch.rand_like(p) for n, p in anchor.items()}
    penalty = EWCPenalty(fisher, anchor, n_train=40, fisher_weight=2.0, l2=0.5)
    assert penalty(model).item() == 0.0
    direction = {n: torch.randn_like(p) for n, p in anchor.items()}

    def at(t):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.copy_(anchor[name] + t * direction[name])
        return penalty(moved).item()

    base = at(1.0)
    assert base > 0
    for t in (0.5, 2.0, -3.0):
        assert abs(at(t) - t * t * base) <= QUADRATIC_TOLERANCE * base


def test_penalty_rejects_mismatched_keys():
    model = mlp()
    anchor = detached_parameters(model)
    fisher = {n: torch.ones_like(p) for n, p in list(anchor.items())[:1]}
    try:
        EWCPenalty(fisher, anchor, n_train=10)
    except ConfigError:
        return
    raise AssertionError("EWCPenalty accepted mismatched keys")


def test_fit_leaves_input_unchanged_and_restores_modes():
    x, y = blobs(60)
    model = train_briefly(mlp(), x, y)
    model.train()
    before = copy.deepcopy(model.state_dict())
    fisher = {
        n: torch.ones_like(p) * 1e-3 for n, p in detached_parameters(model).items()
    }
    config = EWCInfluenceConfig(max_steps=20, min_steps=5, eval_every=5)
    fitted = fit_failures(model, fisher, 60, x[:10], (y[:10] + 1) % 3, config)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(m.training for m in fitted.modules())
    assert not torch.equal(fitted[0].weight, model[0].weight)


def test_config_rejects_bad_values():
    for kwargs in (
        {"lr": 0},
        {"min_steps": 500},
        {"val_metric": "loss"},
        {"reduction": "max"},
        {"val_fraction": 1.0},
    ):
        try:
            EWCInfluenceConfig(**kwargs)
        except ConfigError:
            continue
        raise AssertionError(f"EWCInfluenceConfig accepted {kwargs}")


def test_extras_hold_fisher_and_fitted_state():
    x, y = blobs(60)
    model = train_briefly(mlp(), x, y)
    config = EWCInfluenceConfig(max_steps=20, min_steps=10, eval_every=5)
    result = identify("ewc-influence", model, x, y, x[:20], y[:20], config)
    assert set(result.extras["fisher"]) == set(detached_parameters(model))
    assert set(result.extras["fitted_state"]) == set(model.state_dict())
    reused = identify(
        "ewc-influence",
        model,
        x,
        y,
        x[:20],
        y[:20],
        config,
        context=IdentificationContext(fisher=result.extras["fisher"]),
    )
    assert torch.equal(reused.scores, result.scores)


@pytest.mark.parametrize("name", ["fisher_weight", "l2"])
def test_negative_weight_named_with_its_value(name):
    with pytest.raises(
        ConfigError, match=rf"^EWC-influence {name} -0\.5 must not be negative"
    ):
        EWCInfluenceConfig(**{name: -0.5})


def test_fit_names_non_finite_start():
    x, y = blobs(60)
    model = train_briefly(mlp(), x, y)
    fisher = {
        n: torch.ones_like(p) * 1e-3 for n, p in detached_parameters(model).items()
    }
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    config = EWCInfluenceConfig(max_steps=20, min_steps=5, eval_every=5)

    with pytest.raises(DivergenceError, match="at θ̂, before any step") as raised:
        fit_failures(model, fisher, 60, x[:10], y[:10], config)
    assert "Lower the lr" not in str(raised.value)
