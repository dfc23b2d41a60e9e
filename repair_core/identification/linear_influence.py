"""Linear influence functions (Koh & Liang 2017) on the failure set.

Removing z from a model trained on the mean loss moves the parameters by about
(1/N) H^-1 grad l(z), with l = -log p and H the Hessian of the mean training
loss (plus damping). The score is the resulting first-order change of
log p(F_q):

    r(z) = -(1/N) grad log p(F_q | theta-hat)^T (H + damping I)^-1
           grad log p(z | theta-hat),

in nats, so a positive score means removing z raises log p(F_q) (z is
harmful). The inverse-Hessian-vector product is computed once; the scores are
then batched dot products with per-example gradients.

Solvers: ``"exact"`` (dense, small models), ``"gd"`` (gradient descent on the
quadratic) and ``"lissa"`` (stochastic recursion). ``damping`` always means the
lambda in (H + lambda I); LiSSA's per-step shrink factor is set to
damping / scale to match.

CPU-minded defaults: LiSSA with depth 1000, batch 64, one repeat and an
automatic scale search (Koh & Liang used scale 10 and depth in the
thousands); GD on minibatches of 512 with a step size from power iteration.
The ``linear-influence-lissa`` and ``linear-influence-gd`` methods default to
damping 3 and GD to 100 steps, the ``exact`` method to damping 0.01; the
``LinearInfluenceConfig`` docstring gives the measurements behind them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification.base import (
    IdentificationContext,
    check_finite,
    check_setting_types,
    gradient_dot_products,
    option,
    summed_log_likelihood_gradient,
)
from repair_core.ihvp import (
    CURVATURES,
    SCALE_SEARCH_SHARE,
    exact_ihvp,
    find_lissa_scale,
    flatten,
    gd_ihvp,
    lissa,
    unflatten,
)
from repair_core.inference import eval_mode
from repair_core.progress import Progress, scaled_progress

logger = logging.getLogger(__name__)

SOLVERS = ("lissa", "gd", "exact")
#: Settings that only one solver reads; the other solvers ignore them.
SOLVER_SETTINGS = {
    "lissa": ("lissa_scale", "lissa_depth", "lissa_repeats", "lissa_batch_size"),
    "gd": ("gd_steps", "gd_lr", "gd_batch_size"),
    "exact": (),
}


def ignored_settings(solver: str) -> tuple[str, ...]:
    """Return the settings of the other solvers, which ``solver`` ignores."""
    return tuple(
        name
        for other, names in SOLVER_SETTINGS.items()
        if other != solver
        for name in names
    )


@dataclass
class LinearInfluenceConfig:
    """Settings of linear influence and its inverse-Hessian-vector product.

    The class defaults suit the ``exact`` solver on small, nearly convex
    models. The ``linear-influence-lissa`` and ``linear-influence-gd``
    methods default to damping 3 and GD to 100 steps, because both iterative
    solvers diverge where the curvature has an eigenvalue below minus the
    damping, and the Hessian of a non-convex network has such eigenvalues.
    Measured on the reference MNIST CNN trained with the default label flips
    (seed 0, one thread of a two-core x86 CPU):

    * 500 embedded-MNIST training images, damping 0.01: LiSSA on the
      Hessian diverged at step 606. It grew 1.5% per step at scale 128,
      which points to an eigenvalue near -2. The GD iterate ended 2.4 times
      longer than 300 steps can make it on a positive semi-definite
      curvature. With damping 3 neither grew.
    * The 3000-image benchmark run: the share of flipped labels in the top
      10% / 20% of the ranking was 0.53 / 0.69 for LiSSA (218 s) and
      0.54 / 0.66 for GD (256 s) with damping 3, against 0.45 / 0.59 and
      0.52 / 0.69 (300 steps, 675 s) with damping 0.01. GD needs fewer steps
      at damping 3 because the damped Hessian is better conditioned: 300
      steps reached 0.53 / 0.70, and its ranking agrees with LiSSA's
      (Spearman 0.97). The empirical Fisher, which is positive semi-definite
      and so never makes the solvers diverge, found fewer flipped labels with
      damping 3: 0.42 / 0.62 (LiSSA) and 0.52 / 0.64 (GD, 300 steps).

    A network whose Hessian has an eigenvalue below -3 still makes the
    iterative solvers diverge. DivergenceError then says so, and
    ``curvature="fisher"`` avoids divergence at any damping.
    """

    solver: str = option(
        "lissa", "Inverse-HVP solver: 'lissa', 'gd' or 'exact'.", SOLVERS
    )
    curvature: str = option(
        "hessian",
        "'hessian' of the mean training loss or empirical 'fisher'.",
        CURVATURES,
    )
    damping: float = option(
        0.01,
        "Lambda added to the curvature, (H + lambda I). The methods "
        "linear-influence-lissa and linear-influence-gd default to 3, "
        "linear-influence-exact to 0.01.",
    )
    lissa_scale: float | None = option(
        None,
        "LiSSA divisor of H; None searches the smallest stable scale on a "
        "doubling grid and uses twice that as a margin.",
    )
    lissa_depth: int = option(1000, "LiSSA recursion steps per repeat.")
    lissa_repeats: int = option(1, "Independent LiSSA runs averaged.")
    lissa_batch_size: int = option(64, "Examples per LiSSA step.")
    gd_steps: int = option(
        300,
        "Gradient-descent steps of the 'gd' solver; the method "
        "linear-influence-gd defaults to 100.",
    )
    gd_lr: float | None = option(
        None, "GD step size; None uses 1 / largest eigenvalue (power iteration)."
    )
    gd_batch_size: int | None = option(
        512, "Examples per GD step; None uses the full training set every step."
    )
    batch_size: int = option(256, "Examples per batch of per-example gradients.")
    seed: int = option(0, "Seed of the minibatch draws.")

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.solver not in SOLVERS:
            raise ConfigError(
                f"Unknown solver {self.solver!r}. Use one of {', '.join(SOLVERS)}."
            )
        if self.curvature not in CURVATURES:
            raise ConfigError(
                f"Unknown curvature {self.curvature!r}. Use one of "
                f"{', '.join(CURVATURES)}."
            )
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ConfigError(f"Damping {self.damping} must be a non-negative number.")
        if self.lissa_scale is not None and not self.lissa_scale > 0:
            raise ConfigError(f"LiSSA scale {self.lissa_scale} must be positive.")
        if self.lissa_scale is not None and not self.damping < self.lissa_scale:
            raise ConfigError(
                f"Damping {self.damping} must be below lissa_scale "
                f"{self.lissa_scale}, because LiSSA shrinks its iterate by "
                "damping / scale per step. Raise lissa_scale, or leave it None "
                "to search one."
            )
        for name in (
            "lissa_depth",
            "lissa_repeats",
            "lissa_batch_size",
            "gd_steps",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1.")
        if self.gd_batch_size is not None and self.gd_batch_size < 1:
            raise ConfigError(f"gd_batch_size {self.gd_batch_size} must be at least 1.")
        if self.gd_lr is not None and not self.gd_lr > 0:
            raise ConfigError(f"gd_lr {self.gd_lr} must be positive.")

    def ignored_settings(self) -> tuple[str, ...]:
        """Return the settings that this config's solver does not read."""
        return ignored_settings(self.solver)


