"""Setup-page safety: the network warning, a workspace database that is
deleted while the dashboard has it open, seed entries, fractions in
whole-number fields, data-size errors and the log lines of training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from streamlit import config as streamlit_config
from streamlit.testing.v1 import AppTest

from repair_core import dashboard
from repair_core.data import EMBEDDED_SIZES
from repair_core.errors import WorkspaceError
from repair_core.workspace import Workspace
from tests import test_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", " ::1 "]
)
def test_network_warning_quiet_on_loopback(address):
    assert dashboard.network_warning(address) is None


@pytest.mark.parametrize(
    ("address", "where"),
    [(None, "every network interface"), ("0.0.0.0", "address 0.0.0.0")],
)
def test_network_warning_names_address(address, where):
    warning = dashboard.network_warning(address)

    assert warning is not None
    assert warning.startswith(f"This dashboard listens on {where}.")
    assert "--server.address 127.0.0.1" in warning


@pytest.fixture
def public_address():
    """Serve on every interface for one test, as Streamlit does by default."""
    saved = streamlit_config.get_option("server.address")
    streamlit_config.set_option("server.address", "0.0.0.0")
    yield
    streamlit_config.set_option("server.address", saved)


def test_sidebar_warns_on_public_address(tmp_path, monkeypatch, public_address):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()

    assert not app.exception
    warnings = [warning.value for warning in app.sidebar.warning]
    assert len(warnings) == 1
    assert warnings[0].startswith("This dashboard listens on address 0.0.0.0.")


def test_sidebar_quiet_on_project_config(tmp_path, monkeypatch):
    # pytest runs from the repository root, whose .streamlit/config.toml binds
    # the server to 127.0.0.1.
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()

    assert not app.exception
    assert [warning.value for warning in app.sidebar.warning] == []


def test_workspace_database_deleted_is_reported(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.database_path.unlink()

    with pytest.raises(WorkspaceError, match="is missing: it was deleted or moved"):
        workspace.list_runs()
    assert not workspace.database_path.exists()


def test_setup_database_deleted_shows_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    Workspace(tmp_path)
    (tmp_path / "runs" / "run-0123abcd").mkdir(parents=True)
    app = AppTest.from_file(
        str(ROOT / "app_pages" / "setup.py"), default_timeout=60
    ).run()
    assert not app.exception
    assert not app.error

    database = tmp_path / "repair.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    app.run()

    assert not app.exception, [e.value for e in app.exception]
    errors = [error.value for error in app.error]
    assert len(errors) == 1
    assert "its database repair.sqlite is missing" in errors[0]
    assert "--workspace" not in errors[0]
    assert not database.exists()


# Seeds and data sizes ---------------------------------------------------------

#: Largest seed the command line accepts.
MAX_SEED = 2**63 - 1

# Fixtures of tests/test_app.py, bound here so that pytest finds them.
prepared = test_app.prepared
workspace_env = test_app.workspace_env


def setup_page(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path))
    return AppTest.from_file(
        str(ROOT / "app_pages" / "setup.py"), default_timeout=300
    ).run()


def test_train_tab_states_what_train_does(tmp_path, monkeypatch):
    app = setup_page(tmp_path, monkeypatch)
    captions = [caption.value for caption in app.caption]
    assert (
        "Trains mnist-cnn on every training image of mnist-embedded, with the "
        "label-flip noise, for at most 100 epochs at learning rate 0.001. Advanced "
        "changes these."
    ) in captions

    app.number_input(key="setup_n_train").set_value(600)
    app.number_input(key="setup_epochs").set_value(15)
    app.selectbox(key="setup_scenario").set_value("none").run()
    captions = [caption.value for caption in app.caption]
    assert (
        "Trains mnist-cnn on 600 training images of mnist-embedded, without noise, "
        "for at most 15 epochs at learning rate 0.001. Advanced changes these."
    ) in captions


@pytest.mark.parametrize(
    ("key", "label"), [("setup_seed", "Seed"), ("setup_ds", "Data split seed")]
)
@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("-1", "= -1 is out of range"),
        (str(MAX_SEED + 1), f"= {MAX_SEED + 1} is out of range"),
        ("1.5", "'1.5' is not a whole number"),
        ("", "is empty"),
        ("  ", "is empty"),
    ],
)
def test_invalid_seed_blocks_train(tmp_path, monkeypatch, key, label, entry, expected):
    app = setup_page(tmp_path, monkeypatch)
    assert not app.button(key="setup_train").disabled
    app.text_input(key=key).set_value(entry).run()

    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == [f"{label} {expected}. Enter a whole number from 0 to {MAX_SEED}."]
    assert app.button(key="setup_train").disabled
    assert app.button(key="setup_import").disabled
    assert "invalid or out of range" in app.warning[0].value


def test_train_keeps_seeds_above_float_range(tmp_path, monkeypatch):
    # 2**53 + 1 is the smallest integer that a float64, and so the front end
    # of a number input, cannot hold.
    app = setup_page(tmp_path, monkeypatch)
    app.text_input(key="setup_seed").set_value(f" {2**53 + 1} ")
    app.text_input(key="setup_ds").set_value(str(MAX_SEED))
    app.number_input(key="setup_n_train").set_value(200)
    app.number_input(key="setup_n_test").set_value(100)
    app.number_input(key="setup_epochs").set_value(1)
    app.button(key="setup_train").click().run()

    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    (run,) = Workspace(tmp_path).list_runs()
    assert run["config"]["seed"] == 2**53 + 1
    assert run["config"]["train"]["seed"] == 2**53 + 1
    assert run["config"]["data_seed"] == MAX_SEED


def test_seed_survives_page_switch(workspace_env):
    # A page that stops early keeps the widget states of the page before, so
    # the switch goes to the Failures page of an open run.
    app = test_app.opened_app(workspace_env)
    app.text_input(key="setup_seed").set_value(str(MAX_SEED))
    app.text_input(key="setup_ds").set_value("17").run()

    test_app.open_page(app, "failures")
    assert "setup_seed" not in app.session_state
    test_app.open_page(app, "setup")

    assert app.text_input(key="setup_seed").value == str(MAX_SEED)
    assert app.text_input(key="setup_ds").value == "17"


@pytest.mark.parametrize(
    ("key", "label", "available"),
    [
        ("setup_n_train", "Training images (0 = all)", 3000),
        ("setup_n_test", "Test images (0 = all)", 2000),
    ],
)
def test_too_many_images_names_field(tmp_path, monkeypatch, key, label, available):
    # The embedded subset's size is known, so the entry is named before Train.
    app = setup_page(tmp_path, monkeypatch)
    app.number_input(key=key).set_value(100000).run()

    assert not app.exception
    errors = [error.value for error in app.error]
    name = label.removesuffix(" (0 = all)")
    assert errors == [
        f"{name} = 100000 is out of range. Enter a whole number from 0 to "
        f"{available}, the size of the embedded MNIST subset."
    ]
    assert app.button(key="setup_train").disabled
    assert Workspace(tmp_path).list_runs() == []

    # Loading names the field in the form's words when the count is found
    # too large only then, as for a torchvision folder.
    monkeypatch.setitem(EMBEDDED_SIZES, key.removeprefix("setup_"), 10**6)
    app.run()
    app.button(key="setup_train").click().run()
    errors = [error.value for error in app.error]
    assert len(errors) == 1
    assert errors[0].startswith(f"Training failed: “{label}” is 100000 but ")
    assert errors[0].endswith(f"Set “{label}” under Advanced to at most {available}.")
    assert "--n-" not in errors[0]
    assert "n_train" not in errors[0]
    assert "n_test" not in errors[0]
    assert Workspace(tmp_path).list_runs() == []


@pytest.mark.parametrize(
    ("key", "name", "allowed"),
    [
        (
            "setup_n_train",
            "Training images",
            "a whole number from 0 to 3000, the size of the embedded MNIST subset",
        ),
        ("setup_epochs", "Max epochs", "a whole number from 1 to 1000"),
        ("setup_patience", "Early-stopping patience", "a whole number from 1 to 100"),
    ],
)
def test_fraction_in_whole_number_blocks_train(
    tmp_path, monkeypatch, key, name, allowed
):
    app = setup_page(tmp_path, monkeypatch)
    app.number_input(key=key).set_value(2.5).run()

    assert not app.exception
    errors = [error.value for error in app.error]
    assert errors == [f"{name} = 2.5 is not a whole number. Enter {allowed}."]
    # The box keeps the entry as typed.
    assert app.number_input(key=key).value == 2.5
    assert app.button(key="setup_train").disabled
    assert app.button(key="setup_import").disabled
    assert "invalid or out of range" in app.warning[0].value

    app.number_input(key=key).set_value(3).run()
    assert not app.exception
    assert not app.error, [error.value for error in app.error]
    assert not app.button(key="setup_train").disabled


def test_fraction_in_data_size_kept_across_pages(workspace_env):
    app = test_app.opened_app(workspace_env)
    app.number_input(key="setup_n_test").set_value(150.5).run()
    assert [error.value for error in app.error] == [
        "Test images = 150.5 is not a whole number. Enter a whole number from 0 "
        "to 2000, the size of the embedded MNIST subset."
    ]

    test_app.open_page(app, "failures")
    app.switch_page("app_pages/setup.py").run()

    assert not app.exception
    assert app.number_input(key="setup_n_test").value == 150.5
    assert len(app.error) == 1
    assert app.button(key="setup_train").disabled


def lost_database_folder(root: Path) -> Path:
    """Make ``root`` a workspace with one run folder, then delete its database."""
    Workspace(root)
    (root / "runs" / "run-0123abcd").mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'repair.sqlite'}{suffix}").unlink(missing_ok=True)
    return root


def test_url_names_lost_database(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path / "current"))
    lost = lost_database_folder(tmp_path / "lost")
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.query_params["workspace"] = str(lost)
    app.run()

    # The address keeps naming the folder, so its ids would not be looked up
    # in another workspace, and the page says why the folder cannot be used.
    assert not app.exception
    assert not app.toast
    errors = [error.value for error in app.error]
    assert len(errors) == 1
    assert "its database repair.sqlite is missing" in errors[0]
    assert app.session_state["workspace_root"] == str(lost)
    assert app.query_params["workspace"] == str(lost)
    assert not (lost / "repair.sqlite").exists()


def test_sidebar_offers_no_create_over_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_WORKSPACE", str(tmp_path / "current"))
    lost = lost_database_folder(tmp_path / "lost")
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()

    app.sidebar.text_input(key="sidebar_workspace").set_value(str(lost)).run()

    assert not app.exception
    errors = [error.value for error in app.sidebar.error]
    assert len(errors) == 1
    assert "its database repair.sqlite is missing" in errors[0]
    assert errors[0].endswith(
        f"The dashboard still uses {str(tmp_path / 'current')!r}."
    )
    buttons = [button.key for button in app.sidebar.button]
    assert "sidebar_workspace_create" not in buttons
    assert app.session_state["workspace_root"] == str(tmp_path / "current")
    assert not (lost / "repair.sqlite").exists()


# Job log ------------------------------------------------------------------------


def dashboard_log(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "repair_core.dashboard"
    ]


def test_training_log_names_new_run(workspace_env, tmp_path, monkeypatch, caplog):
    test_app.copied_workspace(workspace_env, tmp_path / "ws", monkeypatch)
    app = AppTest.from_file(str(ROOT / "app_pages" / "setup.py"), default_timeout=300)
    for key, value in test_app.open_run_state(workspace_env).items():
        app.session_state[key] = value
    app.run()
    app.number_input(key="setup_n_train").set_value(200)
    app.number_input(key="setup_n_test").set_value(100)
    app.number_input(key="setup_epochs").set_value(1)
    with caplog.at_level(logging.INFO, logger="repair_core.dashboard"):
        app.button(key="setup_train").click().run()

    assert not app.exception, [e.value for e in app.exception]
    new_run = app.session_state["run_id"]
    assert new_run != workspace_env.run_id
    logged = dashboard_log(caplog)
    started = [m for m in logged if m.startswith("Started training")]
    finished = [m for m in logged if m.startswith("Finished training")]
    assert started == [
        "Started training on the setup page (new run: data mnist-embedded, 200 "
        "training images, 100 test images, scenario label-flip, model mnist-cnn, "
        "seed 0)."
    ]
    assert len(finished) == 1
    assert finished[0].endswith(f" s (new run {new_run}).")
    # The run open on the page is not the one being trained.
    for message in started + finished:
        assert workspace_env.run_id not in message
        assert workspace_env.failure_set_id not in message


def test_failed_training_log_names_settings(workspace_env, caplog, monkeypatch):
    # The page would name the count before Train; loading names it too.
    monkeypatch.setitem(EMBEDDED_SIZES, "n_train", 10**6)
    app = test_app.opened_app(workspace_env)
    app.number_input(key="setup_n_train").set_value(100000)
    with caplog.at_level(logging.INFO, logger="repair_core.dashboard"):
        app.button(key="setup_train").click().run()

    assert not app.exception
    failed = [m for m in dashboard_log(caplog) if m.startswith("training failed")]
    assert len(failed) == 1
    assert "(new run: data mnist-embedded, 100000 training images," in failed[0]
    assert workspace_env.run_id not in failed[0]
    assert app.session_state["run_id"] == workspace_env.run_id
