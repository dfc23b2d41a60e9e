"""Repair: erase the influence of the culprits and measure what changed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from repair_core import dashboard, pipeline
from repair_core.errors import ConfigError
from repair_core.evaluation import (
    DEFAULT_STRENGTHS,
    MIN_REMAINING,
    NO_CONTROLS,
    SWEEPABLE,
    check_strengths,
    unchanged_sweep_note,
)
from repair_core.treatments import (
    CONTROLLED_TREATMENTS,
    REMOVES_NOTHING,
    TREATMENTS,
    default_config,
    training_text,
)
from repair_core.treatments.ewc_deletion import STOP_LABELS, STOP_REASONS

TREATMENT_HELP = {
    "ewc-deletion": "Unlearn C under an EWC prior, early-stopped on F_q accuracy. "
    "On the embedded MNIST benchmark it fixed fewer holdout failures than "
    "fine-tuning or Newton removal at the same remaining accuracy.",
    "newton": "One Newton step that removes C (Guo et al. 2020).",
    "finetune": "Fine-tune the model on D without C.",
    "retrain": "Train a freshly initialised model on D without C.",
    "fit-failures": "Fit F_q under an EWC prior; C is recorded but not used.",
    "fit-failures+ewc-deletion": "EWC-deletion of C, then the EWC fit of F_q.",
}
SHORT_SUBSETS = {
    "query_acc": "F_q",
    "holdout_acc": "F_h",
    "remaining_acc": "T\\F",
    "test_acc": "T",
}
SUBSETS = {
    "query_acc": "F_q (query failures)",
    "holdout_acc": "F_h (holdout failures)",
    "remaining_acc": "T\\F (correct before)",
    "test_acc": "T (whole test set)",
}
ARM_LABELS = {
    "before": "before",
    "treatment": "treatment",
    "nothing": "nothing removed",
    "random": "random removal",
}
ARM_COLOURS = {
    "before": "#9e9e9e",
    "treatment": "#1f77b4",
    "nothing": "#ff7f0e",
    "random": "#2ca02c",
}
#: Accuracy axis of the bar chart, with headroom above 100% so that a full
#: bar and the top of its error bar are drawn whole.
BAR_RANGE = [0, 1.1]
BAR_TICKS = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
GRID_LIMIT = 48
#: Names of the swept settings as the settings form labels them.
SWEEP_FIELD_LABELS = {"gamma": "strength γ", "max_epochs": "max epochs"}
#: A sweep point nearer than this to a labelled point, in accuracy on the x
#: and the y axis of a chart with the full SWEEP ranges, gets no label, so
#: that label texts do not overlap. A chart with narrower ranges scales the
#: gap down in proportion.
#: NOTE: sized for labels of about 40 by 15 pixels on a chart about 700
#: pixels wide, so labels on a much narrower chart can still touch.
LABEL_GAP = (0.06, 0.05)
#: Widest axis ranges of the sweep chart, wider than 0% to 100% so that the
#: label of a point at 0% or 100% is not cut off by the edge of the plot.
SWEEP_X_RANGE = [-0.07, 1.07]
SWEEP_Y_RANGE = [-0.04, 1.1]
#: The sweep chart's axes reach beyond the outermost points by this fraction
#: of the points' span (max minus min, taken as at least SWEEP_MIN_SPAN).
SWEEP_MARGIN = 0.15
SWEEP_MIN_SPAN = 0.02
#: Anchor of the sweep chart's heading, for links to it.
SWEEP_ANCHOR = "trade-off-from-sweeps"

dashboard.init_state()
ws, run = dashboard.require_run()
failure_set_id, split = dashboard.require_failure_set(ws, run)
root = str(ws.root)
class_names = [str(name) for name in run.data.test.class_names]
n_train = len(run.data.train)

#: Ids of the sweeps stored during this script run.
new_sweeps: list[str] = []

st.title("Repair")
dashboard.warn_not_opened("ranking", "repair")
dashboard.show_interrupted_job("repair")
dashboard.warn_if_no_holdout(failure_set_id, split)


def choose_repair() -> None:
    st.session_state["repair_id"] = st.session_state["repair_select"]
    dashboard.forget_not_opened("repair")


def confirmed_causes(n_confirmed: int) -> tuple[Any, str, None] | None:
    if not n_confirmed:
        st.info(
            "No culprit is confirmed for this failure set. Confirm culprits on "
            "the **Causes** page, or remove the top K of a ranking."
        )
        return None
    resolved = dashboard.run_safely(
        "Reading the confirmed culprits",
        lambda: pipeline.resolve_causes(
            ws, run, failure_set_id=failure_set_id, confirmed=True
        ),
    )
    return None if resolved is None else (*resolved, None)


def top_k_causes() -> tuple[Any, str, str] | None:
    rankings = ws.list_scores(run.run_id, failure_set_id=failure_set_id)
    if not rankings:
        st.info(
            "No ranking exists for this failure set. Run an identification "
            "method on the **Causes** page first."
        )
        return None

    ids = [record["id"] for record in reversed(rankings)]
    by_id = {record["id"]: record for record in rankings}
    dashboard.sync_widget(
        "repair_scores",
        dashboard.ranking_to_open(st.session_state["scores_id"], rankings),
        ids,
    )
    left, right = st.columns([3, 1])
    scores_id = left.selectbox(
        "Ranking",
        ids,
        key="repair_scores",
        format_func=lambda i: dashboard.ranking_label(by_id[i]),
        # The choice also becomes the ranking that Causes reviews.
        on_change=lambda: st.session_state.update(
            scores_id=st.session_state["repair_scores"]
        ),
    )
    max_k = n_train - MIN_REMAINING
    top_k = dashboard.number_field(
        "K",
        max(1, min(50, max_k)),
        key="repair_k",
        minimum=1,
        maximum=max_k,
        reason=f", so that at least {MIN_REMAINING} of the {n_train} training "
        "examples remain: one to train on and one to validate on",
        container=right,
        help="Number of the highest-ranked training examples to remove.",
    )
    if top_k is None:
        return None

    resolved = dashboard.run_safely(
        "Choosing the top K",
        lambda: pipeline.resolve_causes(
            ws,
            run,
            failure_set_id=failure_set_id,
            scores_id=scores_id,
            top_k=int(top_k),
        ),
    )
    return None if resolved is None else (*resolved, scores_id)


def causes_section() -> tuple[Any, str, str | None] | None:
    """Show the choice of C. Return (indices, description, scores id), or
    None when C is not available yet."""
    decisions = ws.get_decisions(run.run_id, failure_set_id)
    n_confirmed = sum(1 for d in decisions.values() if d == "confirmed")
    dashboard.keep_widget_value("repair_source", ["confirmed", "top-k"])
    # The option labels stay fixed: the browser sends the selected label back,
    # so a label that changed since the last run would drop the selection.
    source = st.radio(
        "Causes C to remove",
        ["confirmed", "top-k"],
        key="repair_source",
        horizontal=True,
        format_func={
            "confirmed": "Confirmed culprits",
            "top-k": "Top K of a ranking",
        }.get,
    )
    if source == "confirmed":
        st.caption(
            f"{dashboard.count_text(n_confirmed, 'confirmed culprit')} in this "
            "failure set."
        )
        return confirmed_causes(n_confirmed)
    return top_k_causes()


def strength_widget(treatment: str, config: Any) -> Any | None:
    """Show the treatment's strength (γ or epochs) and return the config, or
    None when the strength is invalid or out of range."""
    field = SWEEPABLE.get(treatment)
    if field == "gamma":
        gamma = dashboard.number_field(
            "Strength γ (larger lets the model move further)",
            float(config.gamma),
            key=f"repair_gamma_{treatment}",
            above=0.0,
            name="Strength γ",
            format="%g",
        )
        return None if gamma is None else dataclasses.replace(config, gamma=gamma)
    if field == "max_epochs":
        epochs = dashboard.number_field(
            "Fine-tuning epochs (0 = the run's training setting)",
            0,
            key=f"repair_epochs_{treatment}",
            minimum=0,
            maximum=dashboard.MAX_EPOCHS,
            name="Fine-tuning epochs",
        )
        if epochs is None:
            return None
        return dataclasses.replace(config, max_epochs=epochs or None)
    return config


def settings_section(treatment: str, sweep: bool) -> Any | None:
    """Show the treatment settings and return the config, or None while a
    setting is invalid.

    A sweep sets the strength itself, so its single value is not shown. A
    single repair runs once per seed of the Seeds field, which replaces the
    config's seed, so the seed is not shown either.
    """
    skip = [SWEEPABLE.get(treatment)]
    if not sweep:
        skip.append("seed")
    try:
        config = default_config(treatment)
        if not sweep:
            config = strength_widget(treatment, config)
        with st.expander("More settings"):
            edited = dashboard.settings_editor(
                config or default_config(treatment),
                f"repair_cfg_{treatment}",
                skip=skip,
            )
    except dashboard.USER_ERRORS as error:
        st.error(f"Invalid {treatment} settings: {error}")
        return None
    return None if config is None else edited


def sweep_strengths(treatment: str) -> list[float] | None:
    field = SWEEPABLE[treatment]
    default = ", ".join(f"{value:g}" for value in DEFAULT_STRENGTHS[treatment])
    dashboard.keep_widget_value(f"repair_sweep_{treatment}")
    text = st.text_input(
        f"Values of {SWEEP_FIELD_LABELS.get(field, field)} to sweep (comma-separated)",
        value=default,
        key=f"repair_sweep_{treatment}",
    )
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        label = SWEEP_FIELD_LABELS.get(field, field)
        st.error(f"The sweep values field is empty. Give at least one {label}.")
        return None
    try:
        # An empty entry, as in "1e-5,,0.1", is more likely a missing number
        # than an extra comma, so it is rejected, as on the command line.
        if "" in parts:
            raise ValueError("empty entry")
        values = [float(part) for part in parts]
    except ValueError:
        st.error(
            f"Invalid sweep values {text!r}. Give numbers separated by single "
            "commas, with nothing empty between them."
        )
        return None
    # float() reads "1e400" as inf, which the strength check would then report
    # as "inf", so the text as typed is named here.
    too_large = [
        part
        for part, value in zip(parts, values, strict=True)
        if math.isinf(value) and part.lower().lstrip("+-") not in ("inf", "infinity")
    ]
    if too_large:
        st.error(
            f"Sweep value {too_large[0]!r} is too large: it overflows to infinity. "
            f"Give finite positive values of {field}."
        )
        return None
    # Checked as typed, so that the Run button stays off until they are valid.
    try:
        return check_strengths(treatment, values)
    except ConfigError as error:
        st.error(str(error))
        return None


def run_single(treatment, config, causes, origin, scores_id, seeds, controls) -> None:
    report = dashboard.progress_reporter(
        f"Repair with {treatment}", drop_prefix=f"{treatment}: "
    )
    with dashboard.long_job("repair", f"repair with {treatment}"):
        summary = dashboard.run_safely(
            "Repair",
            lambda: pipeline.run_repair(
                ws,
                run,
                treatment,
                causes,
                failure_set_id=failure_set_id,
                scores_id=scores_id,
                causes_origin=origin,
                config=config,
                seeds=seeds,
                controls=controls,
                progress=report,
            ),
        )
    if summary is not None:
        st.session_state["repair_id"] = summary["repair_id"]
        dashboard.forget_not_opened("repair")
        st.rerun()


def run_sweep(treatment, config, causes, origin, strengths) -> None:
    report = dashboard.progress_reporter(
        f"Sweep of {treatment}", drop_prefix=f"{treatment}: "
    )
    with dashboard.long_job("repair", f"sweep of {treatment}"):
        summary = dashboard.run_safely(
            "Sweep",
            lambda: pipeline.run_sweep(
                ws,
                run,
                treatment,
                causes,
                failure_set_id=failure_set_id,
                strengths=strengths,
                causes_origin=origin,
                config=config,
                progress=report,
            ),
        )
    if summary is not None:
        new_sweeps.append(summary["sweep_id"])
        # The repair results come before the chart and can be long, so the
        # message links to the chart.
        st.success(
            f"Sweep {summary['sweep_id']} is done. Its trade-off is drawn below, "
            f"under [Trade-off from sweeps](#{SWEEP_ANCHOR})."
        )


def controls_widget(treatment: str) -> bool:
    """Show the controls checkbox of a treatment that runs controls and return
    whether they run. Other treatments get a note instead."""
    if treatment not in CONTROLLED_TREATMENTS:
        st.caption(
            NO_CONTROLS.get(treatment)
            or f"{treatment} runs without the nothing-removed and random-removal "
            "controls."
        )
        return False
    dashboard.keep_widget_value("repair_controls")
    return st.checkbox(
        "Run the controls",
        value=True,
        key="repair_controls",
        help="Run the same treatment with nothing removed and with as many "
        "random examples removed, so the gain over each can be shown. "
        f"{', '.join(CONTROLLED_TREATMENTS)} run controls.",
    )


def action_section() -> None:
    chosen = causes_section()

    left, right = st.columns(2)
    dashboard.keep_widget_value("repair_treatment", TREATMENTS)
    treatment = left.selectbox(
        "Treatment",
        TREATMENTS,
        key="repair_treatment",
        format_func=lambda name: f"{name} — {TREATMENT_HELP.get(name, '')}",
    )
    # The run mode is chosen first because it decides the settings shown on
    # the left.
    with right:
        modes = ["single", "sweep"] if treatment in SWEEPABLE else ["single"]
        dashboard.keep_widget_value("repair_mode", modes)
        mode = st.segmented_control(
            "Run",
            modes,
            default="single",
            key="repair_mode",
            format_func={"single": "One strength", "sweep": "Sweep"}.get,
        )
        if mode == "sweep" and treatment in SWEEPABLE:
            strengths = sweep_strengths(treatment)
        else:
            mode = "single"
            n_seeds = dashboard.number_field(
                "Number of seeds",
                3,
                key="repair_seeds",
                minimum=1,
                maximum=10,
                help="Training treatments vary with the seed, and so does Newton "
                "removal, whose solver samples minibatches. Each seed (0, 1, …) "
                "runs the whole treatment again and the spread is reported; one "
                "seed is quickest.",
            )
            with_controls = controls_widget(treatment)
    with left:
        config = settings_section(treatment, sweep=mode == "sweep")
    if chosen is None and treatment in REMOVES_NOTHING:
        # This treatment removes nothing, so it runs without causes as well.
        chosen = (torch.zeros(0, dtype=torch.long), "none", None)

    ready = chosen is not None and config is not None
    if mode == "sweep":
        ready = ready and bool(strengths)
    else:
        ready = ready and n_seeds is not None
    if chosen is not None:
        st.caption(
            f"C: {dashboard.count_text(len(chosen[0]), 'training example')}, "
            f"{chosen[1]}."
        )

    label = "Run sweep" if mode == "sweep" else "Repair"
    clicked = st.button(
        label,
        type="primary",
        key="repair_run",
        disabled=not ready or dashboard.read_only(),
    )
    st.caption(dashboard.LONG_JOB_CAPTION)
    # Confirmed culprits can change in another tab or session between drawing
    # the page and the click, so the click compares C with the C on show.
    shown_causes = st.session_state.get("repair_shown_causes")
    current = None
    if chosen is not None and chosen[2] is None:
        current = [failure_set_id, sorted(int(i) for i in chosen[0])]
    st.session_state["repair_shown_causes"] = current
    if not clicked:
        return
    if current is not None and shown_causes is not None and shown_causes != current:
        st.warning(
            "The confirmed culprits changed since this page was drawn"
            f"{causes_change_text(shown_causes[1], current[1])}: C now has "
            f"{dashboard.count_text(len(current[1]), 'training example')}. "
            f"Nothing was run. Check C above and press {label} again."
        )
        return
    causes, origin, scores_id = chosen
    if mode == "sweep":
        run_sweep(treatment, config, causes, origin, strengths)
    else:
        seeds = tuple(range(int(n_seeds)))
        controls = ("nothing", "random") if with_controls else ()
        run_single(treatment, config, causes, origin, scores_id, seeds, controls)


def causes_change_text(before: list[int], after: list[int]) -> str:
    """Return ", #5 added and #9 removed" for the indices that differ."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    parts = [
        f"{index_list_text(indices)} {verb}"
        for indices, verb in ((added, "added"), (removed, "removed"))
        if indices
    ]
    return f" ({' and '.join(parts)})" if parts else ""


