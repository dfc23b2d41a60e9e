import copy

import pytest
import torch
from scipy.stats import spearmanr

from repair_core.identification import (
    EWCInfluenceConfig,
    LinearInfluenceConfig,
    default_config,
    identify,
)
from repair_core.identification.base import summed_log_likelihood_gradient
from repair_core.ihvp import exact_ihvp, flatten, gd_ihvp, lissa
from repair_core.inference import eval_mode
from tests.convex import L2, fit_logistic, noisy_problem, query_log_likelihood

MIN_LOO_SPEARMAN = 0.8
MAX_SOLVER_RELATIVE_ERROR = 0.03
TOP_K = 10


@pytest.fixture(scope="module")
def problem():
    return noisy_problem()


def exact_config():
    return LinearInfluenceConfig(solver="exact", damping=L2)


def test_exact_tracks_leave_one_out(problem):
    model, x, y, qx, qy, _ = problem
    assert len(qy) >= 5
    scores = identify("linear-influence-exact", model, x, y, qx, qy, exact_config())
    base = query_log_likelihood(model, qx, qy)
    actual = []
    for i in range(len(y)):
        keep = torch.cat([torch.arange(i), torch.arange(i + 1, len(y))])
        refit = fit_logistic(copy.deepcopy(model), x, y, keep=keep)
        actual.append(query_log_likelihood(refit, qx, qy) - base)
    rho = spearmanr(scores.scores.numpy(), actual).statistic
    assert rho >= MIN_LOO_SPEARMAN


def test_iterative_solvers_match_exact(problem):
    model, x, y, qx, qy, _ = problem
    with eval_mode(model):
        g = flatten(summed_log_likelihood_gradient(model, qx, qy))
    exact = exact_ihvp(model, x, y, g, damping=L2)
    scale = 4.0
    via_lissa = lissa(
        model,
        x,
        y,
        g,
        scale=scale,
        damping=L2 / scale,
        depth=2000,
        batch_size=len(y),
    )
    via_gd = gd_ihvp(model, x, y, g, damping=L2, steps=3000, batch_size=None)
    for estimate in (via_lissa, via_gd):
        relative = ((estimate - exact).norm() / exact.norm()).item()
        assert relative <= MAX_SOLVER_RELATIVE_ERROR


def test_removing_top_ranked_raises_query_likelihood(problem):
    model, x, y, qx, qy, _ = problem
    base = query_log_likelihood(model, qx, qy)
    ewc = EWCInfluenceConfig(max_steps=300, min_steps=300, val_fraction=0.0, lr=0.01)
    for method, config in (
        ("linear-influence-exact", exact_config()),
        ("ewc-influence", ewc),
    ):
        scores = identify(method, model, x, y, qx, qy, config).scores
        top = torch.argsort(scores, descending=True)[:TOP_K]
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[top] = False
        refit = fit_logistic(copy.deepcopy(model), x, y, keep=keep)
        assert query_log_likelihood(refit, qx, qy) > base, method


def test_duplicate_failure_ranks_helpful(problem):
    model, x, y, qx, qy, _ = problem
    x2, y2 = torch.cat([x, qx[:1]]), torch.cat([y, qy[:1]])
    refit = fit_logistic(copy.deepcopy(model), x2, y2)
    ewc = EWCInfluenceConfig(max_steps=200, min_steps=200, val_fraction=0.0, lr=0.01)
    for method, config in (
        ("linear-influence-exact", exact_config()),
        ("ewc-influence", ewc),
    ):
        scores = identify(method, refit, x2, y2, qx, qy, config).scores
        rank_from_bottom = (scores < scores[-1]).sum().item()
        assert rank_from_bottom < len(scores) // 20, method


def test_lissa_and_gd_scores_agree_with_exact(problem):
    model, x, y, qx, qy, _ = problem
    exact = identify("linear-influence-exact", model, x, y, qx, qy, exact_config())
    config = default_config("linear-influence-lissa")
    config.damping = L2
    config.lissa_batch_size = len(y)
    config.lissa_depth = 1500
    via_lissa = identify("linear-influence-lissa", model, x, y, qx, qy, config)
    assert via_lissa.extras["scale"] > 0
    rho = spearmanr(exact.scores.numpy(), via_lissa.scores.numpy()).statistic
    assert rho > 0.99
