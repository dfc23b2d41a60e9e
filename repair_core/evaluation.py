"""Before/after evaluation of repairs, with controls, seeds, sweeps and removal curves.

Every figure is measured on the failure split of the original model θ̂:
accuracy on the query failures F_q, the holdout failures F_h, the remaining
set T\\F and the whole test set T, plus which holdout failures a repair fixed
and which remaining examples it broke. Before the repair, accuracy on F_q and
F_h is 0 and on T\\F is 1 by construction.

Training repairs are noisy: on full MNIST, fine-tuning with nothing removed
fixed 18% to 69% of holdout failures depending on the base model, and the
spread across fine-tuning seeds reached 0.44 for random removal. So
:func:`repair_with_controls` runs each training treatment, and Newton
removal, over several seeds beside two controls with the same protocol,
nothing removed and as many random examples removed, and reports the gain
over nothing removed first.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.failures import FailureSplit
from repair_core.fisher import diagonal_fisher
from repair_core.identification.base import check_seed
from repair_core.inference import predict_logits, share
from repair_core.progress import Progress, scaled_progress
from repair_core.training import TrainConfig
from repair_core.treatments import (
    CONTROLLED_TREATMENTS,
    REMOVES_NOTHING,
    apply_treatment,
    resolve_config,
    validate_causes,
)
from repair_core.treatments.base import TreatmentConfig
from repair_core.treatments.finetune import FinetuneConfig
from repair_core.treatments.newton import apply_newton_step, newton_direction

logger = logging.getLogger(__name__)

MIN_REMAINING = 2
"""Minimum number of training examples a removal leaves, because fine-tuning
and retraining hold out at least one for validation and train on the rest."""

#: (images (n, C, H, W), labels (n,)) of one data set.
Data = tuple[torch.Tensor, torch.Tensor]
#: Receives a name and a repaired model, and returns where it stored the model.
StoreModel = Callable[[str, nn.Module], str]

ACCURACY_KEYS = ("query_acc", "holdout_acc", "failure_acc", "remaining_acc", "test_acc")
#: Per-run outcomes; the gain over the nothing-removed control covers these.
OUTCOME_KEYS = (
    *ACCURACY_KEYS,
    "holdout_fixed",
    "remaining_broken",
    "test_log_likelihood",
)
#: Per-run figures that are averaged over seeds: the outcomes and wall time.
METRIC_KEYS = (*OUTCOME_KEYS, "seconds")
CONTROLS = ("nothing", "random")
#: File of the run's own model θ̂, relative to the run's folder.
BASE_MODEL_FILE = "model.pt"
#: The reason each treatment outside CONTROLLED_TREATMENTS runs without controls.
NO_CONTROLS = {
    "fit-failures": "fit-failures removes nothing, so it runs without the "
    "nothing-removed and random-removal controls.",
}
SWEEPABLE = {"ewc-deletion": "gamma", "newton": "gamma", "finetune": "max_epochs"}
#: Strengths swept when none are given. EWC-deletion's γ spans decades
#: because the Fisher term only keeps the parameters near θ̂ when γ is far
#: below 0.01. On the reference CNN over the embedded MNIST, repairs go from
#: barely changed at γ = 1e-5 to as far as early stopping allows at 1e-4,
#: with the points of remaining-set accuracy above 0.95 in between, so that
#: decade is sampled more finely. Newton's γ is a multiple of the full
#: Newton step.
DEFAULT_STRENGTHS = {
    "ewc-deletion": (1e-5, 2e-5, 3e-5, 5e-5, 1e-4, 1e-3, 1e-2, 0.1),
    "newton": (0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    "finetune": (1, 2, 5, 10),
}
#: Share of a Newton sweep's progress bar that the shared solve fills. The
#: solve takes nearly all of the time, since each point is one parameter
#: update and an evaluation.
NEWTON_SOLVE_SHARE = 0.9


def _accuracy_on(correct: torch.Tensor, indices: torch.Tensor) -> float:
    if len(indices) == 0:
        return math.nan
    return share(correct[indices])


def evaluate_model(
    model: nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    split: FailureSplit,
) -> dict[str, Any]:
    """Measure accuracy on F_q, F_h, F, T\\F and T.

    Args:
        model: the classifier to measure.
        test_images: the test set, shape (n_test, C, H, W).
        test_labels: its classes, shape (n_test,).
        split: the failure split of the original model on this test set.

    Returns:
        ``query_acc``, ``holdout_acc``, ``failure_acc``, ``remaining_acc`` and
        ``test_acc`` (NaN for an empty set), ``test_log_likelihood`` (mean
        log p(y|x) over T) and ``predictions``, int64 (n_test,).
    """
    logits = predict_logits(model, test_images)
    predictions = logits.argmax(1)
    labels = test_labels.cpu()
    correct = predictions == labels
    log_p = torch.log_softmax(logits, 1).gather(1, labels[:, None]).mean().item()
    return {
        "query_acc": _accuracy_on(correct, split.query),
        "holdout_acc": _accuracy_on(correct, split.holdout),
        "failure_acc": _accuracy_on(correct, split.failures),
        "remaining_acc": _accuracy_on(correct, split.remaining),
        "test_acc": share(correct),
        "test_log_likelihood": log_p,
        "predictions": predictions,
    }


def compare(
    before_model: nn.Module,
    after_model: nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    split: FailureSplit,
) -> dict[str, Any]:
    """Compare a model before and after a repair on the same failure split.

    Returns:
        ``before`` and ``after`` as from :func:`evaluate_model`;
        ``holdout_fixed`` (count) and ``holdout_fixed_idx`` (test indices of
        F_h that were wrong before and are right after); ``remaining_broken``
        and ``remaining_broken_idx`` (test indices of T\\F that were right
        before and are wrong after).
    """
    before = evaluate_model(before_model, test_images, test_labels, split)
    after = evaluate_model(after_model, test_images, test_labels, split)
    labels = test_labels.cpu()
    right_before = before["predictions"] == labels
    right_after = after["predictions"] == labels
    holdout = split.holdout
    remaining = split.remaining
    fixed = holdout[~right_before[holdout] & right_after[holdout]]
    broken = remaining[right_before[remaining] & ~right_after[remaining]]
    return {
        "before": before,
        "after": after,
        "holdout_fixed": len(fixed),
        "holdout_fixed_idx": fixed.tolist(),
        "remaining_broken": len(broken),
        "remaining_broken_idx": broken.tolist(),
    }


def _run_record(comparison: dict[str, Any], seconds: float) -> dict[str, float]:
    after = comparison["after"]
    record = {key: after[key] for key in ACCURACY_KEYS}
    record["holdout_fixed"] = comparison["holdout_fixed"]
    record["remaining_broken"] = comparison["remaining_broken"]
    record["test_log_likelihood"] = after["test_log_likelihood"]
    record["seconds"] = seconds
    return record


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Return the mean, std, min and max over runs of every metric.

    The std is the sample standard deviation, and 0 for a single run. NaN
    values (an empty F_h, for example) give NaN for every statistic.
    """
    summary: dict[str, dict[str, float]] = {"mean": {}, "std": {}, "min": {}, "max": {}}
    for key in METRIC_KEYS:
        values = [float(run[key]) for run in runs]
        if any(math.isnan(value) for value in values):
            stats = dict.fromkeys(summary, math.nan)
        else:
            stats = {
                "mean": _mean(values),
                "std": _spread(values),
                "min": min(values),
                "max": max(values),
            }
        for name, value in stats.items():
            summary[name][key] = value
    return summary


