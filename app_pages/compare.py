"""Compare: detection curves, removal curves and wall times of the methods."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from repair_core import dashboard, pipeline
from repair_core.evaluation import MIN_REMAINING
from repair_core.metrics import detection_curve

#: Points drawn per detection curve; longer curves are thinned evenly.
CURVE_POINTS = 400
BASELINES = ("oracle", "random")
#: The sets the detection curves can count, with the label of each choice.
DETECTION_TARGETS = {
    "corrupted": "every corrupted example ({n_corrupted})",
    "implicated": "those implicated by F_q ({n_implicated})",
}
IMPLICATED_TEXT = (
    "A training image of class a labelled b is implicated when F_q holds a "
    "failure of class a predicted as b. A failure set picked from one cell of "
    "the confusion matrix implicates only the label changes of that kind."
)
#: Shown in the wall-time table for records stored without their device.
UNKNOWN_DEVICE = "—"
#: Line dashes of successive removal curves of one method.
CURVE_DASHES = ("solid", "dash", "dot", "dashdot")
#: Room on the removal charts' log x axis beyond the smallest and the largest
#: k, in decades, so that the k = 0 line reaches past every point.
K_AXIS_MARGIN = 0.15
#: Colour of the legend key of the k = 0 lines, which take their curves' colours.
CONTROL_KEY_COLOUR = "#888888"
#: Opacity of the band of ± one standard deviation around the k = 0 line.
CONTROL_BAND_OPACITY = 0.15
#: Height in pixels of a removal chart without its legend, and the height
#: added per legend entry, about one row of plotly's legend. The legend above
#: the plot wraps to one entry per row on a narrow chart, and plotly takes its
#: rows from the chart's height.
REMOVAL_CHART_HEIGHT = 360
LEGEND_ENTRY_HEIGHT = 20
#: Width in pixels of the plot area that the k labels of a removal chart are
#: spaced for. Each chart takes half of the page's main column.
# NOTE: an estimate of the plot area in a window about 1024 px wide with the
# sidebar open, not measured. In a narrower window the labels kept can touch.
K_LABEL_PLOT_WIDTH = 250
#: Width in pixels of one digit of a tick label in plotly's default 12 px font,
#: and the least space between two labels.
K_LABEL_DIGIT_WIDTH = 7
K_LABEL_GAP = 6

dashboard.init_state()
ws, run = dashboard.require_run()
failure_set_id, split = dashboard.require_failure_set(ws, run)
root = str(ws.root)
records = ws.list_scores(run.run_id, failure_set_id=failure_set_id)
n_train = len(run.data.train)

st.title("Compare")
st.caption(f"Methods run on failure set `{failure_set_id}` of run `{run.run_id}`.")
dashboard.show_interrupted_job("compare")
dashboard.warn_if_no_holdout(failure_set_id, split)


def add_baselines(missing: list[str]) -> None:
    for method in missing:
        report = dashboard.progress_reporter(method)
        with dashboard.long_job("compare", f"identification with {method}"):
            dashboard.run_safely(
                f"Identification with {method}",
                lambda method=method, report=report: pipeline.run_identification(
                    ws, run, method, failure_set_id=failure_set_id, progress=report
                ),
            )
    st.rerun()


def detection_figure(
    latest: dict[str, dict[str, Any]], mask: Any, noun: str
) -> go.Figure:
    figure = go.Figure()
    for method, record in latest.items():
        scores = dashboard.stored_scores(root, record["id"])
        inspected, found = detection_curve(scores, mask)
        step = max(1, len(inspected) // CURVE_POINTS)
        keep = np.r_[np.arange(0, len(inspected), step), len(inspected) - 1]
        dash = "dot" if method in BASELINES else "solid"
        figure.add_scatter(
            x=inspected[keep],
            y=found[keep],
            mode="lines",
            # The id shows which of several rankings by one method is drawn.
            name=dashboard.ranking_label(record),
            line={
                "dash": dash,
                "width": 2 if method in BASELINES else 3,
                "color": dashboard.method_colour(method),
            },
        )
    figure.update_layout(
        xaxis={
            "title": "share of D inspected",
            "tickformat": ".0%",
            # Plotly hides a tick label that crosses the edge of the chart, so
            # the range and the right margin leave room for "100%".
            "range": [0, 1.04],
            "dtick": 0.2,
        },
        yaxis={"title": f"share of {noun} found", "tickformat": ".0%"},
        height=420,
        margin={"t": 10, "b": 10, "r": 24},
        legend=dashboard.LEGEND_ABOVE,
        showlegend=True,
    )
    return figure


def detection_section(latest: dict[str, dict[str, Any]]) -> None:
    st.subheader("Detection curves")
    if run.corrupted_mask is None or not bool(run.corrupted_mask.any()):
        st.info(
            "This run has no ground truth about corrupted examples, so detection "
            "cannot be measured. Train a run with a noise scenario to compare "
            "detection."
        )
        return
    missing = [method for method in BASELINES if method not in latest]
    plural = "s" if len(missing) > 1 else ""
    if missing and st.button(
        f"Add the {' and '.join(missing)} baseline{plural}",
        key="compare_baselines",
        disabled=dashboard.read_only(),
    ):
        add_baselines(missing)
    if missing:
        st.caption(dashboard.LONG_JOB_CAPTION)
    mask, noun, note = detection_target()
    # A scores file that cannot be read shows its error in place of the
    # chart. The removal curves below do not need it.
    figure = (
        dashboard.run_safely(
            "Loading the rankings", lambda: detection_figure(latest, mask, noun)
        )
        if latest
        else None
    )
    if figure is not None:
        st.plotly_chart(figure, key="compare_detection")
        st.caption(
            "The newest ranking of each method. Oracle ranks the known corrupted "
            f"examples first; random is the chance level.{note}"
        )


def detection_target() -> tuple[Any, str, str]:
    """Return the mask the detection curves count, its noun and a caption note.

    A failure set drawn from some kinds of mistake only implicates the label
    changes of those kinds, so the curves can count either those or every
    corrupted example.
    """
    corrupted = run.corrupted_mask
    n_corrupted = int(corrupted.sum())
    implicated = pipeline.implicated_by(run, split.query)
    n_implicated = 0 if implicated is None else int(implicated.sum())
    if n_implicated == 0 or n_implicated == n_corrupted:
        return corrupted, "corrupted", ""
    choice = st.radio(
        "Count",
        list(DETECTION_TARGETS),
        format_func=lambda key: DETECTION_TARGETS[key].format(
            n_corrupted=n_corrupted, n_implicated=n_implicated
        ),
        key="compare_detection_target",
        horizontal=True,
        help=IMPLICATED_TEXT,
    )
    if choice == "implicated":
        return (
            implicated,
            "implicated",
            f" Only the {n_implicated} label changes whose kind of mistake occurs "
            "in F_q count; the oracle still ranks every corrupted example first.",
        )
    return (
        corrupted,
        "corrupted",
        f" F_q implicates {n_implicated} of the {n_corrupted} corrupted examples; "
        "nothing in F_q points to the others.",
    )


def parse_ks(text: str) -> list[int] | None:
    """Read the "k values" field, or show an error and return None.

    Values that would leave fewer than MIN_REMAINING training examples are
    kept, because the removal curve skips them and the page warns about them.
    """
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        st.error("The k values field is empty. Give at least one whole number.")
        return None
    try:
        # An empty entry, as in "10,,30", is more likely a missing number
        # than an extra comma, so it is rejected, as on the command line.
        if "" in parts:
            raise ValueError("empty entry")
        values = [int(part) for part in parts]
    except ValueError:
        st.error(
            f"Invalid k values {text!r}. Give whole numbers separated by single "
            "commas, with nothing empty between them."
        )
        return None
    ks = sorted(set(values))
    below = [k for k in ks if k < 1]
    if below:
        st.error(
            f"The k values field contains {', '.join(map(str, below))}, but every "
            "k must be at least 1, because k = 0 (nothing removed) is always "
            "computed. Remove the smaller values."
        )
        return None
    repeated = [k for k in ks if values.count(k) > 1]
    if repeated:
        # Each k's models are stored under k, so the removal curve rejects a
        # repeated k, and the field is checked as typed to keep Compute off.
        st.error(
            f"k {repeated[0]} is given {values.count(repeated[0])} times in the k "
            "values. Give each k once."
        )
        return None
    max_k = n_train - MIN_REMAINING
    if all(k > max_k for k in ks):
        st.error(
            f"Every one of the k values {', '.join(map(str, ks))} would leave fewer "
            f"than {MIN_REMAINING} of the {n_train} training examples to fine-tune "
            f"on. Give k values up to {max_k}."
        )
        return None
    return ks


def skipped_text(skipped: list[int]) -> str:
    """Name the k values that a removal curve skips, and why."""
    values = ", ".join(str(k) for k in skipped)
    max_k = n_train - MIN_REMAINING
    verb = "is" if len(skipped) == 1 else "are"
    return (
        f"k {values} {verb} skipped, so the curves have no point there: removing "
        f"more than {max_k} of the {n_train} training examples would leave fewer "
        f"than {MIN_REMAINING} to fine-tune on."
    )


def run_curves(scores_ids: list[str], ks: list[int], n_seeds: int) -> list[str]:
    """Compute and store a removal curve for each ranking and return the new ids.

    Every curve also runs k = 0, fine-tuning with nothing removed over the same
    seeds, so that the charts show how much fine-tuning alone changes.
    """
    ks = [0, *ks]
    new_ids = []
    for scores_id in scores_ids:
        report = dashboard.progress_reporter(f"Removal curve of {scores_id}")
        with dashboard.long_job("compare", f"removal curve of {scores_id}"):
            summary = dashboard.run_safely(
                "Removal curve",
                lambda scores_id=scores_id, report=report: pipeline.run_removal_curve(
                    ws,
                    run,
                    scores_id,
                    failure_set_id=failure_set_id,
                    ks=tuple(ks),
                    seeds=tuple(range(n_seeds)),
                    progress=report,
                ),
            )
        if summary is not None:
            new_ids.append(summary["removal_curve_id"])
    return new_ids


def ranking_name(scores_id: str, methods: dict[str, str]) -> str:
    """Name a curve's ranking by its method, and by its id as well when the
    failure set has several rankings of that method."""
    method = methods.get(scores_id)
    if method is None:
        return scores_id
    if list(methods.values()).count(method) > 1:
        return f"{method} {scores_id}"
    return method


def curve_label(record: dict[str, Any], methods: dict[str, str]) -> str:
    ranking = ranking_name(record["scores_id"], methods)
    seeds = dashboard.count_text(len(record["seeds"]), "seed")
    return f"{ranking} · {seeds} · {record['id']}"


def legend_labels(
    curves: list[dict[str, Any]], methods: dict[str, str]
) -> dict[str, str]:
    """Return the legend entry of each removal curve by id: "method · seeds",
    with the ranking's id where the failure set has several rankings of that
    method, and the curve's id only where two curves would share an entry.
    Short entries keep the legend of a narrow chart from crowding out the
    plot."""
    short = {}
    for curve in curves:
        ranking = ranking_name(curve["scores_id"], methods)
        seeds = dashboard.count_text(len(curve["seeds"]), "seed")
        short[curve["id"]] = f"{ranking} · {seeds}"
    counts = list(short.values())
    return {
        curve_id: label if counts.count(label) == 1 else f"{label} · {curve_id}"
        for curve_id, label in short.items()
    }


def add_control_line(
    figure: go.Figure,
    control: dict[str, Any],
    key: str,
    x_range: list[float],
    *,
    name: str,
    group: str,
    colour: str,
    with_spread: bool,
) -> None:
    """Draw the k = 0 point of a removal curve as a dotted line across the
    chart, with a band of ± one standard deviation when ``with_spread``.

    The line has no legend entry of its own: it belongs to the legend group
    ``group`` of its curve, so a click on the curve's entry hides both.
    """
    mean = control["mean"][key]
    spread = control["std"][key] if with_spread else 0.0
    hover = f"nothing removed (k = 0)<br>{mean:.1%}"
    if with_spread:
        hover += f" ± {spread:.1%}"
        low, high = max(0.0, mean - spread), min(1.0, mean + spread)
        figure.add_scatter(
            x=[x_range[0], x_range[1], x_range[1], x_range[0]],
            y=[high, high, low, low],
            fill="toself",
            fillcolor=colour,
            opacity=CONTROL_BAND_OPACITY,
            line={"width": 0},
            mode="lines",
            hoverinfo="skip",
            showlegend=False,
            legendgroup=group,
            name=name,
        )
    figure.add_scatter(
        x=x_range,
        y=[mean, mean],
        mode="lines",
        name=name,
        legendgroup=group,
        showlegend=False,
        line={"color": colour, "dash": "dot", "width": 1.5},
        hovertemplate=f"{hover}<extra></extra>",
    )


def k_axis(curves: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Return the k values of ``curves`` above 0, which get the ticks of the
    removal charts, and the charts' x range in decades."""
    ks = sorted({point["k"] for curve in curves for point in curve["points"]})
    ks = [k for k in ks if k > 0] or [1]
    log_range = [
        math.log10(ks[0]) - K_AXIS_MARGIN,
        math.log10(ks[-1]) + K_AXIS_MARGIN,
    ]
    return ks, log_range


