"""Cause identification: rank every training example by how much it caused the
failures in the query set F_q.

``identify(method, ...)`` runs one method from ``METHODS`` and returns a
``ScoreResult`` whose scores have shape (n_train,), float64 on the CPU, with
higher meaning more harmful. Every method evaluates the model in eval mode,
restores each submodule's mode afterwards, differentiates only the trainable
parameters and gives identical scores for the same seed on the same device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repair_core.devices import seeded
from repair_core.errors import ConfigError
from repair_core.fisher import checked_parameters
from repair_core.identification.base import (
    IdentificationContext,
    ScoreResult,
    check_seed,
    settings_from_dict,
)
from repair_core.identification.baselines import (
    OracleConfig,
    RandomConfig,
    TrainingLossConfig,
    score_oracle,
    score_random,
    score_training_loss,
)
from repair_core.identification.confident_learning import (
    ConfidentLearningConfig,
    score_confident_learning,
)
from repair_core.identification.ewc_influence import (
    EWCInfluenceConfig,
    fit_failures,
    score_ewc_influence,
)
from repair_core.identification.linear_influence import (
    LinearInfluenceConfig,
    ignored_settings,
    score_linear_influence,
)
from repair_core.identification.sgd_influence import (
    SGDInfluenceConfig,
    record_sgd,
    replay_sgd,
    score_sgd_influence,
)
from repair_core.identification.tracin import TracInConfig, score_tracin
from repair_core.inference import (
    check_finite_images,
    check_model_labels,
    eval_mode,
    model_device,
)
from repair_core.progress import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ConfidentLearningConfig",
    "EWCInfluenceConfig",
    "IdentificationContext",
    "LinearInfluenceConfig",
    "MethodSpec",
    "OracleConfig",
    "RandomConfig",
    "SGDInfluenceConfig",
    "ScoreResult",
    "TracInConfig",
    "TrainingLossConfig",
    "config_json",
    "default_config",
    "fit_failures",
    "identify",
    "record_sgd",
    "replay_sgd",
    "resolve_config",
]

ScoreFunction = Callable[..., tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class MethodSpec:
    """One identification method: its config class, defaults and scorer."""

    name: str
    config_class: type
    score: ScoreFunction
    description: str
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The method explains the failures in F_q, so it needs at least one.
    uses_query: bool = True
    #: The method differentiates the model, so it needs a trainable parameter.
    uses_gradients: bool = True
    #: Settings that the method's name fixes: those in ``defaults`` to that
    #: value, and the others, which the method ignores, to the config class
    #: default. The CLI's '--set help' and the dashboard's forms leave them out.
    fixed: tuple[str, ...] = ()


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "ewc-influence",
            EWCInfluenceConfig,
            score_ewc_influence,
            "Fit F_q under an EWC prior; score the drop in each log p(z).",
        ),
        MethodSpec(
            "linear-influence-lissa",
            LinearInfluenceConfig,
            score_linear_influence,
            "Koh & Liang influence with a LiSSA inverse-HVP.",
            {"solver": "lissa", "damping": 3.0},
            fixed=("solver", *ignored_settings("lissa")),
        ),
        MethodSpec(
            "linear-influence-gd",
            LinearInfluenceConfig,
            score_linear_influence,
            "Koh & Liang influence with a gradient-descent inverse-HVP.",
            {"solver": "gd", "damping": 3.0, "gd_steps": 100},
            fixed=("solver", *ignored_settings("gd")),
        ),
        MethodSpec(
            "linear-influence-exact",
            LinearInfluenceConfig,
            score_linear_influence,
            "Koh & Liang influence with a dense solve (small models only).",
            {"solver": "exact"},
            fixed=("solver", *ignored_settings("exact")),
        ),
        MethodSpec(
            "sgd-influence",
            SGDInfluenceConfig,
            score_sgd_influence,
            "Hara et al. 2019: walk the recorded training steps back.",
        ),
        MethodSpec(
            "tracin",
            TracInConfig,
            score_tracin,
            "TracIn over saved checkpoints (Captum); opponents of F_q rank high.",
        ),
        MethodSpec(
            "confident-learning",
            ConfidentLearningConfig,
            score_confident_learning,
            "cleanlab label quality from K-fold probabilities; ignores F_q.",
            uses_query=False,
            uses_gradients=False,
        ),
        MethodSpec(
            "training-loss",
            TrainingLossConfig,
            score_training_loss,
            "Loss of each training example; ignores F_q.",
            uses_query=False,
            uses_gradients=False,
        ),
        MethodSpec(
            "random",
            RandomConfig,
            score_random,
            "Seeded random order.",
            uses_query=False,
            uses_gradients=False,
        ),
        MethodSpec(
            "oracle",
            OracleConfig,
            score_oracle,
            "Known corrupted examples first (synthetic corruption only).",
            uses_query=False,
            uses_gradients=False,
        ),
    )
}


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ConfigError(
            f"Unknown identification method {method!r}. Use one of "
            f"{', '.join(METHODS)}."
        )
    return METHODS[method]


def _check_fixed(spec: MethodSpec, config: Any) -> None:
    """Raise ConfigError when ``config`` changes a setting that the method's
    name fixes, so that a ranking is never stored under another method's name
    and no setting is given that the method would ignore."""
    defaults = default_config(spec.name)
    for name in spec.fixed:
        value = getattr(config, name)
        expected = getattr(defaults, name)
        if value == expected:
            continue
        if name not in spec.defaults:
            readers = [
                other.name
                for other in METHODS.values()
                if other.config_class is spec.config_class and name not in other.fixed
            ]
            raise ConfigError(
                f"Method {spec.name} ignores the setting {name}, which only "
                f"{' and '.join(readers)} reads. Leave {name} out, or choose "
                f"{' or '.join(readers)}."
            )
        advice = next(
            (
                f"Choose the method {other.name} instead"
                for other in METHODS.values()
                if name in other.fixed and other.defaults.get(name) == value
            ),
            f"Leave {name} at {expected!r}",
        )
        raise ConfigError(
            f"Method {spec.name} uses {name} {expected!r}, not {value!r}. {advice}."
        )


def default_config(method: str) -> Any:
    """Return a fresh default config dataclass for ``method``."""
    spec = _spec(method)
    return spec.config_class(**spec.defaults)


def resolve_config(method: str, config: Any = None) -> Any:
    """Return the config dataclass that ``identify`` runs ``method`` with.

    Args:
        config: the method's config dataclass, a dict of settings that
            override ``default_config(method)``, or None for those defaults.

    Raises:
        ConfigError: an unknown method or setting, a config of another
            method, or a setting that the method's name fixes.
    """
    spec = _spec(method)
    config = default_config(method) if config is None else config
    if isinstance(config, dict):
        config = settings_from_dict(spec.config_class, {**spec.defaults, **config})
    if not isinstance(config, spec.config_class):
        raise ConfigError(
            f"Method {method!r} takes a {spec.config_class.__name__}, not "
            f"{type(config).__name__}. Start from default_config({method!r})."
        )
    _check_fixed(spec, config)
    return config


def config_json(config: Any) -> dict:
    """Return the settings of ``config`` as the JSON object a ranking stores.

    Settings that the config's solver ignores are left out. A ranking stored
    with them still resolves, since they remain settings of the class.
    """
    settings = dataclasses.asdict(config)
    ignored = getattr(config, "ignored_settings", None)
    for name in ignored() if ignored is not None else ():
        del settings[name]
    json.dumps(settings)
    return settings


def _check_data(
    spec: MethodSpec,
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
) -> None:
    if spec.uses_gradients:
        checked_parameters(model)
    if spec.uses_query and len(query_labels) == 0:
        without = ", ".join(name for name, m in METHODS.items() if not m.uses_query)
        raise ConfigError(
            f"The query failure set F_q is empty, so {spec.name} has no failures "
            f"to explain. Pass at least one failure; {without} rank without them."
        )
    if len(train_labels) == 0:
        raise ConfigError("The training set is empty, so there is nothing to rank.")
    if len(train_images) != len(train_labels):
        raise ConfigError(
            f"{len(train_images)} training images but {len(train_labels)} labels. "
            "Pass one label per image."
        )
    if len(query_images) != len(query_labels):
        raise ConfigError(
            f"{len(query_images)} query images but {len(query_labels)} labels. "
            "Pass one label per failure."
        )
    check_finite_images(train_images, "Training image")
    check_finite_images(query_images, "Query image")
    check_model_labels(model, train_images, train_labels, query_images, query_labels)


def _seed_of(config: Any) -> int | None:
    """Return the config's seed, or None for a method without one."""
    if not any(entry.name == "seed" for entry in dataclasses.fields(config)):
        return None
    return check_seed(config.seed)


