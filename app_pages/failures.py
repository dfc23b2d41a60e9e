"""Failures: browse the misclassified test images and choose the failure set F."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import streamlit as st
import torch

from repair_core import dashboard, pipeline
from repair_core.failures import FailureSplit, split_failures

PAGE_SIZE = 32
#: Marker colours of the failures by true class, Plotly's default qualitative
#: palette, which has no grey that reads like the grey of the correct points.
#: It repeats after ten classes.
CLASS_COLOURS = plotly.colors.qualitative.Plotly
#: Narrowest column, in CSS pixels, for the confusion matrix and the map side
#: by side. Below it the two charts stack. A 900 px window with the sidebar
#: open leaves a main area of about 400 px, where side by side the map's plot
#: area was 84 px wide and the matrix cells 14 px (headless Chromium).
CHART_MIN_WIDTH = 360
#: Height in pixels of the map's plot area, about, since plotly takes the
#: legend's rows from the chart height. The legend below the plot fits about
#: four entries of 20 px per row in a column of CHART_MIN_WIDTH, plus a row
#: for its title.
MAP_PLOT_HEIGHT = 370
MAP_LEGEND_ROW_HEIGHT = 20
MAP_LEGEND_ENTRIES_PER_ROW = 4

dashboard.init_state()
ws, run = dashboard.require_run()
root = str(ws.root)
class_names = [str(name) for name in run.data.test.class_names]
labels = run.data.test.labels.numpy()
predictions, confidence = dashboard.predictions_on_test(root, run.run_id)
failures = np.flatnonzero(predictions != labels)

st.title("Failures")
if len(failures) == 0:
    st.info(
        "The model classifies every test image correctly, so there is nothing to "
        "repair. Open or train another run on the Setup page."
    )
    st.stop()


def choose_failure_set() -> None:
    dashboard.forget_not_opened("failure set")
    st.session_state["failure_set_id"] = st.session_state["failures_set_select"]
    st.session_state["scores_id"] = None
    st.session_state["repair_id"] = None


def apply_confusion_click() -> None:
    points = dashboard.selected_points(st.session_state.get("failures_confusion"))
    cell = dashboard.confusion_cell(points, len(class_names))
    if cell is not None:
        st.session_state["failures_true"] = [class_names[cell[0]]]
        st.session_state["failures_pred"] = [class_names[cell[1]]]


def clear_filters() -> None:
    st.session_state["failures_true"] = []
    st.session_state["failures_pred"] = []
    st.session_state["failures_map_version"] += 1


def show_failure_set_summary() -> None:
    sets = ws.list_failure_sets(run.run_id)
    if not sets:
        return
    by_id = {record["id"]: record for record in sets}
    ids = [record["id"] for record in reversed(sets)]

    def describe(failure_set_id: str) -> str:
        record = by_id[failure_set_id]
        counts, config = record["metrics"], record["config"]
        parts = [
            failure_set_id,
            config.get("origin", ""),
            dashboard.count_text(counts["n_failures"], "failure"),
        ]
        if config.get("query_fraction") is not None:
            parts.append(f"query share {config['query_fraction']:g}")
        if config.get("seed") is not None:
            parts.append(f"split seed {config['seed']}")
        return " · ".join(parts)

    dashboard.sync_widget(
        "failures_set_select", st.session_state["failure_set_id"], ids
    )
    st.selectbox(
        "Current failure set F",
        ids,
        key="failures_set_select",
        format_func=describe,
        on_change=choose_failure_set,
    )
    dashboard.warn_not_opened("failure set")
    if st.session_state["failure_set_id"] not in by_id:
        st.session_state["failure_set_id"] = st.session_state["failures_set_select"]
        # The sidebar, drawn before this page, names the current set too.
        st.rerun()
    counts = by_id[st.session_state["failure_set_id"]]["metrics"]
    columns = st.columns(4)
    columns[0].metric("F (failures)", counts["n_failures"])
    columns[1].metric("F_q (query)", counts["n_query"])
    columns[2].metric("F_h (holdout)", counts["n_holdout"])
    columns[3].metric(
        "T\\F (correctly classified)",
        counts["n_remaining"],
        help="Test images the model classifies correctly, on which a repair must "
        "keep its accuracy. Failures left out of F count in neither F nor T\\F.",
    )
    if counts["n_holdout"] == 0:
        st.warning(empty_holdout_text(counts["n_failures"]))


def empty_holdout_text(n_failures: int) -> str:
    failures_text = (
        "the one failure" if n_failures == 1 else f"all {n_failures} failures"
    )
    return (
        f"This split puts {failures_text} in the query set F_q, so the holdout set F_h "
        "is empty and no repair can show whether it fixes failures it was not "
        "ranked on. Lower the query share or choose more failures."
    )


def same_split(config: dict[str, Any], query_fraction: float, seed: int) -> bool:
    stored_fraction = config.get("query_fraction")
    return (
        stored_fraction is not None
        and math.isclose(stored_fraction, query_fraction)
        and config.get("seed") == seed
    )


def identical_failure_set(split: FailureSplit) -> str | None:
    """Return the id of a stored failure set of this run with the same
    failures, query share and split seed, and so the same split, or None."""
    for record in reversed(ws.list_failure_sets(run.run_id)):
        counts = record["metrics"]
        if counts["n_failures"] != len(split.failures) or not same_split(
            record["config"], split.query_fraction, split.seed
        ):
            continue
        stored = dashboard.run_safely(
            "Reading a stored failure set",
            lambda record=record: pipeline.load_failure_split(
                ws, run.run_id, record["id"]
            ),
        )
        if stored is not None and torch.equal(stored.failures, split.failures):
            return record["id"]
    return None


def same_query_as_current(split: FailureSplit) -> bool:
    """Return whether ``split`` has the query and holdout sets of the current
    failure set."""
    failure_set_id = st.session_state["failure_set_id"]
    if failure_set_id is None:
        return False
    current = dashboard.run_safely(
        "Reading the current failure set",
        lambda: pipeline.load_failure_split(ws, run.run_id, failure_set_id),
    )
    return (
        current is not None
        and set(current.query.tolist()) == set(split.query.tolist())
        and set(current.holdout.tolist()) == set(split.holdout.tolist())
    )


def use_failure_set(failure_set_id: str, message: str) -> None:
    st.session_state["failure_set_id"] = failure_set_id
    st.session_state["scores_id"] = None
    st.session_state["repair_id"] = None
    st.session_state["failures_message"] = message
    st.rerun()


def failure_groups() -> list[np.ndarray]:
    """Return the test indices of the failures of each true class, in the
    order of the map's failure traces (trace 1 onwards)."""
    return [failures[labels[failures] == c] for c in np.unique(labels[failures])]


