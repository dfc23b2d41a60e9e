"""The benchmark's units of work, built on the pipeline, identification and
evaluation modules.

A *run unit* trains one corrupted base model (scenario × data × seed) and
scores its training set with each identification method. An *experiment
unit* repairs that model: removal curves (experiment 1 and 6), top-k removal
under input noise and FGSM (2 and 3), and the treatment trade-off (4).
Experiment 5 (cost) only reads the timings the other units record.
Every step is saved to the results file as soon as it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repair_core.benchmark.settings import BenchSettings
from repair_core.benchmark.store import ResultsStore, Unit, peak_rss_mb
from repair_core.evaluation import evaluate_model, removal_curve, repair_with_controls
from repair_core.evaluation import sweep as run_sweep
from repair_core.failures import FailureSplit
from repair_core.identification import default_config, identify
from repair_core.metrics import detection_curve, detection_summary, ranking
from repair_core.pipeline import (
    LoadedRun,
    RunConfig,
    identification_context,
    implicated_by,
    load_failure_split,
    load_run,
    train_run,
)
from repair_core.training import TrainConfig
from repair_core.treatments import default_config as treatment_config
from repair_core.workspace import Workspace

logger = logging.getLogger(__name__)

#: Detection curves are stored at these shares of D inspected.
CURVE_POINTS = np.linspace(0.0, 1.0, 101)

#: Data sets of the benchmark: the embedded 3000/2000 MNIST split, and full
#: MNIST from a torchvision folder (experiment 6).
DATA_KEYS = ("embedded", "mnist")

#: The classes whose labels the label-flip scenario changes.
LABEL_FLIP_CLASSES = (1, 7, 6, 9)

#: Methods scored after the repairs of experiments 1 and 6: those that train
#: many models or replay training, and GD linear influence, which has the
#: lowest published detection figure of the influence methods.
SLOW_METHODS = ("linear-influence-gd", "sgd-influence", "confident-learning")

#: Removal counts with a published or bar figure, measured first.
REPORTED_KS = (300, 1000)


@dataclass
class BenchContext:
    """Settings, results store and workspace shared by every unit."""

    settings: BenchSettings
    store: ResultsStore
    workspace: Workspace
    device: str = "cpu"


# Measurement ---------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux only).

    Writing 5 to /proc/self/clear_refs resets VmHWM, so VmHWM read later is
    the peak of the step alone. Returns False where that is not possible.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measured(compute: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``compute`` and return its value with wall time and peak memory.

    Returns:
        (value, cost): ``cost`` has ``seconds`` (perf_counter wall time),
        ``step_peak_rss_mb`` (peak resident memory during the call, where
        /proc allows resetting it, else None), ``process_peak_rss_mb``
        (``ru_maxrss``: the peak of the whole process so far) and, on CUDA,
        ``cuda_peak_mb``.
    """
    reset = _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = compute()
    cost: dict[str, Any] = {"seconds": time.perf_counter() - start}
    cost["step_peak_rss_mb"] = _vm_hwm_mb() if reset else None
    cost["process_peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        cost["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return value, cost


# Run units -----------------------------------------------------------------


def run_config(
    context: BenchContext, scenario: str, data_key: str, seed: int
) -> RunConfig:
    """Return the run settings of one base model."""
    settings = context.settings
    train = TrainConfig(
        seed=seed,
        max_epochs=settings.max_epochs,
        record_trajectory="sgd-influence" in settings.methods,
    )
    common = {
        "scenario": scenario,
        "model": "mnist-cnn",
        "seed": seed,
        "device": context.device,
        "train": train,
    }
    if data_key == "embedded":
        return RunConfig(
            data="mnist-embedded",
            n_train=settings.n_train,
            n_test=settings.n_test,
            **common,
        )
    return RunConfig(
        data="mnist",
        root=settings.mnist_root,
        n_train=settings.mnist_n_train,
        n_test=settings.mnist_n_test,
        **common,
    )


@dataclass
class BaseRun:
    """A trained base model with its failure split and corruption mask."""

    unit: Unit
    run: LoadedRun
    split: FailureSplit
    summary: dict[str, Any]

    @property
    def mask(self) -> torch.Tensor:
        return self.run.corrupted_mask

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run.data.train.images, self.run.data.train.labels

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run.data.test.images, self.run.data.test.labels


def base_run(context: BenchContext, scenario: str, data_key: str, seed: int) -> BaseRun:
    """Train (or reload) the base model of a scenario, data set and seed."""
    key = f"run/{scenario}/{data_key}/seed{seed}"
    unit = context.store.unit(
        key, kind="run", scenario=scenario, data=data_key, seed=seed
    )
    stored = unit.steps.get("train")
    if stored is not None and not context.workspace.run_dir(stored["run_id"]).is_dir():
        logger.warning("%s: run %s is not in the workspace; retraining", key, stored)
        unit.restart()
    config = run_config(context, scenario, data_key, seed)

    def train() -> dict[str, Any]:
        summary, cost = measured(lambda: train_run(context.workspace, config))
        summary.pop("history", None)
        return {**summary, "cost": cost}

    summary = unit.step("train", train)
    run = load_run(context.workspace, summary["run_id"], device=context.device)
    split = load_failure_split(
        context.workspace, summary["run_id"], summary["failure_set_id"]
    )
    unit.set("status", "done")
    return BaseRun(unit=unit, run=run, split=split, summary=summary)


def _method_config(settings: BenchSettings, method: str) -> Any:
    config = default_config(method)
    overrides = settings.method_overrides.get(method, {})
    return dataclasses.replace(config, **overrides) if overrides else config


def _scores_path(method: str) -> str:
    return f"bench_scores/{method}.pt"


def _fit_quality(base: BaseRun, fitted_state: dict[str, torch.Tensor]) -> dict:
    """Accuracy of the EWC fit θ̂₊F on F_q (fitted) and F_h (not fitted)."""
    fitted = base.run.build_model()
    fitted.load_state_dict(fitted_state)
    fitted.to(base.run.device).eval()
    result = evaluate_model(fitted, *base.test, base.split)
    result.pop("predictions")
    return result


def scores_of(context: BenchContext, base: BaseRun, method: str) -> torch.Tensor | None:
    """Score D with ``method`` once; return the scores, or None if it failed."""
    workspace, run_id = context.workspace, base.run.run_id
    step_name = f"identify/{method}"
    record = base.unit.steps.get(step_name)
    if record is not None and record.get("error"):
        return None
    if record is not None and workspace.path(run_id, _scores_path(method)).is_file():
        return workspace.load_tensor(run_id, _scores_path(method))
    base.unit.steps.pop(step_name, None)

    holder: dict[str, torch.Tensor] = {}

    def compute() -> dict[str, Any]:
        identify_context = identification_context(workspace, base.run)
        query = base.split.query
        try:
            result, cost = measured(
                lambda: identify(
                    method,
                    base.run.model,
                    *base.train,
                    base.test[0][query],
                    base.test[1][query],
                    _method_config(context.settings, method),
                    context=identify_context,
                )
            )
        except Exception as error:  # noqa: BLE001
            # A failed method is recorded and the unit goes on without it.
            logger.exception("%s failed on %s", method, base.unit.key)
            return {"method": method, "error": f"{type(error).__name__}: {error}"}
        workspace.save_tensor(run_id, _scores_path(method), result.scores)
        fisher = result.extras.get("fisher")
        if fisher is not None and not workspace.path(run_id, "fisher.pt").is_file():
            workspace.save_tensor(
                run_id, "fisher.pt", {k: v.cpu() for k, v in fisher.items()}
            )
        holder["scores"] = result.scores
        record = {
            "method": method,
            "seconds": result.seconds,
            "cost": cost,
            "config": result.config,
        }
        if base.mask is not None:
            inspected, found = detection_curve(result.scores, base.mask)
            record["detection"] = detection_summary(
                result.scores, base.mask, implicated_by(base.run, base.split.query)
            )
            record["curve"] = np.interp(CURVE_POINTS, inspected, found).tolist()
        if "fitted_state" in result.extras:
            record["fit"] = _fit_quality(base, result.extras["fitted_state"])
        return record

    record = base.unit.step(step_name, compute)
    if record.get("error"):
        return None
    return holder["scores"]


def complete_detection(context: BenchContext) -> None:
    """Add the implicated-flip figures to rankings stored without them.

    Rankings scored before those figures existed keep their scores in the
    workspace, so the figures are computed from them without scoring again.
    Runs whose workspace folder is gone are left as they are.
    """
    workspace = context.workspace
    for record in context.store.units.values():
        steps = record.get("steps", {})
        if record.get("kind") != "run" or "train" not in steps:
            continue
        todo = [
            name
            for name, step in steps.items()
            if name.startswith("identify/")
            and "detection" in step
            and "n_implicated" not in step["detection"]
        ]
        run_id = steps["train"]["run_id"]
        if not todo or not workspace.run_dir(run_id).is_dir():
            continue
        run = load_run(workspace, run_id, device="cpu")
        split = load_failure_split(workspace, run_id, steps["train"]["failure_set_id"])
        implicated = implicated_by(run, split.query)
        if implicated is None:
            continue
        for name in todo:
            path = _scores_path(name.removeprefix("identify/"))
            if workspace.path(run_id, path).is_file():
                steps[name]["detection"] = detection_summary(
                    workspace.load_tensor(run_id, path), run.corrupted_mask, implicated
                )
        context.store.save()


def fit_strength(context: BenchContext, base: BaseRun) -> dict[str, Any]:
    """Detection of EWC-influence against the number of steps of its fit.

    Each fit uses every failure of F_q and runs exactly the given number of
    full-batch steps (no early stopping), with the other settings at their
    defaults, so the rows show how the strength of the fit alone moves the
    ranking.
    """
    defaults = _method_config(context.settings, "ewc-influence")
    identify_context = identification_context(context.workspace, base.run)
    query = base.split.query
    implicated = implicated_by(base.run, query)
    rows = []
    for steps in context.settings.fit_steps:
        config = dataclasses.replace(
            defaults, max_steps=steps, min_steps=steps, val_fraction=0.0
        )
        result = identify(
            "ewc-influence",
            base.run.model,
            *base.train,
            base.test[0][query],
            base.test[1][query],
            config,
            context=identify_context,
        )
        identify_context.fisher = result.extras["fisher"]
        rows.append(
            {
                "steps": steps,
                "seconds": result.seconds,
                **detection_summary(result.scores, base.mask, implicated),
                "fit": _fit_quality(base, result.extras["fitted_state"]),
            }
        )
    return {"lr": defaults.lr, "rows": rows}


def failure_composition(base: BaseRun, classes: tuple[int, ...]) -> dict[str, Any]:
    """Count the failures (all, F_q, F_h) whose true class is in ``classes``."""
    labels = base.test[1]
    in_classes = torch.isin(labels, torch.tensor(classes))
    composition: dict[str, Any] = {"classes": list(classes)}
    for name, indices in (
        ("failures", base.split.failures),
        ("query", base.split.query),
        ("holdout", base.split.holdout),
    ):
        composition[f"n_{name}"] = len(indices)
        composition[f"{name}_in_classes"] = int(in_classes[indices].sum())
    return composition


def _holdout_by_group(
    base: BaseRun, model: torch.nn.Module, classes: tuple[int, ...]
) -> dict[str, Any]:
    """Accuracy of ``model`` on F_h inside and outside ``classes``."""
    labels = base.test[1]
    holdout = base.split.holdout
    predictions = evaluate_model(model, *base.test, base.split)["predictions"]
    correct = (predictions == labels)[holdout]
    inside = torch.isin(labels[holdout], torch.tensor(classes))
    result: dict[str, Any] = {}
    for name, chosen in (("in_classes", inside), ("other_classes", ~inside)):
        count = int(chosen.sum())
        result[f"n_{name}"] = count
        result[f"holdout_acc_{name}"] = (
            correct[chosen].float().mean().item() if count else None
        )
    return result


def _arms(outcome: dict[str, Any]) -> dict[str, Any]:
    """Keep mean, std and per-seed records of each arm, minus removed indices."""
    arms = {}
    for arm, values in outcome["arms"].items():
        arms[arm] = {
            "mean": values["mean"],
            "std": values["std"],
            "per_seed": [
                {k: v for k, v in record.items() if k != "removed"}
                for record in values["per_seed"]
            ],
        }
    return {
        "treatment": outcome["treatment"],
        "n_removed": outcome["n_causes"],
        "seeds": outcome["seeds"],
        "before": outcome["before"],
        "arms": arms,
    }


def _fisher(context: BenchContext, base: BaseRun) -> dict[str, torch.Tensor] | None:
    path = context.workspace.path(base.run.run_id, "fisher.pt")
    if path.is_file():
        return context.workspace.load_tensor(base.run.run_id, "fisher.pt")
    return None


def _repair(
    context: BenchContext,
    base: BaseRun,
    treatment: str,
    causes: torch.Tensor,
    *,
    controls: tuple[str, ...],
    seeds: tuple[int, ...] | None = None,
    group_classes: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    settings = context.settings
    config = treatment_config(treatment)
    overrides = settings.treatment_overrides.get(treatment, {})
    if overrides:
        config = dataclasses.replace(config, **overrides)
    outcome = repair_with_controls(
        treatment,
        base.run.model,
        base.train,
        causes,
        base.test,
        base.split,
        seeds=seeds or settings.finetune_seeds,
        config=config,
        fisher=_fisher(context, base),
        train_config=base.run.config.train,
        controls=controls,
        model_factory=base.run.build_model,
    )
    record = _arms(outcome)
    if group_classes is not None:
        record["first_seed_holdout_by_group"] = _holdout_by_group(
            base, outcome["model"], group_classes
        )
    return record


# Experiment units ----------------------------------------------------------


def _experiment_unit(
    context: BenchContext, experiment: int, data_key: str, seed: int, base: BaseRun
) -> Unit:
    key = f"exp{experiment}/{data_key}/seed{seed}"
    unit = context.store.unit(
        key,
        kind="experiment",
        experiment=experiment,
        data=data_key,
        seed=seed,
    )
    if unit.record.get("run_id") not in (None, base.run.run_id):
        logger.warning("%s was made with another base run; starting it over", key)
        unit.restart()
    unit.set("run_id", base.run.run_id)
    return unit


def label_flip_experiment(context: BenchContext, data_key: str, seed: int) -> None:
    """Experiment 1 (embedded data) and 6 (full MNIST): detection and removal."""
    settings = context.settings
    experiment = 1 if data_key == "embedded" else 6
    base = base_run(context, "label-flip", data_key, seed)
    unit = _experiment_unit(context, experiment, data_key, seed, base)
    unit.set("base", _base_summary(base))
    unit.step("composition", lambda: failure_composition(base, LABEL_FLIP_CLASSES))
    # The slow methods run after the repairs, so that a run stopped early
    # still has the removal figures.
    scores = {}
    for method in settings.methods:
        if method not in SLOW_METHODS:
            scores[method] = scores_of(context, base, method)

    if "ewc-influence" in settings.methods:
        unit.step("fit-strength", lambda: fit_strength(context, base))

    mask_indices = torch.nonzero(base.mask).flatten()
    unit.step(
        "semi-oracle",
        lambda: _repair(
            context,
            base,
            "finetune",
            mask_indices,
            controls=("nothing",),
            group_classes=LABEL_FLIP_CLASSES,
        ),
    )
    curve_scores = {}
    for method in settings.curve_methods:
        if method not in scores:
            scores[method] = scores_of(context, base, method)
        if scores[method] is not None:
            curve_scores[method] = scores[method]
    for k in curve_order(settings.ks):
        for method, method_scores in curve_scores.items():
            unit.step(
                f"curve/{method}/k{k}",
                lambda method_scores=method_scores, k=k: removal_curve(
                    method_scores,
                    base.run.model,
                    base.train,
                    base.test,
                    base.split,
                    ks=(k,),
                    seeds=settings.finetune_seeds,
                    train_config=base.run.config.train,
                ),
            )
    if "ewc-influence" in scores and scores["ewc-influence"] is not None:
        top = ranking(scores["ewc-influence"])[: _largest_k(settings, base)]
        unit.step(
            "top-k-by-group",
            lambda: _repair(
                context,
                base,
                "finetune",
                top.sort().values,
                controls=(),
                seeds=settings.finetune_seeds[:1],
                group_classes=LABEL_FLIP_CLASSES,
            ),
        )
    for method in settings.methods:
        if method in SLOW_METHODS:
            scores_of(context, base, method)
    if experiment == 6 and settings.retrain_reference:
        unit.step(
            "semi-oracle-retrain",
            lambda: _repair(
                context,
                base,
                "retrain",
                mask_indices,
                controls=(),
                seeds=settings.finetune_seeds[:1],
                group_classes=LABEL_FLIP_CLASSES,
            ),
        )
    unit.finish()


def curve_order(ks: tuple[int, ...]) -> list[int]:
    """Return ``ks`` with the reported points (k = 300 and 1000) first."""
    return sorted(ks, key=lambda k: (k not in REPORTED_KS, ks.index(k)))


def _largest_k(settings: BenchSettings, base: BaseRun) -> int:
    n_train = len(base.train[1])
    return min(max(settings.ks), n_train - 1)


def _base_summary(base: BaseRun) -> dict[str, Any]:
    keys = (
        "run_id",
        "n_train",
        "n_test",
        "test_accuracy",
        "n_failures",
        "n_query",
        "n_holdout",
        "n_corrupted",
        "best_epoch",
        "epochs_run",
        "cost",
    )
    return {k: base.summary.get(k) for k in keys}


def noise_experiment(
    context: BenchContext, experiment: int, scenario: str, seed: int
) -> None:
    """Experiments 2 and 3: detection and top-k removal under input corruption."""
    settings = context.settings
    base = base_run(context, scenario, "embedded", seed)
    unit = _experiment_unit(context, experiment, "embedded", seed, base)
    unit.set("base", _base_summary(base))
    unit.set("scenario", scenario)
    scores = {m: scores_of(context, base, m) for m in settings.noise_methods}
    if scores.get("ewc-influence") is None:
        unit.fail(RuntimeError("EWC-influence failed, so there is nothing to remove"))
        return
    k = min(settings.noise_k, len(base.train[1]) - 1)
    top = ranking(scores["ewc-influence"])[:k].sort().values
    unit.step(
        "removal",
        lambda: _repair(context, base, "finetune", top, controls=("nothing", "random")),
    )
    unit.finish()


def tradeoff_experiment(context: BenchContext, data_key: str, seed: int) -> None:
    """Experiment 4: EWC-deletion and Newton sweeps beside fine-tuning on D\\C."""
    settings = context.settings
    base = base_run(context, "label-flip", data_key, seed)
    unit = _experiment_unit(context, 4, data_key, seed, base)
    unit.set("base", _base_summary(base))
    scores = scores_of(context, base, "ewc-influence")
    if scores is None:
        unit.fail(RuntimeError("EWC-influence failed, so there are no causes"))
        return
    k = max(1, round(settings.tradeoff_fraction * len(scores)))
    causes = ranking(scores)[:k].sort().values
    unit.set("n_causes", k)
    unit.set(
        "causes_corrupted",
        int(base.mask[causes].sum()) if base.mask is not None else None,
    )
    for treatment, gammas in (
        ("ewc-deletion", settings.ewc_gammas),
        ("newton", settings.newton_gammas),
    ):
        config = treatment_config(treatment)
        overrides = settings.treatment_overrides.get(treatment, {})
        if overrides:
            config = dataclasses.replace(config, **overrides)

        def compute(treatment=treatment, gammas=gammas, config=config):
            points, cost = measured(
                lambda: run_sweep(
                    treatment,
                    base.run.model,
                    base.train,
                    causes,
                    base.test,
                    base.split,
                    strengths=list(gammas),
                    config=config,
                    fisher=_fisher(context, base),
                    train_config=base.run.config.train,
                )
            )
            return {"points": points, "cost": cost}

        unit.step(f"sweep/{treatment}", compute)
    unit.step(
        "finetune",
        lambda: _repair(
            context, base, "finetune", causes, controls=("nothing", "random")
        ),
    )
    unit.finish()


# Order ---------------------------------------------------------------------


def planned_units(settings: BenchSettings) -> list[tuple[int, str, int]]:
    """Return (experiment, data key, seed) in the order they run.

    The first seed of every experiment on the embedded data runs first, then
    the further seeds of experiment 1 (whose detection and removal figures
    are the ones averaged over seeds), then the full-MNIST experiment 6,
    then the further seeds of the rest, and last the trade-off of
    experiment 4 on full MNIST when both 4 and 6 are chosen. A run stopped
    early thus has a complete first pass on the embedded data and a
    three-seed experiment 1.
    """
    first, *rest = settings.seeds
    order = (1, 4, 2, 3, 6)
    chosen = [e for e in order if e in settings.experiments]
    if 5 in settings.experiments and 1 not in chosen:
        chosen.insert(0, 1)
    embedded = [e for e in chosen if e != 6]
    plan = [(e, "embedded", first) for e in embedded]
    plan += [(1, "embedded", seed) for seed in rest if 1 in chosen]
    if 6 in chosen:
        plan += [(6, "mnist", seed) for seed in settings.seeds]
    plan += [(e, "embedded", seed) for e in embedded if e != 1 for seed in rest]
    if 4 in chosen and 6 in chosen:
        plan += [(4, "mnist", seed) for seed in settings.seeds]
    return plan


def run_unit(context: BenchContext, experiment: int, data_key: str, seed: int):
    """Run one planned unit, dispatching on the experiment number."""
    if experiment in (1, 6):
        label_flip_experiment(context, data_key, seed)
    elif experiment == 2:
        noise_experiment(context, 2, "input-noise", seed)
    elif experiment == 3:
        noise_experiment(context, 3, "fgsm", seed)
    elif experiment == 4:
        tradeoff_experiment(context, data_key, seed)
