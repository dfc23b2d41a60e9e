"""Treatments (Step II): erase the influence of the causes C from a trained model.

Every treatment starts from θ̂, changes only trainable parameters, is seeded,
never modifies the model it is given, and returns a :class:`RepairResult`
whose model has each submodule's train or eval mode as θ̂.

* ``ewc-deletion``: unlearn C under an EWC prior, early-stopped on F_q
  accuracy (Tanno et al. 2022).
* ``newton``: one Newton step of removal (Guo et al. 2020).
* ``finetune``: fine-tune θ̂ on D\\C.
* ``retrain``: train a freshly initialised model on D\\C.
* ``fit-failures``: θ̂₊F, the EWC fit of F_q; C is recorded but not used.
* ``fit-failures+ewc-deletion``: EWC-deletion of C, then the EWC fit of F_q.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from repair_core.devices import seeded
from repair_core.errors import ConfigError, DivergenceError
from repair_core.fisher import checked_parameters, diagonal_fisher
from repair_core.inference import (
    accuracy,
    check_finite_images,
    check_model_labels,
    model_device,
)
from repair_core.progress import Progress
from repair_core.training import TrainConfig
from repair_core.treatments.base import (
    RepairResult,
    TreatmentConfig,
    check_remaining,
    complement,
    read_causes_file,
    read_causes_table,
    retain_sample,
    validate_causes,
)
from repair_core.treatments.ewc_deletion import EWCDeletionConfig, ewc_delete
from repair_core.treatments.finetune import (
    FinetuneConfig,
    effective_train_config,
    finetune,
)
from repair_core.treatments.fit_failures import (
    FitAndDeleteConfig,
    FitFailuresConfig,
    fit_and_delete,
    fit_query_failures,
)
from repair_core.treatments.newton import NewtonConfig, newton_remove
from repair_core.treatments.retrain import RetrainConfig, retrain

__all__ = [
    "CONFIG_CLASSES",
    "CONTROLLED_TREATMENTS",
    "TRAINING_TREATMENTS",
    "REMOVES_NOTHING",
    "TREATMENTS",
    "EWCDeletionConfig",
    "FinetuneConfig",
    "FitAndDeleteConfig",
    "FitFailuresConfig",
    "NewtonConfig",
    "RepairResult",
    "RetrainConfig",
    "TreatmentConfig",
    "apply_treatment",
    "complement",
    "default_config",
    "read_causes_file",
    "read_causes_table",
    "repair",
    "resolve_config",
    "training_settings",
    "training_text",
    "validate_causes",
]

logger = logging.getLogger(__name__)

TREATMENTS = (
    "ewc-deletion",
    "newton",
    "finetune",
    "retrain",
    "fit-failures",
    "fit-failures+ewc-deletion",
)

#: Treatments that remove C with an optimiser over many steps, so their
#: results vary with the seed and are reported beside nothing-removed and
#: random controls. For fit-failures+ewc-deletion the nothing-removed control
#: is the fit of F_q alone.
TRAINING_TREATMENTS = (
    "ewc-deletion",
    "finetune",
    "retrain",
    "fit-failures+ewc-deletion",
)

#: Treatments reported beside the nothing-removed and random-removal
#: controls: the training treatments and Newton removal, whose LiSSA solve
#: draws its minibatches by seed. Newton removal of nothing returns θ̂ at
#: once, so that control costs no solve.
CONTROLLED_TREATMENTS = (*TRAINING_TREATMENTS, "newton")

#: Treatments that remove nothing. Causes given to them are recorded, and an
#: empty list of causes is accepted.
REMOVES_NOTHING = ("fit-failures",)

CONFIG_CLASSES: dict[str, type[TreatmentConfig]] = {
    "ewc-deletion": EWCDeletionConfig,
    "newton": NewtonConfig,
    "finetune": FinetuneConfig,
    "retrain": RetrainConfig,
    "fit-failures": FitFailuresConfig,
    "fit-failures+ewc-deletion": FitAndDeleteConfig,
}

_NEEDS_FISHER = ("ewc-deletion", "fit-failures", "fit-failures+ewc-deletion")
#: Treatments that train on D\C with a validation split for early stopping.
_TRAINS_ON_REMAINDER = ("finetune", "retrain")


def training_settings(
    treatment: str, config: dict[str, Any], train_config: TrainConfig | None
) -> dict[str, Any] | None:
    """Return the optimiser settings that fine-tuning or retraining used.

    They are the run's training settings with the treatment's epoch limit;
    the seed is left out, since each seed of a repair replaces it. Other
    treatments return None.
    """
    if treatment not in _TRAINS_ON_REMAINDER:
        return None
    used = effective_train_config(
        train_config, seed=0, max_epochs=config.get("max_epochs")
    )
    return {
        "lr": used.lr,
        "betas": list(used.betas),
        "batch_size": used.batch_size,
        "max_epochs": used.max_epochs,
        "patience": used.patience,
        "val_fraction": used.val_fraction,
    }


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def training_text(training: dict[str, Any]) -> str:
    """Describe stored ``training_settings`` in one sentence."""
    validation = f"{training['val_fraction']:.0%} of the examples each arm trains on"
    if training["patience"] >= training["max_epochs"]:
        # Patience cannot end a run that ends first at max_epochs.
        stopping = f"keeping the epoch with the lowest validation loss on {validation}"
    else:
        stopping = (
            f"stopping after {_epochs(training['patience'])} without a lower "
            f"validation loss on {validation}"
        )
    return (
        f"Trained with Adam at lr {training['lr']:g}, batches of "
        f"{training['batch_size']}, at most {_epochs(training['max_epochs'])}, "
        f"{stopping}."
    )


def _check_treatment(treatment: str) -> None:
    if treatment not in TREATMENTS:
        raise ConfigError(
            f"Unknown treatment {treatment!r}. Use one of {', '.join(TREATMENTS)}."
        )


def default_config(treatment: str) -> TreatmentConfig:
    """Return the default settings of ``treatment``."""
    _check_treatment(treatment)
    return CONFIG_CLASSES[treatment]()


def resolve_config(
    treatment: str, config: TreatmentConfig | dict[str, Any] | None
) -> TreatmentConfig:
    """Return ``config`` as the settings class of ``treatment``.

    Args:
        config: None for the defaults, a dict of settings, or an instance of
            the treatment's settings class.

    Raises:
        ConfigError: unknown treatment, unknown setting, or settings of
            another treatment.
    """
    _check_treatment(treatment)
    cls = CONFIG_CLASSES[treatment]
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.from_dict(config)
    if type(config) is not cls:
        raise ConfigError(
            f"Treatment {treatment!r} takes {cls.__name__}, not "
            f"{type(config).__name__}. Use default_config({treatment!r})."
        )
    return config


def apply_treatment(
    treatment: str,
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: Any,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: TreatmentConfig | dict[str, Any] | None = None,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
    train_config: TrainConfig | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Run a treatment; like :func:`repair`, except that ``causes`` may be empty.

    Empty causes are the nothing-removed control, which still fine-tunes or
    retrains on all of D. The returned model has each submodule's train or
    eval mode as ``model``.

    Raises:
        ConfigError: unknown treatment, bad settings, causes that are not
            training indices (see :func:`validate_causes`, which drops
            repeated indices), a model
            without trainable parameters, non-finite images, labels that are
            not int64 class indices in 0..K-1 for a model with K outputs, or,
            for fine-tuning and retraining, causes that leave too few examples
            for the validation split.
        DivergenceError: the repaired model has non-finite parameters.
    """
    config = resolve_config(treatment, config)
    causes = validate_causes(causes, len(train_labels), allow_empty=True)
    if treatment in _TRAINS_ON_REMAINDER:
        val_fraction = (train_config or TrainConfig()).val_fraction
        check_remaining(treatment, len(causes), len(train_labels), val_fraction)
    if not (treatment == "retrain" and model_factory is not None):
        checked_parameters(model)
    check_finite_images(train_images, "Training image")
    check_finite_images(query_images, "Query image")
    check_model_labels(model, train_images, train_labels, query_images, query_labels)
    with seeded(config.seed):
        result = _apply(
            treatment,
            model,
            train_images,
            train_labels,
            causes,
            query_images,
            query_labels,
            config,
            fisher=fisher,
            train_config=train_config,
            model_factory=model_factory,
            progress=progress,
        )
    _check_finite_model(result.model, treatment)
    result.metrics = {
        "query_acc": _before_after(model, result.model, query_images, query_labels),
        "causes_acc": _before_after(
            model, result.model, train_images[causes], train_labels[causes]
        ),
    }
    if progress is not None:
        progress(1.0, f"{treatment} done")
    return result