def k_tick_labels(
    ks: list[int], log_range: list[float], plot_width: float = K_LABEL_PLOT_WIDTH
) -> list[str]:
    """Return the tick label of each of the sorted ``ks``, or an empty text
    where the label would overlap a label already placed.

    Labels are placed from the smallest k up, but the largest k always keeps
    its label, so the axis shows how far the curves reach.
    """
    span = log_range[1] - log_range[0]
    centres = [(math.log10(k) - log_range[0]) / span * plot_width for k in ks]
    half_widths = [len(str(k)) * K_LABEL_DIGIT_WIDTH / 2 for k in ks]

    def apart(left: int, right: int) -> bool:
        room = half_widths[left] + half_widths[right] + K_LABEL_GAP
        return centres[right] - centres[left] >= room

    labels = [""] * len(ks)
    last = len(ks) - 1
    placed: int | None = None
    for index, k in enumerate(ks):
        if index != last and not apart(index, last):
            continue
        if placed is not None and not apart(placed, index):
            continue
        labels[index] = str(k)
        placed = index
    return labels


def removal_figure(
    curves: list[dict[str, Any]], methods: dict[str, str], key: str
) -> go.Figure:
    """Draw the accuracy ``key`` of each removal curve against k on a log axis.

    A log axis has no place for k = 0, so the nothing-removed point of a curve
    is a dotted line across the chart instead.
    """
    # Only the k values get ticks, because plotly labels the minor ticks of
    # a log axis with their leading digit, so k = 30 and 300 both read "3".
    ks, log_range = k_axis(curves)
    x_range = [10**value for value in log_range]

    figure = go.Figure()
    labels = legend_labels(curves, methods)
    # Curves of one method share its colour and differ in dash.
    drawn: dict[str, int] = {}
    for curve in curves:
        points = [point for point in curve["points"] if point["k"] > 0]
        controls = [point for point in curve["points"] if point["k"] == 0]
        method = methods.get(curve["scores_id"], "")
        colour = dashboard.method_colour(method)
        dash = CURVE_DASHES[drawn.get(method, 0) % len(CURVE_DASHES)]
        drawn[method] = drawn.get(method, 0) + 1
        # One seed has no spread, so it gets no error bars.
        several_seeds = len(curve["seeds"]) > 1
        means = [point["mean"][key] for point in points]
        error_y = None
        if several_seeds:
            spreads = [point["std"][key] for point in points]
            error_y = dashboard.accuracy_error_bars(means, spreads)
        label = labels[curve["id"]]
        figure.add_scatter(
            x=[point["k"] for point in points],
            y=means,
            error_y=error_y,
            mode="lines+markers",
            name=label,
            legendgroup=label,
            line={"color": colour, "dash": dash},
        )
        for control in controls:
            add_control_line(
                figure,
                control,
                key,
                x_range,
                name=f"{label} · nothing removed (k = 0)",
                group=label,
                colour=colour,
                with_spread=several_seeds,
            )
    if any(point["k"] == 0 for curve in curves for point in curve["points"]):
        # A key for the dotted lines, which share their curves' legend entries.
        figure.add_scatter(
            x=[None],
            y=[None],
            mode="lines",
            name="nothing removed (k = 0)",
            line={"color": CONTROL_KEY_COLOUR, "dash": "dot", "width": 1.5},
            hoverinfo="skip",
        )
    figure.update_layout(
        xaxis={
            "title": "training examples removed (k)",
            "type": "log",
            "range": log_range,
            "tickvals": ks,
            "ticktext": k_tick_labels(ks, log_range),
        },
        yaxis=dashboard.accuracy_axis("accuracy"),
        height=REMOVAL_CHART_HEIGHT + LEGEND_ENTRY_HEIGHT * (len(curves) + 1),
        margin={"t": 10, "b": 10},
        # Each curve is a legend group, and plotly puts 10 px between groups
        # by default.
        legend={**dashboard.LEGEND_ABOVE, "tracegroupgap": 0},
        showlegend=True,
    )
    return figure


