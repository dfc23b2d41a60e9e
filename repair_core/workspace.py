"""The workspace: an SQLite database of records plus files for tensors.

Layout of a workspace folder::

    repair.sqlite             runs, failure sets, scores, repairs, sweeps,
                              removal curves, review decisions
    runs/<run_id>/...         checkpoints and arrays of one run

Every file is written to a temporary name in the same folder, flushed to disk
and renamed over the target, so a reader sees either the old or the new file,
never half of one. Database writes run in transactions. A process killed in
the middle of a save therefore leaves the earlier state readable.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import socket
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repair_core.data import check_path_name
from repair_core.errors import WorkspaceError

logger = logging.getLogger(__name__)

#: The version changes only when existing tables change incompatibly. A table
#: added later (sweeps, removal_curves) is created by CREATE TABLE IF NOT
#: EXISTS when an older workspace is opened. A column added later, listed in
#: _ADDED_COLUMNS, is added with its default. Older versions of the tool
#: ignore both.
SCHEMA_VERSION = 1
DATABASE_NAME = "repair.sqlite"
DEFAULT_WORKSPACE = "workspace"
#: Environment variable that names the workspace folder used when none is given.
WORKSPACE_ENV = "REPAIR_WORKSPACE"
DECISIONS = ("confirmed", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS failure_sets (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    created_at TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    failure_set_id TEXT NOT NULL REFERENCES failure_sets(id),
    method TEXT NOT NULL,
    created_at TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS repairs (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    failure_set_id TEXT NOT NULL REFERENCES failure_sets(id),
    scores_id TEXT,
    treatment TEXT NOT NULL,
    created_at TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    failure_set_id TEXT NOT NULL REFERENCES failure_sets(id),
    treatment TEXT NOT NULL,
    causes TEXT NOT NULL,
    n_removed INTEGER NOT NULL,
    strengths TEXT NOT NULL,
    created_at TEXT NOT NULL,
    config TEXT NOT NULL,
    points TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS removal_curves (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    failure_set_id TEXT NOT NULL REFERENCES failure_sets(id),
    scores_id TEXT NOT NULL REFERENCES scores(id),
    ks TEXT NOT NULL,
    seeds TEXT NOT NULL,
    created_at TEXT NOT NULL,
    points TEXT NOT NULL,
    skipped_ks TEXT NOT NULL DEFAULT '[]',
    device TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS decisions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    failure_set_id TEXT NOT NULL REFERENCES failure_sets(id),
    train_index INTEGER NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('confirmed', 'rejected')),
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, failure_set_id, train_index)
);
-- No foreign key, so that versions of the tool without this table can still
-- delete a claimed failure set.
CREATE TABLE IF NOT EXISTS failure_set_claims (
    id TEXT PRIMARY KEY,
    failure_set_id TEXT NOT NULL,
    claimant TEXT NOT NULL,
    claimed_at TEXT NOT NULL
);
"""

#: Every table of _SCHEMA.
_WORKSPACE_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))

#: Columns added to a table after its first release, with their definitions.
_ADDED_COLUMNS = {
    "sweeps": {"device": "TEXT NOT NULL DEFAULT ''"},
    "removal_curves": {
        "skipped_ks": "TEXT NOT NULL DEFAULT '[]'",
        "device": "TEXT NOT NULL DEFAULT ''",
        "config": "TEXT NOT NULL DEFAULT '{}'",
    },
}

