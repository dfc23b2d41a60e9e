"""Streamlit glue shared by the dashboard pages.

Session state, cached access to the workspace and to loaded runs, image
thumbnails and grids, plotly figures and small widget helpers. Every
computation is delegated to the rest of ``repair_core``, so this module only
caches, encodes and draws.

Session-state keys shared between pages (one copy per browser session):

* ``workspace_root``: the workspace folder in use.
* ``run_id``, ``failure_set_id``, ``scores_id``, ``repair_id``: the run, the
  failure set F, the ranking under review and the repair on show.
* ``map_runs``: run ids whose UMAP map this session asked to see.
* ``_kept_<widget key>``: the last value of a widget, restored by
  :func:`keep_widget_value` when a page draws the widget again.
* ``_job_running_<page>``: the long job a page started and has not finished.
* ``_pages_<widget key>``: the page count that :func:`page_window` last showed.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import html
import io
import ipaddress
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image
from streamlit.errors import StreamlitAPIException
from streamlit.runtime.scriptrunner import RerunException, StopException

from repair_core import pipeline
from repair_core.data import check_path_name
from repair_core.errors import ConfigError, DataError, RepairError, WorkspaceError
from repair_core.failures import FailureSplit
from repair_core.identification.base import MAX_SEED
from repair_core.inference import eval_mode, model_device, predict_logits
from repair_core.metrics import ranking
from repair_core.models import embed
from repair_core.progress import Progress
from repair_core.workspace import (
    DEFAULT_WORKSPACE,
    WORKSPACE_ENV,
    Workspace,
    contains_workspace,
    lost_records_message,
)

logger = logging.getLogger(__name__)

#: Errors a page shows with ``st.error`` instead of crashing: bad input or
#: state (RepairError, a ValueError) and non-finite numbers from a solver.
USER_ERRORS = (RepairError, FloatingPointError)

#: Rankings that are references to compare with, not suspects to review.
REFERENCE_METHODS = ("random", "oracle")

#: Examples per batch when computing penultimate features for the map.
EMBED_BATCH_SIZE = 512
#: Maps with more points than this are drawn with WebGL (plotly Scattergl).
WEBGL_MIN_POINTS = 5000
#: File of a run folder that keeps the run's UMAP map.
MAP_FILE = "umap.pt"
#: UMAP needs more points than its neighbourhood size (15 by default).
MIN_MAP_POINTS = 20
#: Confusion matrices with at most this many classes label every class.
LABELLED_CLASSES = 20
#: Axis range of accuracy axes, a little wider than [0, 1] so that markers at
#: 0% and 100% are drawn whole.
ACCURACY_RANGE = [-0.02, 1.02]


#: Plotly legend settings that put a horizontal legend above the plot area.
#: Plotly's default place for a horizontal legend, below the plot, covers the
#: x-axis title. Plotly widens the top margin to fit the legend. Plotly hides
#: the legend of a chart with one line, so charts also set ``showlegend``:
#: otherwise a lone curve would not say which method drew it.
LEGEND_ABOVE = {
    "orientation": "h",
    "yanchor": "bottom",
    "y": 1.02,
    "xanchor": "left",
    "x": 0,
}

_PALETTE = plotly.colors.qualitative.D3
#: Line colour of each identification method, the same on every chart. The
#: colours are the ten of plotly's D3 qualitative palette, so no two methods
#: share a hue. Random is grey because it is the chance level.
METHOD_COLOURS = {
    "ewc-influence": _PALETTE[0],
    "linear-influence-lissa": _PALETTE[1],
    "linear-influence-gd": _PALETTE[2],
    "linear-influence-exact": _PALETTE[4],
    "sgd-influence": _PALETTE[5],
    "tracin": _PALETTE[3],
    "confident-learning": _PALETTE[6],
    "training-loss": _PALETTE[8],
    "random": _PALETTE[7],
    "oracle": _PALETTE[9],
}


def method_colour(method: str) -> str:
    """Return the chart colour of an identification method, or black for a
    method missing from METHOD_COLOURS."""
    return METHOD_COLOURS.get(method, "#000000")


def palette_colour(index: int) -> str:
    """Return colour ``index`` of the D3 palette, for the classes or the
    series of a chart. The palette repeats after ten colours."""
    return _PALETTE[index % len(_PALETTE)]


def accuracy_axis(title: str) -> dict[str, Any]:
    """Return plotly axis settings for an accuracy from 0% to 100%."""
    return {"title": title, "tickformat": ".0%", "range": ACCURACY_RANGE}


def accuracy_error_bars(
    means: Sequence[float], spreads: Sequence[float]
) -> dict[str, Any]:
    """Return plotly ``error_y`` settings for accuracies ± their spread, with
    each bar cut at 0% and 100%, which no accuracy can pass."""
    plus, minus = [], []
    for mean, spread in zip(means, spreads, strict=True):
        plus.append(max(0.0, min(spread, 1.0 - mean)))
        minus.append(max(0.0, min(spread, mean)))
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


_STATE_DEFAULTS: dict[str, Any] = {
    "run_id": None,
    "failure_set_id": None,
    "scores_id": None,
    "repair_id": None,
}

# Card outline colours of the image grids.
TONE_COLOURS = {
    "bad": "#d62728",
    "good": "#2ca02c",
    "warn": "#ff7f0e",
    "info": "#1f77b4",
    None: "rgba(128, 128, 128, 0.35)",
}


# Session state ---------------------------------------------------------------


def init_state() -> None:
    """Create the shared session-state keys that are missing, once per session."""
    if "workspace_root" not in st.session_state:
        root = os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        st.session_state["workspace_root"] = root
    for key, value in _STATE_DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = value
    if "map_runs" not in st.session_state:
        st.session_state["map_runs"] = set()


def select_run(run_id: str | None, failure_set_id: str | None) -> None:
    """Make ``run_id`` the open run and forget choices made for the previous one."""
    st.session_state["run_id"] = run_id
    st.session_state["failure_set_id"] = failure_set_id
    st.session_state["scores_id"] = None
    st.session_state["repair_id"] = None
    # A run chosen by the user replaces the one that the address named.
    st.session_state.pop(_URL_PENDING, None)
    st.session_state.pop(_URL_NOT_OPENED, None)
    st.session_state.pop(_URL_MISSING_WORKSPACE, None)


#: URL query parameter for each piece of the working context, so a reload of
#: the browser tab reopens the same run, failure set, ranking and repair.
URL_KEYS = {
    "run": "run_id",
    "fs": "failure_set_id",
    "scores": "scores_id",
    "repair": "repair_id",
}


def restore_from_url() -> None:
    """On a session's first script run, reopen what the URL names.

    A browser reload starts a new session, so the session state is empty, but
    the URL keeps the query parameters that :func:`save_to_url` wrote. While
    the workspace database cannot be read, because it is damaged or it or its
    folder was moved away, the ids wait. Each later script run tries again
    until the database can be read or the user opens another run or
    workspace. An id that the workspace does not hold, or that belongs to
    another run or failure set, is ignored together with everything after it,
    and a toast names it. Without a failure set in the URL, the run opens with
    the failure set of the URL's ranking or repair, else with the one Setup's
    Open picks.
    """
    if not st.session_state.get("_url_restored"):
        st.session_state["_url_restored"] = True
        if not _restore_workspace_from_url():
            return
        params = st.query_params
        if not params.get("run") or st.session_state["run_id"]:
            return
        st.session_state[_URL_PENDING] = {
            name: value for name in URL_KEYS if (value := params.get(name))
        }
    pending = st.session_state.get(_URL_PENDING)
    if pending is None:
        return
    try:
        ws = open_workspace(st.session_state["workspace_root"])
        check_database(ws)
    except USER_ERRORS:
        # The page shows the workspace error. The address keeps its ids, and
        # a later script run opens them once the database can be read again.
        return
    del st.session_state[_URL_PENDING]
    _restore_records(ws, pending)


#: Session-state key of the ids that the address names and that wait for a
#: readable workspace database. :func:`save_to_url` keeps them in the address.
_URL_PENDING = "_url_pending"


def _restore_workspace_from_url() -> bool:
    """Switch to the workspace folder that the address names, if it contains a
    workspace. Return False when the address names a folder that cannot be
    used, after a toast with the reason."""
    root = st.query_params.get("workspace")
    if not root or root == st.session_state["workspace_root"]:
        return True
    current = st.session_state["workspace_root"]
    if (problem := folder_path_problem(root)) is not None:
        st.toast(f"{problem} The dashboard uses {current!r}.")
        return False
    # An address is easy to mistype or to get from someone else, so it
    # opens only a folder that is or was a workspace. That is a folder with a
    # database, even a damaged one, with run folders whose database is lost,
    # or one that this server opened before it was moved away. The page then
    # shows why the workspace cannot be read, and the address keeps its
    # ids until it can. No new, empty workspace is created there.
    if (
        contains_workspace(root)
        or lost_records_message(root) is not None
        or root in _opened_roots()
    ):
        st.session_state["workspace_root"] = root
        return True
    display, state = no_workspace_state(root)
    _report_missing_workspace(
        root,
        f"The address names the workspace folder {display}, which {state}, so the "
        f"dashboard uses {current!r}.",
    )
    return False


def _report_missing_workspace(root: str, message: str) -> None:
    """Toast ``message`` about the address's workspace folder ``root``, which
    contains no workspace, and repeat it in the sidebar. When the address
    names a run, the ids and the address wait until the user enters the
    workspace's new folder or opens another run."""
    ids = {name: value for name in URL_KEYS if (value := st.query_params.get(name))}
    if not ids.get("run"):
        ids = {}
    else:
        # After a server restart this is also how a moved workspace looks.
        display_id = pipeline.shortened_id(ids["run"].replace("`", ""))
        message += (
            " If the workspace was moved, enter its new folder as the workspace "
            f"folder in the sidebar to open run `{display_id}`."
        )
    # Without ids the sidebar still shows which workspace is in use, until
    # the user opens a run or another workspace.
    st.session_state[_URL_MISSING_WORKSPACE] = {
        "root": root,
        "ids": ids,
        "message": message,
    }
    st.toast(message)