def index_list_text(indices: list[int], limit: int = 5) -> str:
    """Return "#1, #2 and 3 more" for training indices, naming up to ``limit``."""
    text = ", ".join(f"#{i}" for i in indices[:limit])
    if len(indices) > limit:
        text += f" and {len(indices) - limit} more"
    return text


def percent_text(mean: float, spread: float | None = None) -> str:
    """Format an accuracy, with its spread over seeds when given; NaN is "—"."""
    if math.isnan(mean):
        return "—"
    if spread is None:
        return f"{mean:.1%}"
    return f"{mean:.1%} ± {spread:.1%}"


def arm_results(summary: dict[str, Any]) -> dict[str, tuple[dict, dict | None]]:
    """Return (means, spread) of every arm. The spread is None for the model
    before repair and for a repair with one seed, whose spread is always 0."""
    several_seeds = len(summary["seeds"]) > 1
    arms = {"before": (summary["before"], None)}
    arms["treatment"] = (summary["after"], summary["spread"] if several_seeds else None)
    for arm, values in summary["controls"].items():
        arms[arm] = (values["mean"], values["std"] if several_seeds else None)
    return arms


def comparison_table(summary: dict[str, Any]) -> pd.DataFrame:
    arms = arm_results(summary)
    rows = []
    for key, subset in SUBSETS.items():
        row = {"subset": subset}
        for arm, (means, spread) in arms.items():
            row[ARM_LABELS[arm]] = percent_text(
                means[key], None if spread is None else spread[key]
            )
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_figure(summary: dict[str, Any]) -> go.Figure:
    arms = arm_results(summary)
    figure = go.Figure()
    for arm, (means, spread) in arms.items():
        values = [means[key] for key in SUBSETS]
        error_y = None
        if spread is not None:
            spreads = [spread[key] for key in SUBSETS]
            error_y = dashboard.accuracy_error_bars(values, spreads)
        figure.add_bar(
            name=ARM_LABELS[arm],
            x=list(SHORT_SUBSETS.values()),
            y=values,
            error_y=error_y,
            marker_color=ARM_COLOURS[arm],
        )
    figure.update_layout(
        barmode="group",
        yaxis={
            "title": "accuracy",
            "range": BAR_RANGE,
            "tickvals": BAR_TICKS,
            "tickformat": ".0%",
        },
        height=380,
        margin={"t": 10, "b": 10},
        legend={"orientation": "h"},
    )
    return figure