def removal_section(records: list[dict[str, Any]]) -> None:
    st.subheader("Removal curves")
    st.caption(
        "Remove the top k of a ranking, fine-tune on the rest and measure "
        "accuracy, averaged over seeds. Fine-tuning runs once per k and seed, "
        "and once per seed with nothing removed (k = 0): the dotted line, with "
        "a band of ± one standard deviation when there are several seeds. A "
        "point inside the band differs from fine-tuning alone by less than "
        "the spread over seeds."
    )

    methods = {record["id"]: record["method"] for record in records}
    by_id = {record["id"]: record for record in records}
    ids = [record["id"] for record in reversed(records)]
    dashboard.keep_widget_value("compare_rankings", ids)
    chosen = st.multiselect(
        "Rankings",
        ids,
        # The ranking under review on the Causes page, else the newest one
        # whose scores file is present. Stored curves need no scores file.
        default=(
            [st.session_state["scores_id"]]
            if st.session_state.get("scores_id") in ids
            else [dashboard.ranking_to_open(None, records)]
        ),
        key="compare_rankings",
        format_func=lambda i: dashboard.ranking_label(by_id[i]),
    )
    left, middle = st.columns([3, 1], vertical_alignment="bottom")
    default_ks = ", ".join(str(k) for k in (10, 30, 100, 300) if k < n_train)
    dashboard.keep_widget_value("compare_ks")
    ks_text = left.text_input(
        "k values",
        default_ks,
        key="compare_ks",
        help="Numbers of top-ranked training examples to remove, separated by commas.",
    )
    n_seeds = dashboard.number_field(
        "Seeds", 1, key="compare_seeds", minimum=1, maximum=10, container=middle
    )
    ks = parse_ks(ks_text)
    if ks is not None:
        too_large = [k for k in ks if k > n_train - MIN_REMAINING]
        if too_large:
            st.warning(skipped_text(too_large))
    new_ids = []
    disabled = not chosen or ks is None or n_seeds is None or dashboard.read_only()
    # The button has a row of its own, as a third column cuts its label short
    # in a narrow window.
    clicked = st.button("Compute", key="compare_run", disabled=disabled)
    st.caption(dashboard.LONG_JOB_CAPTION)
    if clicked:
        new_ids = run_curves(chosen, ks, n_seeds)

    stored = ws.list_removal_curves(run.run_id, failure_set_id=failure_set_id)
    if not stored:
        return
    # The default shows the newest curve of each ranking, as the detection chart does.
    newest = {record["scores_id"]: record["id"] for record in stored}
    curves = dashboard.choose_records(
        "Removal curves to draw",
        stored,
        "compare_curve_select",
        default=list(newest.values()),
        added=new_ids,
        format_func=lambda record: curve_label(record, methods),
    )
    if curves:
        left, right = st.columns(2)
        left.markdown("**Holdout failures F_h**")
        figure = removal_figure(curves, methods, "holdout_acc")
        left.plotly_chart(figure, key="compare_fh")
        right.markdown("**Correct before, T\\F**")
        figure = removal_figure(curves, methods, "remaining_acc")
        right.plotly_chart(figure, key="compare_rest")
        if "" in k_tick_labels(*k_axis(curves)):
            st.caption(
                "A tick without a label is a k too close to a labelled one for "
                "both labels to fit. Hover over its point to read k."
            )
        without_control = [
            curve["id"]
            for curve in curves
            if not any(point["k"] == 0 for point in curve["points"])
        ]
        if without_control:
            st.caption(
                "Removal curves stored without k = 0 have no dotted line: "
                f"{', '.join(without_control)}."
            )


