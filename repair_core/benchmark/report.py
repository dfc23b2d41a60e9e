"""Render docs/BENCHMARKS.md and its plots from the results file alone."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from repair_core import noise
from repair_core.benchmark import plots
from repair_core.benchmark.bars import QualityBars
from repair_core.benchmark.page_base import (
    REMAINING_FLOOR,
    best_tradeoff_points,
    describe_point,
    method_label,
    number,
    ratio,
    short_of,
    sweep_by_gamma,
    table,
)
from repair_core.benchmark.published import PublishedSections
from repair_core.benchmark.settings import (
    EXPERIMENT_TITLES,
    PUBLISHED,
)
from repair_core.benchmark.store import RESULTS_NAME, read_results
from repair_core.benchmark.summary import Results, Stat, stat_of
from repair_core.errors import ConfigError

logger = logging.getLogger(__name__)

PAGE_NAME = "BENCHMARKS.md"


def page_path(out: str | Path) -> Path:
    """Return the page path, one level above the plot folder ``out``."""
    return Path(out).resolve().parent / PAGE_NAME


def check_page_is_ours(out: str | Path) -> None:
    """Raise unless the page for ``out`` is absent or was rendered from
    ``out/results.json``, so that rendering never replaces someone's own file.

    Raises:
        FileExistsError: the page contains something else.
    """
    out = Path(out).resolve()
    path = page_path(out)
    if not path.exists():
        return
    # The page's heading and its sentence naming the results file, as
    # PageWriter writes them.
    start = "# Benchmarks\n"
    source = f"The page is rendered from [`{out.name}/{RESULTS_NAME}`]"
    try:
        text = path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        text = ""
    ours = text.startswith(start) and source in text
    if not ours:
        raise FileExistsError(
            f"{path} exists and was not rendered from {out / RESULTS_NAME}, so the "
            f"benchmark will not replace it. Move it away, or pass an --out folder "
            f"whose parent folder has no {PAGE_NAME} of its own."
        )


def prepare_out_folder(out: str | Path) -> None:
    """Create the folder ``out`` if it is missing, then check it as
    ``check_out_writable`` does.

    Raises:
        ConfigError: ``out`` or a folder above it is a file, ``out`` cannot
            be created, or a folder or file the benchmark writes is read-only.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise ConfigError(
            f"--out {str(out)!r} must be a folder, but it or a folder above it is "
            f"a file ({error}). Pass another --out folder."
        ) from error
    except OSError as error:
        raise ConfigError(
            f"Cannot create the --out folder {str(out)!r} ({error}). Make its "
            "parent folder writable, or pass another --out folder."
        ) from error
    check_out_writable(out)


def check_out_writable(out: str | Path) -> None:
    """Raise unless the results file and plots can be written in ``out`` and
    the page one level above it.

    Raises:
        ConfigError: one of the two folders or the existing page is read-only,
            or the results path is not a file.
    """
    out = Path(out).resolve()
    results_path = out / RESULTS_NAME
    if results_path.exists() and not results_path.is_file():
        raise ConfigError(
            f"{str(results_path)!r} is not a file, but the benchmark stores its "
            "results there. Move it away, or pass another --out folder."
        )
    page = page_path(out)
    for folder, contents in (
        (out, f"{RESULTS_NAME} and the plots"),
        (page.parent, f"the page {PAGE_NAME}"),
    ):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            # strerror leaves out the random name of the temporary file.
            raise ConfigError(
                f"Folder {str(folder)!r} is not writable ({error.strerror or error}), "
                f"but the benchmark writes {contents} there. Make it writable, or "
                "pass another --out folder."
            ) from error
    if page.is_file():
        try:
            # Opening for update writes nothing.
            with page.open("r+b"):
                pass
        except OSError as error:
            raise ConfigError(
                f"The page {str(page)!r} is read-only ({error}). Make it "
                "writable, or pass another --out folder."
            ) from error