def _lissa_divergence_advice(
    config: LinearInfluenceConfig, scale: float, searched: bool
) -> str:
    """Return the hints of a LiSSA DivergenceError in the names of the settings,
    which are the same in Python and in the CLI's --set NAME=VALUE."""
    if searched:
        scale_hint = (
            f"The scale {scale:g} came from the automatic scale search, whose "
            "short probe runs can miss a divergence that a longer run shows. "
            f"Set lissa_scale to a larger value, for example {2 * scale:g}."
        )
    else:
        scale_hint = (
            "If the scale is below half the largest eigenvalue of the curvature, "
            f"set lissa_scale to a larger value (now {scale:g}), or leave it unset "
            "to search one."
        )
    if config.curvature == "fisher":
        # The empirical Fisher is positive semi-definite, so only the scale
        # can make the recursion diverge.
        return scale_hint
    return (
        f"{scale_hint} If the curvature has an eigenvalue below minus the damping "
        f"{config.damping:g}, as the Hessian of a non-convex network can, set "
        f"damping to a larger value (now {config.damping:g}) or curvature to "
        "'fisher'."
    )


def _gd_divergence_advice(config: LinearInfluenceConfig) -> str:
    """Return the hints of a GD DivergenceError in the names of the settings."""
    if config.curvature == "fisher":
        return "The step size is too large. Set gd_lr to a smaller value."
    return (
        "The curvature has negative eigenvalues larger than the damping, or the "
        "step size is too large. Set damping to a larger value (now "
        f"{config.damping:g}), gd_lr to a smaller value, or curvature to 'fisher'."
    )


