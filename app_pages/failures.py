"""Failures: browse the misclassified test images and choose the failure set F."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from repair_core import dashboard, pipeline

PAGE_SIZE = 32

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
        counts = record["metrics"]
        return (
            f"{failure_set_id} · {record['config'].get('origin', '')} · "
            f"{counts['n_failures']} failures"
        )

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
    if st.session_state["failure_set_id"] not in by_id:
        st.session_state["failure_set_id"] = st.session_state["failures_set_select"]
    counts = by_id[st.session_state["failure_set_id"]]["metrics"]
    columns = st.columns(4)
    columns[0].metric("F (failures)", counts["n_failures"])
    columns[1].metric("F_q (query)", counts["n_query"])
    columns[2].metric("F_h (holdout)", counts["n_holdout"])
    columns[3].metric("T\\F (correct)", counts["n_remaining"])


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
    figure.add_trace(
        trace(
            x=coordinates[failures, 0],
            y=coordinates[failures, 1],
            mode="markers",
            marker={
                "size": 7,
                "color": labels[failures],
                "colorscale": "Turbo",
                "line": {"width": 0.5, "color": "#222"},
            },
            customdata=failures,
            text=[
                f"#{i}: true {class_names[labels[i]]} → {class_names[predictions[i]]}"
                for i in failures
            ],
            hovertemplate="%{text}<extra></extra>",
            name="failure (colour = true class)",
        )
    )
    figure.update_layout(
        height=420,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        dragmode="lasso",
        legend={"orientation": "h"},
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return figure


def map_selection(key: str) -> np.ndarray | None:
    """Test indices of the failures picked on the map, or None without a pick."""
    points = dashboard.selected_points(st.session_state.get(key))
    picked = [
        int(point["point_index"])
        for point in points
        if point.get("curve_number") == 1 and "point_index" in point
    ]
    return failures[picked] if picked else None


if "failures_map_version" not in st.session_state:
    st.session_state["failures_map_version"] = 0
for key in ("failures_true", "failures_pred"):
    if key not in st.session_state:
        st.session_state[key] = []

message = st.session_state.pop("failures_message", None)
if message:
    st.success(message)
show_failure_set_summary()
st.divider()

left, right = st.columns(2)
with left:
    st.markdown("**Misclassifications** — click a cell to filter the grid")
    counts = dashboard.confusion_counts(labels, predictions, len(class_names))
    st.plotly_chart(
        dashboard.confusion_figure(counts, class_names, failures_only=True),
        key="failures_confusion",
        on_select=apply_confusion_click,
        selection_mode="points",
    )
with right:
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

filter_true, filter_pred, clear = st.columns([3, 3, 1], vertical_alignment="bottom")
true_names = filter_true.multiselect("True class", class_names, key="failures_true")
pred_names = filter_pred.multiselect(
    "Predicted class", class_names, key="failures_pred"
)
clear.button("Clear filters", key="failures_clear", on_click=clear_filters)

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
    st.caption(f"The map selection keeps {len(picked)} failures.")
chosen = chosen[np.argsort(-confidence[chosen], kind="stable")]

st.subheader(f"{len(chosen)} of {len(failures)} failures")
if len(chosen):
    window = dashboard.page_window(len(chosen), PAGE_SIZE, "failures_page")
    images = dashboard.thumbnails(root, run.run_id, "test")
    dashboard.show_grid(
        dashboard.Card(
            image=images[i],
            title=f"{class_names[labels[i]]} → {class_names[predictions[i]]}",
            lines=[f"confidence {confidence[i]:.0%}", f"test #{i}"],
            tone="bad",
        )
        for i in chosen[window]
    )

st.divider()
st.markdown(
    "**Use these failures as F.** They are split at random into a query set "
    "F_q, used to find causes, and a holdout set F_h, used only to check that "
    "a repair generalises."
)
fraction_column, seed_column, button_column = st.columns(
    [3, 2, 2], vertical_alignment="bottom"
)
query_fraction = fraction_column.slider(
    "Query share", 0.1, 1.0, run.config.query_fraction, 0.05, key="failures_qf"
)
split_seed = seed_column.number_input("Split seed", 0, None, 0, key="failures_seed")
if button_column.button(
    f"Use these {len(chosen)} failures as F",
    type="primary",
    key="failures_create",
    disabled=len(chosen) == 0,
):
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
        st.session_state["failure_set_id"] = failure_set_id
        st.session_state["scores_id"] = None
        st.session_state["repair_id"] = None
        st.session_state["failures_message"] = (
            f"Created failure set {failure_set_id}: {len(split.query)} query and "
            f"{len(split.holdout)} holdout failures."
        )
        st.rerun()