def signed_points(value: float) -> str:
    """Format a difference of accuracies in percentage points, as "+28.3 pts",
    so it does not read as a relative change; NaN, as on an empty F_h, is "—"."""
    if math.isnan(value):
        return "—"
    # A difference that rounds to zero shows as +0.0, never -0.0.
    return f"{100 * value:+.1f} pts" if round(value, 3) != 0 else "+0.0 pts"


def shown_percent(value: float) -> float:
    """Return an accuracy in percent, rounded as percent_text shows it."""
    return float(percent_text(value).rstrip("%"))


def accuracy_metric(
    column: Any,
    label: str,
    after: float,
    before: float,
    help: str | None = None,
    against: str = "",
) -> None:
    """Show an accuracy with its change; an empty subset (NaN) shows "—".

    The change is the difference of the two accuracies as the page shows them,
    so that it matches the figures of the table, followed by ``against``,
    which names what ``before`` is. A change that rounds to zero gets no arrow
    and a neutral colour.
    """
    if math.isnan(after) or math.isnan(before):
        column.metric(label, percent_text(after), help=help)
        return
    change = round(shown_percent(after) - shown_percent(before), 1)
    if change == 0:
        column.metric(
            label,
            percent_text(after),
            delta=f"0.0 pts{against}",
            delta_color="off",
            delta_arrow="off",
            help=help,
        )
        return
    column.metric(
        label, percent_text(after), delta=f"{change:+.1f} pts{against}", help=help
    )


