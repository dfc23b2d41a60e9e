"""PNG plots of the benchmark, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from repair_core.benchmark.settings import METHOD_LABELS  # noqa: E402
from repair_core.benchmark.summary import Results, Stat, stat_of  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 110


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    logger.info("Wrote %s", path)
    return path


def detection_plot(
    results: Results,
    panels: list[tuple[str, str, str]],
    path: Path,
) -> Path | None:
    """Share of corrupted examples found against share of D inspected.

    Args:
        panels: (scenario, data key, title) per panel.
    """
    drawn = [p for p in panels if results.methods(p[0], p[1])]
    if not drawn:
        return None
    figure, axes = plt.subplots(
        1, len(drawn), figsize=(5.2 * len(drawn), 4.2), squeeze=False
    )
    for axis, (scenario, data_key, title) in zip(axes[0], drawn, strict=True):
        for method in results.methods(scenario, data_key):
            curve = results.mean_curve(scenario, data_key, method)
            if curve.size == 0:
                continue
            inspected = np.linspace(0.0, 1.0, len(curve))
            style = "--" if method in ("random", "oracle") else "-"
            axis.plot(inspected, curve, style, label=METHOD_LABELS.get(method, method))
        for fraction in (0.1, 0.2):
            axis.axvline(fraction, color="grey", linewidth=0.6, linestyle=":")
        n_seeds = len(results.run_units(scenario, data_key))
        axis.set_title(f"{title} ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
        axis.set_xlabel("share of training set inspected")
        axis.set_ylabel("share of corrupted examples found")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def removal_plot(
    results: Results, experiment: int, data_key: str, methods: list[str], path: Path
) -> Path | None:
    """Accuracy on F_h and T\\F after removing the top k and fine-tuning."""
    curves = {m: results.curve_points(experiment, data_key, m) for m in methods}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    references = {
        "nothing removed": results.arm_runs(
            experiment, data_key, "semi-oracle", "nothing"
        ),
        "every flipped label removed": results.arm_runs(
            experiment, data_key, "semi-oracle", "treatment"
        ),
    }
    for axis, key, title in (
        (axes[0], "holdout_acc", "holdout failures F_h"),
        (axes[1], "remaining_acc", "remaining set T\\F"),
    ):
        for method, points in curves.items():
            ks = list(points)
            stats = [stat_of(points[k], key) for k in ks]
            axis.errorbar(
                ks,
                [s.mean for s in stats],
                yerr=[s.std for s in stats],
                marker="o",
                capsize=3,
                label=METHOD_LABELS.get(method, method),
            )
        for (name, runs), colour in zip(
            references.items(), ("black", "tab:purple"), strict=True
        ):
            stat = stat_of(runs, key)
            if not stat.ok:
                continue
            axis.axhline(stat.mean, color=colour, linestyle="--", label=name)
            axis.axhspan(
                stat.mean - stat.std, stat.mean + stat.std, color=colour, alpha=0.08
            )
        axis.set_xscale("log")
        axis.set_xlabel("k (top-ranked training examples removed)")
        axis.set_ylabel(f"accuracy on {title}")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(figure, path)


def tradeoff_plot(results: Results, data_key: str, path: Path) -> Path | None:
    """Accuracy on F_h against accuracy on T\\F for every treatment of exp. 4."""
    units = results.experiment_units(4, data_key)
    if not any(u.get("steps") for u in units):
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    for treatment, marker in (("ewc-deletion", "o"), ("newton", "s")):
        for position, unit in enumerate(units):
            record = unit.get("steps", {}).get(f"sweep/{treatment}")
            if not record:
                continue
            points = record["points"]
            axis.plot(
                [p["remaining_acc"] for p in points],
                [p["holdout_acc"] for p in points],
                marker=marker,
                color="tab:blue" if treatment == "ewc-deletion" else "tab:orange",
                alpha=0.9 if position == 0 else 0.45,
                label=(
                    f"{'EWC-deletion' if treatment == 'ewc-deletion' else 'Newton'}"
                    " (γ sweep)"
                    if position == 0
                    else None
                ),
            )
            for point in points:
                axis.annotate(
                    f"{point['strength']:g}",
                    (point["remaining_acc"], point["holdout_acc"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    for arm, label, colour in (
        ("treatment", "fine-tune on D\\C", "tab:green"),
        ("random", "random removal + fine-tune", "tab:red"),
        ("nothing", "nothing removed + fine-tune", "black"),
    ):
        runs = results.arm_runs(4, data_key, "finetune", arm)
        x, y = stat_of(runs, "remaining_acc"), stat_of(runs, "holdout_acc")
        if x.ok:
            axis.errorbar(
                x.mean,
                y.mean,
                xerr=x.std,
                yerr=y.std,
                fmt="D",
                color=colour,
                capsize=3,
                label=label,
            )
    axis.axvline(0.95, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("accuracy on remaining set T\\F")
    axis.set_ylabel("accuracy on holdout failures F_h")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, path)


def cost_plot(rows: list[tuple[str, Stat]], path: Path) -> Path | None:
    """Horizontal bars of wall time per method or treatment, log scale."""
    rows = [(name, stat) for name, stat in rows if stat.ok and stat.mean > 0]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7.0, 0.38 * len(rows) + 1.2))
    names = [name for name, _ in rows]
    axis.barh(
        names,
        [s.mean for _, s in rows],
        xerr=[s.std for _, s in rows],
        color="tab:blue",
        capsize=2,
    )
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("wall time (s)")
    axis.grid(alpha=0.3, axis="x")
    return _save(figure, path)