def _mean(values: list[float]) -> float:
    """Mean of ``values``, exactly the value itself when all are equal, so
    identical seeds show no rounding difference."""
    if any(math.isnan(value) for value in values):
        return math.nan
    if min(values) == max(values):
        return values[0]
    if all(math.isfinite(value) for value in values):
        return statistics.fmean(values)
    return sum(values) / len(values)


def _spread(values: list[float]) -> float:
    """Sample std of ``values``: 0 for one value or equal values, without the
    rounding residue (such as 1e-16) of a floating-point sum."""
    if any(math.isnan(value) for value in values):
        return math.nan
    if len(values) < 2 or min(values) == max(values):
        return 0.0
    if all(math.isfinite(value) for value in values):
        return statistics.stdev(values)
    return math.nan


def _random_causes(n_train: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=generator)[:size].sort().values


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Return ``seeds`` as a list, or raise ConfigError unless it is a
    non-empty sequence of distinct seeds that torch accepts."""
    if isinstance(seeds, int | str) or not isinstance(seeds, Iterable):
        raise ConfigError(
            f"seeds={seeds!r} is not a sequence of seeds; give one such as "
            "(0, 1, 2), or (0,) for one seed."
        )
    seeds = [check_seed(seed) for seed in seeds]
    if not seeds:
        raise ConfigError("At least one seed is needed, for example seeds=(0, 1, 2).")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"Seeds {seeds} repeat a value; give distinct seeds.")
    return seeds


def _needs_fisher(treatment: str) -> bool:
    return treatment in ("ewc-deletion", "fit-failures", "fit-failures+ewc-deletion")


def _non_decreasing(progress: Progress | None) -> Progress | None:
    """Wrap ``progress`` so that the fractions it receives never decrease.

    A run's own count can restart, as Newton removal's LiSSA solve counts
    from 0 again after its scale search. The job's bar then waits at the
    highest fraction reached instead of moving back.
    """
    if progress is None:
        return None
    highest = 0.0

    def report(fraction: float, message: str) -> None:
        nonlocal highest
        highest = max(highest, fraction)
        progress(highest, message)

    return report


def _part_progress(
    progress: Progress | None, low: float, high: float, label: str
) -> Progress | None:
    """Return a callback that reports one part of a job on [low, high] of its bar.

    Each message starts with ``label``, which names the part (the arm, k or
    strength and the seed). Passed to a treatment, the callback also lets a
    job be stopped during a run, since an exception raised by ``progress``
    ends the run at its next report.
    """
    if progress is None:
        return None

    def labelled(fraction: float, message: str) -> None:
        progress(fraction, f"{label} — {message}")

    return scaled_progress(labelled, low, high)


def repair_with_controls(
    treatment: str,
    model: nn.Module,
    train: Data,
    causes: Any,
    test: Data,
    split: FailureSplit,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    config: TreatmentConfig | dict[str, Any] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    train_config: TrainConfig | None = None,
    controls: Sequence[str] = CONTROLS,
    model_factory: Callable[[], nn.Module] | None = None,
    store_model: StoreModel | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run a treatment once per seed, beside controls with the same protocol.

    For the training treatments (EWC-deletion, fine-tuning, retraining and
    the fit of F_q with EWC-deletion) and Newton removal, each control in
    ``controls`` runs with the same settings and seeds:
    ``"nothing"`` removes no example and ``"random"`` removes |C| training
    examples drawn at random with the run's seed. Newton removal of nothing
    is θ̂ itself. fit-failures, which removes nothing, runs without controls.

    Args:
        treatment: one of ``TREATMENTS``.
        model: θ̂, left unchanged.
        train: training images (N, C, H, W) and labels (N,).
        causes: training indices of C, validated like :func:`repair`'s.
        test: test images (n_test, C, H, W) and labels (n_test,).
        split: the failure split of θ̂ on ``test``.
        seeds: one run per seed; the seed replaces the config's seed.
        config: the treatment's settings.
        fisher: diagonal Fisher at θ̂ over D, reused by every run.
        train_config: optimiser settings of fine-tuning and retraining.
        controls: control arms to run, a subset of ``("nothing", "random")``.
        model_factory: builds an untrained network for retraining.
        store_model: called with a name such as ``"random-seed1"`` and each
            repaired model; what it returns is recorded as that run's
            ``model_file``. A control arm that returned θ̂ itself, as Newton
            removal of nothing does, is not stored, and its ``model_file`` is
            ``BASE_MODEL_FILE``, the run's own model.
        progress: called with (fraction done, message) before each run and
            at each step or epoch inside it. Each run fills an equal share.

    Returns:
        ``gain_over_nothing`` (treatment minus nothing-removed: ``mean``, the
        difference of the means, and ``paired_mean``/``paired_std`` over
        seeds), then ``treatment``, ``n_causes``, ``seeds``, ``before``
        (accuracies of θ̂), ``arms`` (per arm ``mean``, ``std``, ``min``,
        ``max`` of every metric and ``per_seed`` records), ``model`` (the
        repaired model of the first seed) and ``result`` (its RepairResult).
        ``gain_over_nothing`` is None without a nothing-removed arm, and
        ``controls_note`` says why a treatment ran without its controls.
        Each ``per_seed`` record has ``unchanged``, True when the run
        returned θ̂ itself, and ``notes`` names the arms that did.
    """
    train_images, train_labels = train
    test_images, test_labels = test
    settings = resolve_config(treatment, config)
    checked = validate_causes(
        causes, len(train_labels), allow_empty=treatment in REMOVES_NOTHING
    )
    seeds = check_seeds(seeds)
    if isinstance(controls, str):
        raise ConfigError(
            f"controls={controls!r} is one name, not a sequence of names; give "
            f"({controls!r},) or any of {', '.join(CONTROLS)} in a tuple."
        )
    unknown = [name for name in controls if name not in CONTROLS]
    if unknown:
        raise ConfigError(
            f"Unknown control {unknown[0]!r}. Use any of {', '.join(CONTROLS)}."
        )
    repeated = sorted({name for name in controls if list(controls).count(name) > 1})
    if repeated:
        raise ConfigError(
            f"Control {repeated[0]!r} is given {list(controls).count(repeated[0])} "
            "times. Give each control once."
        )
    arms = ["treatment"]
    controls_note = None
    if treatment in CONTROLLED_TREATMENTS:
        arms += list(controls)
    elif controls:
        controls_note = NO_CONTROLS[treatment]
        logger.info(controls_note)
    if fisher is None and _needs_fisher(treatment):
        fisher = diagonal_fisher(model, train_images, train_labels)

    query_images = test_images[split.query]
    query_labels = test_labels[split.query]
    per_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    first_result = None
    total = len(arms) * len(seeds)
    progress = _non_decreasing(progress)
    for position, (arm, seed) in enumerate(
        (arm, seed) for arm in arms for seed in seeds
    ):
        label = f"{treatment}: {arm} arm, seed {seed}"
        if progress is not None:
            progress(position / total, label)
        if arm == "treatment":
            removed = checked
        elif arm == "nothing":
            removed = torch.empty(0, dtype=torch.long)
        else:
            removed = _random_causes(len(train_labels), len(checked), seed)
        result = apply_treatment(
            treatment,
            model,
            train_images,
            train_labels,
            removed,
            query_images,
            query_labels,
            dataclasses.replace(settings, seed=seed),
            fisher=fisher,
            train_config=train_config,
            model_factory=model_factory,
            progress=_part_progress(
                progress, position / total, (position + 1) / total, label
            ),
        )
        comparison = compare(model, result.model, test_images, test_labels, split)
        record = _run_record(comparison, result.seconds)
        record.update(
            seed=seed,
            n_removed=0 if treatment in REMOVES_NOTHING else len(removed),
            removed=removed.tolist(),
            unchanged=_same_parameters(model, result.model),
        )
        record.update(_early_stopping_record(result.extras))
        if "step_norm" in result.extras:
            record["step_norm"] = result.extras["step_norm"]
        if (
            store_model is not None
            and arm != "treatment"
            and _same_state(model, result.model)
        ):
            # One copy of θ̂ per seed would repeat the run's model file.
            record["model_file"] = BASE_MODEL_FILE
        elif store_model is not None:
            record["model_file"] = store_model(f"{arm}-seed{seed}", result.model)
        per_arm[arm].append(record)
        if arm == "treatment" and first_result is None:
            first_result = result
    if progress is not None:
        progress(1.0, f"{treatment}: all runs done")

    summaries = {
        arm: {**summarise(runs), "per_seed": runs} for arm, runs in per_arm.items()
    }
    before = evaluate_model(model, test_images, test_labels, split)
    before.pop("predictions")
    return {
        "gain_over_nothing": _gain(per_arm) if "nothing" in per_arm else None,
        "controls_note": controls_note,
        "notes": [
            *_unchanged_notes(per_arm),
            *_stop_notes(treatment, settings, per_arm["treatment"]),
            *_short_step_notes(treatment, settings, per_arm["treatment"], before),
            *_chance_notes(per_arm, len(split.holdout)),
        ],
        "treatment": treatment,
        "n_causes": len(checked),
        "seeds": seeds,
        "before": before,
        "arms": summaries,
        "model": first_result.model,
        "result": first_result,
    }


