"""Causes: rank the training examples behind F_q and confirm the culprits by eye."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from repair_core import dashboard, pipeline
from repair_core.identification import METHODS, default_config, resolve_config

PAGE_SIZE = 24
#: Choices of cards per grid row; fewer suit narrow windows.
GRID_COLUMN_CHOICES = [2, 3, 4, 6]
DEFAULT_GRID_COLUMNS = 4
#: Symbols only, so that both options fit under a card at six cards per row.
DECISION_LABELS = {"confirmed": "✓", "rejected": "✗"}
SHOW_CHOICES = ["all", "undecided", "confirmed", "rejected"]
#: Style that fills the chosen option of each card's control green for ✓ and
#: red for ✗, since Streamlit draws either choice in the same primary colour.
#: It finds the options by place, in the order of DECISION_LABELS. st.html
#: sends HTML of style tags only outside the layout, so no element moves.
DECISION_STYLE = f"""<style>
[class*="st-key-review_"] button[role="radio"][aria-checked="true"]:first-of-type {{
  background: {dashboard.TONE_COLOURS["good"]};
  border-color: {dashboard.TONE_COLOURS["good"]};
  color: #fff;
}}
[class*="st-key-review_"] button[role="radio"][aria-checked="true"]:last-of-type {{
  background: {dashboard.TONE_COLOURS["bad"]};
  border-color: {dashboard.TONE_COLOURS["bad"]};
  color: #fff;
}}
</style>"""
#: Smallest F_q for which the page does not suggest a gentler EWC-influence
#: fit. On a 600-image run, 25 query failures of 1 predicted as 7 put 0.55 of
#: the matching flipped labels in the top 20% with the default fit and 0.97
#: with lr 1e-4. On a 3000-image run, random sets of 12 to 25 failures ranked
#: about as well with lr 1e-4 as with the default. Sets of 38 and 62 ranked
#: better with the default in 3 of 4 cases and the same in the fourth
#: (README, EWC-influence).
EWC_MIN_FAILURES = 30

dashboard.init_state()
ws, run = dashboard.require_run()
failure_set_id, split = dashboard.require_failure_set(ws, run)
root = str(ws.root)
class_names = [str(name) for name in run.data.train.class_names]
given_labels = run.data.train.labels.numpy()
# An all-False mask (scenario "none") carries no information about real label
# noise, so the grid then shows no clean/corrupted badges.
mask = None
if run.corrupted_mask is not None and bool(run.corrupted_mask.any()):
    mask = run.corrupted_mask.numpy()

st.title("Causes")
st.caption(
    f"Failure set `{failure_set_id}`: the methods rank all {len(given_labels)} "
    "training examples by how much they caused the "
    f"{dashboard.count_text(len(split.query), 'query failure')} F_q."
)


def choose_ranking() -> None:
    st.session_state["scores_id"] = st.session_state["causes_scores"]
    dashboard.forget_not_opened("ranking")


def note_changed_elsewhere(indices: list[int]) -> None:
    """Name the cards that another tab or session changed, so a change here
    left their saved decisions as they were."""
    if not indices:
        return
    named = ", ".join(f"#{i}" for i in indices[:5])
    if len(indices) > 5:
        named += ", …"
    if len(indices) == 1:
        changed = f"Train {named} was changed"
        keeps = "it keeps its saved decision"
    else:
        changed = f"{len(indices)} examples (train {named}) were changed"
        keeps = "they keep their saved decisions"
    st.session_state["causes_conflict"] = (
        f"{changed} in another tab or session since this page was drawn, so "
        f"{keeps}. The cards now show the saved decisions."
    )


def set_decisions(
    indices: list[int],
    decision: str | None,
    previous: dict[int, str | None],
    description: str,
) -> bool:
    """Save ``decision`` for ``indices`` and remember how to undo it.

    ``previous`` maps each index to its decision as this page drew it; an
    index whose saved decision has changed since keeps it. ``description``
    names the change on the undo button. Returns whether the save succeeded.
    """
    expected = {int(i): previous.get(int(i)) for i in indices}
    saved = dashboard.run_safely(
        "Saving the decisions" if len(indices) > 1 else "Saving the decision",
        lambda: (
            ws.set_decisions(
                run.run_id, failure_set_id, indices, decision, expected=expected
            ),
        ),
    )
    if saved is None:
        return False
    unchanged = saved[0]
    note_changed_elsewhere(unchanged)
    changed = [i for i in expected if i not in unchanged]
    if changed:
        st.session_state["causes_undo"] = {
            "failure_set_id": failure_set_id,
            "previous": [[i, expected[i]] for i in changed],
            "decision": decision,
            "description": description,
        }
    return True


def save_decision(train_index: int, key: str, previous: str | None) -> None:
    decision = st.session_state[key]
    verbs = {"confirmed": "confirmed", "rejected": "rejected", None: "cleared"}
    set_decisions(
        [train_index],
        decision,
        {train_index: previous},
        f"train #{train_index} {verbs[decision]}",
    )


def undo_last() -> None:
    """Give each example of the last change the decision it had before."""
    undo = st.session_state.pop("causes_undo", None)
    if not undo or undo["failure_set_id"] != failure_set_id:
        return
    by_decision: dict[str | None, list[int]] = {}
    for index, decision in undo["previous"]:
        by_decision.setdefault(decision, []).append(index)
    # Only decisions that still have the value this change set are restored.
    expected = {index: undo["decision"] for index, _ in undo["previous"]}
    unchanged: list[int] = []
    for decision, indices in by_decision.items():
        result = dashboard.run_safely(
            "Undoing the last change",
            lambda decision=decision, indices=indices: ws.set_decisions(
                run.run_id, failure_set_id, indices, decision, expected=expected
            ),
        )
        unchanged += result or []
    note_changed_elsewhere(sorted(unchanged))


def refresh_view() -> None:
    st.session_state.pop("causes_view", None)


def run_methods(configs: dict[str, object]) -> None:
    finished = []
    reused = []
    for method, config in configs.items():
        report = dashboard.progress_reporter(method)
        with dashboard.long_job("causes", f"identification with {method}"):
            summary = dashboard.run_safely(
                f"Identification with {method}",
                lambda method=method, config=config, report=report: (
                    pipeline.run_identification(
                        ws,
                        run,
                        method,
                        failure_set_id=failure_set_id,
                        config=config,
                        progress=report,
                    )
                ),
            )
        if summary is None:
            continue
        if not finished and not reused:
            # The first method chosen is the one opened for review.
            st.session_state["scores_id"] = summary["scores_id"]
            dashboard.forget_not_opened("ranking")
        if summary.get("reused"):
            # The pipeline found a ranking with the same settings, seed and
            # device and computed nothing.
            reused.append(f"{method} ({summary['scores_id']})")
        else:
            finished.append(f"{method} ({summary['seconds']:.1f} s)")
    messages = []
    if finished:
        messages.append("Ranked with " + ", ".join(finished) + ".")
    if reused:
        messages.append(
            f"Reused {dashboard.count_text(len(reused), 'stored ranking')} with the "
            "same settings, seed and device instead of computing again: "
            + ", ".join(reused)
            + "."
        )
    if messages:
        st.session_state["causes_message"] = " ".join(messages)
        st.rerun()


def fit_may_overshoot(config: object | None) -> bool:
    """Return whether EWC-influence with ``config`` fits fewer than
    EWC_MIN_FAILURES query failures at the default lr or above, a fit that can
    overshoot and rank clean images first. Fewer steps do not count as
    gentler: max_steps=30 min_steps=10 ranked worse than lr 1e-4 on small sets
    and worse than the default on larger ones. ``config`` is None for invalid
    settings, which count as the defaults."""
    if len(split.query) >= EWC_MIN_FAILURES:
        return False
    defaults = default_config("ewc-influence")
    return config is None or config.lr >= defaults.lr


def small_fit_advice() -> str:
    """Return why the default EWC-influence fit suits few failures badly and
    which settings to use instead."""
    defaults = default_config("ewc-influence")
    n_query = len(split.query)
    return (
        f"F_q has {dashboard.count_text(n_query, 'failure')}, fewer than "
        f"{EWC_MIN_FAILURES}. On a small set, above all one of a single kind of "
        f"mistake, the default fit of ewc-influence (at least {defaults.min_steps} "
        f"full-batch Adam steps at lr {defaults.lr:g}) can overshoot and rank "
        "clean images of other classes first. In the ewc-influence settings, "
        "set lr to 0.0001 (1e-4): on small sets it ranked about as well as the "
        "default or far better."
    )


def warn_small_failure_set(config: object | None, chosen: bool) -> None:
    """Warn when EWC-influence is chosen with a fit that may overshoot (see
    fit_may_overshoot)."""
    if chosen and fit_may_overshoot(config):
        st.warning(small_fit_advice())


def warn_overshooting_ranking(record: dict) -> None:
    """Warn beside an EWC-influence ranking made with a fit that may have
    overshot, since the settings form that warned before the run is folded
    away once a ranking exists."""
    if record["method"] != "ewc-influence":
        return
    try:
        config = resolve_config("ewc-influence", record["config"])
    except dashboard.USER_ERRORS:
        # Settings that this version no longer reads are not judged.
        return
    if fit_may_overshoot(config):
        st.warning(
            "This ranking may list clean images first. "
            + small_fit_advice()
            + " Then run it again under Run identification methods."
        )


def method_settings(method: str, opened: dict | None) -> object:
    """Show the settings form of ``method`` and return its settings.

    The form starts from the settings of ``opened``, the ranking under review,
    when ``method`` made it, and from the method's defaults otherwise. Entries
    the user changed in this session are kept (see
    dashboard.fill_settings_form).
    """
    key_prefix = f"causes_cfg_{method}"
    skip = METHODS[method].fixed
    config, source_id = default_config(method), None
    if opened is not None and opened["method"] == method:
        try:
            config = resolve_config(method, opened["config"])
            source_id = opened["id"]
        except dashboard.USER_ERRORS:
            # Settings that this version no longer reads leave the form at
            # the defaults.
            config = default_config(method)
    dashboard.fill_settings_form(config, key_prefix, source_id, skip=skip)
    return dashboard.settings_editor(config, key_prefix, skip=skip)


def method_section(expanded: bool, opened: dict | None) -> None:
    """Show the identification methods with their settings and run the
    chosen ones. ``opened`` is the ranking under review, or None."""
    with st.expander("Run identification methods", expanded=expanded):
        dashboard.keep_widget_value("causes_methods", list(METHODS))
        methods = st.multiselect(
            "Methods",
            list(METHODS),
            default=["ewc-influence"],
            key="causes_methods",
            help="Each method scores every training example; higher means more "
            "harmful to F_q.",
        )
        configs: dict[str, object] = {}
        invalid = False
        if methods:
            for method, tab in zip(methods, st.tabs(methods), strict=True):
                with tab:
                    st.caption(METHODS[method].description)
                    try:
                        configs[method] = method_settings(method, opened)
                    except dashboard.USER_ERRORS as error:
                        st.error(f"Invalid {method} settings: {error}")
                        invalid = True
        warn_small_failure_set(configs.get("ewc-influence"), "ewc-influence" in methods)
        clicked = st.button(
            "Run identification",
            type="primary",
            key="causes_run",
            disabled=not methods or invalid or dashboard.read_only(),
        )
        st.caption(dashboard.LONG_JOB_CAPTION)
        if clicked:
            run_methods(configs)


IMPLICATED_HELP = (
    "Of the changed labels whose kind of mistake occurs among the query "
    "failures, the share that lies in the top 20% of the ranking. An image of "
    "class a labelled b is expected to cause failures of class a predicted as b."
)


DETECTION_HELP = {
    "found in top 10%": "Share of all corrupted training examples that lie in "
    "the top 10% of the ranking.",
    "found in top 20%": "Share of all corrupted training examples that lie in "
    "the top 20% of the ranking.",
    "precision at 100": "Share of the 100 highest-ranked training examples "
    "that are corrupted.",
    "implicated in top 20%": IMPLICATED_HELP,
}


def rankings_table(records: list[dict]) -> None:
    rows = []
    for record in records:
        metrics = record["metrics"]
        detection = metrics.get("detection") or {}
        row = {
            "method": record["method"],
            "scores": record["id"],
            "settings": ", ".join(dashboard.ranking_settings(record)) or "defaults",
            "seconds": metrics.get("seconds"),
            "found in top 10%": detection.get("found_at_10pct"),
            "found in top 20%": detection.get("found_at_20pct"),
            "precision at 100": detection.get("precision_at_100"),
        }
        if "n_implicated" in detection:
            row["implicated in top 20%"] = detection.get("implicated_found_at_20pct")
        rows.append(row)
    table = pd.DataFrame(rows)
    if mask is None:
        # Without a ground-truth corruption mask there is nothing to detect.
        table = table.drop(columns=[c for c in DETECTION_HELP if c in table])
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            # 200 pixels, wide enough for "max steps 30, min steps 10".
            "settings": st.column_config.TextColumn(width="medium"),
            "seconds": st.column_config.NumberColumn(format="%.1f"),
            # With the percent format, Streamlit 1.67 shows as many decimals
            # as the step has, less two, so a step of 0.001 shows one decimal
            # in every row instead of up to two.
            **{
                column: st.column_config.NumberColumn(
                    format="percent", step=0.001, help=text
                )
                for column, text in DETECTION_HELP.items()
            },
        },
    )


def card_for(index: int, rank: int, score: float, predicted: int) -> dashboard.Card:
    tone, badge = None, None
    if mask is not None:
        tone, badge = ("bad", "corrupted") if mask[index] else ("good", "clean")
    return dashboard.Card(
        image=images[index],
        title=f"#{rank + 1} · score {score:.3g}",
        lines=[
            # No-break spaces keep each word with its label when lines wrap.
            f"given\u00a0{class_names[given_labels[index]]} · "
            f"predicted\u00a0{class_names[predicted]}",
            f"train #{index}",
        ],
        tone=tone,
        badge=badge,
    )


def review_grid(shown: np.ndarray, decisions: dict[int, str], per_row: int) -> None:
    st.html(DECISION_STYLE)
    for start in range(0, len(shown), per_row):
        columns = st.columns(per_row)
        for column, index in zip(columns, shown[start : start + per_row], strict=False):
            index = int(index)
            key = f"review_{failure_set_id}_{index}"
            # The workspace is the source of truth, so decisions saved by
            # another session or by a bulk action show here too.
            st.session_state[key] = decisions.get(index)
            with column:
                dashboard.show_card(
                    card_for(index, rank_of[index], scores[index], predicted[index])
                )
                # The label names the card for screen readers and stays hidden.
                st.segmented_control(
                    f"Decision on train #{index}",
                    list(DECISION_LABELS),
                    format_func=DECISION_LABELS.get,
                    key=key,
                    on_change=save_decision,
                    args=(index, key, decisions.get(index)),
                    disabled=dashboard.read_only(),
                    label_visibility="collapsed",
                )


def score_map(coordinates: np.ndarray, confirmed: list[int]) -> go.Figure:
    percentile = 1.0 - rank_of / max(len(rank_of) - 1, 1)
    trace = dashboard.scatter_class(len(coordinates))
    figure = go.Figure(
        trace(
            x=coordinates[:, 0],
            y=coordinates[:, 1],
            mode="markers",
            marker={
                "size": 5,
                "color": percentile,
                "colorscale": "Inferno",
                "colorbar": {"title": "score percentile"},
            },
            text=[
                f"train #{i}: score {scores[i]:.3g}, given "
                f"{class_names[given_labels[i]]}"
                for i in range(len(scores))
            ],
            hovertemplate="%{text}<extra></extra>",
            name="training examples",
        )
    )
    if confirmed:
        figure.add_trace(
            trace(
                x=coordinates[confirmed, 0],
                y=coordinates[confirmed, 1],
                mode="markers",
                marker={
                    "size": 11,
                    "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "#2ca02c"},
                },
                name="confirmed culprits",
                hoverinfo="skip",
            )
        )
    figure.update_layout(
        height=460,
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        legend={"orientation": "h"},
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return figure


def export_csv(confirmed: list[int], method: str) -> bytes:
    """Return the confirmed culprits as CSV, best-ranked first. Rank and score
    come from the ranking under review, which the method and scores_id
    columns name."""
    ranked = sorted(confirmed, key=lambda i: rank_of[i])
    table = pd.DataFrame(
        {
            "train_index": ranked,
            "rank": [int(rank_of[i]) + 1 for i in ranked],
            "score": [float(scores[i]) for i in ranked],
            "method": method,
            "scores_id": scores_id,
            "given_label": [class_names[given_labels[i]] for i in ranked],
            "predicted_label": [class_names[predicted[i]] for i in ranked],
        }
    )
    if mask is not None:
        table["corrupted"] = [bool(mask[i]) for i in ranked]
    return table.to_csv(index=False).encode()


def confirm_top_k(top: list[int], drawn: dict[int, str]) -> bool:
    """Confirm the examples of ``top`` that had no decision in ``drawn``, the
    decisions as this page drew them. Returns whether the save succeeded.

    Examples of ``top`` whose saved decision another tab or session changed
    since keep it, and the conflict note names them.
    """
    chosen = [i for i in top if drawn.get(i) is None]
    description = (
        f"confirming {dashboard.count_text(len(chosen), 'example')} of the top "
        f"{len(top)}"
    )
    if not set_decisions(chosen, "confirmed", {}, description):
        return False
    already_decided = len(top) - len(chosen)
    confirmed_text = (
        f"Confirmed {dashboard.count_text(len(chosen), 'example')} of the top "
        f"{len(top)} as culprits."
    )
    if already_decided:
        confirmed_text += f" {already_decided} already had a decision and kept it."
    # The button sits below the fold, far from the page's message area.
    st.session_state["causes_toast"] = confirmed_text
    saved = ws.get_decisions(run.run_id, failure_set_id)
    meant = {i: drawn.get(i, "confirmed") for i in top}
    note_changed_elsewhere([i for i in top if saved.get(i) != meant[i]])
    return True


def clear_decisions(previous: dict[int, str]) -> None:
    """Clear the review decisions in ``previous`` once the confirmation box is
    ticked, and untick it."""
    if not st.session_state.get("causes_clear_confirm"):
        return
    cleared = set_decisions(
        list(previous),
        None,
        previous,
        f"clearing {dashboard.count_text(len(previous), 'decision')}",
    )
    st.session_state["causes_clear_confirm"] = False
    if cleared:
        # Decisions left now were changed, or added for examples that had none,
        # in another tab or session after this page was drawn.
        note_changed_elsewhere(sorted(ws.get_decisions(run.run_id, failure_set_id)))


records = ws.list_scores(run.run_id, failure_set_id=failure_set_id)
# Messages that come and go sit in containers that every run draws, so that
# the elements after them keep their place: otherwise the browser draws the
# review grid anew and the keyboard focus leaves the control just used.
message = st.session_state.pop("causes_message", None)
if toast := st.session_state.pop("causes_toast", None):
    st.toast(toast, icon=":material/check_circle:")
with st.container():
    if message:
        st.success(message)
    dashboard.warn_not_opened("ranking")
dashboard.show_interrupted_job("causes")
records_by_id = {record["id"]: record for record in records}
opened_id = None
if records:
    opened_id = dashboard.ranking_to_open(st.session_state["scores_id"], records)
method_section(expanded=not records, opened=records_by_id.get(opened_id))
if not records:
    st.info("No ranking yet for this failure set. Run a method above.")
    st.stop()

rankings_table(records)
record_ids = [record["id"] for record in reversed(records)]
dashboard.sync_widget("causes_scores", opened_id, record_ids)
scores_id = st.selectbox(
    "Ranking to review",
    record_ids,
    key="causes_scores",
    format_func=lambda i: dashboard.ranking_label(records_by_id[i]),
    on_change=choose_ranking,
)
st.session_state["scores_id"] = scores_id
warn_overshooting_ranking(records_by_id[scores_id])

# A scores file deleted from the run folder stops the review and the export,
# as it stops Repair, instead of showing scores kept in the cache.
loaded = dashboard.run_safely(
    "Loading the ranking",
    lambda: (
        dashboard.stored_scores(root, scores_id),
        dashboard.ranking_order(root, scores_id),
    ),
)
if loaded is None:
    st.stop()
scores, order = loaded
rank_of = np.empty(len(order), dtype=np.int64)
rank_of[order] = np.arange(len(order))
predicted = dashboard.predictions_on_train(root, run.run_id)
images = dashboard.thumbnails(root, run.run_id, "train")
decisions = ws.get_decisions(run.run_id, failure_set_id)
# The decisions that the last run drew, which the reviewer saw when clicking
# Confirm top K. They differ from ``decisions`` where another tab or session
# changed a decision since.
drawn_state = st.session_state.get("causes_drawn")
drawn = dict(decisions)
if drawn_state and drawn_state["view"] == [run.run_id, failure_set_id]:
    drawn = drawn_state["decisions"]
st.session_state["causes_drawn"] = {
    "view": [run.run_id, failure_set_id],
    "decisions": dict(decisions),
}
confirmed = sorted(i for i, d in decisions.items() if d == "confirmed")
rejected = sorted(i for i, d in decisions.items() if d == "rejected")

columns = st.columns(4)
# Short labels fit a quarter of a narrow window, and help texts give the detail.
columns[0].metric(
    "Confirmed",
    len(confirmed),
    help="Training examples confirmed as culprits, which Repair removes.",
)
columns[1].metric("Rejected", len(rejected))
columns[2].metric("Undecided", len(order) - len(confirmed) - len(rejected))
if mask is not None:
    # The value names its base, as the cards mark corrupted examples whether
    # or not they are confirmed.
    # With nothing confirmed there is no share to give, so "—" replaces "0 of 0".
    columns[3].metric(
        "Corrupted",
        f"{int(mask[confirmed].sum())} of {len(confirmed)}" if confirmed else "—",
        help="Confirmed examples that the noise scenario corrupted, of all "
        "confirmed ones.",
    )

k_column, confirm_column = st.columns(2, vertical_alignment="bottom")
top_k = dashboard.number_field(
    "K",
    min(20, len(order)),
    key="causes_k",
    minimum=1,
    maximum=len(order),
    reason=", the number of ranked training examples",
    container=k_column,
    help="Number of the highest-ranked training examples that Confirm top K "
    "marks as culprits. Examples that already have a decision keep it.",
)
confirm_top = confirm_column.button(
    "Confirm top K",
    key="causes_confirm_top",
    disabled=top_k is None or dashboard.read_only(),
)
if confirm_top and top_k is not None:
    # A failed save shows its error, which a rerun would wipe at once.
    if confirm_top_k([int(i) for i in order[:top_k]], drawn):
        st.rerun()
# Clearing needs a ticked box first; the Undo button can restore it.
clear_column, clear_button_column = st.columns(2, vertical_alignment="center")
confirm_clear = clear_column.checkbox(
    f"Allow clearing {dashboard.count_text(len(decisions), 'decision')}",
    key="causes_clear_confirm",
    disabled=not decisions,
    help=f"Tick to allow clearing the "
    f"{dashboard.count_text(len(decisions), 'saved decision')} of this "
    "failure set.",
)
clear_button_column.button(
    "Clear decisions",
    key="causes_clear",
    disabled=not (decisions and confirm_clear) or dashboard.read_only(),
    on_click=clear_decisions,
    args=(dict(decisions),),
)

# A new run or failure set starts from the whole ranking.
if st.session_state.get("causes_show_for") != failure_set_id:
    dashboard.forget_widget_value("causes_show")
    st.session_state["causes_show_for"] = failure_set_id
show_column, per_row_column = st.columns([3, 1], vertical_alignment="bottom")
dashboard.keep_widget_value("causes_show", SHOW_CHOICES)
show = show_column.segmented_control(
    "Show",
    SHOW_CHOICES,
    default="all",
    key="causes_show",
)
dashboard.keep_widget_value("causes_per_row", GRID_COLUMN_CHOICES)
per_row = per_row_column.selectbox(
    "Cards per row",
    GRID_COLUMN_CHOICES,
    index=GRID_COLUMN_CHOICES.index(DEFAULT_GRID_COLUMNS),
    key="causes_per_row",
    help="Fewer cards per row suit a narrow window.",
)
st.caption(
    "Under each card, ✓ confirms the example as a culprit and ✗ rejects it; "
    "clicking the chosen one again clears it. Confirm top K keeps examples you "
    "rejected."
)

conflict_note = st.session_state.pop("causes_conflict", None)
undo = st.session_state.get("causes_undo")
with st.container():
    if conflict_note:
        st.warning(conflict_note)
        # The warning sits above the grid, out of view while the reviewer
        # works further down, and a toast shows wherever the page is scrolled.
        st.toast(conflict_note, icon=":material/warning:")
    if undo and undo["failure_set_id"] == failure_set_id:
        st.button(
            f"Undo: {undo['description']}",
            key="causes_undo_button",
            on_click=undo_last,
            disabled=dashboard.read_only(),
        )

# A filtered view lists the examples that matched the filter when the view
# opened, so deciding a card, here or in another session, moves no card under
# the pointer. The list is taken again when the filter, the ranking or the
# failure set changes, or when the reviewer refreshes it.
view = [failure_set_id, scores_id, show]
view_state = st.session_state.get("causes_view")
if not view_state or view_state["view"] != view:
    if view_state:
        # Another view starts on its first page.
        st.session_state.pop("causes_page", None)
    view_state = {"view": view, "decisions": dict(decisions)}
    st.session_state["causes_view"] = view_state


def matches_filter(decision: str | None) -> bool:
    return decision is None if show == "undecided" else decision == show


if show == "all":
    listed = order
else:
    opened_with = view_state["decisions"]
    listed = order[[matches_filter(opened_with.get(int(i))) for i in order]]
    moved = [int(i) for i in listed if not matches_filter(decisions.get(int(i)))]
    moved_slot = st.container()
    if moved:
        note, refresh = moved_slot.columns([3, 1], vertical_alignment="center")
        note.caption(
            f"{dashboard.count_text(len(moved), 'decided example')} no longer "
            f"{'matches' if len(moved) == 1 else 'match'} “{show}” but "
            f"{'stays' if len(moved) == 1 else 'stay'} in place until you refresh."
        )
        refresh.button("Refresh the list", key="causes_refresh", on_click=refresh_view)
if len(listed):
    window = dashboard.page_window(len(listed), PAGE_SIZE, "causes_page")
    if window is not None:
        review_grid(listed[window], decisions, per_row)
else:
    st.info(f"No {show} examples.")

st.divider()
# The export sits in the full width, as a narrow column cut its label short.
method = records_by_id[scores_id]["method"]
st.download_button(
    f"Download {len(confirmed)} confirmed culprits (CSV)",
    data=export_csv(confirmed, method),
    file_name=f"culprits-{run.run_id}-{failure_set_id}-{method}-{scores_id}.csv",
    mime="text/csv",
    key="causes_export",
    disabled=not confirmed,
    help="One row per confirmed culprit with its rank and score in this ranking. "
    "The file is also accepted by 'repair --causes-file'.",
)
if confirmed:
    dashboard.page_link(
        "app_pages/repair.py",
        f"Next: remove the {dashboard.count_text(len(confirmed), 'confirmed culprit')} "
        "on Repair",
    )
st.markdown("**Training set map, coloured by score**")
coordinates = dashboard.map_coordinates(root, run.run_id, "causes_map_button")
if coordinates is not None:
    st.plotly_chart(score_map(coordinates["train"], confirmed), key="causes_map")
