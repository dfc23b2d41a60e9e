"""State of the benchmark page under construction and the text helpers its
sections share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repair_core.benchmark.settings import METHOD_LABELS, BenchSettings
from repair_core.benchmark.summary import Results, Stat, best_under, stat_of

REMAINING_FLOOR = 0.95
DETECTION_BAR = 0.85

#: Figures a plain prototype measured on full MNIST (3000 training images,
#: 10,000 test images), quoted for comparison.
PROTOTYPE_FULL_MNIST = {
    "n_failures": 1110,
    "found_at_20pct": 0.62,
    "top_1000": (0.68, 0.83),
    "semi_oracle": (0.62, 0.96),
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def number(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return "–"


def describe_difference(difference: Stat) -> str:
    """Describe a paired difference in accuracy with its standard error."""
    if not difference.ok:
        return "no paired runs"
    text = f"paired difference {difference.mean:+.3f}"
    if difference.n < 2:
        return f"{text}, 1 pair"
    return (
        f"{text}, standard error {difference.standard_error:.3f} over "
        f"{difference.n} pairs"
    )


def ratio(stat: Stat, reference: Stat) -> str:
    if not (stat.ok and reference.ok and reference.mean > 0):
        return "–"
    return f"{stat.mean / reference.mean:.2f}"


def versus(value: float, published: float) -> str:
    if value != value:
        return "not comparable with"
    if value < published:
        return f"{published - value:.2f} below"
    return f"{value - published:.2f} above"


def short_of(value: float, published: float, what: str) -> str:
    if value != value:
        return ""
    if value >= published:
        return f"We reach the published figure on {what}."
    return f"We fall short on {what} by {published - value:.3f}."


def sweep_by_gamma(
    units: list[dict[str, Any]], treatment: str
) -> dict[float, list[dict[str, Any]]]:
    by_gamma: dict[float, list[dict[str, Any]]] = {}
    for unit in units:
        record = unit.get("steps", {}).get(f"sweep/{treatment}")
        for point in (record or {}).get("points", []):
            by_gamma.setdefault(float(point["strength"]), []).append(point)
    return dict(sorted(by_gamma.items()))


def best_tradeoff_points(
    units: list[dict[str, Any]],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return the best sweep point of EWC-deletion and of Newton removal: the
    γ with the highest mean F_h accuracy among those whose mean T\\F accuracy
    is at least ``REMAINING_FLOOR``, or None where no γ qualifies.

    Each point has ``strength``, ``holdout_acc`` and ``remaining_acc``, the
    means over base seeds.
    """
    best = []
    for treatment in ("ewc-deletion", "newton"):
        means = [
            {
                "strength": gamma,
                "holdout_acc": stat_of(points, "holdout_acc").mean,
                "remaining_acc": stat_of(points, "remaining_acc").mean,
            }
            for gamma, points in sweep_by_gamma(units, treatment).items()
        ]
        best.append(best_under(means, "holdout_acc", "remaining_acc", REMAINING_FLOOR))
    return best[0], best[1]


def describe_point(point: dict[str, Any] | None) -> str:
    """Format a point from ``best_tradeoff_points`` as one line of text."""
    if point is None:
        return f"no γ keeps T\\F ≥ {REMAINING_FLOOR}"
    return (
        f"F_h {point['holdout_acc']:.3f} at γ = {point['strength']:g} "
        f"(T\\F {point['remaining_acc']:.3f})"
    )


class PageBase:
    """The lines, quality bars, results and settings of one page."""

    def __init__(self, results: Results, out: Path) -> None:
        self.results = results
        self.out = out
        self.settings = BenchSettings.from_dict(results.settings)
        self.lines: list[str] = []
        self.bars: list[tuple[str, str, str]] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None:
            relative = f"{self.out.name}/{path.name}"
            self.add(f"![{alt}]({relative})", "")

    def bar(
        self, name: str, measured: str, passed: bool | None, complete: bool = True
    ) -> None:
        if passed is None:
            verdict = "not measured"
        elif not complete:
            verdict = ("pass" if passed else "fail") + " so far, incomplete"
        else:
            verdict = "pass" if passed else "fail"
        self.bars.append((name, measured, verdict))
