"""The workspace store: round trips, schema version and crash safety."""

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repair_core.errors import WorkspaceError
from repair_core.workspace import SCHEMA_VERSION, Workspace, atomic_save_arrays


def test_records_round_trip(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.add_run("run-a", "train", {"data": "x", "seed": 3}, {"acc": 0.9})
    workspace.add_failure_set("fs-a", "run-a", {"seed": 0}, {"n_query": 4})
    workspace.add_scores("sc-a", "run-a", "fs-a", "random", {"seed": 1}, {"s": 2.0})
    workspace.add_repair("rp-a", "run-a", "fs-a", "sc-a", "finetune", {}, {"g": 1})

    reopened = Workspace(tmp_path / "ws")

    assert reopened.get_run("run-a")["config"] == {"data": "x", "seed": 3}
    assert reopened.get_run("run-a")["metrics"] == {"acc": 0.9}
    assert [r["id"] for r in reopened.list_failure_sets("run-a")] == ["fs-a"]
    assert reopened.get_scores("sc-a")["method"] == "random"
    assert reopened.get_repair("rp-a")["scores_id"] == "sc-a"
    assert reopened.schema_version == SCHEMA_VERSION


POINTS = [
    {"strength": 0.01, "holdout_acc": 0.5, "remaining_acc": 0.9},
    {"strength": 0.05, "holdout_acc": 0.75, "remaining_acc": 0.8},
]
CURVE = [{"k": 10, "mean": {"holdout_acc": 0.5}, "std": {"holdout_acc": 0.0}}]


def _add_sweep(workspace, sweep_id, failure_set_id="fs-a"):
    workspace.add_sweep(
        sweep_id,
        "run-a",
        failure_set_id,
        "newton",
        "top 20 of sc-a",
        20,
        [0.01, 0.05],
        {"gamma": 0.01},
        POINTS,
        device="cpu",
    )


def _workspace_with_records(root):
    workspace = Workspace(root)
    workspace.add_run("run-a", "train", {}, {})
    workspace.add_failure_set("fs-a", "run-a", {}, {})
    workspace.add_failure_set("fs-b", "run-a", {}, {})
    workspace.add_scores("sc-a", "run-a", "fs-a", "random", {}, {})
    return workspace


def test_sweep_round_trip_after_reopen(tmp_path):
    workspace = _workspace_with_records(tmp_path)
    _add_sweep(workspace, "sw-a")
    _add_sweep(workspace, "sw-b")
    _add_sweep(workspace, "sw-c", failure_set_id="fs-b")

    reopened = Workspace(tmp_path)
    record = reopened.get_sweep("sw-a")

    assert record["run_id"] == "run-a"
    assert record["failure_set_id"] == "fs-a"
    assert record["treatment"] == "newton"
    assert record["causes"] == "top 20 of sc-a"
    assert record["n_removed"] == 20
    assert record["strengths"] == [0.01, 0.05]
    assert record["config"] == {"gamma": 0.01}
    assert record["points"] == POINTS
    assert record["device"] == "cpu"
    assert record["created_at"]
    listed = reopened.list_sweeps("run-a", failure_set_id="fs-a")
    assert [r["id"] for r in listed] == ["sw-a", "sw-b"]
    assert [r["id"] for r in reopened.list_sweeps("run-a")] == ["sw-a", "sw-b", "sw-c"]
    assert reopened.list_sweeps("run-other") == []


def test_removal_curve_round_trip_after_reopen(tmp_path):
    workspace = _workspace_with_records(tmp_path)
    workspace.add_removal_curve(
        "rc-a", "run-a", "fs-a", "sc-a", [10, 900], [0], CURVE, skipped_ks=[3000]
    )

    reopened = Workspace(tmp_path)
    record = reopened.get_removal_curve("rc-a")

    assert record["run_id"] == "run-a"
    assert record["failure_set_id"] == "fs-a"
    assert record["scores_id"] == "sc-a"
    assert record["ks"] == [10, 900]
    assert record["seeds"] == [0]
    assert record["points"] == CURVE
    assert record["skipped_ks"] == [3000]
    assert record["device"] == ""
    listed = reopened.list_removal_curves("run-a", failure_set_id="fs-a")
    assert [r["id"] for r in listed] == ["rc-a"]
    assert reopened.list_removal_curves("run-a", failure_set_id="fs-b") == []


def test_opening_adds_later_columns_to_older_tables(tmp_path):
    # The sweeps and removal_curves tables as first released, with one record
    # each.
    root = tmp_path / "ws"
    _workspace_with_records(root)
    connection = sqlite3.connect(root / "repair.sqlite")
    with connection:
        for table, columns in (
            ("sweeps", ["device"]),
            ("removal_curves", ["skipped_ks", "device"]),
        ):
            for column in columns:
                connection.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        connection.execute(
            "INSERT INTO sweeps (id, run_id, failure_set_id, treatment, causes, "
            "n_removed, strengths, created_at, config, points) VALUES "
            "('sw-old', 'run-a', 'fs-a', 'newton', 'top 20', 20, '[1.0]', 'now', "
            "'{}', '[]')"
        )
        connection.execute(
            "INSERT INTO removal_curves (id, run_id, failure_set_id, scores_id, ks, "
            "seeds, created_at, points) VALUES ('rc-old', 'run-a', 'fs-a', 'sc-a', "
            "'[10]', '[0]', 'now', '[]')"
        )
    connection.close()

    reopened = Workspace(root)

    assert reopened.get_sweep("sw-old")["device"] == ""
    old_curve = reopened.get_removal_curve("rc-old")
    assert old_curve["skipped_ks"] == []
    assert old_curve["device"] == ""
    reopened.add_removal_curve(
        "rc-new", "run-a", "fs-a", "sc-a", [10], [0], CURVE, skipped_ks=[5000]
    )
    assert Workspace(root).get_removal_curve("rc-new")["skipped_ks"] == [5000]


def test_nan_point_survives_round_trip(tmp_path):
    workspace = _workspace_with_records(tmp_path)
    points = [{"k": 10, "mean": {"holdout_acc": float("nan")}}]
    workspace.add_removal_curve("rc-a", "run-a", "fs-a", "sc-a", [10], [0], points)

    stored = Workspace(tmp_path).get_removal_curve("rc-a")["points"]

    assert math.isnan(stored[0]["mean"]["holdout_acc"])


def test_missing_sweep_and_curve_messages(tmp_path):
    workspace = Workspace(tmp_path)

    with pytest.raises(WorkspaceError, match="Sweep 'sw-nope' not found"):
        workspace.get_sweep("sw-nope")
    with pytest.raises(WorkspaceError, match="Removal curve 'rc-nope' not found"):
        workspace.get_removal_curve("rc-nope")


def test_sweep_needs_stored_failure_set(tmp_path):
    workspace = _workspace_with_records(tmp_path)

    # A failure set deleted by another command is named, and nothing is stored.
    with pytest.raises(WorkspaceError, match="was deleted while the command ran"):
        _add_sweep(workspace, "sw-a", failure_set_id="fs-missing")
    assert workspace.list_sweeps("run-a") == []


def test_schema_1_workspace_gets_new_tables(tmp_path):
    workspace = _workspace_with_records(tmp_path)
    workspace.add_repair("rp-a", "run-a", "fs-a", "sc-a", "finetune", {}, {"g": 1})
    # A schema-1 workspace written before sweeps and removal curves were stored.
    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        connection.execute("DROP TABLE sweeps")
        connection.execute("DROP TABLE removal_curves")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        tables = {
            row[0] for row in connection.execute("SELECT name FROM sqlite_master")
        }
    assert "sweeps" not in tables
    assert "removal_curves" not in tables

    reopened = Workspace(tmp_path)
    _add_sweep(reopened, "sw-a")
    reopened.add_removal_curve("rc-a", "run-a", "fs-a", "sc-a", [10], [0], CURVE)

    assert reopened.get_repair("rp-a")["metrics"] == {"g": 1}
    assert reopened.get_sweep("sw-a")["points"] == POINTS
    assert reopened.get_removal_curve("rc-a")["points"] == CURVE
    assert reopened.check_integrity() == "ok"


def test_tensor_files_round_trip(tmp_path):
    workspace = Workspace(tmp_path)
    state = {"weight": torch.randn(3, 4), "bias": torch.zeros(3)}

    workspace.save_tensor("run-a", "model.pt", state)
    loaded = Workspace(tmp_path).load_tensor("run-a", "model.pt")

    assert torch.equal(loaded["weight"], state["weight"])
    assert torch.equal(loaded["bias"], state["bias"])


def test_cut_short_tensor_file_reads_as_corrupt(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.save_tensor("run-a", "model.pt", {"weight": torch.zeros(50_000)})
    path = workspace.path("run-a", "model.pt")
    path.write_bytes(path.read_bytes()[:5000])

    with pytest.raises(WorkspaceError) as caught:
        workspace.load_tensor("run-a", "model.pt")

    assert "is corrupt: torch.load failed with" in str(caught.value)
    assert "permissions" not in str(caught.value)


def test_unwritable_tensor_file_is_a_workspace_error(tmp_path):
    workspace = Workspace(tmp_path)
    # A file where the run's folder should be stops every write into it.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run-a").write_text("not a folder")

    with pytest.raises(WorkspaceError, match=r"model\.pt' of run 'run-a' could not be"):
        workspace.save_tensor("run-a", "model.pt", {"weight": torch.zeros(3)})


def test_decisions_persist_and_update(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {}, {})
    workspace.add_failure_set("fs-a", "run-a", {}, {})

    workspace.set_decisions("run-a", "fs-a", [5, 2, 9], "confirmed")
    workspace.set_decisions("run-a", "fs-a", [9], "rejected")
    workspace.set_decisions("run-a", "fs-a", [2], None)

    assert Workspace(tmp_path).get_decisions("run-a", "fs-a") == {
        5: "confirmed",
        9: "rejected",
    }


def test_decisions_changed_since_read_are_kept(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {}, {})
    workspace.add_failure_set("fs-a", "run-a", {}, {})
    workspace.set_decisions("run-a", "fs-a", [1, 2], "confirmed")
    read = workspace.get_decisions("run-a", "fs-a")
    # Another session rejects 2 and confirms 3 after this one read.
    workspace.set_decisions("run-a", "fs-a", [2], "rejected")
    workspace.set_decisions("run-a", "fs-a", [3], "confirmed")

    unchanged = workspace.set_decisions(
        "run-a",
        "fs-a",
        [4, 3, 2, 1],
        None,
        expected={i: read.get(i) for i in (1, 2, 3, 4)},
    )

    assert unchanged == [2, 3]
    assert workspace.get_decisions("run-a", "fs-a") == {2: "rejected", 3: "confirmed"}
    assert workspace.set_decisions("run-a", "fs-a", [2], "confirmed") == []


def test_unknown_decision_rejected(tmp_path):
    workspace = Workspace(tmp_path)

    with pytest.raises(WorkspaceError, match="Unknown review decision 'maybe'"):
        workspace.set_decisions("run-a", "fs-a", [1], "maybe")


def test_missing_run_message(tmp_path):
    workspace = Workspace(tmp_path)

    with pytest.raises(WorkspaceError, match="Run 'run-nope' not found"):
        workspace.get_run("run-nope")


def test_newer_schema_rejected(tmp_path):
    Workspace(tmp_path)
    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")

    with pytest.raises(WorkspaceError, match="schema version 99"):
        Workspace(tmp_path)


def test_damaged_schema_version_rejected(tmp_path):
    Workspace(tmp_path)
    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        connection.execute("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")

    with pytest.raises(WorkspaceError, match="schema version 'abc', which is not a"):
        Workspace(tmp_path)


def test_runs_file_caught_before_work(tmp_path):
    workspace = Workspace(tmp_path)
    (tmp_path / "runs").write_text("not a folder")

    with pytest.raises(WorkspaceError, match="runs' is a file, but it must be"):
        workspace.check_writable()


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs Linux's /proc")
def test_database_not_creatable_says_so():
    # /proc exists, but no file can be created in it, not even by root.
    with pytest.raises(WorkspaceError) as caught:
        Workspace("/proc")
    assert str(caught.value) == (
        "The workspace database '/proc/repair.sqlite' could not be created "
        "(unable to open database file). Choose a workspace folder where files "
        "can be written."
    )


def test_workspace_path_is_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")

    with pytest.raises(WorkspaceError, match="is a file, not a folder"):
        Workspace(path)


@pytest.mark.parametrize("root", ["", "  "])
def test_workspace_path_is_empty(tmp_path, monkeypatch, root):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(WorkspaceError, match="The workspace path is empty"):
        Workspace(root)
    # Nothing was created in the current folder.
    assert list(tmp_path.iterdir()) == []


def test_corrupt_database_message(tmp_path):
    (tmp_path / "repair.sqlite").write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(WorkspaceError, match="could not be used"):
        Workspace(tmp_path)


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_lost_database_with_run_folders_rejected(tmp_path, state):
    Workspace(tmp_path).add_run("run-a", "train", {}, {})
    for name in ("run-aaaaaaaa", "run-bbbbbbbb"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    database = tmp_path / "repair.sqlite"
    for extra in ("-wal", "-shm"):
        database.with_name(database.name + extra).unlink(missing_ok=True)
    if state == "empty":
        database.write_bytes(b"")
    else:
        database.unlink()

    with pytest.raises(
        WorkspaceError,
        match=(
            rf"contains run folders \(run-aaaaaaaa, run-bbbbbbbb\) but its database "
            rf"repair.sqlite is {state}, so their records are lost\. Restore"
        ),
    ):
        Workspace(tmp_path)
    # Nothing was written: an empty database stays empty, a missing one missing.
    assert database.is_file() == (state == "empty")
    if state == "empty":
        assert database.stat().st_size == 0


def test_database_with_tables_and_run_folders_opens(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {}, {})
    (tmp_path / "runs" / "run-aaaaaaaa").mkdir(parents=True)

    assert [run["id"] for run in Workspace(tmp_path).list_runs()] == ["run-a"]


def test_damaged_record_names_itself(tmp_path):
    Workspace(tmp_path).add_run("run-a", "train", {"seed": 1}, {})
    with sqlite3.connect(tmp_path / "repair.sqlite") as connection:
        connection.execute("UPDATE runs SET config = '{bad' WHERE id = 'run-a'")

    with pytest.raises(
        WorkspaceError, match="Record 'run-a' in workspace .* is damaged: its config"
    ):
        Workspace(tmp_path).get_run("run-a")
    with pytest.raises(WorkspaceError, match="is damaged"):
        Workspace(tmp_path).list_runs()


def test_duplicate_id_keeps_first_record(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {"first": True}, {})

    with pytest.raises(sqlite3.IntegrityError):
        workspace.add_run("run-a", "train", {"first": False}, {})
    assert workspace.get_run("run-a")["config"] == {"first": True}


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from repair_core.workspace import Workspace, atomic_save_arrays

    root = sys.argv[1]
    workspace = Workspace(root)
    version = 1
    print("ready", flush=True)
    while True:
        version += 1
        # A large array makes each write take long enough to be killed midway.
        atomic_save_arrays(workspace.path("run-a", "big.npz"),
                           values=np.full(3_000_000, version, dtype=np.float64))
        workspace.set_decisions("run-a", "fs-a", list(range(2000)), "confirmed"
                                if version % 2 else "rejected")
    """
)


def test_kill_during_save_keeps_earlier_state(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {}, {})
    workspace.add_failure_set("fs-a", "run-a", {}, {})
    atomic_save_arrays(
        workspace.path("run-a", "big.npz"), values=np.full(3_000_000, 1.0)
    )
    workspace.set_decisions("run-a", "fs-a", list(range(2000)), "confirmed")

    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)

    reopened = Workspace(tmp_path)
    values = np.load(reopened.path("run-a", "big.npz"))["values"]
    decisions = reopened.get_decisions("run-a", "fs-a")
    assert values.shape == (3_000_000,)
    assert np.all(values == values[0])
    assert len(decisions) == 2000
    assert len(set(decisions.values())) == 1
    assert reopened.check_integrity() == "ok"
    leftovers = [p.name for p in reopened.run_dir("run-a").iterdir()]
    assert "big.npz" in leftovers


def test_delete_unused_failure_set_keeps_used_one(tmp_path):
    workspace = Workspace(tmp_path)
    workspace.add_run("run-a", "train", {}, {})
    for name in ("fs-free", "fs-used"):
        workspace.save_tensor("run-a", f"failure_sets/{name}.pt", {"query": [1]})
        workspace.add_failure_set(name, "run-a", {}, {})
    workspace.set_decisions("run-a", "fs-used", [3], "confirmed")

    assert workspace.delete_unused_failure_set("run-a", "fs-free")
    assert not workspace.delete_unused_failure_set("run-a", "fs-used")

    assert [r["id"] for r in workspace.list_failure_sets("run-a")] == ["fs-used"]
    assert not workspace.path("run-a", "failure_sets/fs-free.pt").exists()
    assert workspace.path("run-a", "failure_sets/fs-used.pt").is_file()


def test_locked_database_says_busy(tmp_path, monkeypatch):
    workspace = Workspace(tmp_path)
    holder = sqlite3.connect(workspace.database_path)
    holder.execute("BEGIN EXCLUSIVE")
    original = sqlite3.connect

    def connect_without_wait(*args, **kwargs):
        # The workspace waits 30 s for a lock; the test waits 0.1 s.
        kwargs["timeout"] = 0.1
        return original(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect_without_wait)
    try:
        with pytest.raises(WorkspaceError, match="stayed locked by another command"):
            workspace.add_run("run-a", "train", {}, {})
    finally:
        holder.rollback()
        holder.close()
    assert workspace.list_runs() == []


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)]
)
def test_written_files_follow_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        workspace = Workspace(tmp_path / "ws")
        workspace.save_tensor("run-a", "train_labels.pt", torch.arange(3))
        atomic_save_arrays(workspace.path("run-a", "arrays.npz"), x=np.zeros(2))
    finally:
        os.umask(previous)

    for name in ("train_labels.pt", "arrays.npz"):
        written = workspace.path("run-a", name).stat().st_mode & 0o777
        assert written == mode, (name, oct(written))
    database = workspace.database_path.stat().st_mode & 0o777
    assert database == mode, oct(database)


def _foreign_database(path, *statements):
    connection = sqlite3.connect(path)
    with connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()
    return path.read_bytes()


@pytest.mark.parametrize("create", [True, False])
@pytest.mark.parametrize(
    "statements",
    [
        ["CREATE TABLE foo (x)", "INSERT INTO foo VALUES (1)"],
        ["CREATE TABLE meta (x)", "CREATE TABLE runs (y)"],
        ["CREATE TABLE meta (key TEXT, value TEXT)", "CREATE TABLE foo (x)"],
        [
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
            "INSERT INTO meta VALUES ('owner', 'another program')",
        ],
        [
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
            "INSERT INTO meta VALUES ('schema_version', '1')",
            "CREATE TABLE documents (x)",
        ],
    ],
)
def test_foreign_database_rejected_unchanged(tmp_path, create, statements):
    database = tmp_path / "repair.sqlite"
    before = _foreign_database(database, *statements)

    with pytest.raises(WorkspaceError) as caught:
        Workspace(tmp_path, create=create)

    message = str(caught.value)
    assert f"The file {str(database)!r} is not a workspace database" in message
    assert "Choose another folder with --workspace" in message
    assert database.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["repair.sqlite"]


@pytest.mark.parametrize("name", ["a" * 300, "a\0b"])
def test_unusable_workspace_path_rejected(tmp_path, name):
    with pytest.raises(WorkspaceError, match="^Workspace folder .* (too long|NUL)"):
        Workspace(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["", "sub"])
def test_symlink_loop_workspace_rejected(tmp_path, below):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path = tmp_path / "a" / below if below else tmp_path / "a"

    with pytest.raises(WorkspaceError, match="loop of symbolic links"):
        Workspace(path)
    assert sorted(child.name for child in tmp_path.iterdir()) == ["a", "b"]


def test_empty_database_left_empty_by_readers(tmp_path):
    database = tmp_path / "repair.sqlite"
    database.write_bytes(b"")

    with pytest.raises(WorkspaceError, match="repair.sqlite is empty"):
        Workspace(tmp_path, create=False)
    assert database.stat().st_size == 0

    # A command that stores results makes the empty file a new workspace.
    Workspace(tmp_path).add_run("run-a", "train", {}, {})
    reopened = Workspace(tmp_path, create=False)
    assert [run["id"] for run in reopened.list_runs()] == ["run-a"]
    assert reopened.schema_version == SCHEMA_VERSION


def test_new_folder_needs_create(tmp_path):
    root = tmp_path / "new"

    with pytest.raises(WorkspaceError, match="repair.sqlite is missing"):
        Workspace(root, create=False)
    assert not root.exists()

    assert Workspace(root).list_runs() == []
    assert Workspace(root, create=False).schema_version == SCHEMA_VERSION


def test_workspace_without_version_row_opens(tmp_path):
    # What a workspace whose creation stopped before its version row holds.
    database = tmp_path / "repair.sqlite"
    _foreign_database(
        database,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE runs (id TEXT PRIMARY KEY, created_at TEXT NOT NULL, "
        "kind TEXT NOT NULL, config TEXT NOT NULL, metrics TEXT NOT NULL)",
    )

    workspace = Workspace(tmp_path)

    assert workspace.schema_version == SCHEMA_VERSION
    assert workspace.list_runs() == []


def test_file_in_place_of_run_folder_caught(tmp_path):
    workspace = Workspace(tmp_path)
    (tmp_path / "runs" / "run-a").mkdir(parents=True)
    (tmp_path / "runs" / "run-a" / "scores").write_text("not a folder")

    with pytest.raises(WorkspaceError, match=r"scores' is a file, but it must be"):
        workspace.check_writable("run-a", "scores")
    # A missing subfolder is created in the run's folder, which is writable.
    workspace.check_writable("run-a", "repairs")
    workspace.check_writable("run-new", "repairs")


def _workspace_with_failure_set(root):
    workspace = Workspace(root)
    workspace.add_run("run-a", "train", {}, {})
    workspace.save_tensor("run-a", "failure_sets/fs-a.pt", {"query": [1]})
    workspace.add_failure_set("fs-a", "run-a", {}, {})
    return workspace


def test_claimed_failure_set_is_kept(tmp_path):
    creator = _workspace_with_failure_set(tmp_path)
    other = Workspace(tmp_path)

    with other.claim_failure_set("run-a", "fs-a"):
        assert not creator.delete_unused_failure_set("run-a", "fs-a")
    assert [r["id"] for r in creator.list_failure_sets("run-a")] == ["fs-a"]
    assert creator.path("run-a", "failure_sets/fs-a.pt").is_file()

    # Neither a claim of the deleting object itself nor an ended claim keeps
    # the set.
    with creator.claim_failure_set("run-a", "fs-a"):
        assert creator.delete_unused_failure_set("run-a", "fs-a")
    assert creator.list_failure_sets("run-a") == []
    assert not creator.path("run-a", "failure_sets/fs-a.pt").exists()


def test_claim_of_deleted_failure_set_rejected(tmp_path):
    creator = _workspace_with_failure_set(tmp_path)
    other = Workspace(tmp_path)
    assert creator.delete_unused_failure_set("run-a", "fs-a")

    with pytest.raises(WorkspaceError, match="It was deleted before this command"):
        with other.claim_failure_set("run-a", "fs-a"):
            pytest.fail("The body ran without a stored failure set.")


def test_add_scores_reuses_same_ranking(tmp_path):
    workspace = _workspace_with_failure_set(tmp_path)
    metrics = {"device": "cpu"}
    workspace.save_tensor("run-a", "scores/sc-a.pt", torch.zeros(3))
    workspace.add_scores("sc-a", "run-a", "fs-a", "random", {"seed": 1}, metrics)

    reused = workspace.add_scores(
        "sc-b", "run-a", "fs-a", "random", {"seed": 1}, metrics, reuse_stored=True
    )
    other_seed = workspace.add_scores(
        "sc-c", "run-a", "fs-a", "random", {"seed": 2}, metrics, reuse_stored=True
    )
    other_device = workspace.add_scores(
        "sc-d",
        "run-a",
        "fs-a",
        "random",
        {"seed": 1},
        {"device": "cuda:0"},
        reuse_stored=True,
    )
    workspace.path("run-a", "scores/sc-a.pt").unlink()
    file_missing = workspace.add_scores(
        "sc-e", "run-a", "fs-a", "random", {"seed": 1}, metrics, reuse_stored=True
    )

    assert reused is not None
    assert reused["id"] == "sc-a"
    assert other_seed is None
    assert other_device is None
    assert file_missing is None
    stored = [record["id"] for record in workspace.list_scores("run-a")]
    assert stored == ["sc-a", "sc-c", "sc-d", "sc-e"]


_CLAIMER = textwrap.dedent(
    """
    import sys
    import time
    from repair_core.workspace import Workspace

    workspace = Workspace(sys.argv[1])
    with workspace.claim_failure_set("run-a", "fs-a"):
        print("claimed", flush=True)
        time.sleep(600)
    """
)


def _claimants(workspace):
    with contextlib.closing(sqlite3.connect(workspace.database_path)) as connection:
        rows = connection.execute("SELECT claimant FROM failure_set_claims")
        return [claimant for (claimant,) in rows]


def test_claim_of_killed_process_dropped(tmp_path):
    creator = _workspace_with_failure_set(tmp_path)
    command = [sys.executable, "-c", _CLAIMER, str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as claimer:
        try:
            assert claimer.stdout.readline().strip() == "claimed"
            # A claim of a running process keeps the set.
            assert not creator.delete_unused_failure_set("run-a", "fs-a")
        finally:
            claimer.send_signal(signal.SIGKILL)
            claimer.wait(timeout=10)
    assert _claimants(creator) != []

    assert creator.delete_unused_failure_set("run-a", "fs-a")
    assert creator.list_failure_sets("run-a") == []
    assert not creator.path("run-a", "failure_sets/fs-a.pt").exists()
    assert _claimants(creator) == []


def _ended_pid():
    """Return the pid of a child process that has ended and been waited for."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


@pytest.mark.parametrize("kind", ["running", "other host", "not parsable"])
def test_claim_kept_unless_process_ended(tmp_path, kind):
    creator = _workspace_with_failure_set(tmp_path)
    hostname = creator.claimant.rsplit(":", 2)[0]
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        claimant = {
            "running": f"{hostname}:{sleeper.pid}:0123abcd",
            # A hostname may contain ":", and this pid has ended here.
            "other host": f"other:host:{_ended_pid()}:0123abcd",
            "not parsable": f"{hostname}-{_ended_pid()}",
        }[kind]
        database = sqlite3.connect(creator.database_path)
        with contextlib.closing(database) as connection, connection:
            connection.execute(
                "INSERT INTO failure_set_claims VALUES ('cl-1', 'fs-a', ?, 'now')",
                (claimant,),
            )

        assert not creator.delete_unused_failure_set("run-a", "fs-a")
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(timeout=10)

    assert _claimants(creator) == [claimant]
    assert [r["id"] for r in creator.list_failure_sets("run-a")] == ["fs-a"]
    assert creator.path("run-a", "failure_sets/fs-a.pt").is_file()