def _before_after(
    model: nn.Module, repaired: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float] | None:
    if len(labels) == 0:
        return None
    return {
        "before": accuracy(model, images, labels),
        "after": accuracy(repaired, images, labels),
    }


def _check_finite_model(model: nn.Module, treatment: str) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DivergenceError(
                f"The {treatment} repair gave non-finite values in {name}. Lower "
                "its strength (gamma) or learning rate, and check the inputs."
            )


def _apply(
    treatment: str,
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: TreatmentConfig,
    *,
    fisher: dict[str, torch.Tensor] | None,
    train_config: TrainConfig | None,
    model_factory: Callable[[], nn.Module] | None,
    progress: Progress | None,
) -> RepairResult:
    n_train = len(train_labels)
    start = time.perf_counter()
    logger.info(
        "Repair with %s: %d causes of %d, settings %s",
        treatment,
        len(causes),
        n_train,
        config.to_dict(),
    )
    if fisher is None and treatment in _NEEDS_FISHER:
        fisher = diagonal_fisher(
            model, train_images, train_labels, batch_size=_fisher_batch_size(config)
        )

    if treatment == "ewc-deletion":
        retain = retain_sample(n_train, causes, config.retain_size, config.seed)
        repaired, extras = ewc_delete(
            model,
            train_images[causes],
            train_labels[causes],
            fisher,
            n_train,
            config,
            query_images=query_images,
            query_labels=query_labels,
            retain_images=train_images[retain],
            retain_labels=train_labels[retain],
            progress=progress,
        )
    elif treatment == "newton":
        repaired, extras = newton_remove(
            model, train_images, train_labels, causes, config, progress=progress
        )
    elif treatment == "finetune":
        repaired, extras = finetune(
            model,
            train_images,
            train_labels,
            causes,
            config,
            train_config=train_config,
            progress=progress,
        )
    elif treatment == "retrain":
        repaired, extras = retrain(
            model,
            train_images,
            train_labels,
            causes,
            config,
            train_config=train_config,
            model_factory=model_factory,
            progress=progress,
        )
    elif treatment == "fit-failures":
        repaired, extras = fit_query_failures(
            model,
            fisher,
            n_train,
            query_images,
            query_labels,
            config,
            progress=progress,
        )
    else:
        deletion = config.deletion
        retain = retain_sample(n_train, causes, deletion.retain_size, config.seed)
        repaired, extras = fit_and_delete(
            model,
            train_images[causes],
            train_labels[causes],
            fisher,
            n_train,
            query_images,
            query_labels,
            config,
            retain_images=train_images[retain],
            retain_labels=train_labels[retain],
            progress=progress,
        )

    seconds = time.perf_counter() - start
    logger.info("Repair with %s took %.1f s", treatment, seconds)
    return RepairResult(
        model=repaired,
        treatment=treatment,
        config=config.to_dict(),
        causes=causes,
        seconds=seconds,
        seed=config.seed,
        device=str(model_device(repaired)),
        extras=extras,
    )