def solve_ihvp(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    vector: torch.Tensor,
    config: LinearInfluenceConfig,
    *,
    log_likelihood=None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, dict]:
    """Return (H + damping I)^-1 vector with the configured solver, and extras."""
    common = {"curvature": config.curvature, "log_likelihood": log_likelihood}
    if config.solver == "exact":
        return exact_ihvp(
            model,
            train_images,
            train_labels,
            vector,
            damping=config.damping,
            alternative="the method linear-influence-lissa or linear-influence-gd",
            **common,
        ), {}
    if config.solver == "gd":
        return gd_ihvp(
            model,
            train_images,
            train_labels,
            vector,
            damping=config.damping,
            steps=config.gd_steps,
            lr=config.gd_lr,
            batch_size=config.gd_batch_size,
            seed=config.seed,
            divergence_advice=_gd_divergence_advice(config),
            progress=progress,
            **common,
        ), {}
    scale = config.lissa_scale
    searched = scale is None
    if scale is None:
        # The probe runs without a per-step shrink, because the final run's
        # shrink, damping / scale, depends on the scale under test, and a
        # damping of 1 or more is no valid shrink at all. A scale that survives
        # the short probe can still diverge in the longer run, hence the
        # factor-2 margin.
        stable = find_lissa_scale(
            model,
            train_images,
            train_labels,
            vector,
            damping=0.0,
            batch_size=config.lissa_batch_size,
            progress=scaled_progress(progress, 0.0, SCALE_SEARCH_SHARE),
            seed=config.seed,
            **common,
        )
        # A scale of at least twice the damping keeps the per-step shrink at
        # or below 0.5, so (eigenvalue + damping) / scale stays below 2 for
        # every eigenvalue the probe bounded.
        scale = max(2.0 * stable, 2.0 * config.damping)
        logger.info("LiSSA scale chosen by search: %g", scale)
    resolved = {"lissa_scale": scale} if searched else {}
    solve_start = SCALE_SEARCH_SHARE if searched else 0.0
    estimate = lissa(
        model,
        train_images,
        train_labels,
        vector,
        scale=scale,
        damping=config.damping / scale,
        depth=config.lissa_depth,
        repeats=config.lissa_repeats,
        batch_size=config.lissa_batch_size,
        seed=config.seed,
        divergence_advice=_lissa_divergence_advice(config, scale, searched),
        progress=scaled_progress(progress, solve_start, 1.0),
        **common,
    )
    return estimate, {"scale": scale, "resolved": resolved}


def score_linear_influence(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: LinearInfluenceConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Return linear influence scores, float64 (N,), and the ihvp vector."""
    ll = context.log_likelihood
    with eval_mode(model):
        query_gradient = summed_log_likelihood_gradient(
            model, query_images, query_labels, log_likelihood=ll
        )
    params = query_gradient
    ihvp, extras = solve_ihvp(
        model,
        train_images,
        train_labels,
        flatten(query_gradient),
        config,
        log_likelihood=ll,
        progress=scaled_progress(progress, 0.0, 0.8),
    )
    with eval_mode(model):
        dots = gradient_dot_products(
            model,
            train_images,
            train_labels,
            unflatten(ihvp, params),
            log_likelihood=ll,
            batch_size=config.batch_size,
            progress=scaled_progress(progress, 0.8, 1.0),
            message="Linear influence",
        )
    scores = -dots / len(train_labels)
    check_finite(
        scores,
        f"Linear influence ({config.solver})",
        "Set damping or lissa_scale to a larger value.",
    )
    return scores, {**extras, "ihvp": ihvp.cpu()}
