"""Correctness tests of the treatments against closed forms, retraining and rules."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repair_core.errors import ConfigError, DivergenceError
from repair_core.fisher import diagonal_fisher
from repair_core.ihvp import SCALE_SEARCH_SHARE
from repair_core.inference import log_likelihoods
from repair_core.training import TrainConfig, split_validation, validation_size
from repair_core.treatments import (
    TREATMENTS,
    apply_treatment,
    default_config,
    read_causes_file,
    read_causes_table,
    repair,
    validate_causes,
)
from repair_core.treatments.base import TreatmentConfig, check_remaining
from repair_core.treatments.ewc_deletion import EWCDeletionConfig, ewc_delete
from repair_core.treatments.newton import NewtonConfig, newton_remove
from tests.factories_treatment import (
    frozen_stem_net,
    frozen_stem_problem,
    tiny_problem,
)

#: Relative error allowed between EWC-deletion and the Gaussian posterior mean.
GAUSSIAN_POSTERIOR_RTOL = 1e-4
#: ‖θ_newton − θ_retrain‖ / ‖θ_retrain − θ̂‖ allowed for a few removed points.
NEWTON_RELATIVE_DISTANCE = 0.2
#: ‖θ − θ̂‖ / ‖θ̂‖ allowed for EWC-deletion with a very strong Fisher term.
STRONG_FISHER_MAX_RELATIVE_MOVE = 1e-3


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


# --- EWC-deletion -----------------------------------------------------------


def test_ewc_deletion_matches_gaussian_posterior():
    # Linear-Gaussian regression with orthogonal feature columns: the
    # posterior precision over D is diagonal, so the diagonal Fisher makes the
    # Laplace approximation exact and the optimum of the deletion objective is
    # the posterior mean given D\C.
    n, sigma, prior_precision = 40, 0.5, 1.0
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, 4, generator=generator, dtype=torch.float64))
    features = q * torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    weights = torch.randn(4, generator=generator, dtype=torch.float64)
    noise = sigma * torch.randn(n, generator=generator, dtype=torch.float64)
    targets = features @ weights + noise
    eye = torch.eye(4, dtype=torch.float64)

    precision = features.T @ features / sigma**2 + prior_precision * eye
    theta_hat = torch.linalg.solve(precision, features.T @ targets / sigma**2)
    causes = torch.tensor([1, 5, 9])
    kept = torch.tensor([i for i in range(n) if i not in causes.tolist()])
    kept_precision = features[kept].T @ features[kept] / sigma**2
    expected = torch.linalg.solve(
        kept_precision + prior_precision * eye,
        features[kept].T @ targets[kept] / sigma**2,
    )

    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta_hat[None])
    fisher = {"weight": (torch.diag(precision) / n)[None]}

    def gaussian_log_likelihood(outputs, y):
        return -((outputs.squeeze(-1) - y) ** 2) / (2 * sigma**2)

    # With the mean over C, gamma = 2|C|/N is the exact posterior weighting.
    config = EWCDeletionConfig(
        gamma=2 * len(causes) / n,
        early_stopping=False,
        max_steps=1000,
        lr=3e-2,
        batch_size=len(causes),
    )
    repaired, record = ewc_delete(
        model,
        features[causes],
        targets[causes],
        fisher,
        n,
        config,
        log_likelihood=gaussian_log_likelihood,
    )
    got = repaired.weight.detach()[0]

    assert record["steps_run"] == 1000
    assert (expected - theta_hat).norm() > 1e-2
    relative_error = (got - expected).norm() / (expected - theta_hat).norm()
    assert relative_error < GAUSSIAN_POSTERIOR_RTOL
    assert torch.equal(model.weight.detach()[0], theta_hat)


def test_ewc_deletion_sum_reduction_gamma():
    # With the sum over C the exact weighting is gamma = 2/N; the optimum is
    # the same point as with the mean and gamma = 2|C|/N.
    n, sigma = 30, 1.0
    generator = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=generator, dtype=torch.float64))
    features = q * torch.tensor([4.0, 5.0], dtype=torch.float64)
    targets = features @ torch.tensor([1.0, -2.0], dtype=torch.float64)
    targets = targets + sigma * torch.randn(n, generator=generator, dtype=torch.float64)
    precision = features.T @ features / sigma**2 + torch.eye(2, dtype=torch.float64)
    theta_hat = torch.linalg.solve(precision, features.T @ targets / sigma**2)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta_hat[None])
    fisher = {"weight": (torch.diag(precision) / n)[None]}
    causes = torch.tensor([0, 3])

    def gaussian_log_likelihood(outputs, y):
        return -((outputs.squeeze(-1) - y) ** 2) / (2 * sigma**2)

    results = []
    for reduction, gamma in (("mean", 2 * len(causes) / n), ("sum", 2 / n)):
        config = EWCDeletionConfig(
            gamma=gamma,
            reduction=reduction,
            early_stopping=False,
            max_steps=1000,
            lr=3e-2,
            batch_size=len(causes),
        )
        repaired, _ = ewc_delete(
            model,
            features[causes],
            targets[causes],
            fisher,
            n,
            config,
            log_likelihood=gaussian_log_likelihood,
        )
        results.append(repaired.weight.detach()[0])

    assert torch.allclose(results[0], results[1], rtol=GAUSSIAN_POSTERIOR_RTOL)


def test_ewc_deletion_lowers_log_p_causes():
    problem = tiny_problem()
    causes = problem.flipped
    before = log_likelihoods(
        problem.model, problem.train_images[causes], problem.train_labels[causes]
    ).sum()
    config = EWCDeletionConfig(gamma=0.05, early_stopping=False, max_steps=50)

    result = repair(
        "ewc-deletion",
        problem.model,
        problem.train_images,
        problem.train_labels,
        causes,
        problem.query_images,
        problem.query_labels,
        config,
    )
    after = log_likelihoods(
        result.model, problem.train_images[causes], problem.train_labels[causes]
    ).sum()

    assert after < before
    assert result.extras["log_p_causes_after"] < result.extras["log_p_causes_before"]
    assert result.extras["steps_run"] == 50


def test_ewc_deletion_strong_fisher_barely_moves():
    problem = tiny_problem()
    theta_hat = _flat(problem.model)

    def relative_move(gamma: float) -> float:
        config = EWCDeletionConfig(gamma=gamma, early_stopping=False, max_steps=50)
        result = repair(
            "ewc-deletion",
            problem.model,
            problem.train_images,
            problem.train_labels,
            problem.flipped,
            problem.query_images,
            problem.query_labels,
            config,
        )
        return ((_flat(result.model) - theta_hat).norm() / theta_hat.norm()).item()

    strong = relative_move(1e-7)
    # At γ = 1e9 the Fisher term is negligible, so Adam moves θ freely.
    free = relative_move(1e9)

    assert strong < STRONG_FISHER_MAX_RELATIVE_MOVE
    assert strong < 0.05 * free


def test_ewc_deletion_early_stopping_keeps_best_query_accuracy():
    problem = tiny_problem()
    fisher = diagonal_fisher(problem.model, problem.train_images, problem.train_labels)
    config = EWCDeletionConfig(gamma=0.05, max_steps=200, eval_every=5, patience=50)

    result = repair(
        "ewc-deletion",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
        fisher=fisher,
    )
    history = result.extras["history"]
    best = max(record["query_acc"] for record in history)
    kept = [r for r in history if r["step"] == result.extras["best_step"]][0]
    query_correct = result.model(problem.query_images).argmax(1) == problem.query_labels

    assert kept["query_acc"] == best
    assert query_correct.float().mean().item() == pytest.approx(best)
    assert result.extras["steps_run"] <= result.extras["best_step"] + 50


def _deletion_extras(config: EWCDeletionConfig) -> dict:
    problem = tiny_problem()
    result = repair(
        "ewc-deletion",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
    )
    return result.extras


def test_ewc_deletion_retain_guard_stops():
    # A free, fast unlearning of C also loses accuracy on D\C, which ends the
    # run at the first evaluation past the allowed drop.
    config = EWCDeletionConfig(
        gamma=1e9, lr=1e-2, early_stopping=False, max_steps=300, eval_every=5
    )

    extras = _deletion_extras(config)

    history = extras["history"]
    before = extras["retain_acc_before"]
    assert extras["stopped_by"] == "retain_drop"
    assert extras["stopped_by_retain"] is True
    assert extras["steps_run"] < config.max_steps
    assert history[-1]["retain_acc"] < before - config.retain_drop
    assert all(r["retain_acc"] >= before - config.retain_drop for r in history[:-1])
    # The parameters kept are those of the last evaluation within the drop.
    assert extras["best_step"] == history[-2]["step"]


def test_ewc_deletion_names_other_stop_reasons():
    free = EWCDeletionConfig(
        gamma=1e9, lr=1e-2, early_stopping=False, max_steps=40, retain_drop=1.0
    )
    # Steps of 1e-12 change no prediction, so F_q accuracy never rises.
    stalled = EWCDeletionConfig(lr=1e-12, max_steps=300, eval_every=5, patience=20)

    assert _deletion_extras(free)["stopped_by"] == "max_steps"
    stalled_extras = _deletion_extras(stalled)
    assert stalled_extras["stopped_by"] == "patience"
    assert stalled_extras["steps_run"] == 20
    # Patience that runs out at the last step still names patience.
    last = dataclasses.replace(stalled, max_steps=20)
    assert _deletion_extras(last)["stopped_by"] == "patience"


def test_ewc_deletion_needs_query_for_early_stopping():
    problem = tiny_problem()
    fisher = diagonal_fisher(problem.model, problem.train_images, problem.train_labels)

    with pytest.raises(ConfigError, match="no query set was given"):
        ewc_delete(
            problem.model,
            problem.train_images[:5],
            problem.train_labels[:5],
            fisher,
            len(problem.train_labels),
            EWCDeletionConfig(),
        )


# --- Newton update removal ---------------------------------------------------


def _fit_logistic(features, labels, l2_sum, model):
    # Minimise sum_n CE_n + (l2_sum / 2) ||theta||^2 to high precision.
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
        loss = F.cross_entropy(model(features), labels, reduction="sum")
        loss = loss + l2_sum / 2 * _flat_with_grad(model).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def _flat_with_grad(model):
    return torch.cat([p.flatten() for p in model.parameters()])


def test_newton_exact_matches_retraining():
    # L2-regularised logistic regression in float64. θ̂ minimises
    # mean_D CE + (l2/2)||θ||², i.e. sum_D CE + (N l2/2)||θ||². Retraining on
    # D\C keeps the same prior: sum_{D\C} CE + (N l2/2)||θ||².
    n, dim, l2 = 200, 3, 0.05
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    true_w = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    logits = features @ true_w
    labels = (
        torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(logits)
    ).long()
    torch.manual_seed(0)
    base = nn.Linear(dim, 2).double()
    theta_hat_model = _fit_logistic(features, labels, n * l2, base)
    causes = torch.tensor([3, 17, 42])
    kept = torch.tensor([i for i in range(n) if i not in causes.tolist()])
    # The objective is strictly convex, so a warm start reaches the same optimum.
    retrained = nn.Linear(dim, 2).double()
    retrained.load_state_dict(theta_hat_model.state_dict())
    retrained = _fit_logistic(features[kept], labels[kept], n * l2, retrained)
    config = NewtonConfig(gamma=1.0, curvature="hessian", solver="exact", damping=l2)

    repaired, record = newton_remove(theta_hat_model, features, labels, causes, config)
    theta_hat = _flat(theta_hat_model)
    theta_retrain = _flat(retrained)
    distance = (_flat(repaired) - theta_retrain).norm()

    assert (theta_retrain - theta_hat).norm() > 1e-3
    assert distance / (theta_retrain - theta_hat).norm() < NEWTON_RELATIVE_DISTANCE
    assert record["step_norm"] > 0


@pytest.mark.parametrize("scale", [50.0, None])
def test_newton_lissa_lowers_log_p_causes(scale):
    problem = tiny_problem()
    causes = problem.flipped
    before = log_likelihoods(
        problem.model, problem.train_images[causes], problem.train_labels[causes]
    ).sum()
    # None searches a stable scale instead of taking a fixed one.
    config = NewtonConfig(gamma=1.0, depth=50, scale=scale)

    result = repair(
        "newton",
        problem.model,
        problem.train_images,
        problem.train_labels,
        causes,
        problem.query_images,
        problem.query_labels,
        config,
    )
    after = log_likelihoods(
        result.model, problem.train_images[causes], problem.train_labels[causes]
    ).sum()

    assert after < before


# --- Fine-tuning and retraining ---------------------------------------------


@pytest.mark.parametrize("treatment", ["finetune", "retrain"])
def test_training_treatment_never_sees_causes(treatment):
    problem = tiny_problem()
    causes = problem.flipped
    train_config = dataclasses.replace(problem.train_config, record_trajectory=True)
    seen = []

    def record(fraction, message):
        seen.append(fraction)

    result = repair(
        treatment,
        problem.model,
        problem.train_images,
        problem.train_labels,
        causes,
        problem.query_images,
        problem.query_labels,
        train_config=train_config,
        progress=record,
    )
    trained_on = torch.cat(result.extras["trajectory"].steps)

    assert len(trained_on) > 0
    assert not torch.isin(trained_on, causes).any()
    assert result.extras["n_trained_on"] == len(problem.train_labels) - len(causes)
    assert seen


def test_retrain_starts_from_fresh_weights():
    problem = tiny_problem()
    config = dataclasses.replace(default_config("retrain"), max_epochs=1)
    fresh_copy = []

    def factory():
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4)
        )
        fresh_copy.append(_flat(model))
        return model

    result = repair(
        "retrain",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
        train_config=problem.train_config,
        model_factory=factory,
    )
    theta_hat = _flat(problem.model)
    retrained = _flat(result.model)

    assert len(fresh_copy) == 1
    # One epoch from fresh weights stays nearer them than to θ̂.
    assert (retrained - fresh_copy[0]).norm() < (retrained - theta_hat).norm()


def test_retrain_resets_parameters_without_factory():
    problem = tiny_problem()
    config = dataclasses.replace(default_config("retrain"), max_epochs=1)

    first = repair(
        "retrain",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
        train_config=problem.train_config,
    )
    second = repair(
        "retrain",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        dataclasses.replace(config, seed=1),
        train_config=problem.train_config,
    )

    assert not torch.equal(_flat(first.model), _flat(problem.model))
    assert not torch.equal(_flat(first.model), _flat(second.model))


@pytest.mark.parametrize("use_factory", [True, False])
def test_retrain_keeps_frozen_stem_and_input_mean(use_factory):
    problem = frozen_stem_problem()
    trained = problem.model
    built = []

    def factory():
        model = frozen_stem_net()
        built.append(copy.deepcopy(model))
        return model

    result = repair(
        "retrain",
        trained,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        {"seed": 3, "max_epochs": 2},
        train_config=problem.train_config,
        model_factory=factory if use_factory else None,
    )
    retrained = result.model

    if use_factory:
        assert len(built) == 1
        assert not torch.equal(built[0].stem[0].weight, trained.stem[0].weight)
        assert not torch.equal(built[0].input_mean, trained.input_mean)
    for name, parameter in trained.stem.named_parameters():
        copied = retrained.stem.get_parameter(name)
        assert torch.equal(copied, parameter), f"stem.{name} differs"
        assert not copied.requires_grad, f"stem.{name} is trainable"
    assert torch.equal(retrained.input_mean, trained.input_mean)
    assert not torch.equal(retrained.head.weight, trained.head.weight)
    assert retrained.head.weight.requires_grad


@pytest.mark.parametrize("use_factory", [True, False])
def test_retrain_estimates_batchnorm_statistics_again(use_factory):
    problem = frozen_stem_problem()
    trained_norm = problem.model.stem[1]
    train_config = dataclasses.replace(problem.train_config, batch_size=32)

    result = repair(
        "retrain",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        {"seed": 3, "max_epochs": 2},
        train_config=train_config,
        model_factory=frozen_stem_net if use_factory else None,
    )
    norm = result.model.stem[1]
    n_remaining = len(problem.train_labels) - len(problem.flipped)
    n_fit = n_remaining - validation_size(n_remaining, train_config.val_fraction)
    steps_per_epoch = -(-n_fit // train_config.batch_size)
    best_epoch = result.extras["best_epoch"]

    # Counting from θ̂'s count would add the batches of θ̂'s training run.
    assert trained_norm.num_batches_tracked.item() > 0
    assert norm.num_batches_tracked.item() == best_epoch * steps_per_epoch
    assert not torch.equal(norm.running_mean, trained_norm.running_mean)
    assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_retrain_keeps_frozen_weight_beside_trainable_bias():
    # reset_parameters of the linear layer redraws its weight and bias, so
    # the frozen weight has to be restored after the reset.
    problem = tiny_problem()
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    model[1].weight.requires_grad_(False)

    result = repair(
        "retrain",
        model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        {"max_epochs": 1},
        train_config=problem.train_config,
    )

    assert torch.equal(result.model[1].weight, model[1].weight)
    assert not result.model[1].weight.requires_grad
    assert not torch.equal(result.model[1].bias, model[1].bias)


def test_retrain_rejects_factory_without_frozen_stem():
    problem = frozen_stem_problem()

    def factory():
        return nn.Sequential(
            nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    with pytest.raises(ConfigError, match="without the frozen parameter 'stem.0"):
        repair(
            "retrain",
            problem.model,
            problem.train_images,
            problem.train_labels,
            problem.flipped,
            problem.query_images,
            problem.query_labels,
            {"max_epochs": 1},
            train_config=problem.train_config,
            model_factory=factory,
        )


# --- Fitting the failures ---------------------------------------------------


@pytest.mark.parametrize("treatment", ["fit-failures", "fit-failures+ewc-deletion"])
def test_fit_treatments_raise_query_accuracy(treatment):
    problem = tiny_problem()
    before = (
        (problem.model(problem.query_images).argmax(1) == problem.query_labels)
        .float()
        .mean()
    )

    fit = {"max_steps": 40, "min_steps": 20, "lr": 1e-2}
    config = {"fit": fit}
    if treatment != "fit-failures":
        config["deletion"] = {"max_steps": 40}

    result = repair(
        treatment,
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
    )
    after = (
        (result.model(problem.query_images).argmax(1) == problem.query_labels)
        .float()
        .mean()
    )

    assert before == 0
    assert after > before
    assert "fit" in result.extras


def test_repair_fit_failures_takes_empty_causes():
    # fit-failures removes nothing, so it needs no causes, as apply_treatment
    # and the command line accept.
    problem = tiny_problem()
    state = _state(problem.model)
    fit = {"max_steps": 20, "min_steps": 10, "lr": 1e-2}

    result = repair(
        "fit-failures",
        problem.model,
        problem.train_images,
        problem.train_labels,
        [],
        problem.query_images,
        problem.query_labels,
        {"fit": fit},
    )
    control = apply_treatment(
        "fit-failures",
        problem.model,
        problem.train_images,
        problem.train_labels,
        [],
        problem.query_images,
        problem.query_labels,
        {"fit": fit},
    )

    assert result.causes.tolist() == []
    assert "fit" in result.extras
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, control.model.state_dict()[key]), key
    _assert_same_state(problem.model, state)


@pytest.mark.parametrize(
    "treatment", [name for name in TREATMENTS if name != "fit-failures"]
)
def test_repair_removing_treatments_reject_empty_causes(treatment):
    problem = tiny_problem()

    with pytest.raises(ConfigError, match="list of causes is empty"):
        repair(
            treatment,
            problem.model,
            problem.train_images,
            problem.train_labels,
            [],
            problem.query_images,
            problem.query_labels,
        )


@pytest.mark.parametrize("fit_first", [False, True])
def test_fit_and_delete_reports_inside_steps(fit_first):
    problem = tiny_problem()
    calls = []
    config = {
        "fit": {"max_steps": 20, "min_steps": 0, "eval_every": 5},
        "deletion": {"max_steps": 20, "eval_every": 5},
        "fit_first": fit_first,
    }

    repair(
        "fit-failures+ewc-deletion",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
        progress=lambda fraction, message: calls.append(fraction),
    )

    # Each step reports inside its half of the bar, so a stop request ends
    # it at its next report instead of after it.
    assert any(0 < fraction < 0.5 for fraction in calls)
    assert any(0.5 < fraction < 1 for fraction in calls)
    assert calls == sorted(calls)
    assert calls[-1] == 1.0


# --- Causes validation and the public interface -----------------------------


def test_validate_causes_sorts_and_drops_duplicates():
    causes = validate_causes([5, 1, 5, 3], 10)

    assert causes.tolist() == [1, 3, 5]
    assert causes.dtype == torch.int64
    assert validate_causes({5, 1, 3}, 10).tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    ("causes", "message"),
    [
        ([], "list of causes is empty"),
        ([3, 10], r"Training index 10 is out of range 0\.\.9"),
        ([-1], r"Training index -1 is out of range 0\.\.9"),
        (list(range(10)), "cover all 10 training examples"),
        ([0.5, 1.0], "integer training indices"),
        ("abc", r"^Causes must be integer training indices, got text 'abc'\."),
        (None, r"^Causes are None\. Pass integer training indices"),
        (["4", "7"], r"got text \"\['4', '7'\]\"\. Pass indices such as"),
    ],
)
def test_validate_causes_rejects_bad_input(causes, message):
    with pytest.raises(ConfigError, match=message):
        validate_causes(causes, 10)


@pytest.mark.parametrize("treatment", ["finetune", "newton"])
def test_repair_names_nan_training_image(treatment):
    problem = tiny_problem()
    state = _state(problem.model)
    images = problem.train_images.clone()
    images[5] = float("nan")

    with pytest.raises(ConfigError, match="Training image 5 contains NaN"):
        repair(
            treatment,
            problem.model,
            images,
            problem.train_labels,
            problem.flipped,
            problem.query_images,
            problem.query_labels,
        )
    _assert_same_state(problem.model, state)


def test_read_causes_file(tmp_path):
    path = tmp_path / "causes.txt"
    path.write_text("4\n\n 2 \n")

    assert read_causes_file(path, 10).tolist() == [2, 4]


def test_read_causes_file_accepts_bom(tmp_path):
    path = tmp_path / "causes.txt"
    path.write_bytes("3\r\n7\r\n".encode("utf-8-sig"))

    assert read_causes_file(path, 10).tolist() == [3, 7]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"4\n2\n4\n", r"Line 3 of .* repeats training index 4 from line 1"),
        (b"4\n" + b"9" * 23 + b"\n", r"Line 2 of .* 9{23} is out of range 0\.\.9"),
        (
            b"4\n" + b"9" * 5000 + b"\n",
            r"Line 2 of .* index 9{40}… \(5000 characters\) is out of range 0\.\.9",
        ),
        (b"x" * 100 + b"\n", r"Line 1 of .* is 'x{40}… \(100 characters\)', not an"),
        (b"\xff\xfe4\x00\n", "is not UTF-8 text"),
        (
            "train_index,given_label\n4,s\u00e9ptima\n".encode("latin-1"),
            "is not UTF-8 text. Save it with UTF-8 encoding, .* or as CSV with a",
        ),
        (b"4\n5_0\n", r"Line 2 of .* is '5_0', not an integer"),
        ("4\n\u0663\n".encode(), r"Line 2 of .* is '\u0663', not an integer"),
        (b"4\n-3\n", r"Line 2 of .* training index -3 is out of range 0\.\.9"),
        (b"\n \n\n", r"Causes file .* lists no training index"),
        (b"".join(b"%d\n" % i for i in range(10)), r"Causes file .* lists all 10"),
        # CSV files, read from their train_index column.
        (b"rank,train_index\n1,4\n2\n", r"Line 3 of .* has no 'train_index' value"),
        (b"rank,train_index\n1,4\n2,x\n", r"Line 3 of .* has train_index 'x', not"),
        (b"train_index,rank\n4,1\n4,2\n", r"Line 3 of .* repeats training index 4"),
        (b"train_index,rank\n", r"has a 'train_index' header but no rows"),
        (b"train_index,train_index\n4,4\n", r"names 'train_index' 2 times"),
        (b"train_index,scores_id,scores_id\n4,a,b\n", r"names 'scores_id' 2 times"),
        (
            b'train_index,label\n4,"open\n5,x\n6,y\n',
            r"Line 2 of .* starts a row that is not valid CSV",
        ),
        (b"train_index,label\n ,a\n3,b\n", r"Line 2 of .* has an empty 'train_index'"),
        (b'label,train_index\n"a\nb",x\n', r"Line 2 of .* has train_index 'x', not an"),
        # Without a train_index column, a comma is not an index.
        (b"index,rank\n4,1\n", r"Line 1 of .* is 'index,rank', a CSV header withou"),
        (b"4\n5,6\n", r"Line 2 of .* is '5,6', several training indices on one"),
    ],
)
def test_read_causes_file_rejects_bad_content(tmp_path, content, message):
    path = tmp_path / "causes.txt"
    path.write_bytes(content)

    with pytest.raises(ConfigError, match=message):
        read_causes_file(path, 10)


@pytest.mark.parametrize(
    ("name", "problem"),
    [("a" * 300, "is too long for the file system"), ("a\0b", "contains a NUL")],
)
def test_read_causes_file_rejects_unusable_path(tmp_path, name, problem):
    with pytest.raises(ConfigError, match=f"Causes file .* {problem}"):
        read_causes_file(tmp_path / name, 10)


def test_read_causes_file_reads_csv_export(tmp_path):
    path = tmp_path / "culprits.csv"
    path.write_text(
        "train_index,rank,given_label,corrupted\n"
        '7,1,"seven, handwritten",True\n'
        "\n"
        "2,2,two,False\n"
    )

    assert read_causes_file(path, 10).tolist() == [2, 7]


@pytest.mark.parametrize(
    "content",
    [
        "train_index\n5\n7\n",
        '"train_index"\r\n"5"\r\n"7"\r\n',
        # A quoted field may hold a line break; the rows still count.
        'label,train_index\n"multi\nline",5\n"x\u2028y",7\n',
        # Spreadsheets in locales with a decimal comma separate fields with
        # semicolons, or with tabs when copied.
        "train_index;score\n5;0,25\n7;0,5\n",
        "score\ttrain_index\n0.25\t5\n0.5\t7\n",
    ],
)
def test_read_causes_file_reads_other_csv(tmp_path, content):
    path = tmp_path / "causes.csv"
    path.write_bytes(content.encode())

    assert read_causes_file(path, 10).tolist() == [5, 7]


def test_read_causes_table_returns_source_ids(tmp_path):
    path = tmp_path / "culprits.csv"
    path.write_text(
        "train_index,scores_id,repair_id,method\n"
        "5,sc-00000001,,ewc-influence\n"
        "7,sc-00000001,,ewc-influence\n"
        "2,sc-00000002,rp-00000003,ewc-influence\n"
    )

    indices, sources = read_causes_table(path, 10)

    assert indices.tolist() == [2, 5, 7]
    assert sources == {
        "scores_id": {"sc-00000001": 2, "sc-00000002": 4},
        "repair_id": {"rp-00000003": 4},
    }
    plain = tmp_path / "causes.txt"
    plain.write_text("5\n7\n")
    assert read_causes_table(plain, 10)[1] == {}


def test_read_causes_file_names_csv_row_line(tmp_path):
    path = tmp_path / "causes.csv"
    path.write_text('train_index,label\n5,"two\nlines"\nx,y\n')

    with pytest.raises(ConfigError, match=r"Line 4 of .* has train_index 'x', not"):
        read_causes_file(path, 10)


def test_read_causes_file_counts_lines_as_editors(tmp_path):
    # A form feed is not a line break, so "2\f3" is one bad line rather than
    # two indices, and after it "x" is still counted as line 4.
    path = tmp_path / "causes.txt"
    path.write_text("1\n2\f3\n4\nx\n")

    with pytest.raises(ConfigError, match=r"Line 2 of .* is '2\\x0c3', not an"):
        read_causes_file(path, 10)
    path.write_text("1\n2\f\n4\nx\n")
    with pytest.raises(ConfigError, match=r"Line 4 of .* is 'x', not an"):
        read_causes_file(path, 10)


def test_read_causes_file_rejects_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        read_causes_file(tmp_path, 10)


@pytest.mark.parametrize("header", ["a,b", "Train-Index;score", "index\tscore"])
def test_read_causes_file_names_missing_index_column(tmp_path, header):
    path = tmp_path / "causes.csv"
    path.write_text(f"{header}\n1,2\n")

    with pytest.raises(
        ConfigError,
        match=rf"^Line 1 of .* is {re.escape(repr(header))}, a CSV header without "
        r"a 'train_index' column\.",
    ):
        read_causes_file(path, 10)


@pytest.mark.parametrize(
    "header", ["Train_Index", " TRAIN_INDEX ;Label", "label\t train_index"]
)
def test_read_causes_file_header_ignores_case_and_spaces(tmp_path, header):
    delimiter = ";" if ";" in header else "\t" if "\t" in header else ","
    rows = ["4", "7"] if delimiter == "," else ["4;a", "7;b"]
    if header.startswith("label"):
        rows = ["a\t4", "b\t7"]
    path = tmp_path / "causes.csv"
    path.write_text("\n".join([header, *rows]) + "\n")

    assert read_causes_file(path, 10).tolist() == [4, 7]


@pytest.mark.parametrize(
    ("text", "line", "entry"),
    [
        ("1,2,3\n", 1, "1,2,3"),
        ("1; 2\n", 1, "1; 2"),
        ("5\n6 7\n", 2, "6 7"),
    ],
)
def test_read_causes_file_names_several_indices_on_line(tmp_path, text, line, entry):
    path = tmp_path / "causes.txt"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        read_causes_file(path, 10)

    message = str(caught.value)
    assert message.startswith(f"Line {line} of {str(path)!r} is {entry!r}, several ")
    assert "Write one index per line" in message
    assert "CSV header" not in message


def test_read_causes_file_unreadable():
    # Reading /proc/self/mem from its start fails with an I/O error, which a
    # permission check cannot avoid even for root.
    unreadable = Path("/proc/self/mem")
    if not unreadable.is_file():
        pytest.skip("needs Linux's /proc/self/mem")
    with pytest.raises(
        ConfigError, match=r"^Causes file .* could not be read \(Input/output error\)"
    ):
        read_causes_file(unreadable, 10)


def test_read_causes_file_rejects_non_integer_line(tmp_path):
    path = tmp_path / "causes.txt"
    path.write_text("4\n\n7x\n")

    with pytest.raises(ConfigError, match=r"Line 3 of .* is '7x', not an integer"):
        read_causes_file(path, 10)


def test_read_causes_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_causes_file(tmp_path / "absent.txt", 10)


@pytest.mark.parametrize(
    ("causes", "message"),
    [
        ([], "list of causes is empty"),
        ([100_000], "out of range"),
        ("all", "cover all"),
    ],
)
def test_repair_bad_causes_leave_model_unchanged(causes, message):
    problem = tiny_problem()
    state = _state(problem.model)
    if causes == "all":
        causes = list(range(len(problem.train_labels)))

    with pytest.raises(ConfigError, match=message):
        repair(
            "finetune",
            problem.model,
            problem.train_images,
            problem.train_labels,
            causes,
            problem.query_images,
            problem.query_labels,
        )
    _assert_same_state(problem.model, state)


def _short_config(treatment: str) -> TreatmentConfig:
    config = default_config(treatment)
    if treatment == "newton":
        config = dataclasses.replace(config, depth=20, scale=50.0)
    if treatment in ("finetune", "retrain"):
        config = dataclasses.replace(config, max_epochs=1)
    if treatment == "ewc-deletion":
        config = dataclasses.replace(config, max_steps=20)
    if treatment.startswith("fit-failures"):
        short_fit = dataclasses.replace(config.fit, max_steps=20, min_steps=10)
        config = dataclasses.replace(config, fit=short_fit)
    if treatment == "fit-failures+ewc-deletion":
        short_deletion = dataclasses.replace(config.deletion, max_steps=20)
        config = dataclasses.replace(config, deletion=short_deletion)
    return config


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_repair_never_modifies_input_model(treatment):
    problem = tiny_problem()
    state = _state(problem.model)
    config = _short_config(treatment)

    result = repair(
        treatment,
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped.tolist(),
        problem.query_images,
        problem.query_labels,
        config,
        train_config=problem.train_config,
    )

    _assert_same_state(problem.model, state)
    assert result.model is not problem.model
    assert result.treatment == treatment
    assert result.causes.tolist() == problem.flipped.tolist()
    assert result.seconds > 0
    assert result.config == config.to_dict()


@pytest.mark.parametrize("treatment", [*TREATMENTS, "newton-scale-search"])
def test_repair_progress_rises_to_one(treatment):
    problem = tiny_problem()
    config = _short_config(treatment.removesuffix("-scale-search"))
    if treatment == "newton-scale-search":
        treatment, config = "newton", dataclasses.replace(config, scale=None)
    calls = []

    repair(
        treatment,
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        config,
        train_config=problem.train_config,
        progress=lambda fraction, message: calls.append((fraction, message)),
    )

    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions), calls
    assert calls[-1] == (1.0, f"{treatment} done")
    if config.to_dict().get("scale", 0) is None:
        searching = [f for f, message in calls if "scale search" in message]
        assert searching and max(searching) <= SCALE_SEARCH_SHARE


def test_repair_config_from_dict_and_errors():
    problem = tiny_problem()
    args = (
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
    )

    result = repair("ewc-deletion", *args, {"gamma": 0.01, "max_steps": 5})

    assert result.config["gamma"] == 0.01
    with pytest.raises(ConfigError, match="Unknown setting 'gama'"):
        repair("ewc-deletion", *args, {"gama": 0.01})
    with pytest.raises(ConfigError, match="takes EWCDeletionConfig"):
        repair("ewc-deletion", *args, NewtonConfig())
    with pytest.raises(ConfigError, match="Unknown treatment 'prune'"):
        repair("prune", *args)
    with pytest.raises(ConfigError, match="gamma -1"):
        EWCDeletionConfig(gamma=-1)
    with pytest.raises(ConfigError, match="Unknown solver"):
        NewtonConfig(solver="cg")
    with pytest.raises(ConfigError, match="Unknown setting 'steps' for EWCInf"):
        repair("fit-failures", *args, {"fit": {"steps": 3}})
    with pytest.raises(ConfigError, match="max_epochs 0"):
        repair("finetune", *args, {"max_epochs": 0})


def test_finetune_honours_train_config():
    problem = tiny_problem()
    train_config = TrainConfig(max_epochs=3, patience=3, batch_size=16, seed=5)

    result = repair(
        "finetune",
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        {"seed": 2, "max_epochs": 1},
        train_config=train_config,
    )

    assert result.extras["epochs_run"] == 1
    assert result.extras["train_config"]["seed"] == 2
    assert result.extras["train_config"]["batch_size"] == 16
    assert result.seed == 2


def _eval_mode(model: nn.Module) -> None:
    model.eval()


def _train_mode_with_dropout_off(model: nn.Module) -> None:
    model.train()
    model.dropout.eval()


@pytest.mark.parametrize("treatment", TREATMENTS)
@pytest.mark.parametrize("set_modes", [_eval_mode, _train_mode_with_dropout_off])
def test_repair_keeps_module_modes(treatment, set_modes):
    problem = frozen_stem_problem()
    set_modes(problem.model)
    modes = _modes(problem.model)

    result = repair(
        treatment,
        problem.model,
        problem.train_images,
        problem.train_labels,
        problem.flipped,
        problem.query_images,
        problem.query_labels,
        _short_config(treatment),
        train_config=problem.train_config,
    )

    assert _modes(result.model) == modes
    assert _modes(problem.model) == modes


@pytest.mark.parametrize("treatment", ["finetune", "retrain"])
def test_repair_rejects_causes_leaving_one_example(treatment):
    problem = tiny_problem()
    state = _state(problem.model)
    n_train = len(problem.train_labels)
    seen = []

    with pytest.raises(ConfigError) as raised:
        repair(
            treatment,
            problem.model,
            problem.train_images,
            problem.train_labels,
            range(n_train - 1),
            problem.query_images,
            problem.query_labels,
            train_config=problem.train_config,
            progress=lambda fraction, message: seen.append(message),
        )
    message = str(raised.value)

    assert f"The causes name {n_train - 1} of the {n_train} training" in message
    assert f"Name at most {n_train - 2} causes." in message
    assert "smaller validation fraction" not in message
    assert seen == []
    _assert_same_state(problem.model, state)


def test_finetune_accepts_causes_leaving_two_examples():
    problem = tiny_problem()
    n_train = len(problem.train_labels)

    result = repair(
        "finetune",
        problem.model,
        problem.train_images,
        problem.train_labels,
        range(n_train - 2),
        problem.query_images,
        problem.query_labels,
        {"max_epochs": 1},
        train_config=problem.train_config,
    )

    assert result.extras["n_trained_on"] == 2


@pytest.mark.parametrize(
    ("val_fraction", "max_causes"),
    [(0.1, 98), (0.5, 98), (0.75, 97), (0.9, 95)],
)
def test_check_remaining_matches_validation_split(val_fraction, max_causes):
    n_train = 100

    check_remaining("finetune", max_causes, n_train, val_fraction)
    split_validation(n_train - max_causes, val_fraction, seed=0)
    with pytest.raises(ConfigError, match=f"Name at most {max_causes} causes"):
        check_remaining("finetune", max_causes + 1, n_train, val_fraction)
    with pytest.raises(ConfigError, match="Cannot hold out|at least 2 examples"):
        split_validation(n_train - max_causes - 1, val_fraction, seed=0)


def test_apply_treatment_rejects_too_small_training_set():
    problem = tiny_problem()
    train_config = dataclasses.replace(problem.train_config, val_fraction=0.9)

    with pytest.raises(
        ConfigError, match="The training set has 4 of the 5 examples needed"
    ):
        apply_treatment(
            "retrain",
            problem.model,
            problem.train_images[:4],
            problem.train_labels[:4],
            torch.tensor([], dtype=torch.long),
            problem.query_images,
            problem.query_labels,
            default_config("retrain"),
            train_config=train_config,
        )


def _repair(problem, treatment, model, causes, config=None, *, entry=repair, **options):
    """Repair ``model`` on the tiny problem's data and query failures with
    ``entry``: repair, or apply_treatment, which also takes empty causes."""
    return entry(
        treatment,
        model,
        problem.train_images,
        problem.train_labels,
        causes,
        problem.query_images,
        problem.query_labels,
        config,
        **options,
    )


def _apply(problem, treatment, model, causes, config=None, **options):
    return _repair(
        problem, treatment, model, causes, config, entry=apply_treatment, **options
    )


@pytest.mark.parametrize(
    ("causes", "message"),
    [
        (torch.tensor([-1]), "Training index -1 is out of range"),
        (torch.tensor([1.0, 2.0]), "integer training indices, got dtype"),
        ("all", "cover all"),
    ],
)
def test_apply_treatment_checks_causes(causes, message):
    problem = tiny_problem()
    if isinstance(causes, str):
        causes = torch.arange(len(problem.train_labels))

    with pytest.raises(ConfigError, match=message):
        _apply(problem, "newton", problem.model, causes, _short_config("newton"))


def test_apply_treatment_counts_each_cause_once():
    problem = tiny_problem()
    config = _short_config("ewc-deletion")

    repeated = _apply(
        problem, "ewc-deletion", problem.model, torch.tensor([7, 3, 3, 3]), config
    )
    once = _apply(problem, "ewc-deletion", problem.model, torch.tensor([3, 7]), config)

    assert repeated.causes.tolist() == [3, 7]
    _assert_same_state(repeated.model, _state(once.model))


def test_repair_reports_device_and_accuracies():
    problem = tiny_problem()
    causes = problem.flipped[:5]

    result = _repair(
        problem, "newton", problem.model, causes.tolist(), _short_config("newton")
    )

    def accuracy(model, images, labels):
        with torch.no_grad():
            return (model(images).argmax(1) == labels).double().mean().item()

    assert result.device == "cpu"
    for name, images, labels in [
        ("query_acc", problem.query_images, problem.query_labels),
        ("causes_acc", problem.train_images[causes], problem.train_labels[causes]),
    ]:
        expected_before = accuracy(problem.model, images, labels)
        expected_after = accuracy(result.model, images, labels)
        assert result.metrics[name]["before"] == pytest.approx(expected_before)
        assert result.metrics[name]["after"] == pytest.approx(expected_after)


def test_empty_causes_no_causes_accuracy():
    problem = tiny_problem()

    result = _apply(
        problem,
        "finetune",
        problem.model,
        [],
        _short_config("finetune"),
        train_config=problem.train_config,
    )

    assert result.causes.tolist() == []
    assert result.metrics["causes_acc"] is None
    assert 0 <= result.metrics["query_acc"]["after"] <= 1


class _WithUnusedLayer(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_newton_ignores_unused_parameter():
    problem = tiny_problem()
    model = _WithUnusedLayer(copy.deepcopy(problem.model))
    reference = _repair(
        problem,
        "newton",
        problem.model,
        problem.flipped.tolist(),
        _short_config("newton"),
    )

    result = _repair(
        problem, "newton", model, problem.flipped.tolist(), _short_config("newton")
    )

    unused = dict(model.unused.named_parameters())
    for name, value in result.model.unused.named_parameters():
        torch.testing.assert_close(value, unused[name])
    with torch.no_grad():
        torch.testing.assert_close(
            result.model(problem.query_images), reference.model(problem.query_images)
        )


def test_newton_non_finite_step_raises():
    problem = tiny_problem()
    config = dataclasses.replace(_short_config("newton"), gamma=1e300)

    with pytest.raises(DivergenceError, match="The newton repair gave non-finite"):
        _repair(problem, "newton", problem.model, problem.flipped.tolist(), config)


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_frozen_model_is_rejected_by_name(treatment):
    problem = tiny_problem()
    model = copy.deepcopy(problem.model).requires_grad_(False)

    with pytest.raises(ConfigError, match="no trainable parameters"):
        _repair(
            problem,
            treatment,
            model,
            problem.flipped.tolist(),
            _short_config(treatment),
            train_config=problem.train_config,
        )


def test_repair_restores_random_stream():
    problem = tiny_problem()
    torch.manual_seed(5)
    expected = torch.rand(3)

    torch.manual_seed(5)
    _repair(
        problem,
        "finetune",
        problem.model,
        problem.flipped.tolist(),
        _short_config("finetune"),
        train_config=problem.train_config,
    )

    torch.testing.assert_close(torch.rand(3), expected)


def test_newton_exact_too_large_names_lissa_solver():
    x = torch.randn(10, 200)
    y = torch.arange(10) % 3
    model = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 3))

    with pytest.raises(ConfigError, match=r"Use the 'lissa' solver \(solver=lissa\)"):
        repair("newton", model, x, y, [0, 1], x[:2], y[:2], {"solver": "exact"})
