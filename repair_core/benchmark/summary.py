"""Aggregate the results file into the figures the page reports.

Detection figures are averaged over base-model seeds. Removal figures pool
every fine-tuning run of every base-model seed, so ``mean ± std`` is over
(base seed × fine-tuning seed) runs and ``n`` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Stat:
    """Mean, sample standard deviation and count of finite values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        finite = [float(v) for v in values if _is_number(v)]
        if not finite:
            return cls(math.nan, math.nan, 0)
        array = np.asarray(finite, dtype=np.float64)
        std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        return cls(float(array.mean()), std, len(array))

    @property
    def ok(self) -> bool:
        return self.n > 0

    @property
    def standard_error(self) -> float:
        """Standard error of the mean; nan with fewer than two values."""
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def text(self, digits: int = 3) -> str:
        if not self.ok:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


class Results:
    """Read access to the units of one results file."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.units: dict[str, Any] = data.get("units", {})
        self.settings: dict[str, Any] = data.get("settings", {})

    def seeds_with(self, prefix: str) -> list[int]:
        """Seeds of the units whose key starts with ``prefix`` + 'seed'."""
        seeds = []
        for key in self.units:
            if key.startswith(prefix + "seed"):
                seeds.append(int(key[len(prefix) + 4 :]))
        return sorted(seeds)

    def run_units(self, scenario: str, data_key: str) -> list[dict[str, Any]]:
        prefix = f"run/{scenario}/{data_key}/"
        return [self.units[f"{prefix}seed{s}"] for s in self.seeds_with(prefix)]

    def experiment_units(self, experiment: int, data_key: str) -> list[dict[str, Any]]:
        prefix = f"exp{experiment}/{data_key}/"
        return [self.units[f"{prefix}seed{s}"] for s in self.seeds_with(prefix)]

    # Detection -------------------------------------------------------------

    def methods(self, scenario: str, data_key: str) -> list[str]:
        seen: list[str] = []
        for unit in self.run_units(scenario, data_key):
            for name in unit.get("steps", {}):
                if name.startswith("identify/") and name[9:] not in seen:
                    seen.append(name[9:])
        return seen

    def identification(
        self, scenario: str, data_key: str, method: str
    ) -> list[dict[str, Any]]:
        """The stored identification records of ``method``, one per seed."""
        records = []
        for unit in self.run_units(scenario, data_key):
            record = unit.get("steps", {}).get(f"identify/{method}")
            if record is not None:
                records.append(record)
        return records

    def detection(self, scenario: str, data_key: str, method: str, key: str) -> Stat:
        return Stat.of(
            r.get("detection", {}).get(key)
            for r in self.identification(scenario, data_key, method)
        )

    def seconds(self, scenario: str, data_key: str, method: str) -> Stat:
        return Stat.of(
            r.get("seconds") for r in self.identification(scenario, data_key, method)
        )

    def errors(self, scenario: str, data_key: str, method: str) -> list[str]:
        return [
            r["error"]
            for r in self.identification(scenario, data_key, method)
            if r.get("error")
        ]

    def mean_curve(self, scenario: str, data_key: str, method: str) -> np.ndarray:
        curves = [
            r["curve"]
            for r in self.identification(scenario, data_key, method)
            if r.get("curve")
        ]
        return np.mean(np.asarray(curves), axis=0) if curves else np.array([])

    # Removal ---------------------------------------------------------------

    def curve_points(
        self, experiment: int, data_key: str, method: str
    ) -> dict[int, list[dict[str, Any]]]:
        """Per-seed fine-tuning records at each k, pooled over base seeds."""
        pooled: dict[int, list[dict[str, Any]]] = {}
        for unit in self.experiment_units(experiment, data_key):
            for name, points in unit.get("steps", {}).items():
                if not name.startswith(f"curve/{method}/k"):
                    continue
                for point in points:
                    pooled.setdefault(int(point["k"]), []).extend(point["per_seed"])
        return dict(sorted(pooled.items()))

    def arm_runs(
        self, experiment: int, data_key: str, step: str, arm: str
    ) -> list[dict[str, Any]]:
        """Per-seed records of one arm of a repair step, pooled over base seeds."""
        runs = []
        for unit in self.experiment_units(experiment, data_key):
            record = unit.get("steps", {}).get(step)
            if record and arm in record.get("arms", {}):
                runs.extend(record["arms"][arm]["per_seed"])
        return runs

    def curve_runs_by_seed(
        self, experiment: int, data_key: str, method: str, k: int
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Fine-tuning records of one method's top-k removal, keyed by
        (base seed, fine-tuning seed)."""
        keyed = {}
        for unit in self.experiment_units(experiment, data_key):
            for point in unit.get("steps", {}).get(f"curve/{method}/k{k}", []):
                if int(point["k"]) == k:
                    for run in point["per_seed"]:
                        keyed[(unit.get("seed"), run.get("seed"))] = run
        return keyed

    def arm_runs_by_seed(
        self, experiment: int, data_key: str, step: str, arm: str
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Records of one arm of a repair step, keyed by (base seed,
        fine-tuning seed)."""
        keyed = {}
        for unit in self.experiment_units(experiment, data_key):
            record = unit.get("steps", {}).get(step)
            if record and arm in record.get("arms", {}):
                for run in record["arms"][arm]["per_seed"]:
                    keyed[(unit.get("seed"), run.get("seed"))] = run
        return keyed

    def step_records(
        self, experiment: int, data_key: str, step: str
    ) -> list[dict[str, Any]]:
        return [
            unit["steps"][step]
            for unit in self.experiment_units(experiment, data_key)
            if step in unit.get("steps", {})
        ]

    def base_records(self, experiment: int, data_key: str) -> list[dict[str, Any]]:
        return [
            {"seed": unit.get("seed"), **unit["base"]}
            for unit in self.experiment_units(experiment, data_key)
            if unit.get("base")
        ]


def stat_of(runs: list[dict[str, Any]], key: str) -> Stat:
    return Stat.of(run.get(key) for run in runs)


def paired_difference(
    runs: dict[tuple[int, int], dict[str, Any]],
    others: dict[tuple[int, int], dict[str, Any]],
    key: str,
) -> Stat:
    """Differences ``runs − others`` in ``key`` over the (base seed,
    fine-tuning seed) pairs both hold.

    Both arms of a pair fine-tune the same base model with the same seed, so
    the spread of the differences shows how far the gap between the arms
    could be fine-tuning noise.
    """
    return Stat.of(
        runs[pair].get(key) - others[pair].get(key)
        for pair in sorted(runs.keys() & others.keys())
        if _is_number(runs[pair].get(key)) and _is_number(others[pair].get(key))
    )


def best_under(
    points: list[dict[str, Any]], key: str, floor_key: str, floor: float
) -> dict[str, Any] | None:
    """The point with the highest ``key`` among those with ``floor_key`` ≥ floor."""
    eligible = [
        p
        for p in points
        if _is_number(p.get(floor_key))
        and p[floor_key] >= floor
        and _is_number(p.get(key))
    ]
    return max(eligible, key=lambda p: p[key]) if eligible else None