def gain_over_random(summary: dict[str, Any]) -> float | None:
    """Return the treatment's F_h accuracy minus that of the random-removal
    control, means over seeds, or None for a repair without that control."""
    random_arm = (summary.get("controls") or {}).get("random")
    if not random_arm:
        return None
    return summary["after"]["holdout_acc"] - random_arm["mean"]["holdout_acc"]


def gain_metrics(summary: dict[str, Any]) -> None:
    gain = summary.get("gain_over_nothing")
    random_arm = (summary.get("controls") or {}).get("random")
    after, before = summary["after"], summary["before"]
    # The two gains on F_h share the first row and the rest follow, because
    # more metrics in a row cut their labels short in a narrow window.
    columns = [*st.columns(2), *st.columns(3)]
    if gain:
        mean, spread = gain["paired_mean"], gain["paired_std"]
        several_seeds = len(summary["seeds"]) > 1
        holdout_help = (
            "Accuracy on F_h, treatment minus nothing removed, in percentage "
            "points, paired by seed."
        )
        remaining_help = (
            "Accuracy on the rest of the test set, treatment minus nothing "
            "removed, in percentage points, paired by seed."
        )
        if several_seeds:
            holdout_help += f" Spread ±{100 * spread['holdout_acc']:.1f} points."
            remaining_help += f" Spread ±{100 * spread['remaining_acc']:.1f} points."
        columns[0].metric(
            "Gain on F_h over nothing removed",
            signed_points(mean["holdout_acc"]),
            help=holdout_help,
        )
        columns[2].metric(
            "Gain on T\\F over nothing removed",
            signed_points(mean["remaining_acc"]),
            help=remaining_help,
        )
    else:
        columns[0].metric(
            "Gain over nothing removed",
            "no control",
            help=summary.get("controls_note")
            or NO_CONTROLS.get(summary["treatment"])
            or "The controls were turned off.",
        )
    if random_arm:
        random_help = (
            "Treatment minus the removal of as many random training examples, "
            "means over seeds."
        )
        unchanged_seeds = [
            record
            for record in (summary.get("per_seed") or {}).get("random", [])
            if record.get("unchanged")
        ]
        if unchanged_seeds:
            random_help += (
                f" Random removal returned the original model unchanged in "
                f"{len(unchanged_seeds)} of {len(summary['seeds'])} seeds, so this is "
                "mostly the gain over the original model."
            )
        columns[1].metric(
            "Gain on F_h over random removal",
            signed_points(gain_over_random(summary)),
            help=random_help,
        )
    # F_h contains the original model's failures, so its accuracy starts at 0%
    # and a change arrow would only repeat the value.
    columns[3].metric(
        "F_h accuracy after",
        percent_text(after["holdout_acc"]),
        help="The holdout failures F_h are the original model's mistakes, so "
        "their accuracy before repair is 0%.",
    )
    nothing_arm = (summary.get("controls") or {}).get("nothing")
    if nothing_arm:
        # Continued training alone changes test accuracy, so the change shown
        # is over the nothing-removed control, like the gains beside it.
        accuracy_metric(
            columns[4],
            "Test accuracy after",
            after["test_acc"],
            nothing_arm["mean"]["test_acc"],
            against=" vs nothing removed",
            help=(
                "Change over nothing removed "
                f"({percent_text(nothing_arm['mean']['test_acc'])}); the original "
                f"model had {percent_text(before['test_acc'])}."
            ),
        )
    else:
        accuracy_metric(
            columns[4],
            "Test accuracy after",
            after["test_acc"],
            before["test_acc"],
            help=(
                f"Change over the original model ({percent_text(before['test_acc'])})."
            ),
        )
    if random_arm and random_arm["mean"]["holdout_acc"] > after["holdout_acc"]:
        st.warning(
            "Random removal did better on F_h than the treatment: "
            f"{random_arm['mean']['holdout_acc']:.1%} against "
            f"{after['holdout_acc']:.1%}. Removing as many random training "
            "examples fixed more holdout failures than removing C, so C may not "
            "be what causes them."
        )


