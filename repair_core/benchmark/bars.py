"""The quality bars at the top of the benchmark page."""

from __future__ import annotations

from repair_core.benchmark.page_base import (
    DETECTION_BAR,
    REMAINING_FLOOR,
    PageBase,
    best_tradeoff_points,
    describe_difference,
    describe_point,
    method_label,
    sweep_by_gamma,
    table,
)
from repair_core.benchmark.summary import Stat, paired_difference, stat_of


def seeds_text(count: int) -> str:
    """Return "1 seed" or "N seeds"."""
    return f"{count} seed" if count == 1 else f"{count} seeds"


class QualityBars(PageBase):
    """Checks of the measured figures against the bars the project set."""

    def quality_bars(self) -> None:
        results = self.results
        ewc = results.detection(
            "label-flip", "embedded", "ewc-influence", "found_at_20pct"
        )
        self.bar(
            f"EWC-influence finds ≥ {DETECTION_BAR} of flipped labels in the top "
            f"20% (mean of {seeds_text(len(self.settings.seeds))})",
            f"{ewc.text()} over {ewc.n} seed(s)" if ewc.ok else "–",
            ewc.mean >= DETECTION_BAR if ewc.ok else None,
            complete=ewc.n >= len(self.settings.seeds),
        )
        for method in ("linear-influence-lissa", "tracin"):
            other = results.detection(
                "label-flip", "embedded", method, "found_at_20pct"
            )
            self.bar(
                f"EWC-influence finds more in the top 20% than {method_label(method)}",
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
            "nothing measured yet says so. A paired difference subtracts, run "
            "by run, the rival arm fine-tuned from the same base model with the "
            "same fine-tuning seed. A difference within about two standard "
            "errors of zero is within the spread that fine-tuning alone causes.",
            "",
        )
        self.add(*table(["bar", "measured", "verdict"], [list(b) for b in self.bars]))

    def removal_bars(self) -> None:
        results = self.results
        ewc = results.curve_points(1, "embedded", "ewc-influence")
        if not ewc:
            self.bar("EWC-influence removal beats the controls at every k", "–", None)
            self.bar("At k = 300, F_h ≥ every flipped label removed", "–", None)
            return
        rivals = {
            "nothing removed": lambda k: results.arm_runs_by_seed(
                1, "embedded", "semi-oracle", "nothing"
            ),
            "random removal": lambda k: results.curve_runs_by_seed(
                1, "embedded", "random", k
            ),
            "highest training loss removed": lambda k: results.curve_runs_by_seed(
                1, "embedded", "training-loss", k
            ),
        }
        for name, rival_runs in rivals.items():
            losses = []
            narrowest: tuple[int, Stat] | None = None
            measured_ks = 0
            for k, runs in ewc.items():
                other = rival_runs(k)
                if not other:
                    continue
                measured_ks += 1
                mine = stat_of(runs, "holdout_acc").mean
                theirs = stat_of(list(other.values()), "holdout_acc").mean
                difference = paired_difference(
                    results.curve_runs_by_seed(1, "embedded", "ewc-influence", k),
                    other,
                    "holdout_acc",
                )
                if not mine > theirs:
                    losses.append(
                        f"k={k}: {mine:.3f} vs {theirs:.3f} "
                        f"({describe_difference(difference)})"
                    )
                elif narrowest is None or difference.mean < narrowest[1].mean:
                    narrowest = (k, difference)
            planned = len(self.settings.ks)
            if losses:
                measured = "ties or loses at " + "; ".join(losses)
            else:
                measured = f"ahead at each of the {measured_ks} of {planned} k measured"
                if narrowest is not None:
                    measured += (
                        f"; narrowest at k={narrowest[0]} "
                        f"({describe_difference(narrowest[1])})"
                    )
            self.bar(
                f"EWC-influence top-k removal beats {name} on F_h at every k",
                measured,
                None if measured_ks == 0 else not losses,
                complete=measured_ks >= planned,
            )
        at300 = ewc.get(300)
        semi = results.arm_runs(1, "embedded", "semi-oracle", "treatment")
        if at300 and semi:
            holdout = stat_of(at300, "holdout_acc")
            remaining = stat_of(at300, "remaining_acc")
            reference = stat_of(semi, "holdout_acc")
            difference = paired_difference(
                results.curve_runs_by_seed(1, "embedded", "ewc-influence", 300),
                results.arm_runs_by_seed(1, "embedded", "semi-oracle", "treatment"),
                "holdout_acc",
            )
            self.bar(
                "At k = 300, F_h accuracy ≥ removing every flipped label, with "
                "T\\F ≥ 0.95",
                f"F_h {holdout.text()} vs {reference.text()} "
                f"({describe_difference(difference)}); T\\F {remaining.text()}",
                holdout.mean >= reference.mean and remaining.mean >= REMAINING_FLOOR,
                complete=holdout.n
                >= len(self.settings.seeds) * len(self.settings.finetune_seeds),
            )
        else:
            self.bar("At k = 300, F_h ≥ every flipped label removed", "–", None)

    def tradeoff_bar(self) -> None:
        units = self.results.experiment_units(4, "embedded")
        ran = all(
            sweep_by_gamma(units, treatment) for treatment in ("ewc-deletion", "newton")
        )
        if not ran:
            self.bar("EWC-deletion beats Newton removal at T\\F ≥ 0.95", "–", None)
            return
        ewc_best, newton_best = best_tradeoff_points(units)
        passed = ewc_best is not None and (
            newton_best is None or ewc_best["holdout_acc"] > newton_best["holdout_acc"]
        )
        self.bar(
            "EWC-deletion's best F_h beats Newton removal's at T\\F ≥ 0.95",
            f"EWC-deletion {describe_point(ewc_best)}; "
            f"Newton {describe_point(newton_best)}",
            passed,
        )
