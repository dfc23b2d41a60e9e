"""Repair: erase the influence of the culprits and measure what changed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from repair_core import dashboard, pipeline
from repair_core.evaluation import DEFAULT_STRENGTHS, SWEEPABLE
from repair_core.treatments import TRAINING_TREATMENTS, TREATMENTS, default_config

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
GRID_LIMIT = 48

dashboard.init_state()
ws, run = dashboard.require_run()
failure_set_id, split = dashboard.require_failure_set(ws, run)
root = str(ws.root)
class_names = [str(name) for name in run.data.test.class_names]
n_train = len(run.data.train)

#: Ids of the sweeps stored during this script run.
new_sweeps: list[str] = []

st.title("Repair")


def choose_repair() -> None:
    st.session_state["repair_id"] = st.session_state["repair_select"]


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
    methods = {record["id"]: record["method"] for record in rankings}
    dashboard.sync_widget("repair_scores", st.session_state["scores_id"], ids)
    left, right = st.columns([3, 1])
    scores_id = left.selectbox(
        "Ranking",
        ids,
        key="repair_scores",
        format_func=lambda i: f"{methods[i]} · {i}",
    )
    top_k = right.number_input(
        "K", 1, max(1, n_train - 1), min(50, n_train - 1), key="repair_k"
    )

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
    source = st.radio(
        "Causes C to remove",
        ["confirmed", "top-k"],
        key="repair_source",
        horizontal=True,
        format_func={
            "confirmed": f"Confirmed culprits ({n_confirmed})",
            "top-k": "Top K of a ranking",
        }.get,
    )
    if source == "confirmed":
        return confirmed_causes(n_confirmed)
    return top_k_causes()


def strength_widget(treatment: str, config: Any) -> Any:
    """Show the treatment's strength (γ or epochs) and return the config."""
    field = SWEEPABLE.get(treatment)
    if field == "gamma":
        gamma = st.number_input(
            "Strength γ (larger removes more)",
            min_value=1e-6,
            value=float(config.gamma),
            format="%g",
            key=f"repair_gamma_{treatment}",
        )
        return dataclasses.replace(config, gamma=float(gamma))
    if field == "max_epochs":
        epochs = st.number_input(
            "Fine-tuning epochs (0 = the run's training setting)",
            min_value=0,
            value=0,
            key=f"repair_epochs_{treatment}",
        )
        return dataclasses.replace(config, max_epochs=int(epochs) or None)
    return config


def settings_section(treatment: str, sweep: bool) -> Any | None:
    """Show the treatment settings and return the config. A sweep sets the
    strength itself, so its single value is not shown."""
    try:
        config = default_config(treatment)
        if not sweep:
            config = strength_widget(treatment, config)
        with st.expander("More settings"):
            return dashboard.settings_editor(
                config, f"repair_cfg_{treatment}", skip=(SWEEPABLE.get(treatment),)
            )
    except dashboard.USER_ERRORS as error:
        st.error(f"Invalid {treatment} settings: {error}")
        return None


def sweep_strengths(treatment: str) -> list[float] | None:
    field = SWEEPABLE[treatment]
    default = ", ".join(f"{value:g}" for value in DEFAULT_STRENGTHS[treatment])
    text = st.text_input(
        f"Values of {field} to sweep (comma-separated)",
        value=default,
        key=f"repair_sweep_{treatment}",
    )
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        st.error(f"Invalid sweep values {text!r}. Give numbers separated by commas.")
        return None


def run_single(treatment, config, causes, origin, scores_id, seeds, controls) -> None:
    report = dashboard.progress_reporter(f"Repair with {treatment}")
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
        st.rerun()


def run_sweep(treatment, config, causes, origin, strengths) -> None:
    report = dashboard.progress_reporter(f"Sweep of {treatment}")
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


def action_section() -> None:
    chosen = causes_section()

    left, right = st.columns(2)
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
            n_seeds = st.number_input(
                "Seeds",
                1,
                10,
                3,
                key="repair_seeds",
                help="Training treatments vary with the seed, so each runs once "
                "per seed and the spread is reported.",
            )
            with_controls = st.checkbox(
                "Run the nothing-removed and random-removal controls",
                value=True,
                key="repair_controls",
                disabled=treatment not in TRAINING_TREATMENTS,
                help="Only the training treatments "
                f"({', '.join(TRAINING_TREATMENTS)}) run controls.",
            )
    with left:
        config = settings_section(treatment, sweep=mode == "sweep")

    ready = chosen is not None and config is not None
    if mode == "sweep":
        ready = ready and bool(strengths)
    if chosen is not None:
        st.caption(
            f"C: {dashboard.count_text(len(chosen[0]), 'training example')}, "
            f"{chosen[1]}."
        )

    label = "Run sweep" if mode == "sweep" else "Repair"
    if not st.button(label, type="primary", key="repair_run", disabled=not ready):
        return
    causes, origin, scores_id = chosen
    if mode == "sweep":
        run_sweep(treatment, config, causes, origin, strengths)
    else:
        seeds = tuple(range(int(n_seeds)))
        controls = ("nothing", "random") if with_controls else ()
        run_single(treatment, config, causes, origin, scores_id, seeds, controls)


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
        figure.add_bar(
            name=ARM_LABELS[arm],
            x=list(SHORT_SUBSETS.values()),
            y=[means[key] for key in SUBSETS],
            error_y=(
                None
                if spread is None
                else {"type": "data", "array": [spread[key] for key in SUBSETS]}
            ),
            marker_color=ARM_COLOURS[arm],
        )
    figure.update_layout(
        barmode="group",
        yaxis={"title": "accuracy", "range": [0, 1.05], "tickformat": ".0%"},
        height=380,
        margin={"t": 10, "b": 10},
        legend={"orientation": "h"},
    )
    return figure


