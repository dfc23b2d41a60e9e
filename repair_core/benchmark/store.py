"""The results file: every finished piece of work is written to it at once.

A benchmark run can stop at any point (a crash, a kill, the end of the time
available) and the page can still be rendered from what the file holds. Each
unit (one experiment on one data set with one base-model seed) stores its
steps as they finish, so a later run with the same settings and workspace
resumes where the last one stopped.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from repair_core.benchmark.settings import BenchSettings
from repair_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
FORMAT_VERSION = 1

#: Settings that choose what to run rather than how: a run with other values
#: resumes the same file, and the stored value is the union of all runs.
SELECTION_KEYS = ("experiments",)


def now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def jsonable(value: Any) -> Any:
    """Convert tensors and tuples to JSON types and NaN or infinity to None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _without_selection(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in SELECTION_KEYS}


#: JSON's names for the Python types that ``json.loads`` returns.
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def read_results(path: Path) -> dict[str, Any]:
    """Read the results file at ``path`` and check its top-level structure.

    Raises:
        DataError: the file cannot be read, is empty, is not valid JSON, or
            its value or one of its main entries has the wrong JSON type, or
            it has no settings.
    """
    advice = (
        "Restore the file from a copy, pass another --out folder, or run the "
        "benchmark with --fresh to discard the file and start over."
    )
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"Failed to read the results file {str(path)!r} ({error}). Make it "
            "readable, or pass another --out folder."
        ) from error
    if not raw.strip():
        raise DataError(f"The results file {str(path)!r} is empty. {advice}")
    try:
        data = json.loads(raw)
    except ValueError as error:
        # JSONDecodeError, or UnicodeDecodeError for bytes that are not text.
        raise DataError(
            f"The results file {str(path)!r} is not valid JSON ({error}). {advice}"
        ) from error
    if not isinstance(data, dict):
        raise DataError(
            f"The results file {str(path)!r} contains a JSON "
            f"{_JSON_TYPES.get(type(data), type(data).__name__)}, but it must "
            f"contain an object. {advice}"
        )
    for key, expected in (("settings", dict), ("units", dict), ("invocations", list)):
        value = data.get(key)
        if value is not None and not isinstance(value, expected):
            raise DataError(
                f"The results file {str(path)!r} is invalid: its {key!r} entry is "
                f"a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, "
                f"but it must be a JSON {_JSON_TYPES[expected]}. {advice}"
            )
    for key, unit in data.get("units", {}).items():
        if not isinstance(unit, dict):
            raise DataError(
                f"The results file {str(path)!r} is invalid: unit {key!r} is a "
                f"JSON {_JSON_TYPES.get(type(unit), type(unit).__name__)}, but it "
                f"must be a JSON object. {advice}"
            )
    if "settings" not in data:
        raise DataError(
            f"The results file {str(path)!r} has no 'settings' entry, so the "
            f"benchmark did not write it. {advice}"
        )
    settings = data["settings"]
    problem = (
        "its 'settings' entry is null"
        if settings is None
        else BenchSettings.json_problem(settings)
    )
    if problem is not None:
        raise DataError(
            f"The results file {str(path)!r} is invalid: {problem}. {advice}"
        )
    return data


def peak_rss_mb() -> float:
    """Return the peak resident set size of this process so far, in MiB.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    divisor = 1024 * 1024 if sys.platform == "darwin" else 1024
    return peak / divisor


class ResultsStore:
    """The results JSON of one benchmark folder, saved after every change.

    Args:
        path: the results file; read when it exists.
        settings: the settings of this run, stored on first write.
        command: the command line, stored with the date.
        resume: keep the units of an existing file with equal settings; the
            keys in ``SELECTION_KEYS`` may differ, and their stored lists
            grow to the union.

    Raises:
        ConfigError: the existing file was written with other settings and
            ``resume`` is set.
        DataError: the existing file is unreadable or not a results file, and
            ``settings`` is None or ``resume`` is set. Without ``resume`` the
            file is replaced unread.
    """

    def __init__(
        self,
        path: Path,
        *,
        settings: dict[str, Any] | None = None,
        command: str = "",
        machine: dict[str, Any] | None = None,
        resume: bool = True,
    ) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {}
        if self.path.is_file() and (settings is None or resume):
            self.data = read_results(self.path)
        if settings is None:
            return
        old = self.data.get("settings")
        new = jsonable(settings)
        if (
            old is not None
            and resume
            and _without_selection(new) != (_without_selection(old))
        ):
            raise ConfigError(
                f"{self.path} contains results of other settings ({old.get('mode')} "
                "mode or other sizes). Pass another --out folder, or --fresh to "
                "start over."
            )
        if old is None or not resume:
            self.data = {
                "format": FORMAT_VERSION,
                "settings": new,
                "started": now(),
                "units": {},
                "invocations": [],
            }
        else:
            for key in SELECTION_KEYS:
                if key in new:
                    old[key] = sorted(set(old.get(key, [])) | set(new[key]))
        self.data["finished"] = False
        self.data.setdefault("invocations", []).append(
            {"command": command, "started": now(), "machine": machine or {}}
        )
        self.save()

    @property
    def units(self) -> dict[str, Any]:
        return self.data.setdefault("units", {})

    def save(self) -> None:
        """Write the file atomically, so a kill never leaves half a file."""
        self.data["updated"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(jsonable(self.data), indent=1))
        os.replace(temporary, self.path)

    def unit(self, key: str, **description: Any) -> Unit:
        """Return the unit ``key``, created with ``description`` if new."""
        record = self.units.get(key)
        if record is None:
            record = {"status": "running", "started": now(), "steps": {}}
            record.update(jsonable(description))
            self.units[key] = record
            self.save()
        return Unit(self, key, record)


class Unit:
    """One experiment on one data set and base-model seed, saved step by step."""

    def __init__(self, store: ResultsStore, key: str, record: dict[str, Any]):
        self.store = store
        self.key = key
        self.record = record

    @property
    def done(self) -> bool:
        return self.record.get("status") == "done"

    @property
    def steps(self) -> dict[str, Any]:
        return self.record["steps"]

    def step(self, name: str, compute: Callable[[], Any]) -> Any:
        """Return the stored result of step ``name``, or compute and store it."""
        if name in self.steps:
            logger.info("%s: step %s already done", self.key, name)
            return self.steps[name]
        logger.info("%s: running step %s", self.key, name)
        value = jsonable(compute())
        self.steps[name] = value
        self.store.save()
        return value

    def set(self, name: str, value: Any) -> None:
        self.record[name] = jsonable(value)
        self.store.save()

    def restart(self) -> None:
        """Drop every stored step, for example when the workspace lost the run."""
        self.record["steps"] = {}
        self.record["status"] = "running"
        self.store.save()

    def finish(self) -> None:
        """Mark the unit done, dropping the error of an earlier failed attempt."""
        self.record["status"] = "done"
        self.record.pop("error", None)
        self.record["finished"] = now()
        self.store.save()

    def fail(self, error: BaseException) -> None:
        self.record["status"] = "failed"
        self.record["error"] = f"{type(error).__name__}: {error}"
        self.store.save()
