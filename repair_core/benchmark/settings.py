"""What the benchmark runs: sizes, methods, removal counts and published figures."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from repair_core.errors import ConfigError

EXPERIMENTS = (1, 2, 3, 4, 5, 6)

EXPERIMENT_TITLES = {
    1: "Label flips: detection and removal curves",
    2: "Random input noise",
    3: "FGSM poisoning",
    4: "Treatment trade-off",
    5: "Cost",
    6: "The published setup: full MNIST",
}

#: Every identification method that scales to the reference CNN. The dense
#: ``linear-influence-exact`` solve does not, so it is left out.
FULL_METHODS = (
    "ewc-influence",
    "linear-influence-lissa",
    "linear-influence-gd",
    "sgd-influence",
    "tracin",
    "confident-learning",
    "training-loss",
    "random",
    "oracle",
)
QUICK_METHODS = ("ewc-influence", "tracin", "training-loss", "random", "oracle")

#: Methods whose top-k removal curve is measured in experiment 1.
CURVE_METHODS = ("ewc-influence", "training-loss", "random")

#: Methods scored in the noise experiments (2 and 3).
NOISE_METHODS = ("ewc-influence", "training-loss", "random", "oracle")

#: Figures reported by Tanno et al. 2022 for the label-flip MNIST setup.
PUBLISHED = {
    "found_at_20pct": {
        "ewc-influence": 0.80,
        "linear-influence-lissa": 0.75,
        "linear-influence-gd": 0.5,
        "sgd-influence": 0.5,
    },
    "removal_top_1000": {"holdout_acc": 0.86, "remaining_acc": 0.963},
    "sgd_influence_slowdown": (12.0, 19.0),
}

#: Labels used in tables and plots.
METHOD_LABELS = {
    "ewc-influence": "EWC-influence",
    "linear-influence-lissa": "Linear influence (LiSSA)",
    "linear-influence-gd": "Linear influence (GD)",
    "linear-influence-exact": "Linear influence (exact)",
    "sgd-influence": "SGD-influence",
    "tracin": "TracInCPFast (Captum)",
    "confident-learning": "Confident learning (cleanlab)",
    "training-loss": "Training loss",
    "random": "Random",
    "oracle": "Oracle",
}


@dataclass
class BenchSettings:
    """Sizes and choices of one benchmark run.

    ``seeds`` are base-model seeds: each trains its own corrupted model and
    failure split. ``finetune_seeds`` are the seeds of every fine-tuning
    repair, so each removal figure is a mean over them.
    """

    mode: str = "full"
    """``full`` or ``quick``; recorded so a results file is never mixed."""
    experiments: tuple[int, ...] = EXPERIMENTS
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int | None = None
    """Training images of the embedded data; None keeps all 3000."""
    n_test: int | None = None
    """Test images of the embedded data; None keeps all 2000."""
    max_epochs: int = 100
    """Epoch limit of base training and of fine-tuning (early stopping decides)."""
    mnist_root: str | None = None
    """Folder with MNIST/raw in the torchvision layout, for experiment 6."""
    mnist_n_train: int = 3000
    mnist_n_test: int | None = None
    """None keeps the full 10,000-image test set."""
    methods: tuple[str, ...] = FULL_METHODS
    curve_methods: tuple[str, ...] = CURVE_METHODS
    noise_methods: tuple[str, ...] = NOISE_METHODS
    ks: tuple[int, ...] = (10, 30, 100, 300, 600, 1000)
    noise_k: int = 1000
    """Top-k removed in experiments 2 and 3."""
    fit_steps: tuple[int, ...] = (25, 50, 100, 150, 200, 300)
    """Step counts of the EWC-influence fit-strength study in experiment 1."""
    tradeoff_fraction: float = 0.15
    """Share of D, ranked by EWC-influence, treated in experiment 4."""
    ewc_gammas: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    """EWC-deletion strengths. The Fisher of the reference CNN averages about
    5e-3 per parameter, so at γ ≥ 0.01 the Fisher term is small beside the
    mean log-likelihood of C and the sweep has to span decades to trace a
    trade-off."""
    newton_gammas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config fields replaced per identification method (quick mode only)."""
    treatment_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config fields replaced per treatment (quick mode only)."""
    retrain_reference: bool = True
    """Also retrain from scratch without every flipped label in experiment 6."""

    def __post_init__(self) -> None:
        self.experiments = tuple(sorted(set(self.experiments)))
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise ConfigError(
                f"Unknown experiment {unknown[0]}. Choose among "
                f"{', '.join(map(str, EXPERIMENTS))}."
            )
        if not self.seeds:
            raise ConfigError("The benchmark needs at least one base-model seed.")
        if not self.finetune_seeds:
            raise ConfigError("The benchmark needs at least one fine-tuning seed.")
        if self.mode not in ("full", "quick"):
            raise ConfigError(f"Mode {self.mode!r} must be 'full' or 'quick'.")
        self.seeds = tuple(self.seeds)
        self.finetune_seeds = tuple(self.finetune_seeds)
        self.methods = tuple(self.methods)
        self.curve_methods = tuple(self.curve_methods)
        self.noise_methods = tuple(self.noise_methods)
        self.ks = tuple(self.ks)
        self.fit_steps = tuple(self.fit_steps)
        self.ewc_gammas = tuple(self.ewc_gammas)
        self.newton_gammas = tuple(self.newton_gammas)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def json_problem(cls, values: dict[str, Any]) -> str | None:
        """Return what makes ``values``, settings read from a results file,
        unusable, such as a missing setting or a value of the wrong JSON
        type, or None when they fit the fields of this class."""
        hints = typing.get_type_hints(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        if missing:
            return f"it lacks the setting {missing[0]!r}"
        for item in dataclasses.fields(cls):
            if not _fits(values[item.name], hints[item.name]):
                return f"its setting {item.name!r} is {values[item.name]!r}"
        return None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _fits(value: Any, kind: Any) -> bool:
    """Return whether the JSON value ``value`` can stand for type ``kind``."""
    origin = typing.get_origin(kind)
    arguments = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in arguments)
    if kind is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, list) and all(_fits(v, arguments[0]) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def full_settings(**changes: Any) -> BenchSettings:
    """Return the settings of the full benchmark, with ``changes`` applied."""
    return BenchSettings(mode="full", **changes)


def quick_settings(**changes: Any) -> BenchSettings:
    """Return a reduced benchmark that runs in minutes on a laptop CPU.

    300 training and 300 test images, 2 epochs, one base-model seed and one
    fine-tuning seed, the cheap methods, and shorter fits and solves.
    """
    values: dict[str, Any] = {
        "mode": "quick",
        "seeds": (0,),
        "finetune_seeds": (0,),
        "n_train": 300,
        "n_test": 300,
        "max_epochs": 2,
        "mnist_n_train": 300,
        "mnist_n_test": 300,
        "methods": QUICK_METHODS,
        "ks": (10, 30, 100),
        "fit_steps": (5, 10),
        "noise_k": 100,
        "ewc_gammas": (1e-4, 1e-2),
        "newton_gammas": (1.0, 4.0),
        "method_overrides": {
            "ewc-influence": {"max_steps": 30, "min_steps": 10},
            "linear-influence-lissa": {"lissa_depth": 50},
            "linear-influence-gd": {"gd_steps": 30},
            "confident-learning": {"n_folds": 2, "max_epochs": 1},
        },
        "treatment_overrides": {
            "ewc-deletion": {"max_steps": 40, "patience": 20},
            "newton": {"depth": 50},
        },
        "retrain_reference": False,
    }
    values.update(changes)
    return BenchSettings(**values)