def gain_metrics(summary: dict[str, Any]) -> None:
    gain = summary.get("gain_over_nothing")
    columns = st.columns(4)
    if gain:
        mean, spread = gain["paired_mean"], gain["paired_std"]
        several_seeds = len(summary["seeds"]) > 1
        holdout_help = "Treatment minus nothing removed, paired by seed."
        remaining_help = None
        if several_seeds:
            holdout_help += f" Spread ±{spread['holdout_acc']:.1%}."
            remaining_help = f"Spread ±{spread['remaining_acc']:.1%}."
        columns[0].metric(
            "Gain on F_h over nothing removed",
            f"{mean['holdout_acc']:+.1%}",
            help=holdout_help,
        )
        columns[1].metric(
            "Gain on T\\F over nothing removed",
            f"{mean['remaining_acc']:+.1%}",
            help=remaining_help,
        )
    else:
        columns[0].metric(
            "Gain over nothing removed",
            "no control",
            help=summary.get("controls_note") or "The controls were turned off.",
        )
    after, before = summary["after"], summary["before"]
    columns[2].metric(
        "F_h accuracy after",
        f"{after['holdout_acc']:.1%}",
        delta=f"{after['holdout_acc'] - before['holdout_acc']:+.1%}",
    )
    columns[3].metric(
        "Test accuracy after",
        f"{after['test_acc']:.1%}",
        delta=f"{after['test_acc'] - before['test_acc']:+.1%}",
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
        text = f"predicted {class_names[before[i]]}"
        if after is not None:
            text += f" → {class_names[after[i]]}"
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


def results_section(repairs: list[dict[str, Any]]) -> None:
    ids = [record["id"] for record in reversed(repairs)]
    by_id = {record["id"]: record for record in repairs}
    dashboard.sync_widget("repair_select", st.session_state["repair_id"], ids)
    repair_id = st.selectbox(
        "Repair result",
        ids,
        key="repair_select",
        on_change=choose_repair,
        format_func=lambda i: (
            f"{by_id[i]['treatment']} · {by_id[i]['metrics'].get('causes', '')} · {i}"
        ),
    )

    summary = by_id[repair_id]["metrics"]
    seeds = summary["seeds"]
    seconds = f"in {summary['seconds']:.0f} s"
    if len(seeds) > 1:
        seed_text = f"seeds {seeds}, {seconds}. Figures are means over seeds."
    else:
        seed_text = f"seed {seeds[0]}, {seconds}."
    st.caption(
        f"Removed {dashboard.count_text(summary['n_removed'], 'example')} "
        f"({summary['causes']}) with {summary['treatment']}, {seed_text}"
    )
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
        st.caption(
            f"{accuracy_text} The controls run the same treatment with nothing "
            "removed and with as many random examples removed. Fixed and broken "
            "examples below are those of the treated model of the first seed."
        )
        path = ws.path(run.run_id, f"repairs/{repair_id}.pt")
        if path.is_file():
            st.download_button(
                "Download the repaired checkpoint",
                # A callable defers reading the file until the user clicks.
                data=path.read_bytes,
                file_name=f"{repair_id}.pt",
                mime="application/octet-stream",
                key="repair_download",
            )

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
    parts = (record["treatment"], record["causes"], record["id"])
    return " · ".join(part for part in parts if part)


def strength_labels(points: list[dict[str, Any]]) -> list[str]:
    """Label each sweep point with its strength. Points with the same
    accuracies share one label that lists their strengths, so that labels do
    not overlap."""
    strengths: dict[tuple[float, float], list[str]] = {}
    for point in points:
        position = (point["remaining_acc"], point["holdout_acc"])
        strengths.setdefault(position, []).append(f"{point['strength']:g}")
    labels = []
    for point in points:
        position = (point["remaining_acc"], point["holdout_acc"])
        labels.append(", ".join(strengths.pop(position, [])))
    return labels


def sweep_section(sweeps: list[dict[str, Any]]) -> None:
    st.subheader("Trade-off from sweeps")
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
    figure = go.Figure()
    for sweep in chosen:
        points = sweep["points"]
        figure.add_scatter(
            x=[point["remaining_acc"] for point in points],
            y=[point["holdout_acc"] for point in points],
            text=strength_labels(points),
            customdata=[point["strength"] for point in points],
            hovertemplate="strength %{customdata:g}<br>T\\F %{x:.1%}<br>F_h %{y:.1%}",
            mode="lines+markers+text",
            textposition="top center",
            name=sweep_label(sweep),
        )
    figure.update_layout(
        xaxis=dashboard.accuracy_axis("accuracy on T\\F (kept)"),
        yaxis=dashboard.accuracy_axis("accuracy on F_h (fixed)"),
        height=400,
        margin={"t": 10, "b": 10},
        legend={"orientation": "h"},
    )
    st.plotly_chart(figure, key="repair_sweep_chart")
    st.caption(
        "Labels are the swept strength. Strengths with the same result share "
        "one label. Up and to the right is better."
    )


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
