"""Repair by fitting the failures directly, with or without deleting causes.

``fit-failures`` returns θ̂₊F, the EWC fit of the query failures F_q that
EWC-influence computes (Tanno et al. 2022): no training data is removed. On
full MNIST with label flips it reached holdout-failure accuracy 0.71 to 0.84
with remaining-set accuracy 0.80 to 0.96, often above removal followed by
fine-tuning, so it is offered beside the deletion treatments.

``fit-failures+ewc-deletion`` first unlearns C by EWC-deletion from θ̂, then
fits F_q from the result. In exact Bayesian updating, deleting p(C|θ) and
adding p(F_q|θ) commute. Deleting first keeps both early-stopping rules
meaningful: deletion stops on F_q accuracy while F_q is still unseen, and the
fit then stops on its own held-out part of F_q. Both steps use the Fisher at
θ̂. The fit is anchored at the deleted model with N − |C| as the size of the
data behind it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from repair_core.identification.base import (
    check_setting_types,
    option,
    settings_from_dict,
)
from repair_core.identification.ewc_influence import (
    EWCInfluenceConfig,
    fit_failures_with_record,
)
from repair_core.progress import Progress, scaled_progress
from repair_core.treatments.base import TreatmentConfig, report
from repair_core.treatments.ewc_deletion import EWCDeletionConfig, ewc_delete

logger = logging.getLogger(__name__)


def _nested(cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    return settings_from_dict(cls, values)


@dataclass
class FitFailuresConfig(TreatmentConfig):
    """Settings of the EWC fit of F_q; ``seed`` replaces the fit's own seed."""

    fit: EWCInfluenceConfig = field(
        default_factory=EWCInfluenceConfig,
        metadata={"help": "Settings of the EWC fit of the query failures."},
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        # The stored settings show the seed that the fit runs with.
        self.fit = dataclasses.replace(
            _nested(EWCInfluenceConfig, self.fit), seed=self.seed
        )


@dataclass
class FitAndDeleteConfig(TreatmentConfig):
    """Settings of EWC-deletion of C followed by the EWC fit of F_q; ``seed``
    replaces the seeds of both steps."""

    deletion: EWCDeletionConfig = field(
        default_factory=EWCDeletionConfig,
        metadata={"help": "Settings of the EWC-deletion step."},
    )
    fit: EWCInfluenceConfig = field(
        default_factory=EWCInfluenceConfig,
        metadata={"help": "Settings of the EWC fit of the query failures."},
    )
    fit_first: bool = option(
        False,
        "Fit F_q before deleting C instead of after. Deletion then stops early on "
        "F_q accuracy of an already fitted model, so it often keeps no step.",
    )

    def __post_init__(self) -> None:
        check_setting_types(self)
        # The stored settings show the seed that each step runs with.
        self.deletion = dataclasses.replace(
            _nested(EWCDeletionConfig, self.deletion), seed=self.seed
        )
        self.fit = dataclasses.replace(
            _nested(EWCInfluenceConfig, self.fit), seed=self.seed
        )


def fit_query_failures(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    n_train: int,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: FitFailuresConfig,
    *,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return θ̂₊F, a fitted copy of ``model``, and the fit's record.

    Args:
        model: θ̂, left unchanged.
        fisher: diagonal Fisher at θ̂ per trainable parameter name.
        n_train: size N of the training set behind θ̂.
        query_images: F_q's images, shape (|F_q|, C, H, W).
        query_labels: F_q's true classes, shape (|F_q|,).
    """
    fit_config = dataclasses.replace(config.fit, seed=config.seed)
    fitted, record = fit_failures_with_record(
        model,
        fisher,
        n_train,
        query_images,
        query_labels,
        fit_config,
        progress=progress,
    )
    return fitted, {"fit": record}


def fit_and_delete(
    model: nn.Module,
    cause_images: torch.Tensor,
    cause_labels: torch.Tensor,
    fisher: dict[str, torch.Tensor],
    n_train: int,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: FitAndDeleteConfig,
    *,
    retain_images: torch.Tensor | None = None,
    retain_labels: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Delete C by EWC-deletion and fit F_q, in the order ``config`` sets.

    Args:
        model: θ̂, left unchanged.
        cause_images: C's images, shape (|C|, C, H, W).
        cause_labels: C's labels, shape (|C|,).
        fisher: diagonal Fisher at θ̂ over D, used by both steps.
        n_train: size N of D.
        query_images: F_q's images, shape (|F_q|, C, H, W).
        query_labels: F_q's true classes, shape (|F_q|,).
        retain_images: a sample of D\\C that guards the deletion step, as in
            :func:`ewc_delete`.
        retain_labels: its classes.

    Returns:
        The repaired copy and a record with a ``deletion`` and a ``fit`` entry.
    """
    deletion_config = dataclasses.replace(config.deletion, seed=config.seed)
    fit_config = dataclasses.replace(config.fit, seed=config.seed)

    # Each step fills half of the bar, and passing it the callback lets a
    # stop request end the step at its next report.
    first_half = scaled_progress(progress, 0.0, 0.5)
    second_half = scaled_progress(progress, 0.5, 1.0)

    def delete(
        start: nn.Module, part: Progress | None
    ) -> tuple[nn.Module, dict[str, Any]]:
        return ewc_delete(
            start,
            cause_images,
            cause_labels,
            fisher,
            n_train,
            deletion_config,
            query_images=query_images,
            query_labels=query_labels,
            retain_images=retain_images,
            retain_labels=retain_labels,
            progress=part,
        )

    def fit(
        start: nn.Module, n_behind: int, part: Progress | None
    ) -> tuple[nn.Module, dict[str, Any]]:
        return fit_failures_with_record(
            start,
            fisher,
            n_behind,
            query_images,
            query_labels,
            fit_config,
            progress=part,
        )

    if config.fit_first:
        fitted, fit_record = fit(model, n_train, first_half)
        report(progress, 0.5, "Fitted the query failures; deleting the causes")
        repaired, deletion_record = delete(fitted, second_half)
    else:
        deleted, deletion_record = delete(model, first_half)
        report(progress, 0.5, "Deleted the causes; fitting the query failures")
        repaired, fit_record = fit(deleted, n_train - len(cause_labels), second_half)
    report(progress, 1.0, "Fit and deletion done")
    return repaired, {"deletion": deletion_record, "fit": fit_record}