def _same_parameters(model: nn.Module, repaired: nn.Module) -> bool:
    """Return whether ``repaired`` has exactly the parameters of ``model``."""
    return all(
        torch.equal(a.detach().cpu(), b.detach().cpu())
        for a, b in zip(model.parameters(), repaired.parameters(), strict=True)
    )


def _same_state(model: nn.Module, repaired: nn.Module) -> bool:
    """Return whether ``repaired`` has exactly the parameters and buffers of
    ``model``."""
    original = model.state_dict()
    changed = repaired.state_dict()
    return original.keys() == changed.keys() and all(
        torch.equal(original[name].cpu(), changed[name].cpu()) for name in original
    )


def unchanged_sweep_note(treatment: str, points: list[dict[str, Any]]) -> str | None:
    """Name the strengths of a sweep whose model is θ̂ itself, or return None.

    Such points all sit where the original model is, so a chart of the sweep
    alone would not show that the treatment did nothing there.
    """
    unchanged = [point["strength"] for point in points if point.get("unchanged")]
    if not unchanged:
        return None
    field = SWEEPABLE.get(treatment, "strength")
    values = ", ".join(f"{value:g}" for value in unchanged)
    return (
        f"At {field} {values} the model is the original one: no step raised "
        "accuracy on F_q before the run stopped, so early stopping kept θ̂."
    )