def _fisher_batch_size(config: TreatmentConfig) -> int:
    if isinstance(config, FitAndDeleteConfig):
        return config.deletion.fisher_batch_size
    if isinstance(config, FitFailuresConfig):
        return config.fit.fisher_batch_size
    return getattr(config, "fisher_batch_size", 256)


def repair(
    treatment: str,
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    causes: Any,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: TreatmentConfig | dict[str, Any] | None = None,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
    train_config: TrainConfig | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair a copy of ``model`` by erasing the influence of the causes.

    Args:
        treatment: one of ``TREATMENTS``.
        model: the trained model θ̂; it is never modified.
        train_images: the training images D, shape (N, C, H, W).
        train_labels: the training labels, shape (N,).
        causes: training indices of C, any integer sequence; validated with
            :func:`validate_causes`. It may be empty only for the treatments
            in ``REMOVES_NOTHING``.
        query_images: the query failures F_q, shape (|F_q|, C, H, W), used for
            early stopping (EWC-deletion) or fitting (fit-failures).
        query_labels: their true classes, shape (|F_q|,).
        config: the treatment's settings (class, dict or None for defaults).
        fisher: diagonal Fisher at θ̂ over D, reused instead of recomputed.
        train_config: optimiser settings of fine-tuning and retraining.
        model_factory: builds an untrained network for retraining.
        progress: called with (fraction done, message).

    Returns:
        The repaired copy with its settings, causes, wall time and extras.
        The copy has each submodule's train or eval mode as ``model``.

    Raises:
        ConfigError: unknown treatment, bad settings or bad causes, including
            empty causes for a treatment that removes them and causes that
            leave fine-tuning or retraining too few examples.
    """
    settings = resolve_config(treatment, config)
    checked = validate_causes(
        causes, len(train_labels), allow_empty=treatment in REMOVES_NOTHING
    )
    return apply_treatment(
        treatment,
        model,
        train_images,
        train_labels,
        checked,
        query_images,
        query_labels,
        settings,
        fisher=fisher,
        train_config=train_config,
        model_factory=model_factory,
        progress=progress,
    )