def changed_images(
    title: str, indices: list[int], after: np.ndarray | None, tone: str, empty: str
) -> None:
    st.markdown(f"**{title}** ({len(indices)})")
    if not indices:
        st.caption(empty)
        return
    images = dashboard.thumbnails(root, run.run_id, "test")
    labels = run.data.test.labels
    before = run.test_predictions

    def change(i: int) -> str:
        # No-break spaces keep the change on one line when the line wraps.
        text = f"predicted {class_names[before[i]]}"
        if after is not None:
            text += f"\u00a0→\u00a0{class_names[after[i]]}"
        return text

    dashboard.show_grid(
        (
            dashboard.Card(
                image=images[i],
                title=f"true {class_names[labels[i]]}",
                lines=[change(i), f"test #{i}"],
                tone=tone,
            )
            for i in indices[:GRID_LIMIT]
        ),
        cell_px=90,
    )
    if len(indices) > GRID_LIMIT:
        st.caption(f"Showing the first {GRID_LIMIT}.")


def strength_text(treatment: str, config: dict[str, Any]) -> str | None:
    """Describe the strength a stored repair used, or None for a treatment
    without one."""
    field = SWEEPABLE.get(treatment)
    if field == "gamma" and config.get("gamma") is not None:
        return f"γ {config['gamma']:g}"
    if field == "max_epochs":
        epochs = config.get("max_epochs")
        if epochs is None:
            return "max epochs of the run's training settings"
        return f"max epochs {epochs}"
    return None


def changed_treatment_settings(treatment: str, config: dict[str, Any]) -> list[str]:
    """Return the stored settings that differ from the treatment's defaults,
    leaving out the seed (listed with the seeds) and the strength."""
    try:
        defaults = default_config(treatment).to_dict()
    except dashboard.USER_ERRORS:
        return []
    skip = ("seed", SWEEPABLE.get(treatment, ""))
    return dashboard.changed_settings(config, defaults, skip=skip)


def repair_name(record: dict[str, Any]) -> str:
    """Return a stored repair's treatment with its strength and changed
    settings."""
    treatment, config = record["treatment"], record.get("config") or {}
    strength = strength_text(treatment, config)
    settings = [strength] if strength else []
    settings += changed_treatment_settings(treatment, config)
    return f"{treatment} ({', '.join(settings)})" if settings else treatment