def map_figure(coordinates: np.ndarray) -> go.Figure:
    correct = np.flatnonzero(predictions == labels)
    trace = dashboard.scatter_class(len(coordinates))
    figure = go.Figure()
    figure.add_trace(
        trace(
            x=coordinates[correct, 0],
            y=coordinates[correct, 1],
            mode="markers",
            marker={"size": 4, "color": "rgba(150,150,150,0.35)"},
            name="correct",
            hoverinfo="skip",
        )
    )
    for group in failure_groups():
        true_class = int(labels[group[0]])
        figure.add_trace(
            trace(
                x=coordinates[group, 0],
                y=coordinates[group, 1],
                mode="markers",
                marker={
                    "size": 7,
                    "color": CLASS_COLOURS[true_class % len(CLASS_COLOURS)],
                    "line": {"width": 0.5, "color": "#222"},
                },
                customdata=group,
                text=[
                    f"#{i}: true {class_names[labels[i]]} → predicted "
                    f"{class_names[predictions[i]]}"
                    for i in group
                ],
                hovertemplate="%{text}<extra></extra>",
                name=f"true {class_names[true_class]}",
            )
        )
    # The legend goes below the plot, where it takes no width from the points
    # and plotly's toolbar, drawn in the top margin, cannot cover it. Plotly
    # widens the bottom margin to fit it.
    margin = {"l": 10, "r": 10, "t": 40, "b": 10}
    legend_rows = 1 + math.ceil(len(figure.data) / MAP_LEGEND_ENTRIES_PER_ROW)
    legend_height = MAP_LEGEND_ROW_HEIGHT * legend_rows
    figure.update_layout(
        height=MAP_PLOT_HEIGHT + margin["t"] + margin["b"] + legend_height,
        margin=margin,
        dragmode="lasso",
        legend={
            "title": {"text": "failures by true class", "side": "top"},
            "orientation": "h",
            "yanchor": "top",
            "y": -0.02,
            "xanchor": "left",
            "x": 0,
        },
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return figure


def map_selection(key: str) -> np.ndarray | None:
    """Test indices of the failures picked on the map, or None without a pick."""
    points = dashboard.selected_points(st.session_state.get(key))
    picked = dashboard.selected_in_traces(points, failure_groups())
    return picked if len(picked) else None


def split_tags() -> dict[int, str]:
    """Return "query" or "holdout" for each failure of the current failure
    set, keyed by test index, so the grid can show where each one went."""
    failure_set_id = st.session_state["failure_set_id"]
    if failure_set_id is None:
        return {}
    split = dashboard.run_safely(
        "Reading the current failure set",
        lambda: pipeline.load_failure_split(ws, run.run_id, failure_set_id),
    )
    if split is None:
        return {}
    tags = {int(i): "query" for i in split.query}
    tags.update({int(i): "holdout" for i in split.holdout})
    return tags


def failure_card(index: int, image: str, tag: str | None) -> dashboard.Card:
    return dashboard.Card(
        image=image,
        title=f"true {class_names[labels[index]]}",
        lines=[
            f"predicted {class_names[predictions[index]]}",
            f"confidence {confidence[index]:.0%}",
            f"test #{index}",
        ],
        tone="bad",
        badge=tag,
        badge_tone={"query": "info", "holdout": "warn"}.get(tag),
    )


if "failures_map_version" not in st.session_state:
    st.session_state["failures_map_version"] = 0
for key in ("failures_true", "failures_pred"):
    dashboard.keep_widget_value(key, class_names)
    if key not in st.session_state:
        st.session_state[key] = []

# The message about the failure set just chosen shows below its button,
# where the user clicked, and a toast shows wherever the page is scrolled.
message = st.session_state.pop("failures_message", None)
if message:
    st.toast(message, icon=":material/check_circle:")
show_failure_set_summary()
st.divider()

charts = st.grid(2, min_column_width=CHART_MIN_WIDTH)
with charts.cell():
    st.markdown("**Misclassifications** — click a cell to filter the grid")
    counts = dashboard.confusion_counts(labels, predictions, len(class_names))
    st.plotly_chart(
        dashboard.confusion_figure(counts, class_names, failures_only=True),
        key="failures_confusion",
        on_select=apply_confusion_click,
        selection_mode="points",
    )
with charts.cell():
    st.markdown("**Feature map** — lasso or box-select failures")
    coordinates = dashboard.map_coordinates(root, run.run_id, "failures_map_button")
    map_key = f"failures_map_{st.session_state['failures_map_version']}"
    if coordinates is not None:
        st.plotly_chart(
            map_figure(coordinates["test"]),
            key=map_key,
            on_select="rerun",
            selection_mode=("lasso", "box"),
        )

# The button's column is wide enough for its label in an 800 px window.
filter_true, filter_pred, clear = st.columns([5, 5, 2], vertical_alignment="bottom")
true_names = filter_true.multiselect("True class", class_names, key="failures_true")
pred_names = filter_pred.multiselect(
    "Predicted class", class_names, key="failures_pred"
)
clear.button(
    "Clear",
    key="failures_clear",
    on_click=clear_filters,
    help="Clear both class filters and any selection on the map.",
)

chosen = failures
if true_names:
    wanted = [class_names.index(name) for name in true_names]
    chosen = chosen[np.isin(labels[chosen], wanted)]
if pred_names:
    wanted = [class_names.index(name) for name in pred_names]
    chosen = chosen[np.isin(predictions[chosen], wanted)]
picked = map_selection(map_key)
if picked is not None:
    chosen = chosen[np.isin(chosen, picked)]
    st.caption(
        f"The map selection keeps {dashboard.count_text(len(picked), 'failure')}."
    )
chosen = chosen[np.argsort(-confidence[chosen], kind="stable")]

st.subheader(f"{len(chosen)} of {dashboard.count_text(len(failures), 'failure')}")
window = None
if len(chosen):
    window = dashboard.page_window(len(chosen), PAGE_SIZE, "failures_page")
if window is not None:
    images = dashboard.thumbnails(root, run.run_id, "test")
    tags = split_tags()
    if tags:
        st.caption(
            "The tag on a card says where the current failure set put the "
            "failure: query (F_q) or holdout (F_h). Untagged failures are not "
            "in it."
        )
    dashboard.show_grid(
        failure_card(int(i), images[i], tags.get(int(i))) for i in chosen[window]
    )

st.divider()
st.markdown(
    "**Use these failures as F.** They are split at random into a query set "
    "F_q, used to find causes, and a holdout set F_h, used only to check that "
    "a repair generalises."
)
fraction_column, seed_column = st.columns([3, 2], vertical_alignment="bottom")
dashboard.keep_widget_value("failures_qf")
query_fraction = fraction_column.slider(
    "Query share", 0.1, 1.0, run.config.query_fraction, 0.05, key="failures_qf"
)
split_seed = dashboard.seed_field("Split seed", "failures_seed", container=seed_column)
preview = None
if len(chosen) and split_seed is not None:
    preview = dashboard.run_safely(
        "Splitting the failures",
        lambda: split_failures(
            run.test_predictions,
            run.data.test.labels,
            query_fraction=float(query_fraction),
            seed=split_seed,
            candidates=torch.as_tensor(chosen, dtype=torch.long),
        ),
    )
if preview is not None:
    query_text = dashboard.count_text(len(preview.query), "query failure")
    holdout_text = dashboard.count_text(len(preview.holdout), "holdout failure")
    st.caption(f"The split gives {query_text} F_q and {holdout_text} F_h.")
    # The summary above already warns when this split puts the same failures
    # in F_q as the current set, whatever its query share or seed.
    if len(preview.holdout) == 0 and not same_query_as_current(preview):
        st.warning(empty_holdout_text(len(preview.failures)))
use_label = (
    "Use this failure as F"
    if len(chosen) == 1
    else f"Use these {len(chosen)} failures as F"
)
create = st.button(
    use_label,
    type="primary",
    key="failures_create",
    disabled=preview is None or dashboard.read_only(),
)
if message:
    st.success(message)
if st.session_state["failure_set_id"] is not None:
    dashboard.page_link("app_pages/causes.py", "Next: rank the causes on Causes")
if create and preview is not None:
    existing = identical_failure_set(preview)
    if existing is not None:
        use_failure_set(
            existing,
            f"Failure set {existing} already contains these failures with query share "
            f"{preview.query_fraction:g} and split seed {preview.seed}, so it is "
            "now the current failure set. No new set was created.",
        )
    parts = []
    if true_names:
        parts.append("true " + ", ".join(true_names))
    if pred_names:
        parts.append("predicted " + ", ".join(pred_names))
    if picked is not None:
        parts.append("map selection")
    origin = "; ".join(parts) or "all failures"
    created = dashboard.run_safely(
        "Creating the failure set",
        lambda: pipeline.create_failure_set(
            ws,
            run,
            query_fraction=float(query_fraction),
            seed=int(split_seed),
            candidates=torch.as_tensor(chosen, dtype=torch.long),
            origin=origin,
        ),
    )
    if created is not None:
        failure_set_id, split = created
        use_failure_set(
            failure_set_id,
            f"Created failure set {failure_set_id}: {len(split.query)} query and "
            f"{len(split.holdout)} holdout failures.",
        )
