"""Setup-page safety: the network warning and a workspace database that is
deleted while the dashboard has it open."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit import config as streamlit_config
from streamlit.testing.v1 import AppTest

from repair_core import dashboard
from repair_core.errors import WorkspaceError
from repair_core.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost", "::1"])
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
