"""Render docs/BENCHMARKS.md and its plots from the results file alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from repair_core import noise
from repair_core.benchmark import plots
from repair_core.benchmark.settings import (
    EXPERIMENT_TITLES,
    METHOD_LABELS,
    PUBLISHED,
    BenchSettings,
)
from repair_core.benchmark.store import RESULTS_NAME
from repair_core.benchmark.summary import Results, Stat, best_under, stat_of

logger = logging.getLogger(__name__)

PAGE_NAME = "BENCHMARKS.md"
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


def page_path(out: str | Path) -> Path:
    """Return the page path, one level above the plot folder ``out``."""
    return Path(out).parent / PAGE_NAME


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return "–"


class PageWriter:
    """Builds the page text section by section from one results file."""

    def __init__(self, results: Results, out: Path) -> None:
        self.results = results
        self.out = out
        self.settings = BenchSettings.from_dict(results.settings)
        self.lines: list[str] = []
        self.bars: list[tuple[str, str, str]] = []

    # Helpers ---------------------------------------------------------------

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

    # Header ----------------------------------------------------------------

    def header(self) -> None:
        data = self.results.data
        settings = self.settings
        invocations = data.get("invocations", [])
        last = invocations[-1] if invocations else {}
        machine = last.get("machine", {})
        self.add(
            "# Benchmarks",
            "",
            "How well the cause identification methods find corrupted training "
            "examples behind a classifier's test failures, and how well the "
            "treatments repair the model, on MNIST with the reference CNN "
            "(`mnist-cnn`). Published figures are from Tanno et al. 2022, "
            '"Repairing Neural Networks by Leaving the Right Past Behind".',
            "",
            "The page is rendered from "
            f"[`{self.out.name}/{RESULTS_NAME}`]({self.out.name}/{RESULTS_NAME}) "
            "by the command below; `--render-only` rebuilds it from that file "
            "alone.",
            "",
            "## How these numbers were made",
            "",
        )
        for invocation in invocations:
            command = invocation.get("command") or "run_benchmark() from Python"
            self.add(f"- `{command}` (started {invocation.get('started', '?')})")
        self.add(
            "",
            f"- Results first written {data.get('started', '?')}, last updated "
            f"{data.get('updated', '?')}.",
            f"- Machine: {machine.get('platform', '?')}, "
            f"{machine.get('cpu_count', '?')} CPUs "
            f"({machine.get('processor', '?')}), torch "
            f"{machine.get('torch', '?')} with {machine.get('torch_threads', '?')} "
            f"threads, device {machine.get('device', '?')}"
            + (f" ({machine['gpu']})" if machine.get("gpu") else "")
            + f", Python {machine.get('python', '?')}.",
            "- 1-minute load average at the start of each invocation: "
            + _load_averages(invocations)
            + ".",
            f"- Mode: {settings.mode}. Base-model seeds planned: "
            f"{', '.join(map(str, settings.seeds))}; fine-tuning seeds per "
            f"removal figure: {', '.join(map(str, settings.finetune_seeds))}.",
            f"- Embedded data: {settings.n_train or 3000} training and "
            f"{settings.n_test or 2000} test images; full MNIST: "
            f"{settings.mnist_n_train} training images drawn from the 60,000 and "
            f"{settings.mnist_n_test or 10000:,} test images.",
            "- Base training and fine-tuning: Adam (lr 1e-3, batch 64), at most "
            f"{settings.max_epochs} epochs, early stopping with patience 5 on the "
            "loss of a 10% validation split (of D\\C when fine-tuning), restoring "
            "the best epoch. Failures F are the misclassified test images; half "
            "of them, drawn at random, form the query set F_q and the rest the "
            "holdout set F_h. T\\F is the rest of the test set.",
            "- Removal figures are `mean ± std` over every fine-tuning run (base "
            "seeds × fine-tuning seeds) and `n` counts them; detection figures "
            "are `mean ± std` over base seeds.",
            "",
        )
        self.completeness()

    def completeness(self) -> None:
        from repair_core.benchmark.experiments import planned_units

        units = self.results.units
        skipped = self.results.data.get("skipped", {})
        rows = []
        for experiment, data_key, seed in planned_units(self.settings):
            key = f"exp{experiment}/{data_key}/seed{seed}"
            unit = units.get(key)
            if key in skipped:
                status = f"skipped: {skipped[key]}"
            elif unit is None:
                status = "not run"
            else:
                status = unit.get("status", "?")
                if unit.get("error"):
                    status += f": {unit['error']}"
                if status == "running":
                    steps = ", ".join(unit.get("steps", {})) or "none"
                    status = f"incomplete (finished steps: {steps})"
                    scored = self.scored_methods(unit)
                    if scored:
                        status += f"; methods scored: {scored}"
            rows.append([f"{experiment}", data_key, str(seed), status])
        if 5 in self.settings.experiments:
            rows.append(["5", "embedded", "–", "read from the timings of 1 and 4"])
        self.add("### What ran", "")
        self.add(*_table(["experiment", "data", "base seed", "status"], rows))

    def scored_methods(self, unit: dict[str, Any]) -> str:
        """List the identification methods stored for the unit's base run."""
        for run_unit in self.results.units.values():
            if run_unit.get("kind") != "run":
                continue
            train = run_unit.get("steps", {}).get("train") or {}
            if train.get("run_id") == unit.get("run_id"):
                return ", ".join(
                    name.removeprefix("identify/")
                    for name in run_unit["steps"]
                    if name.startswith("identify/")
                )
        return ""

    # Base models -----------------------------------------------------------

    def base_table(self, experiment: int, data_key: str) -> None:
        rows = []
        for record in self.results.base_records(experiment, data_key):
            cost = record.get("cost") or {}
            rows.append(
                [
                    str(record.get("seed")),
                    _number(record.get("test_accuracy")),
                    _number(record.get("n_failures")),
                    _number(record.get("n_query")),
                    _number(record.get("n_holdout")),
                    _number(record.get("n_corrupted")),
                    _number(record.get("best_epoch")),
                    _number(cost.get("seconds"), 0),
                ]
            )
        if rows:
            self.add(
                *_table(
                    [
                        "seed",
                        "test accuracy",
                        "failures |F|",
                        "|F_q|",
                        "|F_h|",
                        "corrupted",
                        "best epoch",
                        "training s",
                    ],
                    rows,
                )
            )

    # Detection -------------------------------------------------------------

    def detection_table(self, scenario: str, data_key: str, published: bool) -> None:
        rows = []
        for method in self.results.methods(scenario, data_key):
            at10 = self.results.detection(scenario, data_key, method, "found_at_10pct")
            at20 = self.results.detection(scenario, data_key, method, "found_at_20pct")
            p100 = self.results.detection(
                scenario, data_key, method, "precision_at_100"
            )
            seconds = self.results.seconds(scenario, data_key, method)
            errors = self.results.errors(scenario, data_key, method)
            row = [
                _label(method),
                at10.text(),
                at20.text(),
                p100.text(),
                seconds.text(1),
                str(at20.n) + (f" ({len(errors)} failed)" if errors else ""),
            ]
            if published:
                figure = PUBLISHED["found_at_20pct"].get(method)
                row.insert(3, f"≈ {figure:.2f}" if figure is not None else "–")
            rows.append(row)
        header = [
            "method",
            "found in top 10%",
            "found in top 20%",
            "precision at 100",
            "seconds",
            "seeds",
        ]
        if published:
            header.insert(3, "top 20%, Tanno et al. 2022")
        if rows:
            self.add(*_table(header, rows))
        for method in self.results.methods(scenario, data_key):
            for error in self.results.errors(scenario, data_key, method):
                self.add(f"- {_label(method)} failed: `{error}`", "")

    # Removal ---------------------------------------------------------------

    def removal_tables(self, experiment: int, data_key: str) -> None:
        methods = [
            m
            for m in self.settings.curve_methods
            if self.results.curve_points(experiment, data_key, m)
        ]
        if not methods:
            self.add("No removal curve has finished yet.", "")
            self.reference_table(experiment, data_key)
            return
        ks = sorted(
            {
                k
                for m in methods
                for k in self.results.curve_points(experiment, data_key, m)
            }
        )
        for key, title in (
            ("holdout_acc", "holdout failures F_h"),
            ("remaining_acc", "remaining set T\\F"),
            ("query_acc", "query failures F_q"),
        ):
            rows = []
            for k in ks:
                row = [str(k)]
                for method in methods:
                    runs = self.results.curve_points(experiment, data_key, method).get(
                        k, []
                    )
                    row.append(stat_of(runs, key).text())
                rows.append(row)
            for name, arm in (
                ("nothing removed", "nothing"),
                ("every corrupted label removed", "treatment"),
            ):
                runs = self.results.arm_runs(experiment, data_key, "semi-oracle", arm)
                if runs:
                    n_removed = runs[0].get("n_removed", "?")
                    rows.append(
                        [f"{name} ({n_removed})", stat_of(runs, key).text()]
                        + [""] * (len(methods) - 1)
                    )
            self.add(
                f"Accuracy on the {title} after removing the top k and "
                "fine-tuning on D\\C:",
                "",
            )
            self.add(*_table(["k"] + [_label(m) for m in methods], rows))
        n = len(self.results.curve_points(experiment, data_key, methods[0])[ks[0]])
        self.add(f"Each cell pools n = {n} fine-tuning runs.", "")

    def reference_table(self, experiment: int, data_key: str) -> None:
        """Accuracies of the nothing-removed and every-flip-removed references."""
        rows = []
        for name, arm in (
            ("nothing removed", "nothing"),
            ("every corrupted label removed", "treatment"),
        ):
            runs = self.results.arm_runs(experiment, data_key, "semi-oracle", arm)
            if runs:
                rows.append(
                    [
                        f"{name} ({runs[0].get('n_removed', '?')})",
                        stat_of(runs, "query_acc").text(),
                        stat_of(runs, "holdout_acc").text(),
                        stat_of(runs, "remaining_acc").text(),
                        str(len(runs)),
                    ]
                )
        if rows:
            self.add("References, fine-tuned on D\\C:", "")
            self.add(*_table(["removed", "F_q", "F_h", "T\\F", "n"], rows))

    def published_removal(self, experiment: int, data_key: str) -> None:
        points = self.results.curve_points(experiment, data_key, "ewc-influence")
        runs = points.get(1000)
        if not runs:
            return
        figure = PUBLISHED["removal_top_1000"]
        holdout = stat_of(runs, "holdout_acc")
        remaining = stat_of(runs, "remaining_acc")
        self.add(
            "Removing the top 1000 by EWC-influence and fine-tuning: holdout-failure "
            f"accuracy {holdout.text()} and remaining accuracy {remaining.text()}, "
            f"against {figure['holdout_acc']} and {figure['remaining_acc']} in "
            "Tanno et al. 2022. "
            + _short_of(holdout.mean, figure["holdout_acc"], "holdout failures")
            + " "
            + _short_of(remaining.mean, figure["remaining_acc"], "the remaining set"),
            "",
        )

    def noise_table(self, experiment: int) -> None:
        records = self.results.step_records(experiment, "embedded", "removal")
        if not records:
            self.add("The top-k removal has not finished yet.", "")
            return
        rows = []
        n_removed = records[0].get("n_removed")
        for arm, name in (
            ("treatment", f"top {n_removed} by EWC-influence removed"),
            ("random", f"{n_removed} random examples removed"),
            ("nothing", "nothing removed"),
        ):
            runs = self.results.arm_runs(experiment, "embedded", "removal", arm)
            rows.append(
                [
                    name,
                    stat_of(runs, "query_acc").text(),
                    stat_of(runs, "holdout_acc").text(),
                    stat_of(runs, "remaining_acc").text(),
                    str(len(runs)),
                ]
            )
        self.add("After fine-tuning on D\\C:", "")
        self.add(*_table(["arm", "F_q", "F_h", "T\\F", "n"], rows))

    # Sections --------------------------------------------------------------

    def experiment_1(self) -> None:
        self.add(f"## 1. {EXPERIMENT_TITLES[1]}", "")
        self.add(
            "Labels flipped 1↔7 with probability 0.4 and 6↔9 with probability 0.3 "
            f"on the embedded MNIST split ({self.settings.n_train or 3000} "
            f"training, {self.settings.n_test or 2000} test images).",
            "",
        )
        self.base_table(1, "embedded")
        self.add("### Detection", "")
        self.detection_table("label-flip", "embedded", published=True)
        self.image(
            plots.detection_plot(
                self.results,
                [("label-flip", "embedded", "label flips, embedded MNIST")],
                self.out / "detection_label_flip.png",
            ),
            "detection curves, label flips",
        )
        self.detection_commentary("label-flip", "embedded")
        self.fit_strength_table()
        self.add("### Removal curves", "")
        self.removal_tables(1, "embedded")
        self.published_removal(1, "embedded")
        self.image(
            plots.removal_plot(
                self.results,
                1,
                "embedded",
                list(self.settings.curve_methods),
                self.out / "removal_curve_label_flip.png",
            ),
            "removal curves, label flips",
        )

    def fit_strength_table(self) -> None:
        """EWC-influence detection against the number of steps of its fit."""
        records = self.results.step_records(1, "embedded", "fit-strength")
        if not records:
            return
        by_steps: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            for row in record["rows"]:
                flat = {**row, **{f"fit_{k}": v for k, v in row["fit"].items()}}
                by_steps.setdefault(int(row["steps"]), []).append(flat)
        rows = [
            [
                str(steps),
                stat_of(runs, "found_at_10pct").text(),
                stat_of(runs, "found_at_20pct").text(),
                stat_of(runs, "fit_query_acc").text(),
                stat_of(runs, "fit_holdout_acc").text(),
                str(len(runs)),
            ]
            for steps, runs in sorted(by_steps.items())
        ]
        self.add("### How the strength of the EWC fit moves the ranking", "")
        self.add(
            "EWC-influence with a fit of exactly this many full-batch Adam steps "
            f"(lr {records[0]['lr']:g}) on all of F_q, no early stopping; F_q and "
            "F_h accuracy are those of the fitted model θ̂₊F, which has seen F_q "
            "but not F_h:",
            "",
        )
        self.add(
            *_table(
                ["steps", "top 10%", "top 20%", "F_q (fit)", "F_h (fit)", "n"], rows
            )
        )

    def detection_commentary(self, scenario: str, data_key: str) -> None:
        ewc = self.results.detection(
            scenario, data_key, "ewc-influence", "found_at_20pct"
        )
        if not ewc.ok:
            return
        notes = []
        figure = PUBLISHED["found_at_20pct"]["ewc-influence"]
        notes.append(
            f"EWC-influence finds {ewc.mean:.3f} of the flipped labels in the top "
            f"20% (Tanno et al. 2022: about {figure:.2f})."
        )
        short = []
        for method, published in PUBLISHED["found_at_20pct"].items():
            ours = self.results.detection(scenario, data_key, method, "found_at_20pct")
            if ours.ok and ours.mean < published:
                short.append(f"{_label(method)} {ours.mean:.3f} vs about {published}")
        if short:
            notes.append(
                "Below the published top-20% figure: " + "; ".join(short) + "."
            )
        ahead = []
        for method in self.results.methods(scenario, data_key):
            if method in ("ewc-influence", "oracle"):
                continue
            other = self.results.detection(scenario, data_key, method, "found_at_20pct")
            if other.ok and other.mean > ewc.mean:
                ahead.append(f"{_label(method)} ({other.mean:.3f})")
        if ahead:
            notes.append(
                "EWC-influence trails "
                + ", ".join(ahead)
                + " on this measure. Training loss and confident learning ignore "
                "F_q, so they find mislabelled examples whether or not they "
                "caused the failures."
            )
        self.add(" ".join(notes), "")

    def experiment_noise(self, experiment: int, scenario: str, description: str):
        self.add(f"## {experiment}. {EXPERIMENT_TITLES[experiment]}", "")
        self.add(description, "")
        self.base_table(experiment, "embedded")
        self.detection_table(scenario, "embedded", published=False)
        self.noise_table(experiment)

    def experiment_4(self) -> None:
        self.add(f"## 4. {EXPERIMENT_TITLES[4]}", "")
        units = self.results.experiment_units(4, "embedded")
        if not units:
            self.add("Not run yet.", "")
            return
        n_causes = units[0].get("n_causes")
        corrupted = units[0].get("causes_corrupted")
        self.add(
            f"The causes C are the top {self.settings.tradeoff_fraction:.0%} of D by "
            f"EWC-influence ({n_causes} examples, {corrupted} of them flipped, "
            "first seed). EWC-deletion and Newton removal run once per γ (seed 0); "
            "fine-tuning and its controls run once per fine-tuning seed. "
            "EWC-deletion stops early on F_q accuracy, so F_h is the fair "
            "measure of the repair.",
            "",
        )
        rows = []
        for treatment in ("ewc-deletion", "newton"):
            for gamma, points in _sweep_by_gamma(units, treatment).items():
                rows.append(
                    [
                        "EWC-deletion" if treatment == "ewc-deletion" else "Newton",
                        f"{gamma:g}",
                        stat_of(points, "query_acc").text(),
                        stat_of(points, "holdout_acc").text(),
                        stat_of(points, "remaining_acc").text(),
                        stat_of(points, "seconds").text(1),
                        str(len(points)),
                    ]
                )
        for arm, name in (
            ("treatment", "fine-tune on D\\C"),
            ("random", "random removal + fine-tune"),
            ("nothing", "nothing removed + fine-tune"),
        ):
            runs = self.results.arm_runs(4, "embedded", "finetune", arm)
            if runs:
                rows.append(
                    [
                        name,
                        "–",
                        stat_of(runs, "query_acc").text(),
                        stat_of(runs, "holdout_acc").text(),
                        stat_of(runs, "remaining_acc").text(),
                        stat_of(runs, "seconds").text(1),
                        str(len(runs)),
                    ]
                )
        self.add(
            *_table(["treatment", "γ", "F_q", "F_h", "T\\F", "seconds", "n"], rows)
        )
        self.image(
            plots.tradeoff_plot(self.results, "embedded", self.out / "tradeoff.png"),
            "trade-off between failure and remaining accuracy",
        )

    def experiment_5(self) -> None:
        self.add(f"## 5. {EXPERIMENT_TITLES[5]}", "")
        results = self.results
        ewc = results.seconds("label-flip", "embedded", "ewc-influence")
        rows = []
        plot_rows = []
        for method in results.methods("label-flip", "embedded"):
            seconds = results.seconds("label-flip", "embedded", method)
            records = results.identification("label-flip", "embedded", method)
            step_peak = Stat.of(
                (r.get("cost") or {}).get("step_peak_rss_mb") for r in records
            )
            process_peak = Stat.of(
                (r.get("cost") or {}).get("process_peak_rss_mb") for r in records
            )
            rows.append(
                [
                    f"identify: {_label(method)}",
                    seconds.text(1),
                    _ratio(seconds, ewc),
                    step_peak.text(0),
                    process_peak.text(0),
                    str(seconds.n),
                ]
            )
            plot_rows.append((_label(method), seconds))
        for name, stat in self.treatment_costs():
            rows.append(
                [
                    f"treat: {name}",
                    stat.text(1),
                    _ratio(stat, ewc),
                    "–",
                    "–",
                    str(stat.n),
                ]
            )
            plot_rows.append((name, stat))
        if not rows:
            self.add("Not measured yet.", "")
            return
        self.add(
            "Wall time (`time.perf_counter`) on the label-flip runs of experiment "
            "1 and the treatments of experiment 4, all on the machine above. "
            "Step peak is the resident-memory peak during the "
            "step (Linux resets the counter through /proc/self/clear_refs); "
            "process peak is `ru_maxrss`, the peak of the whole process so far, "
            "so it never decreases. Times include any slowdown from other jobs "
            "sharing the machine; the load average at the start of each "
            "invocation is listed above where it was recorded.",
            "",
        )
        self.add(
            *_table(
                [
                    "work",
                    "seconds",
                    "× EWC-influence",
                    "step peak MiB",
                    "process peak MiB",
                    "n",
                ],
                rows,
            )
        )
        sgd = results.seconds("label-flip", "embedded", "sgd-influence")
        if sgd.ok and ewc.ok:
            low, high = PUBLISHED["sgd_influence_slowdown"]
            self.add(
                f"SGD-influence took {sgd.mean / ewc.mean:.1f}× the time of "
                f"EWC-influence; Tanno et al. 2022 report {low:g}–{high:g}×.",
                "",
            )
        self.image(plots.cost_plot(plot_rows, self.out / "cost.png"), "wall time")

    def treatment_costs(self) -> list[tuple[str, Stat]]:
        costs = []
        units = self.results.experiment_units(4, "embedded")
        for treatment, name in (
            ("ewc-deletion", "EWC-deletion, one γ"),
            ("newton", "Newton removal, solve + one γ"),
        ):
            points = [
                p for pts in _sweep_by_gamma(units, treatment).values() for p in pts
            ]
            costs.append((name, stat_of(points, "seconds")))
        costs.append(
            (
                "fine-tune on D\\C, one seed",
                stat_of(
                    self.results.arm_runs(4, "embedded", "finetune", "treatment"),
                    "seconds",
                ),
            )
        )
        retrain = [
            run
            for record in self.results.step_records(6, "mnist", "semi-oracle-retrain")
            for run in record["arms"]["treatment"]["per_seed"]
        ]
        costs.append(
            ("retrain from scratch on D\\C (full MNIST)", stat_of(retrain, "seconds"))
        )
        return [(name, stat) for name, stat in costs if stat.ok]

    def experiment_6(self) -> None:
        self.add(f"## 6. {EXPERIMENT_TITLES[6]}", "")
        units = self.results.experiment_units(6, "mnist")
        skipped = {
            k: v
            for k, v in self.results.data.get("skipped", {}).items()
            if k.startswith("exp6/")
        }
        if not units:
            reason = next(iter(skipped.values()), "not run yet")
            self.add(f"Not measured: {reason}.", "")
            self.investigation()
            return
        self.add(
            f"Experiment 1 on full MNIST: {self.settings.mnist_n_train} training "
            "images drawn class-balanced from the 60,000, and the "
            f"{self.settings.mnist_n_test or 10000:,}-image test set.",
            "",
        )
        self.base_table(6, "mnist")
        self.detection_table("label-flip", "mnist", published=True)
        self.image(
            plots.detection_plot(
                self.results,
                [
                    ("label-flip", "embedded", "embedded MNIST"),
                    ("label-flip", "mnist", "full MNIST"),
                ],
                self.out / "detection_full_mnist.png",
            ),
            "detection curves, embedded and full MNIST",
        )
        self.removal_tables(6, "mnist")
        self.published_removal(6, "mnist")
        self.image(
            plots.removal_plot(
                self.results,
                6,
                "mnist",
                list(self.settings.curve_methods),
                self.out / "removal_curve_full_mnist.png",
            ),
            "removal curves, full MNIST",
        )
        self.side_by_side()
        self.investigation()

    def side_by_side(self) -> None:
        results = self.results
        rows = []

        def removal(data_key: str, experiment: int, method: str, k: int, key: str):
            runs = results.curve_points(experiment, data_key, method).get(k, [])
            return stat_of(runs, key).text()

        def semi(data_key: str, experiment: int, key: str):
            runs = results.arm_runs(experiment, data_key, "semi-oracle", "treatment")
            return stat_of(runs, key).text()

        def failures(data_key: str, experiment: int):
            return Stat.of(
                r.get("n_failures") for r in results.base_records(experiment, data_key)
            ).text(0)

        proto = PROTOTYPE_FULL_MNIST
        published = PUBLISHED["removal_top_1000"]
        rows.append(
            [
                "failures |F|",
                failures("embedded", 1),
                failures("mnist", 6),
                str(proto["n_failures"]),
                "–",
            ]
        )
        rows.append(
            [
                "EWC-influence, found in top 20%",
                results.detection(
                    "label-flip", "embedded", "ewc-influence", "found_at_20pct"
                ).text(),
                results.detection(
                    "label-flip", "mnist", "ewc-influence", "found_at_20pct"
                ).text(),
                f"{proto['found_at_20pct']}",
                f"≈ {PUBLISHED['found_at_20pct']['ewc-influence']}",
            ]
        )
        for key, name, index, published_value in (
            ("holdout_acc", "F_h", 0, published["holdout_acc"]),
            ("remaining_acc", "T\\F", 1, published["remaining_acc"]),
        ):
            rows.append(
                [
                    f"top 1000 removed + fine-tune: {name}",
                    removal("embedded", 1, "ewc-influence", 1000, key),
                    removal("mnist", 6, "ewc-influence", 1000, key),
                    f"{proto['top_1000'][index]}",
                    f"{published_value}",
                ]
            )
            rows.append(
                [
                    f"every flipped label removed + fine-tune: {name}",
                    semi("embedded", 1, key),
                    semi("mnist", 6, key),
                    f"{proto['semi_oracle'][index]}",
                    "–",
                ]
            )
        self.add("### Beside the embedded data", "")
        self.add(
            *_table(
                [
                    "figure",
                    "embedded MNIST",
                    "full MNIST",
                    "plain prototype, full MNIST",
                    "Tanno et al. 2022",
                ],
                rows,
            )
        )

    def investigation(self) -> None:
        """Facts that locate the gap to the published removal figures."""
        self.add("### Where the difference to the published figures comes from", "")
        facts = []
        for data_key, experiment, name in (
            ("embedded", 1, "embedded MNIST"),
            ("mnist", 6, "full MNIST"),
        ):
            facts += self.investigation_facts(data_key, experiment, name)
        if not facts:
            self.add("Not enough of experiments 1 and 6 has finished to say.", "")
            return
        self.add(*[f"- {fact}" for fact in facts], "")

    def investigation_facts(
        self, data_key: str, experiment: int, name: str
    ) -> list[str]:
        results = self.results
        facts = []
        compositions = [
            unit["steps"]["composition"]
            for unit in results.experiment_units(experiment, data_key)
            if "composition" in unit.get("steps", {})
        ]
        if compositions:
            n_train = (
                self.settings.mnist_n_train
                if data_key == "mnist"
                else self.settings.n_train or 3000
            )
            share = Stat.of(
                c["holdout_in_classes"] / c["n_holdout"]
                for c in compositions
                if c["n_holdout"]
            )
            facts.append(
                f"{name}, the split: {share.text()} of the holdout failures F_h "
                "have a true class among the flipped classes 1, 7, 6 and 9; "
                f"the rest are ordinary errors of a model trained on {n_train} "
                "images, which no removal of flipped labels is expected to fix."
            )
        fits = [
            r["fit"]
            for r in results.identification("label-flip", data_key, "ewc-influence")
            if r.get("fit")
        ]
        if fits:
            query = Stat.of(f["query_acc"] for f in fits)
            holdout = Stat.of(f["holdout_acc"] for f in fits)
            remaining = Stat.of(f["remaining_acc"] for f in fits)
            facts.append(
                f"{name}, the fit of F_q: the EWC fit θ̂₊F behind EWC-influence "
                f"classifies {query.text()} of F_q correctly, {holdout.text()} of "
                f"the unseen F_h and {remaining.text()} of T\\F."
            )
        semi = results.arm_runs(experiment, data_key, "semi-oracle", "treatment")
        nothing = results.arm_runs(experiment, data_key, "semi-oracle", "nothing")
        if semi and nothing:
            facts.append(
                f"{name}, the fine-tuning protocol: fine-tuning with nothing "
                f"removed reaches {stat_of(nothing, 'holdout_acc').text()} on F_h, "
                "and removing every flipped label reaches "
                f"{stat_of(semi, 'holdout_acc').text()} on F_h with "
                f"{stat_of(semi, 'remaining_acc').text()} on T\\F. With the exact "
                "causes removed, this protocol's F_h accuracy is "
                + _versus(
                    stat_of(semi, "holdout_acc").mean,
                    PUBLISHED["removal_top_1000"]["holdout_acc"],
                )
                + " the published 0.86 after removing the top 1000."
            )
        groups = [
            r["first_seed_holdout_by_group"]
            for r in results.step_records(experiment, data_key, "semi-oracle")
            if r.get("first_seed_holdout_by_group")
        ]
        if groups:
            inside = Stat.of(g["holdout_acc_in_classes"] for g in groups)
            outside = Stat.of(g["holdout_acc_other_classes"] for g in groups)
            facts.append(
                f"{name}, by class (first fine-tuning seed): after removing every "
                f"flipped label, F_h accuracy is {inside.text()} on failures of "
                f"classes 1, 7, 6, 9 and {outside.text()} on the other classes."
            )
        top = [
            r["first_seed_holdout_by_group"]
            for r in results.step_records(experiment, data_key, "top-k-by-group")
            if r.get("first_seed_holdout_by_group")
        ]
        if top:
            inside = Stat.of(g["holdout_acc_in_classes"] for g in top)
            outside = Stat.of(g["holdout_acc_other_classes"] for g in top)
            facts.append(
                f"{name}, by class after removing the top {max(self.settings.ks)} "
                f"by EWC-influence (first seed): {inside.text()} on classes 1, 7, "
                f"6, 9 and {outside.text()} on the others."
            )
        retrain = results.step_records(experiment, data_key, "semi-oracle-retrain")
        if retrain:
            runs = [
                r for record in retrain for r in record["arms"]["treatment"]["per_seed"]
            ]
            facts.append(
                f"{name}, retraining from scratch (not fine-tuning) without every "
                f"flipped label: F_h {stat_of(runs, 'holdout_acc').text()}, T\\F "
                f"{stat_of(runs, 'remaining_acc').text()} (n = {len(runs)})."
            )
        return facts

    # Quality bars ----------------------------------------------------------

    def quality_bars(self) -> None:
        results = self.results
        ewc = results.detection(
            "label-flip", "embedded", "ewc-influence", "found_at_20pct"
        )
        self.bar(
            f"EWC-influence finds ≥ {DETECTION_BAR} of flipped labels in the top "
            "20% (mean of 3 seeds)",
            f"{ewc.text()} over {ewc.n} seed(s)" if ewc.ok else "–",
            ewc.mean >= DETECTION_BAR if ewc.ok else None,
            complete=ewc.n >= len(self.settings.seeds),
        )
        for method in ("linear-influence-lissa", "tracin"):
            other = results.detection(
                "label-flip", "embedded", method, "found_at_20pct"
            )
            self.bar(
                f"EWC-influence finds more in the top 20% than {_label(method)}",
                f"{ewc.text()} vs {other.text()}",
                ewc.mean > other.mean if ewc.ok and other.ok else None,
                complete=min(ewc.n, other.n) >= len(self.settings.seeds),
            )
        self.removal_bars()
        self.tradeoff_bar()
        self.add("## Quality bars", "")
        finished = {
            e: sum(
                1
                for u in self.results.experiment_units(e, "embedded")
                if u.get("status") == "done"
            )
            for e in (1, 4)
        }
        self.add(
            "Measured on the embedded data. Base seeds finished: "
            f"{finished[1]} of {len(self.settings.seeds)} for experiment 1 and "
            f"{finished[4]} of {len(self.settings.seeds)} for experiment 4; an "
            "unfinished seed contributes the steps it completed. A bar with "
            "nothing measured yet says so.",
            "",
        )
        self.add(*_table(["bar", "measured", "verdict"], [list(b) for b in self.bars]))

    def removal_bars(self) -> None:
        results = self.results
        ewc = results.curve_points(1, "embedded", "ewc-influence")
        nothing = results.arm_runs(1, "embedded", "semi-oracle", "nothing")
        if not ewc:
            self.bar("EWC-influence removal beats the controls at every k", "–", None)
            self.bar("At k = 300, F_h ≥ every flipped label removed", "–", None)
            return
        rivals = {
            "nothing removed": {k: nothing for k in ewc},
            "random removal": results.curve_points(1, "embedded", "random"),
            "highest training loss removed": results.curve_points(
                1, "embedded", "training-loss"
            ),
        }
        for name, by_k in rivals.items():
            losses = []
            measured_ks = 0
            for k, runs in ewc.items():
                other = by_k.get(k)
                if not other:
                    continue
                measured_ks += 1
                mine = stat_of(runs, "holdout_acc").mean
                theirs = stat_of(other, "holdout_acc").mean
                if not mine > theirs:
                    losses.append(f"k={k}: {mine:.3f} vs {theirs:.3f}")
            planned = len(self.settings.ks)
            self.bar(
                f"EWC-influence top-k removal beats {name} on F_h at every k",
                ("ties or loses at " + "; ".join(losses))
                if losses
                else f"ahead at each of the {measured_ks} of {planned} k measured",
                None if measured_ks == 0 else not losses,
                complete=measured_ks >= planned,
            )
        at300 = ewc.get(300)
        semi = results.arm_runs(1, "embedded", "semi-oracle", "treatment")
        if at300 and semi:
            holdout = stat_of(at300, "holdout_acc")
            remaining = stat_of(at300, "remaining_acc")
            reference = stat_of(semi, "holdout_acc")
            self.bar(
                "At k = 300, F_h accuracy ≥ removing every flipped label, with "
                "T\\F ≥ 0.95",
                f"F_h {holdout.text()} vs {reference.text()}; T\\F {remaining.text()}",
                holdout.mean >= reference.mean and remaining.mean >= REMAINING_FLOOR,
                complete=holdout.n
                >= len(self.settings.seeds) * len(self.settings.finetune_seeds),
            )
        else:
            self.bar("At k = 300, F_h ≥ every flipped label removed", "–", None)

    def tradeoff_bar(self) -> None:
        units = self.results.experiment_units(4, "embedded")
        best = {}
        for treatment in ("ewc-deletion", "newton"):
            means = [
                {
                    "strength": gamma,
                    "holdout_acc": stat_of(points, "holdout_acc").mean,
                    "remaining_acc": stat_of(points, "remaining_acc").mean,
                }
                for gamma, points in _sweep_by_gamma(units, treatment).items()
            ]
            best[treatment] = (
                best_under(means, "holdout_acc", "remaining_acc", REMAINING_FLOOR),
                bool(means),
            )
        ewc_best, ewc_ran = best["ewc-deletion"]
        newton_best, newton_ran = best["newton"]
        if not (ewc_ran and newton_ran):
            self.bar("EWC-deletion beats Newton removal at T\\F ≥ 0.95", "–", None)
            return

        def describe(point):
            if point is None:
                return "no γ keeps T\\F ≥ 0.95"
            return (
                f"F_h {point['holdout_acc']:.3f} at γ = {point['strength']:g} "
                f"(T\\F {point['remaining_acc']:.3f})"
            )

        passed = ewc_best is not None and (
            newton_best is None or ewc_best["holdout_acc"] > newton_best["holdout_acc"]
        )
        self.bar(
            "EWC-deletion's best F_h beats Newton removal's at T\\F ≥ 0.95",
            f"EWC-deletion {describe(ewc_best)}; Newton {describe(newton_best)}",
            passed,
        )

    # Page ------------------------------------------------------------------

    def render(self) -> str:
        experiments = self.settings.experiments
        self.header()
        self.quality_bars()
        if 1 in experiments:
            self.experiment_1()
        if 2 in experiments:
            self.experiment_noise(
                2,
                "input-noise",
                f"Salt-and-pepper noise ({noise.DEFAULT_SALT_PEPPER_AMOUNT:.0%} of "
                f"pixels set to 0 or 1) on {noise.DEFAULT_FRACTION:.0%} of the "
                "training images of classes 1, 7, 6 and 9; labels unchanged. The "
                "top-k removal uses EWC-influence.",
            )
        if 3 in experiments:
            self.experiment_noise(
                3,
                "fgsm",
                f"{noise.DEFAULT_FRACTION:.0%} of the training images of classes "
                "1, 7, 6 and 9 replaced by FGSM adversarial versions (ε = "
                f"{noise.DEFAULT_EPSILON_GREYSCALE:g}, crafted on a victim model "
                "trained on the clean data); labels unchanged. The top-k removal "
                "uses EWC-influence.",
            )
        if 4 in experiments:
            self.experiment_4()
        if 5 in experiments:
            self.experiment_5()
        if 6 in experiments:
            self.experiment_6()
        return "\n".join(self.lines).rstrip() + "\n"