#: Session-state key of an address whose workspace folder contains no
#: workspace: the folder, the ids it named and the message about them.
_URL_MISSING_WORKSPACE = "_url_missing_workspace"


def _restore_records(ws: Workspace, params: dict[str, str]) -> None:
    """Open the run, failure set, ranking and repair that ``params`` name."""
    run_id = params["run"]
    if _url_record(ws, "runs", "run", run_id) is None:
        return
    st.session_state["run_id"] = run_id
    failure_set_id = params.get("fs") or _url_failure_set(ws, run_id, params)
    checks = (
        (
            "failure_set_id",
            "failure_sets",
            "failure set",
            failure_set_id,
            {"run_id": run_id},
        ),
        (
            "scores_id",
            "scores",
            "ranking",
            params.get("scores"),
            {"run_id": run_id, "failure_set_id": failure_set_id},
        ),
        (
            "repair_id",
            "repairs",
            "repair",
            params.get("repair"),
            {"run_id": run_id, "failure_set_id": failure_set_id},
        ),
    )
    for key, table, kind, record_id, expected in checks:
        if not record_id:
            continue
        record = _url_record(ws, table, kind, record_id)
        if record is None:
            return
        mismatched = [
            name for name, value in expected.items() if record.get(name) != value
        ]
        if mismatched:
            owner = " and ".join(
                f"{OWNER_NOUNS[name]} `{record.get(name)}`" for name in mismatched
            )
            _toast_not_opened(kind, record_id, f"belongs to {owner}")
            return
        st.session_state[key] = record_id


#: Noun of each record field that names the run or failure set a record
#: belongs to.
OWNER_NOUNS = {"run_id": "run", "failure_set_id": "failure set"}


#: Workspace method that reads one record of each table the URL can name.
_URL_GETTERS = {
    "runs": Workspace.get_run,
    "failure_sets": Workspace.get_failure_set,
    "scores": Workspace.get_scores,
    "repairs": Workspace.get_repair,
}


def _url_record(
    ws: Workspace, table: str, kind: str, record_id: str
) -> dict[str, Any] | None:
    """Return the record ``record_id`` of ``table``, or toast why it was not
    opened and return None."""
    try:
        if not ws.has_record(table, record_id):
            _toast_not_opened(kind, record_id, "was not found in this workspace")
            return None
        return _URL_GETTERS[table](ws, record_id)
    except USER_ERRORS as error:
        # A database error is no sign that the record is missing, so the
        # toast reports that it could not be read, with the error.
        _toast_not_opened(
            kind, record_id, f"could not be read from this workspace ({error})"
        )
        return None


def _url_failure_set(ws: Workspace, run_id: str, params: Any) -> str | None:
    """Return the failure set for a URL that names none: that of the URL's
    ranking or repair when it belongs to ``run_id``, else the one Setup's Open
    picks. Records that cannot be read are named later by :func:`_url_record`.
    """
    try:
        for table, name in (("scores", "scores"), ("repairs", "repair")):
            record_id = params.get(name)
            if record_id and ws.has_record(table, record_id):
                record = _URL_GETTERS[table](ws, record_id)
                if record.get("run_id") == run_id:
                    return record.get("failure_set_id")
        return last_used_failure_set(ws, run_id)
    except USER_ERRORS:
        return None


def _toast_not_opened(kind: str, record_id: str, reason: str) -> None:
    """Say why the URL's ``record_id`` was not opened."""
    # A code span shows the id as typed, without rendering Markdown in it.
    display_id = pipeline.shortened_id(record_id.replace("`", ""))
    message = (
        f"The address names the {kind} `{display_id}`, which {reason}, so it was not "
        "opened."
    )
    st.toast(message)
    # A toast fades after a few seconds, so the page that would have shown the
    # record repeats the message where it states that none is open.
    st.session_state[_URL_NOT_OPENED] = {"kind": kind, "message": message}


#: Session-state key of the record that the address named and that was not
#: opened: its kind and the message about it.
_URL_NOT_OPENED = "_url_not_opened"


def warn_not_opened(*kinds: str) -> None:
    """Repeat why the address's record was not opened, if it is of one of
    ``kinds`` and was not. The message stays until :func:`forget_not_opened`."""
    note = st.session_state.get(_URL_NOT_OPENED)
    if note is not None and note["kind"] in kinds:
        st.warning(note["message"])


def forget_not_opened(*kinds: str) -> None:
    """Drop the message about the address's record of one of ``kinds``, once
    the user has chosen or made another record of that kind."""
    note = st.session_state.get(_URL_NOT_OPENED)
    if note is not None and note["kind"] in kinds:
        del st.session_state[_URL_NOT_OPENED]


def save_to_url() -> None:
    """Write the working context into the URL's query parameters.

    Streamlit clears query parameters when the user moves to another page, so
    this runs on every script run. Only this dashboard's keys are touched.
    """
    pending = st.session_state.get(_URL_PENDING)
    missing = st.session_state.get(_URL_MISSING_WORKSPACE)
    root = st.session_state.get("workspace_root")
    if missing is not None and missing["ids"]:
        # The address keeps the missing folder and its ids, so a reload after
        # the folder is back opens them.
        target = {name: missing["ids"].get(name) for name in URL_KEYS}
        root = missing["root"]
    elif pending is not None:
        # The ids wait for a readable database, so the address keeps them.
        target = {name: pending.get(name) for name in URL_KEYS}
    else:
        target = {name: st.session_state.get(key) for name, key in URL_KEYS.items()}
    default_root = os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    target["workspace"] = root if root != default_root else None
    current = {name: st.query_params.get_all(name) for name in st.query_params}
    wanted = {name: values for name, values in current.items() if name not in target}
    wanted.update({name: [value] for name, value in target.items() if value})
    # Each write of st.query_params sends the browser one new address, and
    # the browser adds a history entry for each address that differs from the
    # one it shows (Streamlit 1.67). So the address is written once, whole.
    if wanted != current:
        st.query_params.from_dict(wanted)


def last_used_failure_set(ws: Workspace, run_id: str) -> str | None:
    """Return the failure set of ``run_id`` with the newest stored result.

    Rankings, repairs, sweeps and removal curves count as use; a failure set
    without any counts from its own creation. None when the run has none.
    """
    sets = ws.list_failure_sets(run_id)
    if not sets:
        return None
    latest = {record["id"]: record["created_at"] for record in sets}
    for records in (
        ws.list_scores(run_id),
        ws.list_repairs(run_id),
        ws.list_sweeps(run_id),
        ws.list_removal_curves(run_id),
    ):
        for record in records:
            failure_set_id = record.get("failure_set_id")
            if failure_set_id in latest:
                latest[failure_set_id] = max(
                    latest[failure_set_id], record["created_at"]
                )
    # Ties keep the newest set, as list_failure_sets is oldest first.
    return max(reversed(sets), key=lambda record: latest[record["id"]])["id"]


#: Prefix of the session-state copies that keep widget values across pages.
_KEPT_PREFIX = "_kept_"


def keep_widget_value(key: str, options: Sequence[Any] | None = None) -> None:
    """Keep the value of the widget ``key`` for the whole session.

    Streamlit drops the state of a widget that a script run does not draw, as
    on a visit to another page, so the widget would start from its default
    again. This copies the value to a plain session-state key on every run
    and writes it back when the widget state is gone. Call it just before the
    widget is created. With ``options``, a kept value that is not among them
    is dropped, and so is each such item of a kept list (a multiselect). A
    kept list left empty by that is dropped, so the widget gets its default.
    """
    copy_key = _KEPT_PREFIX + key
    if key in st.session_state:
        st.session_state[copy_key] = st.session_state[key]
        return
    if copy_key not in st.session_state:
        return
    value = st.session_state[copy_key]
    if options is not None:
        if isinstance(value, list):
            value = [item for item in value if item in options]
            if not value and st.session_state[copy_key]:
                return
        elif value not in options:
            return
    st.session_state[key] = value