_TABLES = ("runs", "failure_sets", "scores", "repairs", "sweeps", "removal_curves")
#: Columns stored as JSON text and decoded when read.
_JSON_COLUMNS = (
    "config",
    "metrics",
    "strengths",
    "ks",
    "skipped_ks",
    "seeds",
    "points",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


#: Tables whose records have an ``id`` column.
RECORD_TABLES = (
    "runs",
    "failure_sets",
    "scores",
    "repairs",
    "sweeps",
    "removal_curves",
)


def listed_ids(ids: list[str], shown: int = 5) -> str:
    """Return "a, b, c and 4 more" for record ids, naming up to ``shown``."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def new_id(prefix: str) -> str:
    """Return a short unique id such as ``run-3f9a1c2e``."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _create_temporary_file(path: Path) -> tuple[int, str]:
    """Create a new file ``.<name>.<random>`` beside ``path`` and return its
    descriptor, open for writing, and its path.

    tempfile.mkstemp creates files with mode 0600 whatever the umask, which
    would hide a group-shared workspace's files from the group. Mode 0666 here
    is reduced by the umask, as open() does.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temporary = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"No unused temporary name beside {str(path)!r}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary_file(path)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Persist the rename itself: on POSIX the directory entry lives in the folder.
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Save NumPy arrays as one ``.npz`` file through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def contains_workspace(root: str | Path) -> bool:
    """Return whether the folder ``root`` contains a workspace database.

    An empty database file does not count, since sqlite would take it for a
    new database. A non-empty file counts without being read, and opening
    the workspace rejects one that another program wrote.
    """
    database = Path(root).expanduser() / DATABASE_NAME
    try:
        return database.is_file() and database.stat().st_size > 0
    except OSError:
        return False


def lost_records_message(root: str | Path) -> str | None:
    """Return an error message when the folder ``root`` contains run folders
    but its database is missing or empty, or None otherwise."""
    root = Path(root).expanduser()
    database = root / DATABASE_NAME
    try:
        folders = sorted(
            entry.name
            for entry in (root / "runs").iterdir()
            if entry.is_dir() and entry.name.startswith("run-")
        )
    except OSError:
        return None
    if not folders or _has_tables(database):
        return None
    state = "is empty" if database.is_file() else "is missing"
    more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
    named = ", ".join(folders[:3])
    return (
        f"Workspace {str(root)!r} contains run folders ({named}{more}) "
        f"but its database {DATABASE_NAME} {state}, so their records are "
        f"lost. Restore {DATABASE_NAME} from a backup, or move the runs folder "
        "away to start a new workspace here."
    )


def _has_tables(database: Path) -> bool:
    """Return whether the SQLite file ``database`` exists and contains tables."""
    try:
        if database.stat().st_size == 0:
            return False
    except OSError:
        return False
    # The file is opened read-only, so a check creates nothing.
    uri = f"{database.as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            return (
                connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
                is not None
            )
    except sqlite3.Error:
        # A damaged file is reported by the first query that reads it.
        return True


def _insert_row(
    connection: sqlite3.Connection, table: str, record: dict[str, Any]
) -> None:
    columns = ", ".join(record)
    marks = ", ".join("?" for _ in record)
    values = [
        json.dumps(v) if isinstance(v, dict | list) else v for v in record.values()
    ]
    connection.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", values)


def _can_write(folder: Path) -> bool:
    """Return whether a new file can be created in ``folder``."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _process_is_running(pid: int) -> bool:
    """Return whether a process with ``pid`` runs on this machine.

    A process that cannot be checked counts as running, because only an
    ended process may lose its failure set claims.
    """
    if pid <= 0 or sys.platform == "win32":
        # os.kill(pid, 0) signals a process group for pid 0 or below, and on
        # Windows it terminates the process instead of checking it.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # PermissionError means that the process runs under another user. Any
        # other error leaves its state unknown.
        return True
    return True


def _claimant_has_ended(claimant: str) -> bool:
    """Return whether a failure set claimant names an ended process on this host.

    A claimant is "hostname:pid:token" (see ``Workspace.claimant``). One from
    another host, or one that does not parse, has not ended as far as this
    process can tell.

    NOTE: a pid that the system has since given to another program counts as
    running, so its claim stays until that program ends. Processes in
    separate pid namespaces that report one hostname (containers sharing the
    host's hostname and a workspace folder) cannot see each other's pids, so
    each deletes the other's claims as ended.
    """
    # rsplit, because a hostname may contain ":".
    parts = claimant.rsplit(":", 2)
    if len(parts) != 3:
        return False
    hostname, pid, _token = parts
    if hostname != socket.gethostname() or not re.fullmatch(r"[0-9]+", pid):
        return False
    return not _process_is_running(int(pid))


#: Seconds a connection waits for another connection's lock before failing.
LOCK_TIMEOUT_SECONDS = 30


def scores_problem(scores: Any, n_train: int | None) -> str | None:
    """Return what keeps ``scores`` from being a stored ranking: one finite
    floating-point score per training example (``n_train`` of them, when
    known). None when nothing does."""
    if not isinstance(scores, torch.Tensor):
        return f"it holds a {type(scores).__name__}, not a tensor of scores"
    if scores.dim() != 1 or not scores.is_floating_point():
        return (
            f"it holds a {scores.dtype} tensor of shape {tuple(scores.shape)}, "
            "not one floating-point score per training example"
        )
    if n_train is not None and len(scores) != n_train:
        return f"it holds {len(scores)} scores, not the ranking's {n_train}"
    if not bool(torch.isfinite(scores).all()):
        return "it holds NaN or infinite scores"
    return None


class Workspace:
    """A folder holding the database and files of every run.

    Args:
        root: the workspace folder; created if missing when ``create`` is set.
        create: when False, a folder without a workspace database raises
            instead of becoming a new, empty workspace. Commands that only
            read runs pass False, so a mistyped path is reported.

    Raises:
        WorkspaceError: the folder is not writable, the database is not a
            workspace database, it was written by a newer schema, or it is
            missing or empty and ``create`` is False.
    """

    def __init__(self, root: str | Path = DEFAULT_WORKSPACE, *, create: bool = True):
        if not str(root).strip():
            # Path("") is the current folder, which is seldom what was meant.
            raise WorkspaceError(
                "The workspace path is empty. Pass a folder path with --workspace, "
                f"such as ./{DEFAULT_WORKSPACE}."
            )
        # resolve() raises ValueError on a NUL character and exists() raises
        # OSError on a name too long for the file system.
        check_path_name(Path(root).expanduser(), "Workspace folder", WorkspaceError)
        try:
            self.root = Path(root).expanduser().resolve()
        except RuntimeError as error:
            # Python 3.11's resolve() raises RuntimeError on a loop of
            # symbolic links; 3.13 raises OSError ELOOP.
            raise WorkspaceError(
                f"Workspace path {str(root)!r} leads through a loop of symbolic "
                f"links ({error}). Pass a folder path with --workspace that "
                "resolves to a folder."
            ) from error
        except OSError as error:
            raise WorkspaceError(
                f"Workspace path {str(root)!r} could not be resolved "
                f"({error.strerror or error}). Pass a folder path with --workspace "
                "that resolves to a folder."
            ) from error
        if self.root.exists() and not self.root.is_dir():
            raise WorkspaceError(
                f"Workspace path {str(self.root)!r} is a file, not a folder. Pass a "
                "folder path with --workspace."
            )
        self.database_path = self.root / DATABASE_NAME
        self._check_records_exist()
        if not create and not contains_workspace(self.root):
            state = "is empty" if self.database_path.is_file() else "is missing"
            raise WorkspaceError(
                f"No workspace at {str(self.root)!r}: the folder's {DATABASE_NAME} "
                f"{state}. Pass the folder you trained in with --workspace, "
                "or train a run there first with 'python -m repair_core train "
                f"--workspace {shlex.quote(str(self.root))}'."
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WorkspaceError(
                f"Cannot create workspace folder {str(self.root)!r}: {error}. Choose "
                "a writable folder with --workspace."
            ) from error
        # A workspace on read-only storage can still be read: listing runs and
        # printing stored results need no writes.
        self.read_only = self.database_path.is_file() and not _can_write(self.root)
        # Identifies this Workspace object in the failure set claims it adds.
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if create and not self.database_path.exists():
            # sqlite creates a database with mode 0644 reduced by the umask, so
            # under umask 002 the group could not write to a shared workspace.
            # An empty file made here with 0666 reduced by the umask is taken
            # by sqlite as a new database, and its journal files copy its mode.
            # Where the file cannot be made, sqlite's own attempt reports why.
            with contextlib.suppress(OSError):
                os.close(os.open(self.database_path, os.O_CREAT | os.O_EXCL, 0o666))
        self._initialise(create)

    def _check_records_exist(self) -> None:
        """Raise WorkspaceError if run folders exist but the database is gone.

        An empty or missing database would otherwise be taken for a new
        workspace: the runs would be listed as none, and writing a fresh
        schema would leave their files without records.
        """
        message = lost_records_message(self.root)
        if message is not None:
            raise WorkspaceError(message)

    def check_writable(self, run_id: str | None = None, folder: str = "") -> None:
        """Raise WorkspaceError unless new files can be written in the folder.

        Commands that store results call this before they start work, so a
        read-only workspace is reported before minutes of computation.

        Args:
            run_id: the run whose folder the command writes into, if any.
            folder: the subfolder of that run that receives the new files,
                such as "scores". Where it does not exist yet, the nearest
                existing folder above it is checked, since the subfolder is
                created there.
        """
        runs = self.root / "runs"
        if runs.exists() and not runs.is_dir():
            raise WorkspaceError(
                f"Workspace entry {str(runs)!r} is a file, but it must be the "
                "folder of the runs' files. Move the file away, or choose another "
                "folder with --workspace."
            )
        folders = [self.root, runs]
        if run_id is not None:
            target = self.run_dir(run_id) / folder
            while not target.exists() and target not in folders:
                target = target.parent
            if target.exists() and not target.is_dir():
                raise WorkspaceError(
                    f"Workspace entry {str(target)!r} is a file, but it must be a "
                    "folder. Move the file away, or choose another folder with "
                    "--workspace."
                )
            folders.append(target)
        for directory in dict.fromkeys(folders):
            if not directory.is_dir():
                continue
            try:
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as error:
                if directory in (self.root, runs):
                    raise WorkspaceError(
                        f"Workspace folder {str(directory)!r} is not writable "
                        f"({error.strerror or error}). Make it writable, or choose "
                        "another folder with --workspace."
                    ) from error
                raise WorkspaceError(
                    f"Folder {str(directory)!r} of run {run_id!r} is not writable "
                    f"({error.strerror or error}), so the files of this command's "
                    f"result could not be written there. Make the folder "
                    f"{str(directory)!r} writable, or choose another folder with "
                    "--workspace."
                ) from error
        if self.database_path.is_file():
            try:
                # Opening for update writes nothing.
                with self.database_path.open("r+b"):
                    pass
            except OSError as error:
                raise WorkspaceError(
                    f"The workspace database {str(self.database_path)!r} is "
                    f"read-only ({error.strerror or error}). Make the file "
                    "writable, or choose another folder with --workspace."
                ) from error

    # Database access -----------------------------------------------------

    @contextlib.contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        """Open the database; only ``create`` lets sqlite create a missing file.

        Every connection after the first opens the file for reading and
        writing only, so a database deleted while the workspace is open is
        reported as missing instead of coming back empty.
        """
        if self.read_only:
            # Without a writable folder sqlite cannot create the WAL index, so
            # the file is opened as immutable: read without locks or WAL.
            uri = f"{self.database_path.as_uri()}?mode=ro&immutable=1"
        else:
            uri = f"{self.database_path.as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT_SECONDS)
        except sqlite3.OperationalError as error:
            if create:
                raise WorkspaceError(
                    f"The workspace database {str(self.database_path)!r} could not "
                    f"be created ({error}). Choose a workspace folder where files "
                    "can be written."
                ) from error
            if not self.database_path.exists():
                raise WorkspaceError(
                    f"The workspace database {str(self.database_path)!r} is "
                    "missing: it was deleted or moved after the workspace was "
                    "opened. Restore it from a backup, or choose another "
                    "workspace folder."
                ) from error
            raise WorkspaceError(
                f"The workspace database {str(self.database_path)!r} cannot be "
                f"opened: {error}. Check the file's permissions, or choose another "
                "workspace folder."
            ) from error
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA foreign_keys = ON")
        try:
            with connection:  # commits on success, rolls back on error
                yield connection
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.IntegrityError):
                if "FOREIGN KEY" not in str(error):
                    raise
                # Another command deleted the run or failure set that this
                # record refers to, as a stopped command does with a failure
                # set it created and no result uses yet.
                raise WorkspaceError(
                    "The run or failure set this result belongs to was deleted "
                    "while the command ran, for example by another command that "
                    "created the failure set and then stopped, so nothing was "
                    "stored. Run the command again."
                ) from error
            if "database is locked" in str(error):
                raise WorkspaceError(
                    f"The workspace database {str(self.database_path)!r} stayed "
                    f"locked by another command or session for {LOCK_TIMEOUT_SECONDS} "
                    "seconds. Run the "
                    "command again once the other one has finished."
                ) from error
            if "readonly" in str(error) or self.read_only:
                raise WorkspaceError(
                    f"The workspace database {str(self.database_path)!r} is "
                    f"read-only ({error}). Make the file and its folder writable, "
                    "or choose another folder with --workspace."
                ) from error
            raise WorkspaceError(
                f"The workspace database {str(self.database_path)!r} could not be "
                f"used: {error}. If the file is damaged, restore it from a backup; "
                "otherwise choose another workspace folder."
            ) from error
        finally:
            connection.close()

    def _initialise(self, create: bool) -> None:
        """Create or update the schema of the database, after checking that
        the file is a workspace database or a new one.

        ``create`` False leaves an empty database file empty.
        """
        with self._connect(create=create) as connection:
            # The check comes before any write, journal mode included, so a
            # database of another program stays as it was.
            has_tables = self._check_workspace_tables(connection)
            if not has_tables and (self.read_only or not create):
                raise WorkspaceError(
                    f"No workspace at {str(self.root)!r}: its {DATABASE_NAME} is "
                    "empty. Pass the folder you trained in with --workspace, or "
                    "train a run in a writable folder first."
                )
            if not self.read_only:
                connection.execute("PRAGMA journal_mode = WAL")
                connection.executescript(_SCHEMA)
                for table, columns in _ADDED_COLUMNS.items():
                    present = {
                        row["name"]
                        for row in connection.execute(f"PRAGMA table_info({table})")
                    }
                    for name, definition in columns.items():
                        if name not in present:
                            connection.execute(
                                f"ALTER TABLE {table} ADD COLUMN {name} {definition}"
                            )
                connection.execute(
                    "INSERT OR IGNORE INTO meta (key, value) "
                    "VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    def _check_workspace_tables(self, connection: sqlite3.Connection) -> bool:
        """Return whether the database contains tables.

        Raises:
            WorkspaceError: the tables are not a workspace's, or their schema
                version is damaged or newer than this tool's.
        """
        names = {
            row["name"]
            for row in connection.execute("SELECT name FROM sqlite_master")
            if not row["name"].startswith("sqlite_")
        }
        if not names:
            return False
        version = None
        meta_keys = None
        if "meta" in names:
            # Another program's meta table may lack these columns.
            with contextlib.suppress(sqlite3.OperationalError):
                meta = dict(connection.execute("SELECT key, value FROM meta"))
                meta_keys = set(meta)
                if "schema_version" in meta:
                    version = str(meta["schema_version"])
        newer = (
            version is not None
            and version.isdigit()
            and int(version) > (SCHEMA_VERSION)
        )
        # The schema creates meta first and adds the version last, so a
        # workspace whose creation stopped between them has only its tables.
        # A table or meta key that no version of the schema has marks another
        # program's database, unless a newer schema added it.
        ours = (
            meta_keys is not None
            and meta_keys <= {"schema_version"}
            and names <= _WORKSPACE_TABLES
        )
        if not ours and not newer:
            foreign = sorted(names - _WORKSPACE_TABLES) or sorted(names)
            listed = ", ".join(foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise WorkspaceError(
                f"The file {str(self.database_path)!r} is not a workspace "
                f"database: it contains tables of another program ({listed}{more}). "
                "Nothing was written to it. "
                "Choose another folder with --workspace, or move the file away."
            )
        if version is not None and not version.isdigit():
            raise WorkspaceError(
                f"Workspace {str(self.root)!r} has schema version "
                f"{version!r}, which is not a version number, so its "
                "database is damaged. Restore it from a backup, or use another "
                "workspace."
            )
        if version is not None and int(version) > SCHEMA_VERSION:
            raise WorkspaceError(
                f"Workspace {str(self.root)!r} has schema version {version}, "
                f"newer than this version of the tool ({SCHEMA_VERSION}). Upgrade "
                "the tool or use another workspace."
            )
        return True

    @property
    def schema_version(self) -> int:
        with self._connect() as connection:
            row = connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        return int(row["value"])

    # Files ---------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def path(self, run_id: str, relative: str) -> Path:
        """Return the absolute path of a file of ``run_id``."""
        return self.run_dir(run_id) / relative

    def save_tensor(self, run_id: str, relative: str, obj: Any) -> str:
        """Save ``obj`` with torch.save under the run folder; return the path used.

        Raises:
            WorkspaceError: the file could not be written, for example because
                its folder is read-only or the disk is full.
        """
        path = self.path(run_id, relative)
        try:
            atomic_torch_save(path, obj)
        except OSError as error:
            raise WorkspaceError(
                f"File {str(path)!r} of run {run_id!r} could not be written: "
                f"{error.strerror or error}. Make its folder writable and free "
                "disk space, or choose another folder with --workspace."
            ) from error
        return relative

    def load_tensor(
        self, run_id: str, relative: str, *, remedy: str | None = None
    ) -> Any:
        """Load a file written by :meth:`save_tensor`.

        Args:
            remedy: the advice that ends the error message of a missing or
                unreadable file. The default advises restoring the file or
                creating the run again.

        Raises:
            WorkspaceError: the file is missing, cannot be read, or is not a
                file that torch.load can read.
        """
        path = self.path(run_id, relative)
        remedy = remedy or (
            "Restore the file from a backup of the workspace, or create the run again."
        )
        if not path.is_file():
            raise WorkspaceError(
                f"File {str(path)!r} of run {run_id!r} is missing. The workspace was "
                f"edited by hand or copied partly. {remedy}"
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except MemoryError:
            raise
        except PermissionError as error:
            raise WorkspaceError(
                f"File {str(path)!r} of run {run_id!r} could not be read: {error}. "
                f"Check the file's permissions. {remedy}"
            ) from error
        except Exception as error:  # torch raises many types for corrupt files
            # A file cut short can also raise OSError, such as EINVAL from a
            # seek past its end.
            # torch's own message is long and suggests settings that do not
            # apply here, so only the exception type is shown.
            raise WorkspaceError(
                f"File {str(path)!r} of run {run_id!r} is corrupt: torch.load "
                f"failed with {type(error).__name__}. {remedy}"
            ) from error

    # Records -------------------------------------------------------------

    def _insert(self, table: str, record: dict[str, Any]) -> None:
        with self._connect() as connection:
            _insert_row(connection, table, record)

    def _decode(self, row: sqlite3.Row) -> dict[str, Any]:
        record = dict(row)
        for key in _JSON_COLUMNS:
            if key in record:
                try:
                    record[key] = json.loads(record[key])
                except (TypeError, ValueError) as error:
                    raise WorkspaceError(
                        f"Record {record.get('id')!r} in workspace "
                        f"{str(self.root)!r} is damaged: its {key} is not valid "
                        f"JSON ({error}). Restore {DATABASE_NAME} from a backup, "
                        "or use another workspace."
                    ) from None
        return record

    def _get(self, table: str, record_id: str, what: str) -> dict[str, Any]:
        with self._connect() as connection:
            row = connection.execute(
                f"SELECT * FROM {table} WHERE id = ?", (record_id,)
            ).fetchone()
        if row is None:
            known = [r["id"] for r in self._list(table)]
            hint = ""
            if known:
                hint = f" Known: {listed_ids(known)}."
            listing = shlex.join(
                ["python", "-m", "repair_core", "runs", "--workspace", str(self.root)]
            )
            raise WorkspaceError(
                f"{what} {record_id!r} not found in workspace {str(self.root)!r}."
                f"{hint} List them with '{listing}' (runs) or '{listing} --run "
                "RUN_ID' (a run's records)."
            )
        return self._decode(row)

    def has_record(self, table: str, record_id: str) -> bool:
        """Return whether ``table`` contains a record with id ``record_id``."""
        if table not in RECORD_TABLES:
            raise ValueError(f"Unknown table {table!r}.")
        with self._connect() as connection:
            row = connection.execute(
                f"SELECT 1 FROM {table} WHERE id = ?", (record_id,)
            ).fetchone()
        return row is not None

    def _list(self, table: str, **where: Any) -> list[dict[str, Any]]:
        clauses = " AND ".join(f"{key} = ?" for key in where)
        query = f"SELECT * FROM {table}" + (f" WHERE {clauses}" if where else "")
        with self._connect() as connection:
            rows = connection.execute(
                query + " ORDER BY created_at, rowid", tuple(where.values())
            ).fetchall()
        return [self._decode(row) for row in rows]

    def add_run(self, run_id: str, kind: str, config: dict, metrics: dict) -> None:
        self._insert(
            "runs",
            {
                "id": run_id,
                "created_at": _now(),
                "kind": kind,
                "config": config,
                "metrics": metrics,
            },
        )

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._get("runs", run_id, "Run")

    def set_run_root(self, run_id: str, root: str, *, description: str) -> None:
        """Record that the run's data folder is now ``root``, described by
        ``description``, which names the folder.

        Only ``root`` and ``description`` of the stored config change; the
        caller checks first that the folder contains the run's images.
        """
        record = self.get_run(run_id)
        config = {**record["config"], "root": root, "description": description}
        with self._connect() as connection:
            connection.execute(
                "UPDATE runs SET config = ? WHERE id = ?",
                (json.dumps(config), run_id),
            )

    def list_runs(self) -> list[dict[str, Any]]:
        return self._list("runs")

    def add_failure_set(
        self, failure_set_id: str, run_id: str, config: dict, metrics: dict
    ) -> None:
        self._insert(
            "failure_sets",
            {
                "id": failure_set_id,
                "run_id": run_id,
                "created_at": _now(),
                "config": config,
                "metrics": metrics,
            },
        )

    @contextlib.contextmanager
    def claim_failure_set(self, run_id: str, failure_set_id: str) -> Iterator[None]:
        """Mark the failure set as in use by this object while the body runs.

        A command that stored a failure set takes it back with
        ``delete_unused_failure_set`` when its own work fails, and that keeps
        a set claimed by another Workspace object, such as another command's.
        The claim is removed when the body ends. A process killed outright
        leaves its claim behind, and ``delete_unused_failure_set`` removes
        that claim once no process with its pid runs on this host. A claim
        left by a process on another host keeps the set, because whether that
        process still runs cannot be checked from here.

        Raises:
            WorkspaceError: the failure set of ``run_id`` is not stored, for
                example because the command that created it deleted it.
        """
        claim_id = new_id("cl")
        with self._connect() as connection:
            # The claim and delete_unused_failure_set each run in one write
            # transaction, and SQLite runs one at a time. Either the claim
            # comes first and the set stays, or the deletion comes first and
            # the claim raises here, before the command starts its work.
            connection.execute("BEGIN IMMEDIATE")
            stored = connection.execute(
                "SELECT 1 FROM failure_sets WHERE id = ? AND run_id = ?",
                (failure_set_id, run_id),
            ).fetchone()
            if stored is not None:
                connection.execute(
                    "INSERT INTO failure_set_claims VALUES (?, ?, ?, ?)",
                    (claim_id, failure_set_id, self.claimant, _now()),
                )
        if stored is None:
            raise WorkspaceError(
                f"Failure set {failure_set_id!r} of run {run_id!r} is not in "
                f"workspace {str(self.root)!r}. It was deleted before this "
                "command started its work, for example by the command that "
                "created it when that command stopped. Run the command again to "
                "create the failure set anew, or use another failure set of the "
                "run."
            )
        try:
            yield
        finally:
            try:
                with self._connect() as connection:
                    connection.execute(
                        "DELETE FROM failure_set_claims WHERE id = ?", (claim_id,)
                    )
            except WorkspaceError as error:
                # A claim left behind only keeps its failure set from deletion.
                logger.warning(
                    "Could not remove claim %s on failure set %s: %s",
                    claim_id,
                    failure_set_id,
                    error,
                )

    def delete_unused_failure_set(self, run_id: str, failure_set_id: str) -> bool:
        """Delete a failure set and its file when nothing else uses it.

        Commands use this to take back a failure set they stored for work that
        then failed. The set stays when a record refers to it or another
        Workspace object claims it (see ``claim_failure_set``). A claim whose
        process on this host has ended is deleted and does not count. Returns
        whether the set was deleted.
        """
        with self._connect() as connection:
            # Checked and deleted in one write transaction, so no claim or
            # record can be added in between.
            connection.execute("BEGIN IMMEDIATE")
            self._delete_ended_claims(connection, failure_set_id)
            claimed = connection.execute(
                "SELECT 1 FROM failure_set_claims WHERE failure_set_id = ? AND "
                "claimant != ? LIMIT 1",
                (failure_set_id, self.claimant),
            ).fetchone()
            if claimed:
                return False
            for table in ("scores", "repairs", "sweeps", "removal_curves", "decisions"):
                used = connection.execute(
                    f"SELECT 1 FROM {table} WHERE failure_set_id = ? LIMIT 1",
                    (failure_set_id,),
                ).fetchone()
                if used:
                    return False
            connection.execute(
                "DELETE FROM failure_set_claims WHERE failure_set_id = ?",
                (failure_set_id,),
            )
            deleted = connection.execute(
                "DELETE FROM failure_sets WHERE id = ? AND run_id = ?",
                (failure_set_id, run_id),
            ).rowcount
        if deleted:
            self.path(run_id, f"failure_sets/{failure_set_id}.pt").unlink(
                missing_ok=True
            )
        return bool(deleted)

    def _delete_ended_claims(
        self, connection: sqlite3.Connection, failure_set_id: str
    ) -> None:
        """Delete the claims on a failure set that name an ended process on this host.

        Such a claim was left by a process killed outright (SIGKILL, a power
        cut), which never ran the code that removes it.
        """
        claims = connection.execute(
            "SELECT id, claimant FROM failure_set_claims WHERE failure_set_id = ? "
            "AND claimant != ?",
            (failure_set_id, self.claimant),
        ).fetchall()
        for claim in claims:
            if not _claimant_has_ended(claim["claimant"]):
                continue
            logger.info(
                "Deleting claim %s on failure set %s because its process %s has ended.",
                claim["id"],
                failure_set_id,
                claim["claimant"],
            )
            connection.execute(
                "DELETE FROM failure_set_claims WHERE id = ?", (claim["id"],)
            )

    def get_failure_set(self, failure_set_id: str) -> dict[str, Any]:
        return self._get("failure_sets", failure_set_id, "Failure set")

    def list_failure_sets(self, run_id: str) -> list[dict[str, Any]]:
        return self._list("failure_sets", run_id=run_id)

    def add_scores(
        self,
        scores_id: str,
        run_id: str,
        failure_set_id: str,
        method: str,
        config: dict,
        metrics: dict,
        *,
        reuse_stored: bool = False,
    ) -> dict[str, Any] | None:
        """Add a scores record.

        With ``reuse_stored``, nothing is added when the same ranking is
        stored already: the same run, failure set, method, ``config`` (seed
        included) and ``metrics["device"]``, with its file ``scores/<id>.pt``
        present. The search and the insert run in one write transaction, so
        two commands that finish the same ranking at the same time store it
        once.

        Returns:
            The newest stored record of the same ranking when one was found
            and nothing was added; otherwise None.
        """
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            if reuse_stored:
                stored = self._same_ranking(
                    connection, run_id, failure_set_id, method, config, metrics
                )
                if stored is not None:
                    return stored
            _insert_row(
                connection,
                "scores",
                {
                    "id": scores_id,
                    "run_id": run_id,
                    "failure_set_id": failure_set_id,
                    "method": method,
                    "created_at": _now(),
                    "config": config,
                    "metrics": metrics,
                },
            )
        return None

    def find_ranking(
        self, run_id: str, failure_set_id: str, method: str, config: dict, device: str
    ) -> dict[str, Any] | None:
        """Return the newest stored ranking of ``method`` on this failure set
        with the settings ``config`` (seed included) made on ``device``, whose
        scores file is present, or None."""
        with self._connect() as connection:
            return self._same_ranking(
                connection,
                run_id,
                failure_set_id,
                method,
                config,
                {"device": device},
            )

    def _same_ranking(
        self,
        connection: sqlite3.Connection,
        run_id: str,
        failure_set_id: str,
        method: str,
        config: dict,
        metrics: dict,
    ) -> dict[str, Any] | None:
        # The record stores the settings as JSON, so they are compared as JSON.
        settings = json.loads(json.dumps(config))
        rows = connection.execute(
            "SELECT * FROM scores WHERE run_id = ? AND failure_set_id = ? AND "
            "method = ? ORDER BY created_at DESC, rowid DESC",
            (run_id, failure_set_id, method),
        ).fetchall()
        for row in rows:
            try:
                record = self._decode(row)
            except WorkspaceError:
                continue
            stored_metrics = record["metrics"]
            if (
                record["config"] == settings
                and isinstance(stored_metrics, dict)
                and stored_metrics.get("device") == metrics.get("device")
                and self._scores_usable(record)
            ):
                return record
        return None

    def _scores_usable(self, record: dict[str, Any]) -> bool:
        """Return whether the ranking's scores file loads and contains valid
        scores, so that a missing or damaged file is computed again instead of
        reused."""
        try:
            scores = self.load_tensor(record["run_id"], f"scores/{record['id']}.pt")
        except WorkspaceError:
            return False
        return scores_problem(scores, record["metrics"].get("n_train")) is None

    def get_scores(self, scores_id: str) -> dict[str, Any]:
        return self._get("scores", scores_id, "Scores")

    def list_scores(self, run_id: str, **where: Any) -> list[dict[str, Any]]:
        return self._list("scores", run_id=run_id, **where)

    def add_repair(
        self,
        repair_id: str,
        run_id: str,
        failure_set_id: str,
        scores_id: str | None,
        treatment: str,
        config: dict,
        metrics: dict,
    ) -> None:
        self._insert(
            "repairs",
            {
                "id": repair_id,
                "run_id": run_id,
                "failure_set_id": failure_set_id,
                "scores_id": scores_id,
                "treatment": treatment,
                "created_at": _now(),
                "config": config,
                "metrics": metrics,
            },
        )

    def get_repair(self, repair_id: str) -> dict[str, Any]:
        return self._get("repairs", repair_id, "Repair")

    def list_repairs(self, run_id: str, **where: Any) -> list[dict[str, Any]]:
        return self._list("repairs", run_id=run_id, **where)

    def add_sweep(
        self,
        sweep_id: str,
        run_id: str,
        failure_set_id: str,
        treatment: str,
        causes: str,
        n_removed: int,
        strengths: list[float],
        config: dict,
        points: list[dict[str, Any]],
        *,
        device: str = "",
    ) -> None:
        """Store the trade-off points of one treatment over several strengths.

        Args:
            causes: where the removed examples C came from, for display.
            n_removed: the size of C.
            strengths: the swept values in the order they ran.
            config: the treatment settings. Each point replaces the swept
                setting with its strength.
            points: one dict per strength, as from repair_core.evaluation.sweep.
            device: the device the sweep ran on, such as "cpu".
        """
        self._insert(
            "sweeps",
            {
                "id": sweep_id,
                "run_id": run_id,
                "failure_set_id": failure_set_id,
                "treatment": treatment,
                "causes": causes,
                "n_removed": n_removed,
                "strengths": strengths,
                "created_at": _now(),
                "config": config,
                "points": points,
                "device": device,
            },
        )

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._get("sweeps", sweep_id, "Sweep")

    def list_sweeps(self, run_id: str, **where: Any) -> list[dict[str, Any]]:
        return self._list("sweeps", run_id=run_id, **where)

    def add_removal_curve(
        self,
        removal_curve_id: str,
        run_id: str,
        failure_set_id: str,
        scores_id: str,
        ks: list[int],
        seeds: list[int],
        points: list[dict[str, Any]],
        *,
        skipped_ks: list[int] = (),
        device: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        """Store the accuracies after removing the top k of a ranking.

        Args:
            ks: the numbers of removed examples that were run, one per
                point. A requested k that would leave nothing to train on
                is skipped before this.
            seeds: the fine-tuning seeds of every k.
            points: one dict per kept k, as from
                repair_core.evaluation.removal_curve.
            skipped_ks: the requested k that were skipped.
            device: the device the curve ran on, such as "cpu".
            config: the fine-tuning settings, without the seed, which
                ``seeds`` gives.
        """
        self._insert(
            "removal_curves",
            {
                "id": removal_curve_id,
                "run_id": run_id,
                "failure_set_id": failure_set_id,
                "scores_id": scores_id,
                "ks": ks,
                "seeds": seeds,
                "created_at": _now(),
                "points": points,
                "skipped_ks": [int(k) for k in skipped_ks],
                "device": device,
                "config": config or {},
            },
        )

    def get_removal_curve(self, removal_curve_id: str) -> dict[str, Any]:
        return self._get("removal_curves", removal_curve_id, "Removal curve")

    def list_removal_curves(self, run_id: str, **where: Any) -> list[dict[str, Any]]:
        return self._list("removal_curves", run_id=run_id, **where)

    # Review decisions ----------------------------------------------------

    def set_decisions(
        self,
        run_id: str,
        failure_set_id: str,
        train_indices: list[int],
        decision: str | None,
        *,
        expected: Mapping[int, str | None] | None = None,
    ) -> list[int]:
        """Record ``decision`` for each training index, in one transaction.

        ``decision`` is "confirmed", "rejected", or None to clear it. With
        ``expected``, {training index: decision or None} as the caller last
        read them, an index whose stored decision differs from its expected
        one keeps it, since another session changed it in the meantime.

        Returns:
            The indices left unchanged for that reason, ascending; empty
            without ``expected``.
        """
        if decision is not None and decision not in DECISIONS:
            raise WorkspaceError(
                f"Unknown review decision {decision!r}. Use one of "
                f"{', '.join(DECISIONS)} or None to clear."
            )
        indices = [int(i) for i in train_indices]
        unchanged: list[int] = []
        with self._connect() as connection:
            if expected is not None:
                # Reading and writing in one write transaction, so that no
                # other session changes a decision in between.
                connection.execute("BEGIN IMMEDIATE")
                stored = {
                    row["train_index"]: row["decision"]
                    for row in connection.execute(
                        "SELECT train_index, decision FROM decisions WHERE "
                        "run_id = ? AND failure_set_id = ?",
                        (run_id, failure_set_id),
                    )
                }
                elsewhere = {i for i in indices if stored.get(i) != expected.get(i)}
                unchanged = sorted(elsewhere)
                indices = [i for i in indices if i not in elsewhere]
            if decision is None:
                connection.executemany(
                    "DELETE FROM decisions WHERE run_id = ? AND failure_set_id = ? "
                    "AND train_index = ?",
                    [(run_id, failure_set_id, i) for i in indices],
                )
            else:
                connection.executemany(
                    "INSERT INTO decisions VALUES (?, ?, ?, ?, ?) ON CONFLICT "
                    "(run_id, failure_set_id, train_index) DO UPDATE SET "
                    "decision = excluded.decision, updated_at = excluded.updated_at",
                    [(run_id, failure_set_id, i, decision, _now()) for i in indices],
                )
        return unchanged

    def get_decisions(self, run_id: str, failure_set_id: str) -> dict[int, str]:
        """Return {training index: decision} for one failure set."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT train_index, decision FROM decisions WHERE run_id = ? AND "
                "failure_set_id = ? ORDER BY train_index",
                (run_id, failure_set_id),
            ).fetchall()
        return {row["train_index"]: row["decision"] for row in rows}

    def check_integrity(self) -> str:
        """Run SQLite's integrity check; return "ok" when the database is sound."""
        with self._connect() as connection:
            return connection.execute("PRAGMA integrity_check").fetchone()[0]
