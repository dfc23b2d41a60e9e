"""EWC-influence (Tanno et al. 2022): score by how much fitting the failures
under an EWC prior lowers each training example's likelihood.

1. Compute the diagonal empirical Fisher F at theta-hat over all N training
   examples.
2. Starting from theta-hat, maximise
   log p(F_q | theta) - (N/2) sum_i F_i (theta_i - theta-hat_i)^2
   - (lambda/2) ||theta - theta-hat||^2 with Adam, giving theta-hat_{+F}.
3. Score r(z) = log p(z | theta-hat) - log p(z | theta-hat_{+F}). A positive
   score means fitting the failures made z less likely, so z conflicts with
   them.

log p(F_q | theta) is a sum over the failures, as in the posterior
p(theta | D, F), so its weight against the (N/2) Fisher term grows with the
number of failures; ``reduction="mean"`` divides it by the number of fitted
failures instead.

How hard the fit is pushed decides the ranking. On mnist-embedded (3000
training images, reference CNN, label flips 1<->7 at 0.4 and 6<->9 at 0.3,
F_q = half the failures), minibatch epochs (batch 64) early-stopped on a 10%
validation split after about 14 steps put only 0.23 of the flipped labels in
the top 20% of the ranking. With full-batch Adam steps at lr 1e-3 on all of
F_q, the share in the top 20% for three base models trained with different
seeds was:

    steps       25     50    100    150    200    300
    model A  0.539  0.682  0.815  0.792  0.638  0.576
    model B  0.355  0.481  0.542  0.558  0.572  0.575
    model C  0.704  0.782  0.808  0.831  0.836  0.819

F_q is fitted (accuracy 0.93 to 1.0) by step 50 in each case, and fits
longer than about 150 steps lowered the ranking on model A, so F_q accuracy
alone cannot tell when to stop. The defaults therefore take full-batch
steps (gradients summed over chunks, so memory is bounded), always take
``min_steps`` = 100 steps, and only then let early stopping on the held-out
10% of F_q end the fit, choosing the best evaluation from ``min_steps`` on;
on model A that kept step 100 and gave 0.75, lower than 0.815 because 10%
of F_q is held out rather than fitted. The benchmark page repeats this study
on every base model it trains.

On model B no step count helps, because of what its failures show. Its F_q
has 58 failures of a 7 predicted as 1 and none of a 1 predicted as 7. So the
fit has no reason to lower the likelihood of the 113 images of 1 labelled 7.
None of them reached the top 20%, against 125 of the 129 images of 7
labelled 1. On full MNIST (1582 failures, whose F_q matches the kind of 0.80
of the flips) the default fit put 0.975 of the flipped labels in the top 20%.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from repair_core.errors import ConfigError, DivergenceError
from repair_core.ewc import EWCPenalty
from repair_core.fisher import (
    LogLikelihood,
    batch_log_likelihood,
    detached_parameters,
    diagonal_fisher,
    trainable_parameters,
)
from repair_core.identification.base import (
    IdentificationContext,
    check_finite,
    check_setting_types,
    log_likelihoods,
    option,
)
from repair_core.inference import model_device
from repair_core.progress import Progress, scaled_progress

logger = logging.getLogger(__name__)

VAL_METRICS = ("log-likelihood", "accuracy")
REDUCTIONS = ("sum", "mean")


@dataclass
class EWCInfluenceConfig:
    """Settings of the EWC-influence fit of the failures."""

    lr: float = option(1e-3, "Adam learning rate of the fit.")
    max_steps: int = option(300, "Upper bound on full-batch Adam steps.")
    min_steps: int = option(
        100, "Steps always taken before early stopping may end the fit."
    )
    patience_steps: int = option(
        50, "Steps without a better validation score before the fit stops."
    )
    eval_every: int = option(10, "Steps between validation evaluations.")
    val_fraction: float = option(
        0.1,
        "Share of F_q held out for early stopping; with fewer than 10 failures "
        "nothing is held out and the fit runs max_steps.",
    )
    val_metric: str = option(
        "log-likelihood",
        "Validation score: 'log-likelihood' (sum) or 'accuracy'.",
        VAL_METRICS,
    )
    reduction: str = option(
        "sum",
        "How log p(F_q) combines the failures: 'sum' (posterior) or 'mean'.",
        REDUCTIONS,
    )
    fisher_weight: float = option(1.0, "Multiplier on the (N/2) Fisher penalty.")
    l2: float = option(0.0, "Isotropic prior precision lambda around theta-hat.")
    fisher_batch_size: int = option(256, "Examples per batch of the Fisher.")
    chunk_size: int = option(
        512, "Examples per forward pass of a full-batch step; memory only."
    )
    seed: int = option(0, "Seed of the validation split.")

    def __post_init__(self) -> None:
        check_setting_types(self)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr)) or (
            self.lr <= 0
        ):
            raise ConfigError(f"EWC-influence lr {self.lr} must be positive.")
        for name in (
            "max_steps",
            "eval_every",
            "fisher_batch_size",
            "chunk_size",
            "patience_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"EWC-influence {name} {getattr(self, name)} must be at least 1."
                )
        if self.min_steps < 0:
            raise ConfigError(
                f"EWC-influence min_steps {self.min_steps} must not be negative."
            )
        if self.min_steps > self.max_steps:
            raise ConfigError(
                f"EWC-influence min_steps {self.min_steps} exceeds max_steps "
                f"{self.max_steps}. Lower min_steps or raise max_steps."
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(
                f"EWC-influence val_fraction {self.val_fraction} must lie in [0, 1)."
            )
        if self.val_metric not in VAL_METRICS:
            raise ConfigError(
                f"Unknown val_metric {self.val_metric!r}. Use one of "
                f"{', '.join(VAL_METRICS)}."
            )
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"Unknown reduction {self.reduction!r}. Use 'sum' or 'mean'."
            )
        for name in ("fisher_weight", "l2"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"EWC-influence {name} {getattr(self, name)} must not be "
                    "negative; 0 turns the term off."
                )


def _split_query(
    n: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(round(n * fraction))
    if n_val == 0 or n_val >= n:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _validation_score(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    metric: str,
    log_likelihood: LogLikelihood | None,
    chunk_size: int,
) -> float:
    device = model_device(model)
    params = detached_parameters(model)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(labels), chunk_size):
            x = images[start : start + chunk_size].to(device)
            y = labels[start : start + chunk_size].to(device)
            if metric == "accuracy":
                total += (model(x).argmax(1) == y).sum().item()
            else:
                total += (
                    batch_log_likelihood(model, params, x, y, log_likelihood)
                    .sum()
                    .item()
                )
    return total


def fit_failures_with_record(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    n_train: int,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: EWCInfluenceConfig,
    *,
    log_likelihood: LogLikelihood | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict]:
    """Run ``fit_failures`` and also return a record of the fit (steps, scores)."""
    if len(query_labels) == 0:
        raise ConfigError("The query failure set is empty, so there is nothing to fit.")
    fitted = copy.deepcopy(model)
    modes = {name: m.training for name, m in fitted.named_modules()}
    fitted.eval()
    device = model_device(fitted)
    params = trainable_parameters(fitted)
    if not params:
        raise ConfigError("The model has no trainable parameters, so it cannot be fit.")
    penalty = EWCPenalty(
        fisher,
        {name: p.detach() for name, p in params.items()},
        n_train=n_train,
        fisher_weight=config.fisher_weight,
        l2=config.l2,
    )
    fit_idx, val_idx = _split_query(len(query_labels), config.val_fraction, config.seed)
    fit_x, fit_y = query_images[fit_idx], query_labels[fit_idx]
    val_x, val_y = query_images[val_idx], query_labels[val_idx]
    weight = 1.0 / len(fit_y) if config.reduction == "mean" else 1.0
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)

    def penalised_loss(backward: bool) -> float:
        """-weight * log p(fit part of F_q) plus the penalty, with gradients
        accumulated into the parameters when ``backward``."""
        total = 0.0
        with torch.set_grad_enabled(backward):
            for start in range(0, len(fit_y), config.chunk_size):
                x = fit_x[start : start + config.chunk_size].to(device)
                y = fit_y[start : start + config.chunk_size].to(device)
                loss = (
                    -weight
                    * batch_log_likelihood(fitted, params, x, y, log_likelihood).sum()
                )
                if backward:
                    loss.backward()
                total += loss.item()
            reg = penalty(fitted)
            if backward:
                reg.backward()
        return total + reg.item()

    best_score, best_step = -math.inf, 0
    best_state = {name: p.detach().clone() for name, p in params.items()}
    history: list[dict[str, float]] = []
    step = 0
    start_objective = math.nan
    for step in range(1, config.max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        objective = penalised_loss(backward=True)
        if step == 1:
            start_objective = objective
        if not math.isfinite(objective) and step == 1:
            raise DivergenceError(
                f"EWC-influence fit objective is {objective} at θ̂, before any "
                "step, so the model's log-likelihood of F_q is not finite there. "
                "Check the model's outputs on the failures; a float16 model can "
                "overflow, so use float32."
            )
        if not math.isfinite(objective):
            raise DivergenceError(
                f"EWC-influence fit objective became {objective} at step {step}. "
                "Lower the lr of the fit."
            )
        optimizer.step()
        if progress is not None:
            progress(step / config.max_steps, f"Fitting failures: step {step}")
        if len(val_y) == 0 or step % config.eval_every:
            continue
        score = _validation_score(
            fitted, val_x, val_y, config.val_metric, log_likelihood, config.chunk_size
        )
        history.append({"step": step, "objective": objective, "val": score})
        if step < config.min_steps:
            continue
        if score > best_score:
            best_score, best_step = score, step
            best_state = {name: p.detach().clone() for name, p in params.items()}
        elif step - best_step >= config.patience_steps:
            break
    if len(val_y) == 0 or best_step == 0:
        best_step = step
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best_state[name])
    # The penalty is zero at theta-hat, so a fit that ends with a higher
    # penalised loss than it started with has overshot, not fitted F_q.
    end_objective = penalised_loss(backward=False)
    if not end_objective <= start_objective + 1e-6 * abs(start_objective):
        raise DivergenceError(
            f"The EWC fit of the failures ended with a penalised loss of "
            f"{end_objective:.4g}, above the {start_objective:.4g} it started "
            f"from at theta-hat: Adam at lr {config.lr:g} overshot. Lower the lr "
            "of the fit."
        )
    for name, module in fitted.named_modules():
        module.train(modes[name])
    fitted.zero_grad(set_to_none=True)
    logger.info(
        "EWC fit of %d failures: %d steps run, kept step %d",
        len(fit_y),
        step,
        best_step,
    )
    record = {
        "steps_run": step,
        "best_step": best_step,
        "history": history,
        "n_fit": len(fit_y),
        "n_val": len(val_y),
    }
    return fitted, record


def fit_failures(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    n_train: int,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: EWCInfluenceConfig,
    *,
    log_likelihood: LogLikelihood | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Fit the failures under the EWC prior and return the fitted copy theta-hat_{+F}.

    Maximises the objective of the module docstring with full-batch Adam steps
    on the trainable parameters, with the copy in eval mode, and restores the
    copy's submodule modes at the end. The input model is not changed.

    Args:
        model: the trained network theta-hat.
        fisher: diagonal Fisher at theta-hat per trainable parameter name.
        n_train: N, the number of examples the Fisher averages over.
        query_images: the failures F_q, shape (M, ...).
        query_labels: their true labels, shape (M,).
        config: fit settings.
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.
        progress: called with (fraction of max_steps done, message).

    Returns:
        A new model with the fitted parameters, on the input model's device.
    """
    fitted, _ = fit_failures_with_record(
        model,
        fisher,
        n_train,
        query_images,
        query_labels,
        config,
        log_likelihood=log_likelihood,
        progress=progress,
    )
    return fitted


def score_ewc_influence(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: EWCInfluenceConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Return EWC-influence scores, float64 (N,), and the Fisher and fitted state."""
    ll = context.log_likelihood
    fisher = context.fisher
    if fisher is None:
        fisher = diagonal_fisher(
            model,
            train_images,
            train_labels,
            batch_size=config.fisher_batch_size,
            log_likelihood=ll,
            progress=scaled_progress(progress, 0.0, 0.4),
        )
    fitted, record = fit_failures_with_record(
        model,
        fisher,
        len(train_labels),
        query_images,
        query_labels,
        config,
        log_likelihood=ll,
        progress=scaled_progress(progress, 0.4, 0.9),
    )
    before = log_likelihoods(model, train_images, train_labels, log_likelihood=ll)
    after = log_likelihoods(fitted, train_images, train_labels, log_likelihood=ll)
    scores = check_finite(
        before - after,
        "EWC-influence",
        "Lower the lr of the fit or check the model for non-finite outputs.",
    )
    extras = {"fisher": fisher, "fitted_state": fitted.state_dict(), **record}
    return scores, extras