def repair_label(record: dict[str, Any]) -> str:
    """Return the option text of a stored repair: treatment, settings, number
    removed, causes and id."""
    metrics = record["metrics"]
    removed = f"{metrics.get('n_removed', 0)} removed"
    causes = metrics.get("causes", "")
    return f"{repair_name(record)} · {removed}, {causes} · {record['id']}"


def repairs_table(repairs: list[dict[str, Any]]) -> pd.DataFrame:
    """Return one row per stored repair, newest first: what it removed, its
    accuracies after repair and its gains over the controls."""
    rows = []
    for record in reversed(repairs):
        summary = record["metrics"]
        gain = (summary.get("gain_over_nothing") or {}).get("paired_mean") or {}
        after = summary["after"]
        row = {
            "repair": record["id"],
            "treatment": repair_name(record),
            "causes": summary.get("causes", ""),
            "removed": summary.get("n_removed"),
            "F_h after": after["holdout_acc"],
            "gain on F_h over nothing removed": gain.get("holdout_acc"),
            "gain on F_h over random removal": gain_over_random(summary),
            "T\\F after": after["remaining_acc"],
            "test after": after["test_acc"],
            "number of seeds": len(summary["seeds"]),
            "seconds": summary.get("seconds"),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def all_repairs_section(repairs: list[dict[str, Any]]) -> None:
    percent = st.column_config.NumberColumn(format="percent")
    with st.expander(f"All repairs of this failure set ({len(repairs)})"):
        st.dataframe(
            repairs_table(repairs),
            hide_index=True,
            column_config={
                "F_h after": percent,
                "gain on F_h over nothing removed": percent,
                "gain on F_h over random removal": percent,
                "T\\F after": percent,
                "test after": percent,
                "seconds": st.column_config.NumberColumn(format="%.0f"),
            },
        )
        st.caption(
            "Accuracies are means over seeds. A repair run without controls "
            "(Newton, fit-failures, or with the controls turned off) has no "
            "gains."
        )


def causes_csv(repair_id: str, causes: list[int]) -> bytes:
    """Return the training examples C of a stored repair as CSV."""
    labels = run.data.train.labels
    table = pd.DataFrame(
        {
            "train_index": causes,
            "given_label": [class_names[int(labels[i])] for i in causes],
        }
    )
    if run.corrupted_mask is not None:
        table["corrupted"] = [bool(run.corrupted_mask[i]) for i in causes]
    table["repair_id"] = repair_id
    return table.to_csv(index=False).encode()


def repair_caption(record: dict[str, Any]) -> str:
    """Describe what a stored repair removed and the settings it ran with."""
    summary = record["metrics"]
    treatment, config = record["treatment"], record.get("config") or {}
    strength = strength_text(treatment, config)
    method = f"{treatment} ({strength})" if strength else treatment
    seeds = summary["seeds"]
    seconds = f"in {summary['seconds']:.0f} s"
    if len(seeds) > 1:
        seed_text = (
            f"seeds {', '.join(str(seed) for seed in seeds)}, {seconds}. Figures "
            "are means over seeds."
        )
    else:
        seed_text = f"seed {seeds[0]}, {seconds}."
    changed = changed_treatment_settings(treatment, config)
    if changed:
        settings_text = f"Settings changed from the defaults: {', '.join(changed)}."
    else:
        settings_text = "The other settings are the defaults."
    if summary.get("training"):
        settings_text += f" {training_text(summary['training'])}"
    if treatment in REMOVES_NOTHING:
        removed_text = f"Removed nothing with {method}"
        if summary["causes"] != "none":
            removed_text += f" (C recorded: {summary['causes']})"
    else:
        removed_text = (
            f"Removed {dashboard.count_text(summary['n_removed'], 'example')} "
            f"({summary['causes']}) with {method}"
        )
    return f"{removed_text}, {seed_text} {settings_text}"


def model_download(repair_id: str) -> bool:
    """Show the download button of the repair's model, or a warning naming
    its file when the file cannot be read. Returns whether it was read."""
    path = ws.path(run.run_id, f"repairs/{repair_id}.pt")
    # The file is read while the page draws, so that the button contains the
    # bytes. A callable as data would read it on the click, and a file deleted
    # by then would fail on the server with a MediaFileStorageError.
    # NOTE: every run of this page reads the whole file and Streamlit keeps
    # a copy per session, which costs time and memory for a large model.
    try:
        model = path.read_bytes()
    except FileNotFoundError:
        st.warning(
            f"The repaired model's file {path} is missing, so it cannot be "
            "downloaded. Run the repair again to store a new model."
        )
        return False
    except OSError as error:
        st.warning(
            f"The repaired model's file {path} cannot be read "
            f"({error.strerror or error}), so it cannot be downloaded. Run the "
            "repair again to store a new model."
        )
        return False
    st.download_button(
        "Download the model",
        help="The repaired checkpoint of the first seed, a state dict.",
        data=model,
        file_name=f"{repair_id}.pt",
        mime="application/octet-stream",
        key="repair_download",
    )
    return True


def results_section(repairs: list[dict[str, Any]]) -> None:
    ids = [record["id"] for record in reversed(repairs)]
    by_id = {record["id"]: record for record in repairs}
    dashboard.sync_widget("repair_select", st.session_state["repair_id"], ids)
    repair_id = st.selectbox(
        "Repair result",
        ids,
        key="repair_select",
        on_change=choose_repair,
        format_func=lambda i: repair_label(by_id[i]),
    )

    summary = by_id[repair_id]["metrics"]
    seeds = summary["seeds"]
    st.caption(repair_caption(by_id[repair_id]))
    if len(repairs) > 1:
        all_repairs_section(repairs)
    gain_metrics(summary)
    for note in summary.get("notes") or []:
        st.info(note)

    st.dataframe(comparison_table(summary), hide_index=True)
    left, right = st.columns([3, 2])
    left.plotly_chart(comparison_figure(summary), key="repair_bars")
    with right:
        if len(seeds) > 1:
            accuracy_text = "Accuracy, mean ± standard deviation over seeds."
        else:
            accuracy_text = "Accuracy of the one seed."
        controls_text = (
            " The controls run the same treatment with nothing removed and with "
            "as many random examples removed."
            if summary.get("controls")
            else ""
        )
        st.caption(
            f"{accuracy_text}{controls_text} Fixed and broken examples below are "
            "those of the treated model of the first seed."
        )
        model_read = model_download(repair_id)
        causes_file = f"repairs/{repair_id}_causes.pt"
        causes = []
        if ws.path(run.run_id, causes_file).is_file():
            causes = ws.load_tensor(run.run_id, causes_file).tolist()
        if causes:
            action = (
                "recorded, though not removed,"
                if by_id[repair_id]["treatment"] in REMOVES_NOTHING
                else "removed"
            )
            st.download_button(
                "Download C (CSV)",
                help=f"The {dashboard.count_text(len(causes), 'training example')} "
                f"{action} by this repair, one index per row; 'repair --causes-file' "
                "reads the file as it is.",
                data=causes_csv(repair_id, causes),
                file_name=f"causes-{run.run_id}-{repair_id}.csv",
                mime="text/csv",
                key="repair_causes_download",
            )

    # Without the model file the cards show the predictions before repair
    # only, and the warning above names the file.
    after = None
    if model_read:
        after = dashboard.run_safely(
            "Evaluating the repaired model",
            lambda: dashboard.repaired_predictions(root, run.run_id, repair_id),
        )
    left, right = st.columns(2)
    with left:
        changed_images(
            "Holdout failures now correct",
            summary["holdout_fixed_idx"],
            after,
            "good",
            "No holdout failure became correct.",
        )
    with right:
        changed_images(
            "Correct examples that broke",
            summary["remaining_broken_idx"],
            after,
            "bad",
            "No correctly classified example broke.",
        )


def sweep_label(record: dict[str, Any]) -> str:
    """Return the option text of a stored sweep: treatment, changed settings,
    causes and id."""
    treatment = record["treatment"]
    changed = changed_treatment_settings(treatment, record.get("config") or {})
    name = f"{treatment} ({', '.join(changed)})" if changed else treatment
    parts = (name, record["causes"], record["id"])
    return " · ".join(part for part in parts if part)


def strength_labels(
    sweeps: list[dict[str, Any]], label_gap: tuple[float, float] = LABEL_GAP
) -> list[list[str]]:
    """Label the points of each sweep with their strengths, so that labels do
    not overlap.

    Points of a sweep with the same accuracies share one label that lists
    their strengths. A point within ``label_gap`` of a point labelled before
    it, in any of the sweeps, gets an empty label.
    """
    labelled: list[tuple[float, float]] = []
    labels = []
    for sweep in sweeps:
        strengths: dict[tuple[float, float], list[str]] = {}
        for point in sweep["points"]:
            position = (point["remaining_acc"], point["holdout_acc"])
            strengths.setdefault(position, []).append(f"{point['strength']:g}")
        sweep_labels = []
        for point in sweep["points"]:
            position = (point["remaining_acc"], point["holdout_acc"])
            text = ", ".join(strengths.pop(position, []))
            if text and any(near(position, other, label_gap) for other in labelled):
                text = ""
            if text:
                labelled.append(position)
            sweep_labels.append(text)
        labels.append(sweep_labels)
    return labels


def near(
    first: tuple[float, float],
    second: tuple[float, float],
    label_gap: tuple[float, float] = LABEL_GAP,
) -> bool:
    """Return whether two sweep points are within ``label_gap`` on both axes.
    Points with a NaN accuracy, as on an empty F_h, are never near."""
    return all(
        abs(a - b) < gap for a, b, gap in zip(first, second, label_gap, strict=True)
    )


def fitted_range(values: list[float], limits: list[float]) -> list[float]:
    """Return an axis range around the finite ``values`` with a margin of
    SWEEP_MARGIN of their span on each side, kept within ``limits``, or
    ``limits`` when no value is finite."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return list(limits)
    low, high = min(finite), max(finite)
    span = max(high - low, SWEEP_MIN_SPAN)
    middle = (low + high) / 2
    half_width = span / 2 + SWEEP_MARGIN * span
    return [max(limits[0], middle - half_width), min(limits[1], middle + half_width)]


def range_width(axis_range: list[float]) -> float:
    return axis_range[1] - axis_range[0]


def sweep_axis(title: str, axis_range: list[float]) -> dict[str, Any]:
    # On a range of a few points Plotly puts ticks less than one point apart,
    # where whole percentages would repeat.
    narrow = range_width(axis_range) < 0.1
    return {
        "title": title,
        "tickformat": ".1%" if narrow else ".0%",
        "range": axis_range,
    }


#: Columns of the sweep table that show where early stopping kept the
#: parameters, by the point field they show. Points stored before these fields
#: were recorded leave them empty.
KEPT_COLUMNS = {"best_epoch": "kept epoch", "best_step": "kept step"}

SWEEP_TABLE_HELP = (
    "Kept epoch: the fine-tuning epoch with the lowest validation loss, whose "
    "parameters early stopping kept. Every strength trains with the same seed, "
    "so strengths whose runs kept the same epoch give the same model and the "
    "same accuracies. Kept step: the EWC-deletion step whose parameters were "
    "kept, with early stopping the one with the highest accuracy on F_q. "
    "Stopped by: what ended an EWC-deletion run. "
    + " ".join(
        f"{STOP_LABELS[reason]}: {text}." for reason, text in STOP_REASONS.items()
    )
)


def sweep_table(sweeps: list[dict[str, Any]]) -> pd.DataFrame:
    """Return one row per sweep point with its strength, accuracies and,
    where recorded, the epoch or step that early stopping kept."""
    kept = {
        key: column
        for key, column in KEPT_COLUMNS.items()
        if any(key in point for sweep in sweeps for point in sweep["points"])
    }
    stopped = any(
        "stopped_by" in point for sweep in sweeps for point in sweep["points"]
    )
    rows = []
    for sweep in sweeps:
        for point in sweep["points"]:
            row = {"sweep": sweep["id"], "strength": f"{point['strength']:g}"}
            for key, column in kept.items():
                row[column] = str(point[key]) if key in point else ""
            if stopped:
                row["stopped by"] = STOP_LABELS.get(point.get("stopped_by"), "")
            for key, subset in SHORT_SUBSETS.items():
                if key in point:
                    row[subset] = percent_text(point[key])
            rows.append(row)
    return pd.DataFrame(rows)


def sweep_section(sweeps: list[dict[str, Any]]) -> None:
    st.subheader("Trade-off from sweeps", anchor=SWEEP_ANCHOR)
    chosen = dashboard.choose_records(
        "Sweeps to draw",
        sweeps,
        "repair_sweep_select",
        default=[sweeps[-1]["id"]],
        added=new_sweeps,
        format_func=sweep_label,
    )
    if not chosen:
        return
    drawn = [point for sweep in chosen for point in sweep["points"]]
    x_range = fitted_range([p["remaining_acc"] for p in drawn], SWEEP_X_RANGE)
    y_range = fitted_range([p["holdout_acc"] for p in drawn], SWEEP_Y_RANGE)
    # Labels take the same room in pixels on any range, so the gap between
    # labelled points shrinks with the ranges.
    label_gap = (
        LABEL_GAP[0] * range_width(x_range) / range_width(SWEEP_X_RANGE),
        LABEL_GAP[1] * range_width(y_range) / range_width(SWEEP_Y_RANGE),
    )
    figure = go.Figure()
    labelled = zip(chosen, strength_labels(chosen, label_gap), strict=True)
    for number, (sweep, labels) in enumerate(labelled):
        points = sweep["points"]
        figure.add_scatter(
            x=[point["remaining_acc"] for point in points],
            y=[point["holdout_acc"] for point in points],
            text=labels,
            customdata=[point["strength"] for point in points],
            hovertemplate="strength %{customdata:g}<br>T\\F %{x:.1%}<br>F_h %{y:.1%}",
            mode="lines+markers+text",
            # Labels of points near the right edge go left, where they fit.
            textposition=[
                "top left" if point["remaining_acc"] > 0.9 else "top center"
                for point in points
            ],
            name=sweep_label(sweep),
            line={"color": dashboard.palette_colour(number)},
        )
    figure.update_layout(
        xaxis=sweep_axis("accuracy on T\\F (kept)", x_range),
        yaxis=sweep_axis("accuracy on F_h (fixed)", y_range),
        height=400,
        margin={"t": 10, "b": 10},
        legend=dashboard.LEGEND_ABOVE,
        showlegend=True,
    )
    st.plotly_chart(figure, key="repair_sweep_chart")
    st.caption(
        "Labels are the swept strength. Strengths with the same result share "
        "one label. A point close to a labelled one has no label, so hover over "
        "it or open Sweep points below to read its strength. Up and to the "
        "right is better. The axes fit the points drawn, not 0% to 100%."
    )
    for sweep in chosen:
        note = unchanged_sweep_note(sweep["treatment"], sweep["points"])
        if note:
            st.info(f"Sweep {sweep['id']}: {note}")
    with st.expander("Sweep points"):
        table = sweep_table(chosen)
        st.dataframe(table, hide_index=True)
        if any(
            column in table.columns for column in (*KEPT_COLUMNS.values(), "stopped by")
        ):
            st.caption(SWEEP_TABLE_HELP)


with st.container(border=True):
    action_section()

repairs = ws.list_repairs(run.run_id, failure_set_id=failure_set_id)
if repairs:
    results_section(repairs)
sweeps = ws.list_sweeps(run.run_id, failure_set_id=failure_set_id)
if sweeps:
    sweep_section(sweeps)
if not repairs and not sweeps:
    st.info("No repair yet for this failure set. Choose C and a treatment above.")
else:
    dashboard.page_link(
        "app_pages/compare.py",
        "Next: compare the methods' detection and removal curves on Compare",
    )