#: How the notes about unchanged models name each arm.
ARM_NAMES = {"treatment": "The treatment", "random": "The random-removal control"}


def _unchanged_notes(per_arm: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Say which arms returned θ̂ itself, so equal figures are not a mystery.

    EWC-deletion keeps the starting parameters when no step raises accuracy
    on F_q before patience or the retained-accuracy guard ends the run. A
    removal arm that did so measures the same as nothing removed.
    """
    notes = []
    for arm, runs in per_arm.items():
        n_unchanged = sum(bool(run["unchanged"]) for run in runs)
        if arm == "nothing" or not n_unchanged:
            continue
        name = ARM_NAMES.get(arm, f"The {arm} arm")
        notes.append(
            f"{name} returned the original model unchanged in {n_unchanged} of "
            f"{len(runs)} seeds: no step raised accuracy on the query "
            "failures F_q before patience or the retained-accuracy guard ended the "
            "run, so early stopping kept the starting parameters."
        )
    return notes


def _short_step_notes(
    treatment: str,
    settings: Any,
    runs: list[dict[str, Any]],
    before: dict[str, Any],
) -> list[str]:
    """Say when a Newton step moved θ̂ too little to change any accuracy, so
    that figures equal to the starting model's point to γ."""
    if treatment != "newton" or not runs:
        return []
    keys = ("query_acc", "holdout_acc", "remaining_acc")
    # An empty F_h has NaN accuracy before and after, which counts as equal.
    if any(
        run[key] != before[key]
        and not (math.isnan(run[key]) and math.isnan(before[key]))
        for run in runs
        for key in keys
    ):
        return []
    norms = [run["step_norm"] for run in runs if "step_norm" in run]
    length = f" (its length is {max(norms):.3g})" if norms else ""
    return [
        f"The Newton step at γ = {settings.gamma:g}{length} left the accuracy on "
        "F_q, F_h and T\\F where it was. A larger γ takes a longer step along the "
        "same direction; a sweep over γ shows where predictions start to change."
    ]


#: Names of the control arms inside a sentence.
CONTROL_NAMES = {"nothing": "nothing removed", "random": "random removal"}


def _chance_notes(
    per_arm: dict[str, list[dict[str, Any]]], n_holdout: int
) -> list[str]:
    """Name the gains on F_h that lie within two standard errors of zero.

    The gain over a control is the mean of the seed-by-seed differences in
    F_h accuracy, and its standard error is their standard deviation over
    √(number of seeds). Two standard errors is a rough check: with few seeds
    a t interval is wider still, so a gain outside it can be chance too.
    """
    treated = per_arm["treatment"]
    if len(treated) < 2:
        return []
    notes = []
    for arm, name in CONTROL_NAMES.items():
        if arm not in per_arm:
            continue
        paired = [
            float(a["holdout_acc"]) - float(b["holdout_acc"])
            for a, b in zip(treated, per_arm[arm], strict=True)
        ]
        mean = _mean(paired)
        error = _spread(paired) / math.sqrt(len(paired))
        if not (math.isfinite(mean) and error > 0 and abs(mean) < 2 * error):
            continue
        notes.append(
            f"The gain on F_h over {name}, {100 * mean:+.1f} points, is within two "
            f"standard errors of zero (standard error {100 * error:.1f} points over "
            f"{len(treated)} seeds), so it may be chance. F_h holds {n_holdout} "
            "images; more seeds shrink the standard error."
        )
    return notes


def _stop_notes(treatment: str, settings: Any, runs: list[dict[str, Any]]) -> list[str]:
    """Say what limited the treatment's runs where the figures alone mislead:
    EWC-deletion runs ended by the retained-accuracy guard, which a larger γ
    does not move past, and seeds that gave the same figures because every
    step used every cause."""
    notes = []

    guarded = [run["seed"] for run in runs if run.get("stopped_by") == "retain_drop"]
    # fit-failures+ewc-deletion keeps the deletion's settings in a group.
    deletion = getattr(settings, "deletion", settings)
    setting = "retain_drop" if deletion is settings else "deletion.retain_drop"
    if guarded:
        notes.append(
            f"EWC-deletion stopped in {len(guarded)} of {len(runs)} seeds because "
            f"accuracy on a sample of D\\C fell by more than {setting} "
            f"({deletion.retain_drop:g}), keeping the parameters of a step before "
            "that drop, so the run ended before early stopping on F_q would have "
            f"ended it. Set {setting} to 1.0 to turn this check off. The sample "
            "is training data, which the model fits closely, so the check does "
            "not bound the drop on test data: see T\\F above."
        )

    # The seed orders the causes into batches and draws the sample of D\C
    # that retain_drop is checked on.
    batch_size = getattr(settings, "batch_size", None)
    n_causes = runs[0]["n_removed"] if runs else 0
    same = (
        len(runs) > 1
        and not runs[0]["unchanged"]
        and all(
            [run.get(key) for key in (*OUTCOME_KEYS, "best_step")]
            == [runs[0].get(key) for key in (*OUTCOME_KEYS, "best_step")]
            for run in runs
        )
    )
    if (
        treatment == "ewc-deletion"
        and same
        and batch_size is not None
        and 0 < n_causes <= batch_size
    ):
        notes.append(
            f"The {len(runs)} seeds gave the same figures: with {n_causes} causes, "
            f"no more than batch_size ({batch_size}), every EWC-deletion step uses "
            "all of them, so the seed does not change the steps. One seed gives "
            "the same result."
        )
    return notes


def _gain(per_arm: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    treated = summarise(per_arm["treatment"])["mean"]
    nothing = summarise(per_arm["nothing"])["mean"]
    gain: dict[str, dict[str, float]] = {
        "mean": {},
        "paired_mean": {},
        "paired_std": {},
    }
    for key in OUTCOME_KEYS:
        gain["mean"][key] = treated[key] - nothing[key]
        paired = [
            float(a[key]) - float(b[key])
            for a, b in zip(per_arm["treatment"], per_arm["nothing"], strict=True)
        ]
        gain["paired_mean"][key] = _mean(paired)
        gain["paired_std"][key] = _spread(paired)
    return gain


def check_strengths(treatment: str, strengths: Sequence[float]) -> list[float]:
    """Return a sweep's strengths as values of the swept setting: whole
    epochs for fine-tuning, floats otherwise.

    Raises:
        ConfigError: a treatment without a strength, no strengths, a value
            that is not finite and positive, a fraction of an epoch, or a
            repeated value.
    """
    if treatment not in SWEEPABLE:
        raise ConfigError(
            f"Treatment {treatment!r} has no strength to sweep. Sweep one of "
            f"{', '.join(SWEEPABLE)}."
        )
    if len(strengths) == 0:
        raise ConfigError("The sweep needs at least one strength.")
    field = SWEEPABLE[treatment]
    for strength in strengths:
        if not (math.isfinite(float(strength)) and float(strength) > 0):
            raise ConfigError(
                f"Sweep strength {strength} of {treatment} must be a finite "
                "positive number."
            )
        if field == "max_epochs" and float(strength) != int(strength):
            raise ConfigError(
                f"Sweep strength {strength} of finetune is a number of epochs and "
                "must be a whole number."
            )
    # Each point's model is stored under its value, so a repeated value would
    # make two points name one file.
    values = [int(s) if field == "max_epochs" else float(s) for s in strengths]
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ConfigError(
            f"Sweep strength {repeated[0]:g} of {treatment} is given "
            f"{values.count(repeated[0])} times. Give each strength once."
        )
    return values


#: Extras of the training treatments that record where early stopping kept
#: the parameters (epochs for fine-tuning, steps for EWC-deletion) and, for
#: EWC-deletion, the reason the run ended (a key of ``STOP_REASONS``).
EARLY_STOPPING_FIELDS = (
    "best_epoch",
    "epochs_run",
    "best_step",
    "steps_run",
    "stopped_by",
)


def _early_stopping_record(extras: dict[str, Any]) -> dict[str, Any]:
    """Return the early-stopping fields of a treatment's extras. Two strengths
    whose runs kept the same epoch or step give the same model, and these
    fields show why. For fit-failures+ewc-deletion they are those of its
    deletion step, which can stop without changing θ̂₊F."""
    deletion = extras.get("deletion")
    if isinstance(deletion, dict):
        extras = deletion
    return {name: extras[name] for name in EARLY_STOPPING_FIELDS if name in extras}


def sweep(
    treatment: str,
    model: nn.Module,
    train: Data,
    causes: Any,
    test: Data,
    split: FailureSplit,
    *,
    strengths: Sequence[float],
    config: TreatmentConfig | dict[str, Any] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    train_config: TrainConfig | None = None,
    store_model: StoreModel | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Trace the trade-off between fixing failures and keeping the rest.

    The strength is γ for EWC-deletion and Newton removal (larger lets the
    parameters move further from θ̂, though EWC-deletion's early stopping and
    retained-accuracy guard can end a run before it does) and the maximum
    number of epochs for fine-tuning. Newton removal
    solves for its direction once and scales it for every γ. ``store_model``
    is called with a name such as ``"gamma-0.001"`` and each repaired model;
    what it returns is recorded as the point's ``model_file``. ``progress``
    is called with (fraction done, message) during Newton's solve, before
    each point, and at each step or epoch of a point's run.

    Returns:
        One point per strength, in the given order: ``strength``, every
        accuracy, ``holdout_fixed``, ``remaining_broken``,
        ``test_log_likelihood``, ``seconds``, and ``unchanged``: whether the
        point's model is θ̂ itself. Fine-tuning points add ``best_epoch``, the
        epoch whose parameters early stopping kept, and ``epochs_run``;
        EWC-deletion points add ``best_step`` and ``steps_run`` likewise.

    Raises:
        ConfigError: a treatment without a strength, or no strengths.
    """
    values = check_strengths(treatment, strengths)
    field = SWEEPABLE[treatment]
    train_images, train_labels = train
    test_images, test_labels = test
    settings = resolve_config(treatment, config)
    checked = validate_causes(causes, len(train_labels))
    query_images = test_images[split.query]
    query_labels = test_labels[split.query]
    if fisher is None and treatment == "ewc-deletion":
        fisher = diagonal_fisher(model, train_images, train_labels)

    # Newton's points each report the shared solve time plus their own step.
    direction, solve_seconds = None, 0.0
    progress = _non_decreasing(progress)
    points_start = 0.0
    if treatment == "newton":
        points_start = NEWTON_SOLVE_SHARE
        start = time.perf_counter()
        direction = newton_direction(
            model,
            train_images,
            train_labels,
            checked,
            settings,
            progress=_part_progress(
                progress, 0.0, points_start, "newton: solving for the direction"
            ),
        )
        solve_seconds = time.perf_counter() - start
    share = (1.0 - points_start) / len(values)
    points = []
    for position, value in enumerate(values):
        label = f"{treatment}: {field} = {value}"
        low = points_start + position * share
        if progress is not None:
            progress(low, label)
        point_settings = dataclasses.replace(settings, **{field: value})
        if direction is not None:
            start = time.perf_counter()
            repaired = apply_newton_step(model, direction, point_settings.gamma)
            seconds = solve_seconds + time.perf_counter() - start
        else:
            result = apply_treatment(
                treatment,
                model,
                train_images,
                train_labels,
                checked,
                query_images,
                query_labels,
                point_settings,
                fisher=fisher,
                train_config=train_config,
                progress=_part_progress(progress, low, low + share, label),
            )
            repaired, seconds = result.model, result.seconds
        comparison = compare(model, repaired, test_images, test_labels, split)
        point = {
            "strength": value,
            **_run_record(comparison, seconds),
            "unchanged": _same_parameters(model, repaired),
        }
        if direction is None:
            point.update(_early_stopping_record(result.extras))
        if store_model is not None:
            point["model_file"] = store_model(f"{field}-{value}", repaired)
        points.append(point)
    if progress is not None:
        progress(1.0, f"{treatment}: all {len(points)} points done")
    return points


def _curve_done_text(ks: Sequence[int]) -> str:
    """Say which k a finished removal curve ran, the k = 0 control apart."""
    removing = [k for k in ks if k > 0]
    if not removing:
        return "the nothing-removed control (k = 0) done"
    done = f"k = {removing[0]}" if len(removing) == 1 else f"all {len(removing)} k"
    control = ", and the nothing-removed control (k = 0)" if 0 in ks else ""
    return f"{done}{control} done"


def removal_curve(
    scores: torch.Tensor,
    model: nn.Module,
    train: Data,
    test: Data,
    split: FailureSplit,
    *,
    ks: Sequence[int] = (10, 30, 100, 300, 600, 1000),
    seeds: Sequence[int] = (0, 1, 2),
    config: FinetuneConfig | None = None,
    train_config: TrainConfig | None = None,
    store_model: StoreModel | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Remove the k highest-scoring training examples and fine-tune on the rest.

    Args:
        scores: one score per training example, shape (N,); higher means
            more harmful. Ties keep the lower index first.
        model: θ̂, left unchanged.
        train: training images (N, C, H, W) and labels (N,).
        test: test images and labels.
        split: the failure split of θ̂ on ``test``.
        ks: numbers of removed examples. k = 0 removes nothing, a control
            that shows how much fine-tuning alone changes the accuracies. A
            k above N - ``MIN_REMAINING`` is skipped with a warning, since
            fine-tuning needs one example to train on and one to validate on.
        seeds: fine-tuning seeds per k; each replaces the seed of ``config``.
        config: the fine-tuning treatment's settings; the defaults when None.
        train_config: optimiser settings of fine-tuning.
        store_model: called with a name such as ``"k300-seed0"`` and each
            fine-tuned model; what it returns is recorded as that run's
            ``model_file``.
        progress: called with (fraction done, message) before each run and
            after each fine-tuning epoch. Each run fills an equal share.

    Returns:
        One entry per kept k, by increasing k: ``k``, ``mean``, ``std``,
        ``min`` and ``max`` of every metric over seeds, and ``per_seed``
        records.
    """
    train_images, train_labels = train
    test_images, test_labels = test
    n_train = len(train_labels)
    scores = torch.as_tensor(scores).flatten().cpu()
    if len(scores) != n_train:
        raise ConfigError(
            f"Got {len(scores)} scores for {n_train} training examples. Score every "
            "training example once."
        )
    if not torch.isfinite(scores.double()).all():
        raise ConfigError("The scores contain NaN or infinite values.")
    seeds = check_seeds(seeds)
    for k in ks:
        if k < 0:
            raise ConfigError(f"k {k} in ks must be at least 0.")
    repeated = sorted({k for k in ks if list(ks).count(k) > 1})
    if repeated:
        # Each k's models are stored under k, so a repeated k would make two
        # points name one file.
        raise ConfigError(
            f"k {repeated[0]} appears {list(ks).count(repeated[0])} times in ks "
            f"{list(ks)}. Give each k once."
        )
    max_k = n_train - MIN_REMAINING
    # A curve is read from left to right, so its points go by increasing k.
    kept_ks = sorted(k for k in ks if k <= max_k)
    if not kept_ks:
        raise ConfigError(
            f"Every k in {list(ks)} would leave fewer than {MIN_REMAINING} of the "
            f"{n_train} training examples to fine-tune on. Choose ks up to {max_k}."
        )
    for k in ks:
        if k > max_k:
            warnings.warn(
                f"Skipping k = {k}: removing it from {n_train} training examples "
                f"would leave fewer than {MIN_REMAINING} to fine-tune on.",
                stacklevel=2,
            )

    order = torch.sort(scores, descending=True, stable=True).indices
    query_images = test_images[split.query]
    query_labels = test_labels[split.query]
    curve = []
    total = len(kept_ks) * len(seeds)
    progress = _non_decreasing(progress)
    for k_position, k in enumerate(kept_ks):
        removed = order[:k].sort().values
        runs = []
        for seed_position, seed in enumerate(seeds):
            done = k_position * len(seeds) + seed_position
            label = f"Removal curve: k = {k}, seed {seed}"
            if progress is not None:
                progress(done / total, label)
            result = apply_treatment(
                "finetune",
                model,
                train_images,
                train_labels,
                removed,
                query_images,
                query_labels,
                dataclasses.replace(config or FinetuneConfig(), seed=seed),
                train_config=train_config,
                progress=_part_progress(
                    progress, done / total, (done + 1) / total, label
                ),
            )
            comparison = compare(model, result.model, test_images, test_labels, split)
            run = {"seed": seed, **_run_record(comparison, result.seconds)}
            if store_model is not None:
                run["model_file"] = store_model(f"k{k}-seed{seed}", result.model)
            runs.append(run)
        curve.append({"k": k, **summarise(runs), "per_seed": runs})
    if progress is not None:
        progress(1.0, _curve_done_text(kept_ks))
    return curve


__all__ = [
    "ACCURACY_KEYS",
    "CONTROLS",
    "METRIC_KEYS",
    "compare",
    "evaluate_model",
    "removal_curve",
    "repair_with_controls",
    "summarise",
    "sweep",
]
