r"""EWC-deletion: unlearn the causes C as a continual-learning step (Tanno et al. 2022).

Starting from θ̂, Adam minimises

    loss(θ) = s · Σ_{c∈C} log p(c|θ) / |C| + (1/γ) Σ_i F_i (θ_i − θ̂_i)² + (λ/2) ‖θ − θ̂‖²

over minibatches of C, where F is the diagonal empirical Fisher at θ̂ over D
and s = 1 (``reduction="mean"``, the default) or s = |C| (``"sum"``). In
``EWCPenalty`` terms the Fisher weight is 2/(γN). The objective of Tanno et
al. 2022 is −log p(C|θ) − (N/2) Σ_i F_i (θ_i − θ̂_i)² − (λ/2) ‖θ − θ̂‖² with the
sum over C. With ``"sum"`` it is matched exactly by γ = 2/N. With ``"mean"``
it is matched, divided by |C|, by γ = 2|C|/N with λ divided by |C|.

The default is the mean, so the minibatch gradient is the usual mean loss
and γ does not have to shrink as |C| grows. The published sweep used γ in
[0.01, 0.05]. Under the mean reduction that weights the Fisher term more
strongly than the exact Laplace posterior does whenever |C| > γN/2, so the
repair stays close to θ̂ and early stopping on F_q accuracy selects how far
it goes.

Raising the loss on C is unbounded, and on a network the quadratic Fisher
term alone does not stop it: on the embedded MNIST data with 35 causes and
γ = 0.03 the test accuracy fell from 0.92 to 0.10 on every seed, and early
stopping on F_q accuracy kept the collapsed model because predicting a single
class fixed 16% of F_q. So every evaluation also measures accuracy on a
sample of D\C (training data, never test data), and the run stops
once that accuracy has dropped by more than ``retain_drop`` from θ̂'s. With
that guard and learning rate 1e-5 the same repair reached holdout-failure
accuracy 0.43 (random removal of 35: 0.09) with remaining-set accuracy 0.93,
for γ = 0.01 and 0.05 alike: at this learning rate the guard, not γ, decides
how far the repair goes. The Fisher of that CNN averages about 5e-3 per
parameter, so the Fisher term only keeps the parameters near θ̂ when γ is
far below 0.01, so the default sweep spans γ from 1e-5 to 0.1. On the
benchmark's 450 causes, γ from 1e-4 to 0.1 stopped at the same point and
only 1e-5 stayed nearer θ̂.

With only one grid point where the Fisher term binds, a finer grid was run
on one of those base models. γ = 1e-5, 2e-5, 3e-5 and 5e-5 gave
holdout-failure accuracy 0.13, 0.17, 0.20 and 0.18 at remaining-set
accuracy 0.99, 0.97, 0.95 and 0.96. Newton update removal of the same
causes reached 0.33 at 0.99 and 0.42 at 0.949, so a denser grid does not
close the gap to Newton removal on this data. A likely reason: Adam at lr
1e-5 moves every parameter by about the same small step, while the Newton
step moves furthest where the Fisher is small, along directions that the
rest of D barely constrains.

Two other optimisers were tried on the same base model and causes, with
the same guard and early stopping. Plain SGD (lr 1e-5, γ = 1e-3) reached
0.20 at 0.97. Steps scaled per parameter by 1/(F_i + 5e-3), a diagonal
natural gradient, reached 0.28 at 0.89 and 0.20 at 0.945. Neither comes
near Newton removal's 0.33 at 0.99, so Adam remains the optimiser.

Other settings were measured on a second base model (embedded data, label
flips, the top 450 causes by EWC-influence), where Newton removal reached
0.38 at 0.98 (γ = 4) and the default sweep's best point with remaining-set
accuracy of at least 0.95 was 0.27 at 0.98 (γ = 3e-5). Full batches of C,
lr 3e-6 for up to 3000 steps, and retain_drop 0.01 each gave 0.27 at 0.98
or below. Objectives that stop pushing once a cause is unlearned,
log(1 − p(c|θ)) or log p(c|θ) floored at log 0.1, gave at most 0.25 at
0.99. Measuring the guard on the run's validation split changed nothing.
A guard on agreement with θ̂'s predictions instead of the labels,
allowed to drop by 0.06, reached 0.33 at 0.96 (γ = 1e-4): better than the
default guard, still short of Newton removal, and measured on this one
model only.

An isotropic pull towards θ̂ (``l2`` = λ) was measured on a third base
model (embedded data, label flips, seed 0, 130 test failures, the top 450
causes by EWC-influence; ``sweep --set l2=...``). Newton removal reached
0.35 at 0.956 (γ = 6), and λ = 0 at best 0.25 at 0.995 (γ = 3e-5). With
λ = 100, γ = 0.01 gave 0.37 at 0.958 but γ = 0.1 gave 0.23 at 0.977. λ = 10
and 30 gave at most 0.22, and λ = 1000 at most 0.03. At λ = 100 the L2 term
outweighs the Fisher term, and one holdout failure is 0.015 of F_h there,
so the one point above Newton removal is within the spread of its
neighbours, and λ stays 0 by default.

The model stays in eval mode throughout, so BatchNorm keeps the running
statistics of θ̂ and Dropout is off. Parameters without ``requires_grad``
never change.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repair_core.errors import ConfigError, DivergenceError
from repair_core.ewc import EWCPenalty
from repair_core.fisher import (
    LogLikelihood,
    categorical_log_likelihood,
    detached_parameters,
)
from repair_core.identification.base import check_setting_types, option
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress
from repair_core.treatments.base import TreatmentConfig, report, trainable

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum")
#: Reasons an EWC-deletion run ended, by the value of ``stopped_by`` in its record.
STOP_REASONS = {
    "retain_drop": "accuracy on a sample of D\\C fell by more than retain_drop",
    "patience": "patience steps passed without a higher accuracy on F_q",
    "max_steps": "max_steps steps ran",
    "no_causes": "there were no causes to remove",
}
#: Short names of ``STOP_REASONS`` for table cells.
STOP_LABELS = {
    "retain_drop": "D\\C drop",
    "patience": "patience",
    "max_steps": "max steps",
    "no_causes": "no causes",
}


@dataclass
class EWCDeletionConfig(TreatmentConfig):
    """Settings of EWC-deletion."""

    gamma: float = option(
        0.03,
        "Strength γ: the Fisher term is (1/γ) Σ F_i Δθ_i², so a larger γ lets the "
        "parameters move further from θ̂. The published sweep used 0.01 to 0.05.",
    )
    l2: float = option(
        0.0,
        "Precision λ of an extra isotropic pull towards θ̂; 0 in the published "
        "comparison with Newton update removal.",
    )
    reduction: str = option(
        "mean",
        'How log p(C|θ) combines the causes: "mean" or "sum" over C.',
        REDUCTIONS,
    )
    lr: float = option(
        1e-5,
        "Adam learning rate. Raising the loss on C moves fast: at 1e-3 or 1e-4 the "
        "reference CNN lost D\\C within 40 steps.",
    )
    batch_size: int = option(
        64, "Causes per Adam step; the whole of C when it is smaller."
    )
    max_steps: int = option(1000, "Upper bound on Adam steps.")
    eval_every: int = option(
        10, "Steps between two measurements of accuracy on the query failures F_q."
    )
    patience: int = option(200, "Steps without a higher F_q accuracy before stopping.")
    early_stopping: bool = option(
        True,
        "Keep the parameters with the highest F_q accuracy and stop after patience"
        " steps without a gain. When False, run max_steps steps and keep the last "
        "parameters.",
    )
    fisher_batch_size: int = option(
        256, "Examples per batch when the Fisher over D has to be computed."
    )
    retain_drop: float = option(
        0.02,
        "Largest allowed drop in accuracy on a sample of D\\C before the "
        "run stops; 1.0 turns the guard off.",
    )
    retain_size: int = option(
        1000, "Examples of D\\C drawn (seeded) to measure the retained accuracy."
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(
                f"EWC-deletion strength gamma {self.gamma} must be a finite positive "
                "number, for example 0.03."
            )
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ConfigError(f"l2 {self.l2} must be a finite number >= 0.")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"Unknown reduction {self.reduction!r}. Use one of "
                f"{', '.join(REDUCTIONS)}."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"Learning rate {self.lr} must be a positive number.")
        for name in ("batch_size", "max_steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1.")
        if self.fisher_batch_size < 1:
            raise ConfigError(
                f"fisher_batch_size {self.fisher_batch_size} must be at least 1."
            )
        if not 0 < self.retain_drop <= 1:
            raise ConfigError(
                f"retain_drop {self.retain_drop} must lie in (0, 1]; use 1.0 to turn "
                "the guard off."
            )
        if self.retain_size < 1:
            raise ConfigError(f"retain_size {self.retain_size} must be at least 1.")


def _query_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> float:
    device = model_device(model)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 512):
            outputs = model(images[start : start + 512].to(device))
            predicted = outputs.argmax(1).cpu()
            correct += (predicted == labels[start : start + 512].cpu()).sum().item()
    return correct / len(labels)


def ewc_delete(
    model: nn.Module,
    cause_images: torch.Tensor,
    cause_labels: torch.Tensor,
    fisher: dict[str, torch.Tensor],
    n_train: int,
    config: EWCDeletionConfig,
    *,
    query_images: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    retain_images: torch.Tensor | None = None,
    retain_labels: torch.Tensor | None = None,
    log_likelihood: LogLikelihood = categorical_log_likelihood,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Unlearn the causes from a copy of ``model`` by EWC-deletion.

    Args:
        model: θ̂, left unchanged.
        cause_images: inputs of C, shape (|C|, ...).
        cause_labels: targets of C, shape (|C|, ...).
        fisher: diagonal Fisher at θ̂ per trainable parameter name.
        n_train: size N of the training set the Fisher averages over.
        config: strength, optimiser and early-stopping settings.
        query_images: inputs of F_q, shape (|F_q|, ...); needed when
            ``config.early_stopping`` is True.
        query_labels: classes of F_q, shape (|F_q|,).
        retain_images: a sample of D\\C, shape (R, ...); when given,
            the run stops once accuracy on it drops by more than
            ``config.retain_drop``. Classification only.
        retain_labels: its classes, shape (R,).
        log_likelihood: per-example log p(y|x, θ) of (outputs, targets);
            softmax cross-entropy by default. A Gaussian log-likelihood turns
            this into deletion for regression.
        progress: called with (fraction done, message) at each evaluation.

    Returns:
        The repaired copy and a record with ``best_step``, ``steps_run``,
        ``best_query_acc``, ``log_p_causes_before`` and ``log_p_causes_after``
        (sums over C), ``retain_acc_before``, ``stopped_by_retain``,
        ``stopped_by`` (one of ``STOP_REASONS``) and ``history`` (step, query
        accuracy, retained accuracy, loss).

    Raises:
        ConfigError: early stopping without a query set.
        DivergenceError: the loss became NaN or infinite.
    """
    if config.early_stopping and (query_images is None or len(query_labels) == 0):
        raise ConfigError(
            "EWC-deletion stops early on accuracy on the query failures F_q, but no "
            "query set was given. Pass query_images and query_labels, or set "
            "early_stopping=False."
        )
    repaired = copy.deepcopy(model)
    n_causes = len(cause_labels)
    if n_causes == 0:
        return repaired, {
            "best_step": 0,
            "steps_run": 0,
            "stopped_by": "no_causes",
            "history": [],
        }

    device = model_device(repaired)
    anchor = {k: v.clone() for k, v in detached_parameters(repaired).items()}
    penalty = EWCPenalty(
        fisher,
        anchor,
        n_train=n_train,
        fisher_weight=2.0 / (config.gamma * n_train),
        l2=config.l2,
    )
    params = trainable(repaired)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    likelihood_scale = 1.0 if config.reduction == "mean" else float(n_causes)
    batch_size = min(config.batch_size, n_causes)

    with eval_mode(repaired):
        log_p_before = _summed_log_likelihood(
            repaired, cause_images, cause_labels, log_likelihood
        )
        best_acc = -1.0
        if config.early_stopping:
            best_acc = _query_accuracy(repaired, query_images, query_labels)
        guarded = retain_images is not None and len(retain_labels) > 0
        retain_before = float("nan")
        if guarded:
            retain_before = _query_accuracy(repaired, retain_images, retain_labels)
        stopped_by_retain = False
        best_step, best_state = 0, [p.detach().clone() for p in params]
        history: list[dict[str, float]] = [
            {
                "step": 0,
                "query_acc": best_acc,
                "retain_acc": retain_before,
                "loss": float("nan"),
            }
        ]
        step, order, position = 0, torch.empty(0, dtype=torch.long), 0
        while step < config.max_steps:
            if position >= len(order):
                order, position = torch.randperm(n_causes, generator=generator), 0
            batch = order[position : position + batch_size]
            position += batch_size
            x = cause_images[batch].to(device)
            y = cause_labels[batch].to(device)

            # Minimising +log p(C) pushes the model away from the causes.
            fit = log_likelihood(repaired(x), y).mean() * likelihood_scale
            loss = fit + penalty(repaired)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"EWC-deletion loss became {loss.item()} at step {step + 1}. "
                    "Lower the learning rate or the strength gamma."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            if step % config.eval_every and step != config.max_steps:
                continue
            record = {
                "step": step,
                "query_acc": float("nan"),
                "retain_acc": float("nan"),
                "loss": loss.item(),
            }
            if guarded:
                retain_acc = _query_accuracy(repaired, retain_images, retain_labels)
                record["retain_acc"] = retain_acc
                if retain_acc < retain_before - config.retain_drop:
                    # Past this point the model loses accuracy on D\C, not only on C.
                    history.append(record)
                    stopped_by_retain = True
                    break
                if not config.early_stopping:
                    best_step, best_state = step, [p.detach().clone() for p in params]
            if config.early_stopping:
                acc = _query_accuracy(repaired, query_images, query_labels)
                record["query_acc"] = acc
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    best_state = [p.detach().clone() for p in params]
            history.append(record)
            report(progress, step / config.max_steps, f"EWC-deletion step {step}")
            if config.early_stopping and step - best_step >= config.patience:
                break

        if stopped_by_retain:
            stopped_by = "retain_drop"
        elif config.early_stopping and step - best_step >= config.patience:
            # Also when patience ran out at the last step.
            stopped_by = "patience"
        else:
            stopped_by = "max_steps"
        if config.early_stopping or stopped_by_retain:
            with torch.no_grad():
                for param, value in zip(params, best_state, strict=True):
                    param.copy_(value)
        else:
            best_step = step
        log_p_after = _summed_log_likelihood(
            repaired, cause_images, cause_labels, log_likelihood
        )

    logger.info(
        "EWC-deletion of %d causes: kept step %d of %d, F_q accuracy %.3f, "
        "log p(C) %.2f -> %.2f",
        n_causes,
        best_step,
        step,
        best_acc,
        log_p_before,
        log_p_after,
    )
    record = {
        "best_step": best_step,
        "steps_run": step,
        "best_query_acc": best_acc if config.early_stopping else None,
        "log_p_causes_before": log_p_before,
        "log_p_causes_after": log_p_after,
        "retain_acc_before": retain_before,
        "stopped_by_retain": stopped_by_retain,
        "stopped_by": stopped_by,
        "history": history,
    }
    return repaired, record


def _summed_log_likelihood(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    log_likelihood: LogLikelihood,
) -> float:
    device = model_device(model)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(labels), 512):
            outputs = model(images[start : start + 512].to(device))
            targets = labels[start : start + 512].to(device)
            total += log_likelihood(outputs, targets).sum().item()
    return total