def _sweep_by_gamma(
    units: list[dict[str, Any]], treatment: str
) -> dict[float, list[dict[str, Any]]]:
    by_gamma: dict[float, list[dict[str, Any]]] = {}
    for unit in units:
        record = unit.get("steps", {}).get(f"sweep/{treatment}")
        for point in (record or {}).get("points", []):
            by_gamma.setdefault(float(point["strength"]), []).append(point)
    return dict(sorted(by_gamma.items()))


def _load_averages(invocations: list[dict[str, Any]]) -> str:
    values = []
    for invocation in invocations:
        load = invocation.get("machine", {}).get("load_average_1min")
        values.append("not recorded" if load is None else f"{load:.1f}")
    return ", ".join(values) or "not recorded"


def _ratio(stat: Stat, reference: Stat) -> str:
    if not (stat.ok and reference.ok and reference.mean > 0):
        return "–"
    return f"{stat.mean / reference.mean:.2f}"


def _versus(value: float, published: float) -> str:
    if value != value:
        return "not comparable with"
    if value < published:
        return f"{published - value:.2f} below"
    return f"{value - published:.2f} above"


def _short_of(value: float, published: float, what: str) -> str:
    if value != value:
        return ""
    if value >= published:
        return f"We reach the published figure on {what}."
    return f"We fall short on {what} by {published - value:.3f}."


def render_page(out: str | Path) -> Path:
    """Render the page and plots from ``out/results.json``; return the page path.

    Raises:
        FileNotFoundError: there is no results file in ``out``.
    """
    out = Path(out)
    results_path = out / RESULTS_NAME
    if not results_path.is_file():
        raise FileNotFoundError(
            f"No {RESULTS_NAME} in {out}. Run the benchmark first, or pass the "
            "--out folder it wrote to."
        )
    results = Results(json.loads(results_path.read_text()))
    text = PageWriter(results, out).render()
    path = page_path(out)
    path.write_text(text)
    logger.info("Wrote %s", path)
    return path