def forget_widget_value(key: str) -> None:
    """Drop the widget ``key``'s value and its kept copy, so the widget starts
    from its default when next drawn. Call it before the widget is created."""
    st.session_state.pop(key, None)
    st.session_state.pop(_KEPT_PREFIX + key, None)


def sync_widget(widget_key: str, value: Any, options: Sequence[Any]) -> None:
    """Point the widget ``widget_key`` at ``value`` when ``value`` changed since
    the last call, or when the widget has no state yet. Call before the widget
    is created; a choice the user made in the widget since then is kept."""
    marker = f"_synced_{widget_key}"
    changed = st.session_state.get(marker) != value
    if value in options and (changed or widget_key not in st.session_state):
        st.session_state[widget_key] = value
    st.session_state[marker] = value
    if widget_key in st.session_state and st.session_state[widget_key] not in options:
        del st.session_state[widget_key]


def choose_records(
    label: str,
    records: Sequence[dict[str, Any]],
    key: str,
    *,
    default: Sequence[str],
    added: Sequence[str] = (),
    format_func: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Show a multiselect of stored records, newest first, and return the
    chosen records.

    Args:
        label: the widget label.
        records: workspace records with an ``id``, oldest first, as from
            ``Workspace.list_sweeps``.
        key: the widget key.
        default: ids chosen when the widget has no state yet.
        added: ids of records stored during this script run, which join the
            choice so that a new result shows at once.
        format_func: the option text of a record.

    Returns:
        The chosen records. A single record is returned without drawing the
        widget.
    """
    if len(records) == 1:
        return list(records)
    by_id = {record["id"]: record for record in records}
    chosen = [i for i in st.session_state.get(key, default) if i in by_id]
    chosen += [i for i in added if i in by_id and i not in chosen]
    # Streamlit allows setting a widget's state before the widget is created in
    # this run. The filtered list drops ids of another run or failure set.
    st.session_state[key] = chosen
    ids = st.multiselect(
        label,
        [record["id"] for record in reversed(records)],
        key=key,
        format_func=lambda i: format_func(by_id[i]),
    )
    return [by_id[i] for i in ids]


# Workspace and runs ----------------------------------------------------------


#: Command-line advice in workspace errors, and its replacement on the dashboard.
_CLI_ADVICE = (
    (" with --workspace", ""),
    ("point --workspace at another folder", "choose another folder"),
)


def dashboard_advice(message: str) -> str:
    """Drop the command line's --workspace advice from an error message."""
    for cli, replacement in _CLI_ADVICE:
        message = message.replace(cli, replacement)
    return message


def folder_path_problem(root: str) -> str | None:
    """Return why the file system cannot take ``root`` as a folder path, or
    None.

    The reasons are those of :func:`repair_core.data.check_path_name`: a NUL
    character, or a name or path longer than the file system allows, even
    below a folder that does not exist yet. A path that merely does not exist
    yet passes.
    """
    try:
        # expanduser on the string keeps the path as typed in the message.
        check_path_name(
            os.path.expanduser(root), "The workspace folder", WorkspaceError
        )
    except WorkspaceError as error:
        return str(error)
    return None


@st.cache_resource(show_spinner=False)
def open_workspace(root: str) -> Workspace:
    """Open the workspace at ``root`` once per process, creating it if missing."""
    opened = Workspace(root)
    _opened_roots().add(root)
    return opened


@st.cache_resource(show_spinner=False)
def _opened_roots() -> set[str]:
    """Return the workspace folders that :func:`open_workspace` opened in this
    process, shared by every session.

    A cache resource, so that clearing Streamlit's caches clears it together
    with the open workspaces. A folder in it was a workspace, so a missing
    workspace there was moved or deleted rather than mistyped.
    """
    return set()


def check_database(ws: Workspace) -> None:
    """Raise WorkspaceError when the database of ``ws`` was damaged, deleted
    or moved since it was opened.

    The open workspace is cached, so without this check a page would go on
    with a database that can no longer be read. A missing database is not
    created again: that would start a new, empty workspace in its place.
    """
    if not ws.database_path.is_file():
        lost = lost_records_message(ws.root)
        if lost is not None:
            raise WorkspaceError(lost)
    # Reading the schema version opens the file without creating it and fails
    # on a missing or damaged database.
    ws.schema_version  # noqa: B018


def workspace() -> Workspace:
    """Return the session's workspace, or show the error and stop the page."""
    init_state()
    root = st.session_state["workspace_root"]
    try:
        opened = open_workspace(root)
        check_database(opened)
        return opened
    except USER_ERRORS as error:
        message = f"The workspace folder {root!r} cannot be used: " + (
            dashboard_advice(str(error))
        )
        # Most workspace errors already advise another folder.
        if "another folder" not in message:
            message += (
                " Enter another folder in the Workspace folder box of the sidebar."
            )
        st.error(message)
        st.stop()


def no_workspace_state(root: str) -> tuple[str, str]:
    """Return ``root`` for display, with the absolute folder a relative or ~
    path leads to, and why it is no workspace: "does not exist", "is a file,
    not a folder" or "contains no workspace"."""
    folder = Path(root).expanduser()
    display = repr(root)
    if str(folder) != root or not folder.is_absolute():
        display += f" ({folder.absolute()})"
    if folder.is_dir():
        return display, "contains no workspace"
    if folder.exists():
        return display, "is a file, not a folder"
    return display, "does not exist"


def read_only() -> bool:
    """Return whether the sidebar found the workspace in use read-only in this
    script run, so that the pages turn off the controls that save."""
    return bool(st.session_state.get(_READ_ONLY))


def read_only_warning(root: str) -> str | None:
    """Return a warning when the workspace at ``root`` can be read but not
    written, or None. An unreadable workspace is reported by the page."""
    try:
        opened = open_workspace(root)
        check_database(opened)
    except USER_ERRORS:
        return None
    try:
        opened.check_writable()
    except WorkspaceError as error:
        return (
            f"{dashboard_advice(str(error))} Its results can be browsed; the "
            "controls that would save a run, ranking, decision or repair are off."
        )
    return None


def is_loopback(address: str) -> bool:
    """Return whether only this machine can reach ``address``: localhost or
    an IP address in 127.0.0.0/8 or ::1."""
    address = address.strip()
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def network_warning(address: str | None) -> str | None:
    """Return a warning when the server listens on ``address`` beyond this
    machine, or None for a loopback address.

    An unset ``server.address`` makes Streamlit listen on every interface.
    """
    if address and is_loopback(address):
        return None
    where = f"address {address}" if address else "every network interface"
    return (
        f"This dashboard listens on {where}. Anyone who can open it can read and "
        "write folders on this machine and, through Import, run Python code "
        "here. Serve it with --server.address 127.0.0.1 and reach it from other "
        "machines through an SSH tunnel."
    )


#: Names of the kinds of file that are not folders, by their st_mode test.
_NON_FOLDER_KINDS = (
    (stat.S_ISREG, "a file"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_folder_problem(root: str) -> str | None:
    """Return why ``root`` cannot become a workspace folder, or None.

    The reasons are that ``root``, or the nearest existing path above it, is
    a file, a device or another kind of file that is not a folder, and that
    the path leads through a loop of symbolic links. Creating the folder may
    still fail where this returns None, as in a read-only location.
    """
    path = Path(root).expanduser()
    for candidate in (path, *path.parents):
        try:
            # stat() follows symbolic links, so a link to a folder is a folder.
            mode = candidate.stat().st_mode
        except OSError as error:
            if error.errno == errno.ELOOP:
                # Checked here because pathlib's resolve(), which Workspace
                # calls, raises RuntimeError on a loop (Python 3.11).
                return f"{root!r} leads through a loop of symbolic links"
            # Missing or not readable, so the path above decides.
            continue
        if stat.S_ISDIR(mode):
            return None
        kind = next(
            (name for test, name in _NON_FOLDER_KINDS if test(mode)), "a special file"
        )
        if candidate == path:
            return f"{root!r} is {kind}, not a folder"
        return (
            f"{root!r} cannot be created, because {str(candidate)!r} is {kind}, "
            "not a folder"
        )
    return None


#: Largest number of training or fine-tuning epochs the pages accept.
MAX_EPOCHS = 1000


#: Session-state keys of the sidebar: the folder that waits for the user to
#: create a workspace there, why the last entry in the box or the last
#: creation of a workspace failed, and whether the workspace is read-only.
_PENDING_WORKSPACE = "pending_workspace"
_BOX_ERROR = "workspace_box_error"
_READ_ONLY = "workspace_read_only"


def workspace_sidebar() -> None:
    """Show the workspace folder and the open run in the sidebar."""
    init_state()
    warning = network_warning(st.get_option("server.address"))
    if warning is not None:
        st.sidebar.warning(warning, icon=":material/warning:")
    key = "sidebar_workspace"
    # ``workspace_root`` is the folder in use, and the box only edits it, so the
    # box is refilled on every run: with the folder that the Create it prompt
    # is about while the prompt shows, else with the folder in use. Streamlit
    # drops the state of a widget that a run does not draw. It also sends a
    # value set in session state to the browser only in the run that sets it.
    st.session_state[key] = (
        st.session_state.get(_PENDING_WORKSPACE) or st.session_state["workspace_root"]
    )

    def change_workspace() -> None:
        root = st.session_state[key].strip()
        st.session_state.pop(_PENDING_WORKSPACE, None)
        st.session_state.pop(_BOX_ERROR, None)
        current = st.session_state["workspace_root"]
        # A rejected entry is reported under the box until the next entry.
        if not root:
            st.session_state[_BOX_ERROR] = (
                "The workspace folder cannot be empty, so the dashboard still "
                f"uses {current!r}."
            )
        elif root == current:
            return
        elif (problem := folder_path_problem(root)) is not None:
            st.session_state[_BOX_ERROR] = (
                f"{problem} The dashboard still uses {current!r}."
            )
        elif contains_workspace(root):
            missing = st.session_state.get(_URL_MISSING_WORKSPACE)
            use_workspace(root)
            if missing is not None and missing["ids"]:
                # The folder may be the new place of the address's workspace,
                # so the address's ids are opened there.
                st.session_state[_URL_PENDING] = missing["ids"]
        elif (lost := lost_records_message(root)) is not None:
            # Creating a workspace here would leave the runs without records.
            st.session_state[_BOX_ERROR] = (
                f"{lost} The dashboard still uses {current!r}."
            )
        elif (problem := not_a_folder_problem(root)) is not None:
            st.session_state[_BOX_ERROR] = (
                f"{problem}, so the dashboard still uses {current!r}. Enter a "
                "folder path."
            )
        else:
            # A mistyped path would otherwise become a new, empty workspace.
            st.session_state[_PENDING_WORKSPACE] = root

    def use_workspace(root: str) -> None:
        st.session_state.pop(_PENDING_WORKSPACE, None)
        st.session_state["workspace_root"] = root
        st.session_state[key] = root
        select_run(None, None)

    def create_workspace(root: str) -> None:
        st.session_state.pop(_PENDING_WORKSPACE, None)
        if not contains_workspace(root):
            # A workspace opened before at this path, whose database was since
            # deleted or moved, stays cached and would keep reporting the
            # missing database.
            open_workspace.clear(root)
        # The workspace is created before the switch, so a folder that cannot
        # take one leaves the folder in use, the open run and the address as
        # they were.
        try:
            open_workspace(root)
        except USER_ERRORS as error:
            current = st.session_state["workspace_root"]
            logger.warning("Creating a workspace in %r failed: %s", root, error)
            st.session_state[_BOX_ERROR] = (
                f"No workspace was created in {root!r}: "
                f"{dashboard_advice(str(error))} The dashboard still uses "
                f"{current!r}."
            )
            return
        use_workspace(root)

    with st.sidebar:
        st.text_input(
            "Workspace folder",
            key=key,
            on_change=change_workspace,
            help=f"Folder of the runs database. The default comes from the "
            f"{WORKSPACE_ENV} environment variable, else ./{DEFAULT_WORKSPACE}.",
        )
        box_error = st.session_state.get(_BOX_ERROR)
        if box_error:
            st.error(box_error)
        read_only_text = read_only_warning(st.session_state["workspace_root"])
        # The pages turn off every control that would save something.
        st.session_state[_READ_ONLY] = read_only_text is not None
        if read_only_text is not None:
            st.warning(read_only_text)
        missing = st.session_state.get(_URL_MISSING_WORKSPACE)
        if missing is not None:
            st.warning(missing["message"])
        pending = st.session_state.get(_PENDING_WORKSPACE)
        if pending:
            display, state = no_workspace_state(pending)
            st.warning(
                f"{display} {state}. Create a new, empty workspace there, or "
                "correct the path."
            )
            create, cancel = st.columns(2)
            create.button(
                "Create it",
                key="sidebar_workspace_create",
                on_click=create_workspace,
                args=(pending,),
            )
            cancel.button(
                "Cancel",
                key="sidebar_workspace_cancel",
                on_click=lambda: st.session_state.pop(_PENDING_WORKSPACE, None),
            )
        run_id = st.session_state["run_id"]
        st.caption(f"Run: `{run_id}`" if run_id else "No run open")
        failure_set_id = st.session_state["failure_set_id"]
        if failure_set_id:
            st.caption(f"Failure set F: `{failure_set_id}`")


def load_run(root: str, run_id: str) -> pipeline.LoadedRun:
    """Return the run, loaded once per process and state of its files.

    A change under the run's data folder or to the files of its run folder
    loads the run again, so that pipeline.load_run checks them anew. It
    raises DataError when the images differ from those the run was stored
    with, and WorkspaceError when the model file is missing.
    """
    ws = open_workspace(root)
    config = ws.get_run(run_id)["config"]
    stamp = data_stamp(config) + pipeline.run_files_stamp(ws, run_id)
    return _load_run_cached(root, run_id, stamp)


@st.cache_resource(show_spinner="Loading the run…", max_entries=4)
def _load_run_cached(root: str, run_id: str, stamp: str) -> pipeline.LoadedRun:
    """Load a run once per process and ``stamp`` of its files. Every session
    shares the read-only result.

    Identification and treatments never modify ``LoadedRun.model``, so the
    cached model can serve concurrent sessions.
    """
    return pipeline.load_run(open_workspace(root), run_id)


def data_stamp(config: dict[str, Any]) -> str:
    """Return a digest of the relative path, size and modification time of
    every file under the data folder of a run's ``config``.

    The digest reads directory entries only, never file contents. It is ""
    for the embedded data, which has no folder. It runs on every page run
    that opens the run: about 0.2 s for 30,000 files on a two-core machine.
    """
    root = config.get("root")
    if config.get("data") == "mnist-embedded" or not root:
        return ""
    top = Path(root).expanduser()
    files = []
    folders = [top]
    # Folder identities, so that a symbolic link to a parent folder is not
    # walked forever.
    seen: set[tuple[int, int]] = set()
    while folders:
        try:
            scan = os.scandir(folders.pop())
        except OSError:
            # Loading the data reports a missing or unreadable folder.
            continue
        with scan:
            for entry in scan:
                path = os.path.relpath(entry.path, top)
                try:
                    info = entry.stat()
                    is_folder = entry.is_dir()
                except OSError:
                    files.append((path, -1, -1))
                    continue
                if not is_folder:
                    files.append((path, info.st_size, info.st_mtime_ns))
                elif (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    folders.append(Path(entry.path))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(sorted(files)).encode())
    return digest.hexdigest()


def count_text(count: int, noun: str) -> str:
    """Return ``count`` with ``noun``, adding an "s" unless ``count`` is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def page_link(path: str, label: str) -> None:
    """Link to another page; nothing is drawn when the page runs on its own
    without st.navigation (as in a single-page AppTest)."""
    with contextlib.suppress(StreamlitAPIException):
        st.page_link(path, label=label, icon=":material/arrow_forward:")


def require_run() -> tuple[Workspace, pipeline.LoadedRun]:
    """Return the open run, or tell the user to open one on Setup and stop."""
    ws = workspace()
    run_id = st.session_state["run_id"]
    if run_id is None:
        warn_not_opened("run")
        st.info(
            "No run is open. Train a model, import one or open an earlier run "
            "on the **Setup** page first."
        )
        page_link("app_pages/setup.py", "Go to Setup")
        st.stop()
    try:
        loaded = load_run(str(ws.root), run_id)
    except USER_ERRORS as error:
        message = str(error)
        # A message that starts with the run's name does not need it twice.
        if not message.startswith(f"Run {run_id!r} "):
            message = f"Run {run_id!r} could not be loaded: {message}"
        st.error(message)
        if isinstance(error, DataError):
            relocate_form(ws, run_id)
        st.stop()
    if (relocated := st.session_state.pop(_RELOCATED, None)) is not None:
        st.success(relocated)
    return ws, loaded


#: Session-state key of the message about a run just pointed at a new folder.
_RELOCATED = "_relocated"


def relocate_form(ws: Workspace, run_id: str) -> None:
    """Offer to point a run whose data folder moved at the new folder."""
    config = ws.get_run(run_id)["config"]
    root = config.get("root")
    if not root or config.get("data") == "mnist-embedded":
        return
    missing = not Path(root).expanduser().is_dir()
    with st.expander("Data folder moved?", expanded=missing):
        st.caption(
            f"The run reads its data from `{root}`. If the same images now lie in "
            "another folder, give that folder: the run, its failure sets, rankings "
            "and repairs open from there once its images are checked to be the "
            "run's own."
        )
        new_root = st.text_input("New data folder", key="relocate_root")
        if st.button(
            "Point the run there",
            key="relocate_run",
            disabled=not new_root.strip(),
        ):
            moved = run_safely(
                "Pointing the run at the new folder",
                lambda: pipeline.relocate_run(ws, run_id, new_root.strip()),
            )
            if moved is not None:
                message = f"Run `{run_id}` now reads its data from `{moved['root']}`."
                others = [f"`{other}`" for other in moved["other_runs"]]
                if len(others) == 1:
                    message += (
                        f" Run {others[0]} still reads `{moved['old_root']}`; open "
                        "it to point it at the new folder too."
                    )
                elif others:
                    message += (
                        f" Runs {', '.join(others)} still read "
                        f"`{moved['old_root']}`; open each to point it at the new "
                        "folder too."
                    )
                st.session_state[_RELOCATED] = message
                st.rerun()


def require_failure_set(
    ws: Workspace, run: pipeline.LoadedRun
) -> tuple[str, FailureSplit]:
    """Return the chosen failure set F, or tell the user to choose one and stop."""
    failure_set_id = st.session_state["failure_set_id"]
    if failure_set_id is None:
        warn_not_opened("failure set")
        st.info(
            "No failure set F is chosen for this run. Pick the failures to explain "
            "on the **Failures** page first."
        )
        page_link("app_pages/failures.py", "Go to Failures")
        st.stop()
    try:
        split = pipeline.load_failure_split(ws, run.run_id, failure_set_id)
    except USER_ERRORS as error:
        st.error(f"Failure set {failure_set_id!r} could not be loaded: {error}")
        st.stop()
    return failure_set_id, split


def progress_reporter(label: str, drop_prefix: str = "") -> Progress:
    """Create a progress bar and return a (fraction, message) callback for it.

    The callback removes ``drop_prefix`` from the start of each message, such
    as a treatment name that the label already contains.
    """
    bar = st.progress(0.0, text=label)

    def report(fraction: float, message: str) -> None:
        if drop_prefix:
            message = message.removeprefix(drop_prefix)
        bar.progress(min(max(float(fraction), 0.0), 1.0), text=f"{label}: {message}")

    return report


def warn_if_no_holdout(failure_set_id: str, split: FailureSplit) -> None:
    """Show a warning when the failure set has no holdout failures F_h."""
    if len(split.holdout):
        return
    n_failures = len(split.failures)
    where = "its one failure is" if n_failures == 1 else f"all {n_failures} are"
    st.warning(
        f"Failure set {failure_set_id} has no holdout failures F_h: {where} in "
        "the query set F_q. So F_h accuracy is undefined (shown as —) and cannot "
        "show whether a repair fixes failures it was not ranked on. Create a "
        "failure set with a lower query share or more failures on the "
        "**Failures** page."
    )


# Cached arrays ---------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=8)
def predictions_on_test(root: str, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the stored model's test predictions and their softmax
    confidence, each shape (n_test,)."""
    run = load_run(root, run_id)
    probabilities = torch.softmax(run.test_logits, dim=1)
    confidence, predicted = probabilities.max(dim=1)
    return predicted.numpy(), confidence.numpy()


@st.cache_data(show_spinner="Predicting the training set…", max_entries=8)
def predictions_on_train(root: str, run_id: str) -> np.ndarray:
    """Return the stored model's predictions on its training set, shape (n_train,)."""
    run = load_run(root, run_id)
    return predict_logits(run.model, run.data.train.images).argmax(1).numpy()


@st.cache_data(show_spinner="Evaluating the repaired model…", max_entries=8)
def repaired_predictions(root: str, run_id: str, repair_id: str) -> np.ndarray:
    """Return the test predictions of a stored repaired model, shape (n_test,)."""
    run = load_run(root, run_id)
    model = pipeline.load_repaired_model(open_workspace(root), run, repair_id)
    return predict_logits(model, run.data.test.images).argmax(1).numpy()


def scores_file_stamp(root: str, scores_id: str) -> tuple[int, int]:
    """Return the size and modification time of a ranking's scores file, or
    (-1, -1) when it is missing, so that the caches below see a file that was
    deleted, replaced or restored."""
    ws = open_workspace(root)
    run_id = ws.get_scores(scores_id)["run_id"]
    try:
        info = ws.path(run_id, f"scores/{scores_id}.pt").stat()
    except OSError:
        return (-1, -1)
    return (info.st_size, info.st_mtime_ns)


def scores_file_missing(record: dict[str, Any]) -> bool:
    """Return whether the scores file of the ranking ``record`` is missing
    from the session's workspace."""
    ws = open_workspace(st.session_state["workspace_root"])
    return not ws.path(record["run_id"], f"scores/{record['id']}.pt").is_file()


def missing_scores_warning(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Warn about the rankings whose scores file is missing, and return the
    others, oldest first as given."""
    missing = [record for record in records if scores_file_missing(record)]
    if missing:
        names = ", ".join(
            f"`{record['id']}` ({record['method']})" for record in missing
        )
        st.warning(
            f"The scores file of {names} was moved or deleted from the workspace, "
            "so it is left out here. Restore the file from a backup, or run the "
            "method again on Causes."
        )
    return [record for record in records if record not in missing]


def stored_scores(root: str, scores_id: str) -> np.ndarray:
    """Return stored identification scores, float64, shape (n_train,).

    Raises WorkspaceError when the scores file is missing or unreadable.
    """
    return _stored_scores(root, scores_id, scores_file_stamp(root, scores_id))


@st.cache_data(show_spinner=False, max_entries=16)
def _stored_scores(root: str, scores_id: str, stamp: tuple[int, int]) -> np.ndarray:
    return pipeline.load_scores(open_workspace(root), scores_id).numpy()


def ranking_order(root: str, scores_id: str) -> np.ndarray:
    """Return training indices from most to least harmful for stored scores."""
    return _ranking_order(root, scores_id, scores_file_stamp(root, scores_id))


@st.cache_data(show_spinner=False, max_entries=16)
def _ranking_order(root: str, scores_id: str, stamp: tuple[int, int]) -> np.ndarray:
    return ranking(torch.as_tensor(_stored_scores(root, scores_id, stamp))).numpy()


@st.cache_data(show_spinner=False, max_entries=8)
def thumbnails(root: str, run_id: str, part: str) -> list[str]:
    """Encode every image of the training or test part as a PNG data URI.

    Runs once per run and part; pages index into the cached list.
    """
    run = load_run(root, run_id)
    images = run.data.train.images if part == "train" else run.data.test.images
    return [encode_png(image) for image in images]


def encode_png(image: torch.Tensor) -> str:
    """Encode one (C, H, W) image with values in [0, 1] as a PNG data URI."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        picture = Image.fromarray(array[:, :, 0], mode="L")
    else:
        picture = Image.fromarray(array[:, :, :3], mode="RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@torch.no_grad()
def _features(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    device = model_device(model)
    parts = []
    with eval_mode(model):
        for start in range(0, len(images), EMBED_BATCH_SIZE):
            batch = images[start : start + EMBED_BATCH_SIZE].to(device)
            parts.append(embed(model, batch).flatten(1).float().cpu())
    return torch.cat(parts).numpy()


# UMAP reports no progress, so the spinner states how long the wait can be.
@st.cache_data(
    show_spinner="Computing the UMAP map of every training and test image. The "
    "first map after a server start also compiles UMAP's code, which can take "
    "a minute or more on two CPU cores…",
    max_entries=4,
)
def umap_coordinates(root: str, run_id: str) -> dict[str, np.ndarray]:
    """Project the penultimate features of the training and test images to 2-D.

    One UMAP fit (umap-learn, seed 0, one thread) covers both parts, so
    training and test points share one map. The first fit in a process also
    compiles umap-learn's numba code: 75 s with umap-learn 0.5.12 on a
    heavily loaded two-core CPU. Returns {"train": (n_train, 2), "test":
    (n_test, 2)}.
    """
    import umap

    ws = open_workspace(root)
    if ws.path(run_id, MAP_FILE).is_file():
        with contextlib.suppress(RepairError):
            stored = ws.load_tensor(run_id, MAP_FILE)
            if isinstance(stored, dict) and set(stored) == {"train", "test"}:
                return {part: np.asarray(values) for part, values in stored.items()}
    run = load_run(root, run_id)
    train = _features(run.model, run.data.train.images)
    test = _features(run.model, run.data.test.images)
    features = np.concatenate([train, test])
    if len(features) < MIN_MAP_POINTS:
        raise RepairError(
            f"The run has {len(features)} images, but the map needs at least "
            f"{MIN_MAP_POINTS}. Use more training or test images."
        )
    # umap-learn optimises for 200 epochs above 10,000 points and 500 below.
    # 200 at every size keeps the map of a small run quick.
    reducer = umap.UMAP(n_components=2, n_epochs=200, random_state=0, n_jobs=1)
    coordinates = reducer.fit_transform(features)
    result = {"train": coordinates[: len(train)], "test": coordinates[len(train) :]}
    # Kept in the run folder for later sessions and servers. A workspace that
    # cannot be written to only loses that.
    with contextlib.suppress(RepairError):
        ws.save_tensor(run_id, MAP_FILE, result)
    return result


def map_coordinates(
    root: str, run_id: str, button_key: str
) -> dict[str, np.ndarray] | None:
    """Return the run's UMAP map once the user asked for it, else show a button.

    The map is computed on the first request and stored in the run folder,
    so later pages, sessions and servers reuse it without asking.
    """
    requested: set[str] = st.session_state["map_runs"]
    if (
        run_id not in requested
        and not open_workspace(root).path(run_id, MAP_FILE).is_file()
    ):
        # The caption and button are drawn in a placeholder, so that they can
        # be removed before the map is drawn in the same script run.
        request = st.empty()
        with request.container():
            st.caption(
                "The map projects the model's penultimate features with UMAP. It "
                "is computed once per run and kept in the run's folder."
            )
            clicked = st.button("Compute the UMAP map", key=button_key)
        if not clicked:
            return None
        request.empty()
        requested.add(run_id)
    try:
        return umap_coordinates(root, run_id)
    except (*USER_ERRORS, ImportError) as error:
        if isinstance(error, ImportError) and not is_missing_package(error):
            raise
        logger.warning("The map of run %s could not be computed: %s", run_id, error)
        st.error(f"The map could not be computed: {describe_error(error)}")
        requested.discard(run_id)
        return None


# Image grids -----------------------------------------------------------------


@dataclass
class Card:
    """One image of a grid with its caption lines and outline tone."""

    image: str
    """PNG data URI."""
    title: str
    lines: list[str] = dataclasses.field(default_factory=list)
    tone: str | None = None
    """Key of ``TONE_COLOURS``: bad, good, warn, info or None."""
    badge: str | None = None
    badge_tone: str | None = None
    """Key of ``TONE_COLOURS`` for the badge; None uses ``tone``."""


_GRID_STYLE = """
<style>
.repair-grid {display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(var(--cell), 1fr));}
.repair-card {border: 2px solid; border-radius: 8px; padding: 6px;
  font: 12px/1.35 sans-serif; text-align: center; overflow: hidden;}
.repair-card img {width: 100%; image-rendering: pixelated; border-radius: 4px;
  background: #000;}
.repair-card .title {font-weight: 600; margin-top: 3px;}
.repair-card .line {opacity: 0.8; overflow-wrap: anywhere;}
.repair-card .badge {display: inline-block; margin-top: 2px; padding: 0 6px;
  border-radius: 8px; color: #fff; font-size: 11px;}
</style>
"""


def card_html(card: Card) -> str:
    """Return the HTML of one grid card; text is escaped."""
    colour = TONE_COLOURS.get(card.tone, TONE_COLOURS[None])
    lines = "".join(
        f'<div class="line">{html.escape(line)}</div>' for line in card.lines
    )
    badge = ""
    if card.badge:
        badge_colour = TONE_COLOURS.get(card.badge_tone or card.tone, colour)
        badge = (
            f'<div class="badge" style="background:{badge_colour}">'
            f"{html.escape(card.badge)}</div>"
        )
    return (
        f'<div class="repair-card" style="border-color:{colour}">'
        f'<img src="{card.image}" alt="{html.escape(card.title)}">'
        f'<div class="title">{html.escape(card.title)}</div>{lines}{badge}</div>'
    )


def show_grid(cards: Iterable[Card], cell_px: int = 110) -> None:
    """Draw cards as one responsive HTML grid."""
    body = "".join(card_html(card) for card in cards)
    st.html(
        f'{_GRID_STYLE}<div class="repair-grid" style="--cell:{cell_px}px">{body}</div>'
    )


def show_card(card: Card) -> None:
    """Draw a single card, for grids built from st.columns."""
    st.html(f"{_GRID_STYLE}{card_html(card)}")


def page_window(total: int, page_size: int, key: str) -> slice | None:
    """Show a page selector when ``total`` items need more than one page and
    return the slice of the current page, or show an error and return None
    when the page number entered is out of range."""
    pages = max(1, -(-total // page_size))
    pages_key = f"_pages_{key}"
    if pages == 1:
        forget_widget_value(key)
        st.session_state.pop(pages_key, None)
        return slice(0, total)
    # When the list gets shorter, a page past its new end becomes the last
    # page. A number entered out of range for an unchanged list is an error.
    shrunk = st.session_state.get(pages_key, pages) > pages
    st.session_state[pages_key] = pages
    if shrunk:
        keep_widget_value(key)
        if st.session_state.get(key, 1) > pages:
            st.session_state[key] = pages
    left, right = st.columns([1, 4], vertical_alignment="bottom")
    page = number_field(
        f"Page (of {pages})",
        1,
        key=key,
        minimum=1,
        maximum=pages,
        name="Page",
        step=1,
        container=left,
        error_container=right,
    )
    if page is None:
        return None
    start = (page - 1) * page_size
    stop = min(start + page_size, total)
    right.caption(f"Showing {start + 1}–{stop} of {total}")
    return slice(start, stop)


# Figures ---------------------------------------------------------------------


def confusion_counts(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> np.ndarray:
    """Return the confusion matrix, rows = true class, columns = predicted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predictions, labels=list(range(num_classes)))


def confusion_figure(
    counts: np.ndarray,
    class_names: Sequence[str],
    *,
    failures_only: bool = False,
) -> go.Figure:
    """Draw a confusion matrix as a plotly heatmap.

    Plotly heatmaps emit no selection events in Streamlit (1.67), so an
    invisible marker sits on every cell, in row-major order, and a click on
    the cell selects it (see :func:`confusion_cell`). With ``failures_only``
    the diagonal and empty cells are blank.
    """
    names = [str(name) for name in class_names]
    values = counts.astype(float)
    if failures_only:
        np.fill_diagonal(values, np.nan)
        values[values == 0] = np.nan
    text = [
        ["" if np.isnan(v) or v == 0 else f"{v:.0f}" for v in row] for row in values
    ]
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            colorscale="Reds" if failures_only else "Blues",
            hoverinfo="skip",
            showscale=False,
        )
    )
    rows, columns = np.indices(values.shape)
    figure.add_trace(
        go.Scatter(
            x=[names[c] for c in columns.ravel()],
            y=[names[r] for r in rows.ravel()],
            mode="markers",
            marker={"size": 28, "symbol": "square", "opacity": 0.01},
            hovertemplate="true %{y} → predicted %{x}: %{text}<extra></extra>",
            text=[str(count) for count in counts.ravel()],
            showlegend=False,
        )
    )
    # Plotly thins category ticks to fit a narrow chart, so up to
    # LABELLED_CLASSES classes get a tick each.
    ticks: dict[str, Any] = {}
    if len(names) <= LABELLED_CLASSES:
        ticks = {"tickmode": "array", "tickvals": names, "ticktext": names}
    figure.update_layout(
        xaxis={
            "title": "predicted class",
            "type": "category",
            "side": "bottom",
            **ticks,
        },
        yaxis={
            "title": "true class",
            "type": "category",
            "autorange": "reversed",
            **ticks,
        },
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        height=max(320, 34 * len(names) + 80),
        clickmode="event+select",
        dragmode=False,
    )
    return figure


def confusion_cell(
    points: list[dict[str, Any]], num_classes: int
) -> tuple[int, int] | None:
    """Return (true, predicted) of the cell clicked in :func:`confusion_figure`,
    or None when no cell marker is selected."""
    for point in points:
        if point.get("curve_number") == 1 and "point_index" in point:
            return divmod(int(point["point_index"]), num_classes)
    return None


def scatter_class(n_points: int) -> type[go.Scatter] | type[go.Scattergl]:
    """Return SVG scatter for small maps and WebGL scatter for large ones."""
    return go.Scatter if n_points <= WEBGL_MIN_POINTS else go.Scattergl


def selected_points(event: Any) -> list[dict[str, Any]]:
    """Return the point dicts of a plotly chart selection event (may be empty)."""
    if not event:
        return []
    selection = event.get("selection") if isinstance(event, dict) else None
    if selection is None:
        selection = getattr(event, "selection", None)
    if not selection:
        return []
    points = selection.get("points") if isinstance(selection, dict) else None
    return list(points or getattr(selection, "points", []) or [])


def selected_in_traces(
    points: list[dict[str, Any]], traces: Sequence[np.ndarray], first_curve: int = 1
) -> np.ndarray:
    """Return the item of each selected point, where ``traces[i]`` contains
    the items (such as dataset indices) of plotly trace ``first_curve + i`` in
    point order. Points of other traces are skipped."""
    picked = []
    for point in points:
        trace = point.get("curve_number", -1) - first_curve
        if 0 <= trace < len(traces) and "point_index" in point:
            picked.append(int(traces[trace][int(point["point_index"])]))
    return np.array(picked, dtype=np.int64)


# Settings editors ------------------------------------------------------------


def _number_text(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def range_text(
    *,
    integer: bool,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> str:
    """Describe the allowed values of a number field, e.g. "a whole number
    from 1 to 10". ``above`` is an exclusive lower bound."""
    kind = "a whole number" if integer else "a number"
    if above is not None:
        text = f"{kind} greater than {_number_text(above)}"
        if maximum is not None:
            text += f" and at most {_number_text(maximum)}"
        return text
    if minimum is not None and maximum is not None:
        return f"{kind} from {_number_text(minimum)} to {_number_text(maximum)}"
    if minimum is not None:
        return f"{kind} of at least {_number_text(minimum)}"
    if maximum is not None:
        return f"{kind} of at most {_number_text(maximum)}"
    return kind


def _entry_text(number: float) -> str:
    """Return the text of an entry of a whole-number input: 2.5 stays 2.5, and
    a whole 3000.0 reads 3000."""
    if number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    return repr(number)


def _whole_number_input(
    container: Any, label: str, value: int, *, key: str, **options: Any
) -> float:
    """Draw a number input for a whole number and return the entry as typed.

    Streamlit 1.67 truncates an entry in an integer number input before the
    script receives it: the front end reads the text with parseInt, so 2.5
    becomes 2 and 1e3 becomes 1, and the server applies int(). This input takes
    floats, shown without decimals, so that the caller sees a fraction and can
    reject it.
    """
    options["step"] = float(options.get("step", 1))
    # Streamlit 1.67's front end formats %g with sprintf-js, which writes the
    # number's shortest text, so 3000 shows as 3000 and 2.5 as 2.5.
    options.setdefault("format", "%g")
    entry = container.number_input(label, value=float(value), key=key, **options)
    return float(entry)


def number_field(
    label: str,
    value: float,
    *,
    key: str,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    name: str | None = None,
    reason: str = "",
    container: Any = None,
    error_container: Any = None,
    **options: Any,
) -> Any:
    """Show a number input and return its value, or show an error and return
    None when the value is out of range or, for a whole-number field, has a
    fractional part.

    ``st.number_input`` with ``min_value`` or ``max_value`` does not send an
    out-of-range entry to the script (Streamlit 1.67): the box keeps the entry
    and the script goes on with the last valid value. So this input has no
    bounds, and the range is checked here, and callers disable their action
    while the value is None.

    The entry is kept for the session, across visits to other pages (see
    :func:`keep_widget_value`).

    Args:
        value: the initial value; an int makes a whole-number field, which
            returns an int (see :func:`_whole_number_input`).
        minimum, maximum: inclusive bounds; None for no bound.
        above: exclusive lower bound, as for a strength that must be positive.
        name: how the error names the field; the label by default.
        reason: a clause appended to the error, such as ", so that ...".
        container: where to draw, e.g. a column; the main area by default.
        error_container: where to show the error; ``container`` by default.
        options: further ``st.number_input`` arguments (help, format, step).
    """
    container = st if container is None else container
    integer = isinstance(value, int) and not isinstance(value, bool)
    keep_widget_value(key)
    allowed = range_text(integer=integer, minimum=minimum, maximum=maximum, above=above)
    if integer:
        number = _whole_number_input(container, label, value, key=key, **options)
        entry_text = _entry_text(number)
    else:
        number = float(container.number_input(label, value=value, key=key, **options))
        entry_text = _number_text(number)
    if integer and not number.is_integer():
        (error_container or container).error(
            f"{name or label} = {entry_text} is not a whole number. Enter "
            f"{allowed}{reason}."
        )
        return None
    too_low = (minimum is not None and number < minimum) or (
        above is not None and number <= above
    )
    too_high = maximum is not None and number > maximum
    if too_low or too_high:
        (error_container or container).error(
            f"{name or label} = {entry_text} is out of range. Enter {allowed}{reason}."
        )
        return None
    return int(number) if integer else number


def changed_settings(
    config: dict[str, Any], defaults: dict[str, Any], skip: Iterable[str] = ()
) -> list[str]:
    """Return "name value" for each setting in ``config`` that differs from
    ``defaults``, as listed by repair_core.identification.base.changed_settings
    (a group's settings under dotted names).
    """
    from repair_core.identification.base import changed_settings as changed

    return [
        f"{name.replace('_', ' ')} "
        f"{_number_text(value) if isinstance(value, float) else value}"
        for name, value in changed(config, defaults, skip)
    ]


def ranking_settings(record: dict[str, Any]) -> list[str]:
    """Return the settings of a stored ranking that differ from its method's
    defaults, so that two rankings by one method can be distinguished."""
    from repair_core.identification import default_config

    try:
        defaults = dataclasses.asdict(default_config(record["method"]))
    except USER_ERRORS:
        return []
    return changed_settings(record["config"], defaults)


def ranking_to_open(scores_id: str | None, records: Sequence[dict[str, Any]]) -> str:
    """Return the id of the ranking a page opens among ``records`` (oldest first).

    That is ``scores_id`` when it is one of them. Otherwise it is the newest
    ranking that is neither random nor the oracle, since those are references
    to compare with, not lists of suspects to review, and the newest ranking
    when all are references. Rankings whose scores file is missing count only
    when every file is.
    """
    ids = [record["id"] for record in records]
    if scores_id in ids:
        return scores_id
    # A ranking whose scores file is missing cannot be reviewed.
    present = [record for record in records if not scores_file_missing(record)]
    for record in reversed(present or records):
        if record["method"] not in REFERENCE_METHODS:
            return record["id"]
    return (present or records)[-1]["id"]


def ranking_label(record: dict[str, Any]) -> str:
    """Return "method · changed settings · id" for a ranking's choice box."""
    # NOTE: no mark for a missing scores file. A choice box whose option
    # labels change between runs loses its selection in Streamlit 1.67.
    return " · ".join([record["method"], *ranking_settings(record), record["id"]])


def parse_seed(label: str, text: str) -> int:
    """Read the seed typed into the field ``label``.

    Raises ConfigError unless the text is a whole number from 0 to MAX_SEED,
    the range the command line takes. Seeds are typed as text because
    Streamlit 1.67 gives an integer number input a max_value of 2**53 - 1 when
    none is set. Its front end drops a larger entry before the script receives
    it, so a job would run with the last valid seed instead.
    """
    text = text.strip()
    allowed = range_text(integer=True, minimum=0, maximum=MAX_SEED)
    short_text = text if len(text) <= 40 else f"{text[:20]}…{text[-10:]}"
    if not text:
        raise ConfigError(f"{label} is empty. Enter {allowed}.")
    # ASCII digits only: int() also reads "1_000" and other scripts' digits.
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ConfigError(
            f"{label} {short_text!r} is not a whole number. Enter {allowed}."
        )
    # int() rejects more than 4300 digits, and every seed has at most 19.
    digits = text.lstrip("+-").lstrip("0")
    if len(digits) > len(str(MAX_SEED)) or not 0 <= int(text) <= MAX_SEED:
        raise ConfigError(f"{label} = {short_text} is out of range. Enter {allowed}.")
    return int(text)


def seed_field(
    label: str, key: str, value: int = 0, container: Any = None, **options: Any
) -> int | None:
    """Show a text box for a seed and return the seed, or show an error and
    return None when :func:`parse_seed` rejects the entry.

    The entry is kept for the session, as number fields keep theirs.
    """
    container = st if container is None else container
    keep_widget_value(key)
    text = container.text_input(label, value=str(value), key=key, **options)
    try:
        return parse_seed(label, text)
    except ConfigError as error:
        container.error(str(error))
        return None


def settings_editor(
    config: Any, key_prefix: str, skip: Sequence[str | None] = ()
) -> Any:
    """Edit the numeric, boolean and text fields of a settings dataclass.

    A field named ``seed`` is typed as text and read by :func:`parse_seed`; a
    text field with ``choices`` in its metadata is picked from a list.

    Fields named in ``skip`` keep their value. Nested settings dataclasses are
    edited recursively. Entries are kept for the session, across visits to
    other pages. Returns a new instance
    built with ``dataclasses.replace``, which runs the class's own checks and
    may raise RepairError. An invalid seed or a fraction in a whole-number
    field raises ConfigError naming the first such field.
    """
    values: dict[str, Any] = {}
    # The first invalid entry is raised after the loop, so the fields after
    # it are still drawn.
    entry_error: ConfigError | None = None
    # A config with a seed runs its nested steps with that seed.
    names = [item.name for item in dataclasses.fields(config)]
    nested_skip = ("seed",) if "seed" in names else ()
    for item in dataclasses.fields(config):
        if item.name in skip:
            continue
        value = getattr(config, item.name)
        key = f"{key_prefix}_{item.name}"
        help_text = item.metadata.get("help")
        label = item.name.replace("_", " ")
        if dataclasses.is_dataclass(value):
            st.markdown(f"**{label}**")
            try:
                values[item.name] = settings_editor(value, key, skip=nested_skip)
            except ConfigError as error:
                entry_error = entry_error or error
            continue
        keep_widget_value(key)
        if isinstance(value, bool):
            values[item.name] = st.checkbox(label, value=value, key=key, help=help_text)
        elif item.name == "seed":
            text = st.text_input(label, value=str(value), key=key, help=help_text)
            try:
                values[item.name] = parse_seed(label, text)
            except ConfigError as error:
                entry_error = entry_error or error
        elif isinstance(value, int):
            entry = _whole_number_input(st, label, value, key=key, help=help_text)
            if entry.is_integer():
                values[item.name] = int(entry)
            else:
                entry_error = entry_error or ConfigError(
                    f"{label} = {_entry_text(entry)} is not a whole number. "
                    "Enter a whole number."
                )
        elif isinstance(value, float):
            values[item.name] = float(
                st.number_input(
                    label, value=value, format="%g", key=key, help=help_text
                )
            )
        elif isinstance(value, str) and item.metadata.get("choices"):
            choices = list(item.metadata["choices"])
            values[item.name] = st.selectbox(
                label,
                choices,
                index=choices.index(value) if value in choices else 0,
                key=key,
                help=help_text,
            )
        elif isinstance(value, str):
            # Spaces around a typed word are not part of the setting.
            values[item.name] = st.text_input(
                label, value=value, key=key, help=help_text
            ).strip()
    if entry_error is not None:
        raise entry_error
    try:
        return dataclasses.replace(config, **values)
    except ConfigError as error:
        # The class's checks name settings as the command line spells them,
        # and the form labels them with spaces.
        message = str(error)
        for name in names:
            if "_" in name:
                message = re.sub(rf"\b{name}\b", name.replace("_", " "), message)
        raise ConfigError(message) from error


#: Prefix of the session-state keys that record, per settings form, the record
#: whose settings the form was last filled with and the entries it got.
_SETTINGS_SOURCE_PREFIX = "_settings_source_"


def _settings_entries(
    config: Any, key_prefix: str, skip: Sequence[str | None] = ()
) -> dict[str, Any]:
    """Map each widget key of ``settings_editor(config, key_prefix, skip)`` to
    the widget value that shows ``config``."""
    entries: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        if item.name in skip:
            continue
        value = getattr(config, item.name)
        key = f"{key_prefix}_{item.name}"
        if dataclasses.is_dataclass(value):
            entries.update(_settings_entries(value, key))
        elif isinstance(value, bool):
            entries[key] = value
        elif item.name == "seed":
            entries[key] = str(value)
        elif isinstance(value, int):
            entries[key] = float(value)
        elif isinstance(value, float | str):
            entries[key] = value
    return entries


def fill_settings_form(
    config: Any,
    key_prefix: str,
    source_id: str | None,
    skip: Sequence[str | None] = (),
) -> None:
    """Fill the form of :func:`settings_editor` with ``config``, the settings
    of the stored record ``source_id``, unless the user changed an entry.

    Call it just before ``settings_editor(config, key_prefix, skip)``. A form
    without entries in this session shows ``config`` through the widgets'
    initial values. When ``source_id`` differs from the record of the last
    call, the entries are replaced by ``config`` only if they still show that
    record's settings, so entries the user changed are kept. A ``source_id``
    of None means default settings, which replace no entries.
    """
    marker = _SETTINGS_SOURCE_PREFIX + key_prefix
    previous = st.session_state.get(marker)
    if previous is not None and source_id in (None, previous["source_id"]):
        return
    entries = _settings_entries(config, key_prefix, skip)
    st.session_state[marker] = {"source_id": source_id, "entries": entries}
    if previous is None:
        return
    for key, filled in previous["entries"].items():
        entry = st.session_state.get(key, st.session_state.get(_KEPT_PREFIX + key))
        if entry is not None and entry != filled:
            return
    for key, value in entries.items():
        st.session_state[key] = value
        st.session_state[_KEPT_PREFIX + key] = value


# Long jobs ------------------------------------------------------------------

#: Caption beside the buttons that start a long job. Any widget change or page
#: switch makes Streamlit stop the script run at its next Streamlit call, and
#: so does a reload or close of the tab, which ends the browser session. The
#: pipeline stores a record only when the job completes.
LONG_JOB_CAPTION = (
    "Leaving this page, reloading or closing the browser tab, or changing any "
    "setting while the job runs stops it, and nothing of it is kept."
)
_JOB_PREFIX = "_job_running_"
#: Actions that :func:`run_safely` reported as failed inside the current long
#: job, or None outside one. A context variable is enough, because Streamlit
#: runs each script run in one thread.
_job_failures: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "job_failures", default=None
)


def _job_ids() -> str:
    """Return the open run and failure set for a log message, such as
    "run r-1, failure set fs-1"."""
    parts = []
    for key, noun in (("run_id", "run"), ("failure_set_id", "failure set")):
        value = st.session_state.get(key)
        if value:
            parts.append(f"{noun} {value}")
    return ", ".join(parts) or "no run open"


@dataclass
class JobSubject:
    """The subject of a long job as its log lines name it in brackets, such
    as "run r-1, failure set fs-1" or "new run run-2"."""

    text: str


@contextlib.contextmanager
def long_job(page: str, name: str, subject: str | None = None) -> Iterator[JobSubject]:
    """Mark the job ``name`` of ``page`` as running while the block runs, and
    log its start and its end: finished, failed or stopped.

    The log lines name ``subject``, by default the open run and failure set.
    A job that makes a new run passes a description of it instead, and can
    set the yielded JobSubject's ``text`` to the new run's id once it is
    known, so that the end line names it.

    A stopped script run raises Streamlit's rerun or stop exception inside the
    block, so the mark is cleared only when the block ends without an
    exception and stays after an interrupted job, for
    :func:`show_interrupted_job`. Call ``st.rerun`` after the block, not in it,
    or the job is logged as stopped.

    NOTE: session-state access is also a point where Streamlit stops a run. A
    stop requested after the job's last progress update can therefore hit the
    clearing of the mark, after the job stored its result, and the page then
    wrongly reports that nothing was stored.
    """
    st.session_state[_JOB_PREFIX + page] = name
    job = JobSubject(subject or _job_ids())
    logger.info("Started %s on the %s page (%s).", name, page, job.text)
    started = time.monotonic()
    failures: list[str] = []
    token = _job_failures.set(failures)
    try:
        yield job
    except (RerunException, StopException):
        seconds = time.monotonic() - started
        logger.warning(
            "Stopped %s after %.1f s (%s) before it finished, as on a page "
            "switch, a changed setting or a closed tab. Nothing of it was stored.",
            name,
            seconds,
            job.text,
        )
        raise
    except Exception:
        seconds = time.monotonic() - started
        logger.exception("%s failed after %.1f s (%s).", name, seconds, job.text)
        raise
    finally:
        _job_failures.reset(token)
    seconds = time.monotonic() - started
    if failures:
        message = "%s failed after %.1f s (%s): %s failed."
        logger.warning(message, name, seconds, job.text, ", ".join(failures))
    else:
        logger.info("Finished %s in %.1f s (%s).", name, seconds, job.text)
    st.session_state.pop(_JOB_PREFIX + page, None)


def show_interrupted_job(page: str) -> None:
    """Show once that the last long job of ``page`` did not finish."""
    name = st.session_state.pop(_JOB_PREFIX + page, None)
    if name:
        st.warning(
            f"The last {name} was stopped before it finished, so nothing of it "
            "was stored."
        )


def describe_error(error: Exception) -> str:
    """Return a one-line message for an error shown with ``st.error``."""
    if isinstance(error, FloatingPointError):
        return f"The computation produced non-finite values: {error}"
    if isinstance(error, ImportError):
        return f"{error}. Install it with pip install -r requirements.txt"
    return dashboard_advice(str(error))


def is_missing_package(error: ImportError) -> bool:
    """Return whether an ImportError comes from a third-party package, such as
    the optional cleanlab, captum or umap-learn, and not from this project."""
    module = error.name or ""
    return not (module == "repair_core" or module.startswith("repair_core."))


#: Format of the repair_core log lines that the dashboard's server prints.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Send the log records of repair_core at INFO and above to standard error
    with their time and level, unless the root or the repair_core logger has
    a handler already.

    Streamlit gives handlers to its own loggers only, so without this the
    records reach Python's last-resort handler, which prints WARNING and
    above as bare messages. Calling it again adds no second handler.
    """
    package = logging.getLogger("repair_core")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    formatter = logging.Formatter(LOG_FORMAT)
    # Milliseconds after a dot, as in Streamlit's own log lines.
    formatter.default_msec_format = "%s.%03d"
    handler.setFormatter(formatter)
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def run_safely(action: str, function: Callable[[], Any]) -> Any:
    """Call ``function``; show a user error with ``st.error``, log it in the
    server's output and return None.

    A third-party package that cannot be imported counts as a user error too,
    and the message gives the install command. An ImportError of this
    project's own modules is raised.
    """
    try:
        return function()
    except (*USER_ERRORS, ImportError) as error:
        if isinstance(error, ImportError) and not is_missing_package(error):
            raise
        logger.warning("%s failed: %s", action, error)
        failures = _job_failures.get()
        if failures is not None:
            failures.append(action)
        st.error(f"{action} failed: {describe_error(error)}")
        return None