def timing_row(
    step: str, name: str, record_id: str, seconds: Any, device: Any = None
) -> dict[str, Any]:
    """Return one row of the wall-time table. Records stored before devices
    were recorded show UNKNOWN_DEVICE."""
    return {
        "step": step,
        "name": name,
        "id": record_id,
        "seconds": seconds,
        "device": device or UNKNOWN_DEVICE,
    }


def sweep_seconds(record: dict[str, Any]) -> float:
    """Return the treatment seconds of a stored sweep, the sum over its points.

    Every Newton point reports the one shared solve plus its own step. The
    total counts the solve once, as the fastest point plus each point's excess
    over it, so it misses the fastest step (one parameter update) per extra
    point.
    """
    seconds = [point["seconds"] for point in record["points"]]
    if record["treatment"] != "newton":
        return sum(seconds)
    fastest = min(seconds)
    return fastest + sum(value - fastest for value in seconds)


def removal_curve_seconds(record: dict[str, Any]) -> float:
    """Return the fine-tuning seconds of a stored removal curve, summed over
    every k and seed."""
    return sum(
        run_record["seconds"]
        for point in record["points"]
        for run_record in point["per_seed"]
    )


def timing_section(records: list[dict[str, Any]]) -> None:
    st.subheader("Wall times")
    rows = [
        timing_row(
            "identification",
            record["method"],
            record["id"],
            record["metrics"].get("seconds"),
            record["metrics"].get("device"),
        )
        for record in records
    ]
    for record in ws.list_repairs(run.run_id, failure_set_id=failure_set_id):
        metrics = record["metrics"]
        rows.append(
            timing_row(
                "repair with controls" if metrics.get("controls") else "repair",
                record["treatment"],
                record["id"],
                metrics.get("seconds"),
                metrics.get("device"),
            )
        )
    for record in ws.list_sweeps(run.run_id, failure_set_id=failure_set_id):
        strengths = dashboard.count_text(len(record["points"]), "strength")
        rows.append(
            timing_row(
                f"sweep of {strengths}",
                record["treatment"],
                record["id"],
                sweep_seconds(record),
                record.get("device"),
            )
        )
    methods = {record["id"]: record["method"] for record in records}
    for record in ws.list_removal_curves(run.run_id, failure_set_id=failure_set_id):
        rows.append(
            timing_row(
                "removal curve",
                methods.get(record["scores_id"], record["scores_id"]),
                record["id"],
                removal_curve_seconds(record),
                record.get("device"),
            )
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "seconds": st.column_config.NumberColumn(format="%.2f"),
            "device": st.column_config.TextColumn(
                help="Device the step ran on, or — where the record was stored "
                "without it."
            ),
        },
    )


available = dashboard.missing_scores_warning(records)
latest = {record["method"]: record for record in available}
detection_section(latest)
if not records:
    st.info("No ranking yet for this failure set. Run methods on the Causes page.")
    st.stop()
removal_section(records)
timing_section(records)