class PageWriter(PublishedSections, QualityBars):
    """Builds the page text section by section from one results file."""

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
        )
        if settings.mode == "quick":
            self.add(
                f"**Quick mode**: the models train on {settings.n_train} images "
                f"for at most {settings.max_epochs} epoch(s), so the figures below "
                "only show that every step of the benchmark runs. They say "
                "nothing about how well the methods work; run without --quick "
                "for that.",
                "",
            )
        self.add("## How these numbers were made", "")
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
            f"thread{'' if machine.get('torch_threads') == 1 else 's'}, device "
            f"{machine.get('device', '?')}"
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
        self.add(*table(["experiment", "data", "base seed", "status"], rows))

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
                    number(record.get("test_accuracy")),
                    number(record.get("n_failures")),
                    number(record.get("n_query")),
                    number(record.get("n_holdout")),
                    number(record.get("n_corrupted")),
                    number(record.get("best_epoch")),
                    number(cost.get("seconds"), 0),
                ]
            )
        if rows:
            self.add(
                *table(
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
        implicated = any(
            self.results.detection(scenario, data_key, m, "n_implicated").ok
            for m in self.results.methods(scenario, data_key)
        )
        for method in self.results.methods(scenario, data_key):
            at10 = self.results.detection(scenario, data_key, method, "found_at_10pct")
            at20 = self.results.detection(scenario, data_key, method, "found_at_20pct")
            p100 = self.results.detection(
                scenario, data_key, method, "precision_at_100"
            )
            seconds = self.results.seconds(scenario, data_key, method)
            errors = self.results.errors(scenario, data_key, method)
            row = [
                method_label(method),
                at10.text(),
                at20.text(),
                p100.text(),
                seconds.text(1),
                str(at20.n) + (f" ({len(errors)} failed)" if errors else ""),
            ]
            if implicated:
                row.insert(
                    3,
                    self.results.detection(
                        scenario, data_key, method, "implicated_found_at_20pct"
                    ).text(),
                )
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
        if implicated:
            header.insert(3, "implicated in top 20%")
        if published:
            header.insert(3, "top 20%, Tanno et al. 2022")
        if rows:
            self.add(*table(header, rows))
        if implicated:
            counts = self.results.detection(
                scenario, data_key, "oracle", "n_implicated"
            )
            self.add(
                "*Implicated* examples are the corrupted ones whose label change "
                "matches a failure in F_q. An image of class a labelled b pushes "
                "the model towards predicting b on class a, so the failures it "
                "is expected to cause are of class a predicted as b. A ranking "
                "built from F_q has little to single out a changed label whose "
                "kind of failure F_q lacks"
                + (
                    f" ({counts.text(0)} implicated per run here; – where none)."
                    if counts.ok
                    else "."
                ),
                "",
            )
        for method in self.results.methods(scenario, data_key):
            for error in self.results.errors(scenario, data_key, method):
                self.add(f"- {method_label(method)} failed: `{error}`", "")

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
                    rows.append(
                        [f"{name} ({removed_counts(runs)})", stat_of(runs, key).text()]
                        + [""] * (len(methods) - 1)
                    )
            self.add(
                f"Accuracy on the {title} after removing the top k and "
                "fine-tuning on D\\C:",
                "",
            )
            self.add(*table(["k"] + [method_label(m) for m in methods], rows))
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
                        f"{name} ({removed_counts(runs)})",
                        stat_of(runs, "query_acc").text(),
                        stat_of(runs, "holdout_acc").text(),
                        stat_of(runs, "remaining_acc").text(),
                        str(len(runs)),
                    ]
                )
        if rows:
            self.add("References, fine-tuned on D\\C:", "")
            self.add(*table(["removed", "F_q", "F_h", "T\\F", "n"], rows))

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
            + short_of(holdout.mean, figure["holdout_acc"], "holdout failures")
            + " "
            + short_of(remaining.mean, figure["remaining_acc"], "the remaining set"),
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
        self.add(*table(["arm", "F_q", "F_h", "T\\F", "n"], rows))

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
            *table(["steps", "top 10%", "top 20%", "F_q (fit)", "F_h (fit)", "n"], rows)
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
                short.append(
                    f"{method_label(method)} {ours.mean:.3f} vs about {published}"
                )
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
                ahead.append(f"{method_label(method)} ({other.mean:.3f})")
        if ahead:
            notes.append(
                "EWC-influence trails "
                + ", ".join(ahead)
                + " on this measure. Training loss and confident learning ignore "
                "F_q, so they find mislabelled examples whether or not they "
                "caused the failures."
            )
        implicated = self.results.detection(
            scenario, data_key, "ewc-influence", "implicated_found_at_20pct"
        )
        if implicated.ok:
            best = max(
                (
                    (
                        self.results.detection(
                            scenario, data_key, m, "implicated_found_at_20pct"
                        ),
                        m,
                    )
                    for m in self.results.methods(scenario, data_key)
                    if m not in ("ewc-influence", "oracle")
                ),
                key=lambda pair: pair[0].mean if pair[0].ok else -1.0,
                default=None,
            )
            sentence = (
                f"Among the implicated flips it finds {implicated.text()} in the "
                "top 20%"
            )
            if best is not None and best[0].ok:
                sentence += (
                    f"; the best other method there is {method_label(best[1])} "
                    f"with {best[0].text()}"
                )
            notes.append(sentence + ".")
        self.add(" ".join(notes), "")

    def experiment_noise(self, experiment: int, scenario: str, description: str):
        self.add(f"## {experiment}. {EXPERIMENT_TITLES[experiment]}", "")
        self.add(description, "")
        self.base_table(experiment, "embedded")
        self.detection_table(scenario, "embedded", published=False)
        self.noise_table(experiment)

    def experiment_4(self) -> None:
        self.add(f"## 4. {EXPERIMENT_TITLES[4]}", "")
        if not self.tradeoff_table("embedded", "tradeoff.png"):
            self.add("Not run yet.", "")

    def tradeoff_table(self, data_key: str, plot_name: str) -> bool:
        """Add the sweeps and fine-tuning of experiment 4 on ``data_key``.

        Returns False, adding nothing, when no unit of it has run.
        """
        units = self.results.experiment_units(4, data_key)
        if not units:
            return False
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
            for gamma, points in sweep_by_gamma(units, treatment).items():
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
            runs = self.results.arm_runs(4, data_key, "finetune", arm)
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
        self.add(*table(["treatment", "γ", "F_q", "F_h", "T\\F", "seconds", "n"], rows))
        ewc_best, newton_best = best_tradeoff_points(units)
        if ewc_best is not None or newton_best is not None:
            self.add(
                f"Best point with mean T\\F ≥ {REMAINING_FLOOR}: EWC-deletion "
                f"{describe_point(ewc_best)}; Newton removal "
                f"{describe_point(newton_best)}.",
                "",
            )
        self.image(
            plots.tradeoff_plot(self.results, data_key, self.out / plot_name),
            "trade-off between failure and remaining accuracy",
        )
        return True

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
                    f"identify: {method_label(method)}",
                    seconds.text(1),
                    ratio(seconds, ewc),
                    step_peak.text(0),
                    process_peak.text(0),
                    str(seconds.n),
                ]
            )
            plot_rows.append((method_label(method), seconds))
        for name, stat in self.treatment_costs():
            rows.append(
                [
                    f"treat: {name}",
                    stat.text(1),
                    ratio(stat, ewc),
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
            *table(
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
                p for pts in sweep_by_gamma(units, treatment).values() for p in pts
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
                "trained on the clean data), each labelled with the victim's "
                "prediction on it, which is wrong where the attack succeeded. The "
                "top-k removal uses EWC-influence.",
            )
        if 4 in experiments:
            self.experiment_4()
        if 5 in experiments:
            self.experiment_5()
        if 6 in experiments:
            self.experiment_6()
        return "\n".join(self.lines).rstrip() + "\n"


def removed_counts(runs: list[dict[str, Any]]) -> str:
    """Return how many examples the runs removed: one number, or the range
    when base seeds corrupted different numbers."""
    counts = sorted({run["n_removed"] for run in runs if "n_removed" in run})
    if not counts:
        return "?"
    if len(counts) == 1:
        return str(counts[0])
    return f"{counts[0]}–{counts[-1]}"


def _load_averages(invocations: list[dict[str, Any]]) -> str:
    values = []
    for invocation in invocations:
        load = invocation.get("machine", {}).get("load_average_1min")
        values.append("not recorded" if load is None else f"{load:.1f}")
    return ", ".join(values) or "not recorded"


def render_page(out: str | Path) -> Path:
    """Render the page and plots from ``out/results.json``; return the page path.

    Raises:
        FileNotFoundError: there is no results file in ``out``.
        FileExistsError: a file that the benchmark did not render is at the
            page's path.
        DataError: the results file is unreadable or not a results file.
        ConfigError: ``out``, the page's folder or the page is read-only.
    """
    # Resolved, so that "." names its folder in the page's links.
    out = Path(out).resolve()
    results_path = out / RESULTS_NAME
    if not results_path.is_file():
        raise FileNotFoundError(
            f"No {RESULTS_NAME} in {out}. Run the benchmark first, or pass the "
            "--out folder it wrote to."
        )
    check_page_is_ours(out)
    results = Results(read_results(results_path))
    check_out_writable(out)
    text = PageWriter(results, out).render()
    path = page_path(out)
    path.write_text(text)
    logger.info("Wrote %s", path)
    return path