def identify(
    method: str,
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: Any = None,
    *,
    context: IdentificationContext | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Rank all training examples by how much they caused the query failures.

    Args:
        method: a key of ``METHODS``.
        model: the trained network theta-hat; it is not changed, and its
            submodule modes are restored.
        train_images: training inputs, shape (N, C, H, W).
        train_labels: training labels as trained on, shape (N,).
        query_images: the failures F_q, shape (M, C, H, W).
        query_labels: their true labels, shape (M,).
        config: the method's config dataclass, a dict of settings that
            override ``default_config(method)``, or None for those defaults.
        context: checkpoints, trajectory, ground truth and so on that some
            methods need.
        progress: called with (fraction done, message).

    Returns:
        The scores, shape (N,), float64 on the CPU, higher meaning more
        harmful, with the resolved config, the values chosen for its None
        settings and timing.

    Raises:
        ConfigError: an unknown method, a wrong config type or missing
            context. Also an empty F_q for a method that explains it, or a
            model without trainable parameters for a method that
            differentiates it. Also non-finite images, images the model cannot
            take, or labels that are not int64 class indices in 0..K-1 for a
            model with K outputs.
        DivergenceError: an iterative solver (the EWC fit, GD or LiSSA)
            produced growing or non-finite values; it is an ArithmeticError.
        FloatingPointError: the method produced non-finite scores.
    """
    spec = _spec(method)
    config = resolve_config(method, config)
    context = context or IdentificationContext()
    _check_data(spec, model, train_images, train_labels, query_images, query_labels)
    seed = _seed_of(config)
    device = model_device(model)
    logger.info(
        "Identifying causes with %s on %d training examples and %d failures",
        method,
        len(train_labels),
        len(query_labels),
    )
    started = time.perf_counter()
    with seeded(seed or 0), eval_mode(model):
        scores, extras = spec.score(
            model,
            train_images,
            train_labels,
            query_images,
            query_labels,
            config,
            context,
            progress,
        )
    seconds = time.perf_counter() - started
    resolved = extras.pop("resolved", {})
    json.dumps(resolved)
    if progress is not None:
        progress(1.0, f"{method} done")
    logger.info("%s finished in %.1f s", method, seconds)
    return ScoreResult(
        scores=scores.detach().double().cpu(),
        method=method,
        config=config_json(config),
        seed=seed,
        device=str(device),
        seconds=seconds,
        extras=extras,
        resolved=resolved,
    )
