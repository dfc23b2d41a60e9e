"""Orchestration shared by the CLI and the dashboard.

Each function loads what it needs from the workspace, calls an algorithm from
the rest of the package and saves what it returns. The algorithms themselves
never touch the workspace.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repair_core import models
from repair_core.data import DataSplit, ImageDataset, check_path_name, load_data
from repair_core.devices import seeded, select_device
from repair_core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EmptyFailureSetError,
    WorkspaceError,
)
from repair_core.failures import FailureSplit, split_failures
from repair_core.inference import model_device, predict_logits, share
from repair_core.noise import apply_scenario
from repair_core.progress import Progress
from repair_core.training import (
    TrainConfig,
    TrainProgress,
    train_model,
    validation_size,
)
from repair_core.workspace import (
    RECORD_TABLES,
    Workspace,
    atomic_write_bytes,
    listed_ids,
    new_id,
    scores_problem,
)

logger = logging.getLogger(__name__)

MAX_SAVED_CHECKPOINTS = 5
#: Run file with per-image digests and file names of the data as stored.
DATA_INDEX_FILE = "data_index.pt"
VICTIM_SEED_OFFSET = 1000


@dataclass
class RunConfig:
    """Everything needed to rebuild a run's data and model."""

    data: str = "mnist-embedded"
    """Data source name (see repair_core.data.DATA_SOURCES)."""
    root: str | None = None
    """Folder of a torchvision or ImageFolder data set."""
    download: bool = False
    """Let torchvision download a missing data set into ``root``."""
    n_train: int | None = None
    """Use a seeded, class-balanced subset of this many training images."""
    n_test: int | None = None
    """Use a seeded, class-balanced subset of this many test images."""
    data_seed: int = 0
    """Seed of the train/test split and subsets."""
    scenario: str = "none"
    """Noise scenario applied to the training set (see repair_core.noise.SCENARIOS)."""
    scenario_params: dict[str, Any] = field(default_factory=dict)
    """Scenario settings, for example {"epsilon": 0.1} for FGSM."""
    model: str = "mnist-cnn"
    """Built-in model name, or 'module:callable' for a user model."""
    seed: int = 0
    """Seed of the noise, the model initialisation and training."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda or mps."""
    query_fraction: float = 0.5
    """Share of the failures used as the query set F_q; the rest is F_h."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""

    def __post_init__(self) -> None:
        # Imported here, as the method modules load only when they are needed.
        from repair_core.identification.base import MAX_SEED, check_setting_types

        # Checked here so that a bad value fails before data loading and training.
        check_setting_types(self)
        if not 0 <= self.data_seed <= MAX_SEED:
            raise ConfigError(
                f"data_seed {self.data_seed} is outside 0..{MAX_SEED}; choose a "
                "seed in that range."
            )
        if not 0 < self.query_fraction <= 1:
            raise ConfigError(
                f"Query fraction {self.query_fraction} must lie in (0, 1]. Use 0.5 "
                "to split the failures in half."
            )
        # Training runs with ``seed``, so the copy in ``train`` follows it and
        # the stored record names the seed that ran.
        if self.train.seed != self.seed:
            self.train = dataclasses.replace(self.train, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        values = dict(values)
        values["train"] = TrainConfig(**values.get("train", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class LoadedRun:
    """A run read back from the workspace, ready for identification or repair."""

    run_id: str
    record: dict[str, Any]
    config: RunConfig
    data: DataSplit
    """The data with the corrupted training set as the model saw it."""
    corrupted_mask: torch.Tensor | None
    """bool, (n_train,), True where the scenario changed an example; None if unknown."""
    clean_train_labels: torch.Tensor | None
    """(n_train,), the training labels before the scenario; None if unknown."""
    model: nn.Module
    device: torch.device
    test_logits: torch.Tensor
    """Logits of the stored model on the test set, shape (n_test,, K)."""

    @property
    def test_predictions(self) -> torch.Tensor:
        return self.test_logits.argmax(1)

    def build_model(self) -> nn.Module:
        """Return a fresh, untrained model of this run's architecture."""
        return _build_architecture(self.config, self.data, self.model_spec_folder)

    @property
    def model_spec_folder(self) -> Path | None:
        folder = self.record["config"].get("factory_folder")
        return Path(folder) if folder else None


def private_model(run: LoadedRun) -> nn.Module:
    """Return a copy of the run's model for one job to differentiate.

    torch.func.functional_call, which the Fisher and per-example gradients
    use, swaps a module's parameters for wrapped tensors while it runs. The
    dashboard caches one LoadedRun per run for every browser session, so two
    jobs differentiating that one module at once could each copy or use the
    other's wrapped tensors and leave the module broken. Jobs therefore work
    on a copy, and the shared module only ever runs forward passes.
    """
    return copy.deepcopy(run.model)


def _load_new_data(config: RunConfig, *, trains: bool) -> DataSplit:
    """Load the data of a new run, which needs a training image of each class,
    outside the validation split when the run ``trains``."""
    data = _load_data(config)
    n_train = len(data.train)
    n_fit = n_train
    if trains:
        n_fit -= validation_size(n_train, config.train.val_fraction)
    if n_fit < data.num_classes:
        if trains:
            counted = (
                f"Training would fit {n_fit} images ({n_train} minus "
                f"{n_train - n_fit} held out for validation)"
            )
            advice = "more training images or a smaller validation fraction"
        else:
            counted = f"The training set has {n_train} images"
            advice = "more training images"
        raise ConfigError(
            f"{counted}, fewer than the {data.num_classes} classes, so some classes "
            f"would have no image to train on. Ask for {advice}."
        )
    return data


def _load_data(config: RunConfig) -> DataSplit:
    return load_data(
        config.data,
        root=config.root,
        download=config.download,
        seed=config.data_seed,
        n_train=config.n_train,
        n_test=config.n_test,
    )


def _data_fingerprint(data: DataSplit) -> dict[str, str]:
    """Digests of the images and labels as loaded, before any noise scenario."""
    digests = {}
    for part, dataset in (("train", data.train), ("test", data.test)):
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (dataset.images, dataset.labels):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digests[part] = digest.hexdigest()
    return digests


#: Rows of images digested at once by _image_digests.
_DIGEST_CHUNK = 4096
#: Examples named in a changed-data message, per kind of change.
_NAMED_CHANGES = 3


def _image_digests(dataset: ImageDataset) -> torch.Tensor:
    """Return a 64-bit digest of each image and its label, shape (N,).

    Each digest is a weighted sum, modulo 2^64, of the image's float32 bit
    patterns and its label, with fixed pseudo-random odd weights: any change
    to one pixel or to the label changes it.
    """
    flat = dataset.images.detach().cpu().contiguous().numpy().reshape(len(dataset), -1)
    bits = flat.view(np.uint32)
    weights = np.random.default_rng(0).integers(
        0, 2**63, size=bits.shape[1] + 1, dtype=np.uint64
    ) * np.uint64(2) + np.uint64(1)
    labels = dataset.labels.cpu().numpy().astype(np.uint64)
    digests = labels * weights[-1]
    for start in range(0, len(bits), _DIGEST_CHUNK):
        chunk = bits[start : start + _DIGEST_CHUNK].astype(np.uint64)
        # uint64 products and sums wrap around modulo 2^64.
        digests[start : start + _DIGEST_CHUNK] += (chunk * weights[:-1]).sum(axis=1)
    return torch.from_numpy(digests.view(np.int64).copy())


def _data_index(data: DataSplit) -> dict[str, Any]:
    """Per-image digests, the image shape and, for image files, the file names
    of both parts."""
    return {
        f"{part}_{key}": value
        for part, dataset in (("train", data.train), ("test", data.test))
        for key, value in (
            ("digests", _image_digests(dataset)),
            ("shape", list(dataset.images.shape[1:])),
            ("files", dataset.files),
        )
    }


def _names_text(names: list[str]) -> str:
    listed = ", ".join(names[:_NAMED_CHANGES])
    more = len(names) - _NAMED_CHANGES
    return f"{listed} and {more} more" if more > 0 else listed


def _part_changes(
    part: str, stored: dict[str, Any], dataset: ImageDataset
) -> list[str]:
    """Describe how one part differs from its stored index: its image shape,
    else the files added, removed or changed where file names are known, else
    the positions changed."""
    old_shape = stored.get(f"{part}_shape")
    new_shape = list(dataset.images.shape[1:])
    if old_shape is not None and old_shape != new_shape:
        # Every digest differs then, so naming files would name all of them.
        return [
            f"the {part} images are now {'×'.join(map(str, new_shape))} (channels × "
            f"height × width), not {'×'.join(map(str, old_shape))} (an image "
            "folder is read as RGB as soon as one of its files is in colour)"
        ]
    old_digests = stored[f"{part}_digests"]
    new_digests = _image_digests(dataset)
    old_files = stored.get(f"{part}_files")
    if old_files is not None and dataset.files is not None:
        return _file_changes(old_files, old_digests, dataset.files, new_digests)
    if len(old_digests) != len(new_digests):
        return []
    positions = torch.nonzero(old_digests != new_digests).flatten().tolist()
    if not positions:
        return []
    noun = "image" if len(positions) == 1 else "images"
    return [
        f"{len(positions)} {part} {noun} changed in pixels or label, at positions "
        f"{_names_text([str(p) for p in positions])}"
    ]


def _file_changes(
    old_files: list[str],
    old_digests: torch.Tensor,
    new_files: list[str],
    new_digests: torch.Tensor,
) -> list[str]:
    """Name the files added, removed or changed between two file lists, each
    with one digest per file."""
    old_at = dict(zip(old_files, old_digests.tolist(), strict=True))
    new_at = dict(zip(new_files, new_digests.tolist(), strict=True))
    added = [name for name in new_files if name not in old_at]
    removed = [name for name in old_files if name not in new_at]
    changed = [
        name for name in new_files if name in old_at and old_at[name] != new_at[name]
    ]
    # A digest covers the pixels and the label, so a file whose class index
    # moved, as when a class folder is renamed, counts as changed.
    kinds = {
        "added": added,
        "removed": removed,
        "changed in pixels or label": changed,
    }
    return [
        f"{len(names)} {'file' if len(names) == 1 else 'files'} {kind} "
        f"({_names_text(names)})"
        for kind, names in kinds.items()
        if names
    ]


def _data_changes(
    workspace: Workspace, run_id: str, record: dict[str, Any], data: DataSplit
) -> list[str]:
    """List how ``data`` differs from the data the run was stored with.

    Stored labels, failure sets and scores are indexed by position, so an image
    moved between class folders would silently shift every one of them. The
    list names the files added, removed or changed where the run stored its
    data index, and classes whose names changed.
    """
    config = record["config"]
    stored = config.get("data_fingerprint")
    counts = {part: record["metrics"].get(f"n_{part}") for part in ("train", "test")}
    now = {"train": data.train, "test": data.test}
    changed = []
    for part in ("train", "test"):
        if counts[part] is not None and counts[part] != len(now[part]):
            changed.append(
                f"the {part} part has {len(now[part])} images, "
                f"{counts[part]} when the run was stored"
            )
    if not changed and stored:
        fingerprint = _data_fingerprint(data)
        changed = [
            f"the {part} part contains other images or labels"
            for part in ("train", "test")
            if stored.get(part) not in (None, fingerprint[part])
        ]
    if changed and workspace.path(run_id, DATA_INDEX_FILE).is_file():
        index = workspace.load_tensor(run_id, DATA_INDEX_FILE)
        details = [
            change
            for part in ("train", "test")
            for change in _part_changes(part, index, now[part])
        ]
        changed += details
    names = config.get("class_names")
    if names is not None and list(data.train.class_names) != list(names):
        # The pages and exports name classes, so a renamed class folder
        # would relabel every figure although the labels are intact.
        now_names = _names_text([repr(name) for name in data.train.class_names])
        stored_names = _names_text([repr(name) for name in names])
        changed.append(f"the class names are now {now_names}, not {stored_names}")
    return changed


def _check_same_data(
    workspace: Workspace, run_id: str, record: dict[str, Any], data: DataSplit
) -> None:
    """Raise DataError when the run's data source no longer gives its images."""
    changed = _data_changes(workspace, run_id, record, data)
    if changed:
        config = record["config"]
        source = config.get("root") or config.get("data")
        raise DataError(
            f"The data of run {run_id!r} ({source}) changed since the run was "
            f"stored: {'; '.join(changed)}. Its labels, failure sets and scores "
            "are indexed by image, so they would point at other images. Restore "
            "the data as it was, or import or train the run again on the new data."
        )


def _train_mean(images: torch.Tensor) -> list[float]:
    return images.mean(dim=(0, 2, 3)).tolist()


def _build_architecture(
    config: RunConfig, data: DataSplit, factory_folder: Path | None = None
) -> nn.Module:
    if ":" in config.model:
        try:
            return models.load_factory(config.model, factory_folder)
        except CheckpointError as error:
            if factory_folder is None or factory_folder.is_dir():
                raise
            raise CheckpointError(
                f"{error} The run was imported from {str(factory_folder)!r}, "
                "where the factory's module was beside the checkpoint, and that "
                "folder no longer exists. Move the module back there, or import "
                "the run again."
            ) from error
    return models.build_model(
        config.model,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        mean=_train_mean(data.train.images),
    )


def _victim_trainer(config: RunConfig, data: DataSplit, device: torch.device):
    """Return a function that trains the FGSM victim on the clean training set.

    The victim uses its own seed, so it is a different model from the one the
    run trains on the poisoned data.
    """

    def train_victim(clean: ImageDataset) -> nn.Module:
        victim_seed = config.seed + VICTIM_SEED_OFFSET
        with seeded(victim_seed):
            victim = _build_architecture(config, data)
        victim_config = dataclasses.replace(
            config.train, seed=victim_seed, record_trajectory=False
        )
        train_model(victim, clean.images, clean.labels, victim_config, device=device)
        return victim.cpu()

    return train_victim


def _save_failure_set(
    workspace: Workspace, run_id: str, split: FailureSplit, origin: str
) -> str:
    failure_set_id = new_id("fs")
    workspace.save_tensor(
        run_id, f"failure_sets/{failure_set_id}.pt", dataclasses.asdict(split)
    )
    workspace.add_failure_set(
        failure_set_id,
        run_id,
        {"query_fraction": split.query_fraction, "seed": split.seed, "origin": origin},
        split.counts(),
    )
    return failure_set_id


def _store_run(
    workspace: Workspace,
    run_id: str,
    *,
    kind: str,
    config: RunConfig,
    data: DataSplit,
    clean_train: ImageDataset,
    mask: torch.Tensor | None,
    model: nn.Module,
    scenario_params: dict[str, Any],
    extra_config: dict[str, Any],
    extra_metrics: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Evaluate ``model``, split its failures and save the run; return its summary."""
    logits = predict_logits(model, data.test.images)
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.all():
        first = int(torch.nonzero(~finite)[0, 0])
        raise CheckpointError(
            f"The model gives NaN or infinite logits for {int((~finite).sum())} of "
            f"the {len(logits)} test images (the first is test image {first}), so "
            "its predictions are meaningless. Check the model's weights and "
            "the forward method for NaN or infinite values."
        )
    predictions = logits.argmax(1)
    test_accuracy = share(predictions == data.test.labels)

    workspace.save_tensor(run_id, "model.pt", _cpu_state(model))
    workspace.save_tensor(run_id, "train_labels.pt", data.train.labels.clone())
    if not torch.equal(data.train.images, clean_train.images):
        workspace.save_tensor(run_id, "train_images.pt", data.train.images.clone())
    if mask is not None:
        workspace.save_tensor(run_id, "corrupted_mask.pt", mask.clone())
    workspace.save_tensor(run_id, "test_logits.pt", logits)
    workspace.save_tensor(
        run_id,
        DATA_INDEX_FILE,
        _data_index(DataSplit(train=clean_train, test=data.test, source=data.source)),
    )

    split = None
    try:
        split = split_failures(
            predictions,
            data.test.labels,
            query_fraction=config.query_fraction,
            seed=config.seed,
        )
    except EmptyFailureSetError:
        logger.warning("Run %s makes no mistakes on the test set", run_id)

    metrics = {
        "n_train": len(data.train),
        "n_test": len(data.test),
        "test_accuracy": test_accuracy,
        "n_failures": 0 if split is None else len(split.failures),
        "n_query": 0 if split is None else len(split.query),
        "n_holdout": 0 if split is None else len(split.holdout),
        "n_corrupted": None if mask is None else int(mask.sum()),
        **extra_metrics,
    }
    record_config = {
        **config.to_dict(),
        "scenario_params": scenario_params,
        "class_names": data.train.class_names,
        "description": data.train.description,
        "data_fingerprint": _data_fingerprint(
            DataSplit(train=clean_train, test=data.test, source=data.source)
        ),
        **extra_config,
    }
    metrics["seconds"] = time.perf_counter() - started
    # The run record is written after its files, so a crash before this line
    # leaves only unreferenced files and no half-made run.
    workspace.add_run(run_id, kind, record_config, metrics)
    failure_set_id = None
    if split is not None:
        failure_set_id = _save_failure_set(workspace, run_id, split, "all failures")
    return {"run_id": run_id, "failure_set_id": failure_set_id, **metrics}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


#: Suffix of the marker that names the files of a result still being written.
PENDING_SUFFIX = ".pending"
#: The form of the ids that ``new_id`` makes, such as ``rp-1a2b3c4d``.
RECORD_ID = re.compile(r"[a-z]+-[0-9a-f]{8}")


@contextlib.contextmanager
def _stored_models(
    workspace: Workspace,
    run_id: str,
    folder: str,
    *,
    main_name: str | None = None,
    main_file: str | None = None,
) -> Iterator[Any]:
    """Yield a function that saves each model as ``<folder>/<name>.pt``.

    ``folder`` is ``<table>/<record id>``, such as ``repairs/rp-1a2b3c4d``, and
    the body adds that record. The model named ``main_name`` goes to
    ``main_file`` instead. If the body raises, every file saved so far is
    deleted, so a failed or interrupted result leaves nothing behind. A
    process killed outright runs no cleanup, so a marker beside the folder
    names the process until the body has finished. Once that process has
    gone without adding the record, ``remove_abandoned_files`` deletes the
    result's files, and every call here runs it first.
    """
    remove_abandoned_files(workspace)
    written: list[str] = []
    marker = workspace.path(run_id, folder + PENDING_SUFFIX)
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        atomic_write_bytes(marker, json.dumps(owner).encode())
    except OSError as error:
        raise WorkspaceError(
            f"Workspace file {str(marker)!r} could not be written "
            f"({error.strerror or error}). Make the folder "
            f"{str(marker.parent)!r} writable, or choose another workspace folder."
        ) from error

    def store(name: str, model: nn.Module) -> str:
        relative = main_file if name == main_name else f"{folder}/{name}.pt"
        workspace.save_tensor(run_id, relative, _cpu_state(model))
        written.append(relative)
        return relative

    try:
        yield store
    except BaseException:
        for relative in written:
            workspace.path(run_id, relative).unlink(missing_ok=True)
        directory = workspace.path(run_id, folder)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        marker.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)


def _process_gone(pid: Any) -> bool:
    """Return whether no process with id ``pid`` runs on this machine."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        # The process exists but belongs to another user.
        return False
    return False


def _files_of(folder: Path, record_id: str) -> list[Path]:
    """Return the entries of ``folder`` that belong to the result ``record_id``.

    These are its folder of models, its files ``<id>.pt`` and ``<id>_causes.pt``
    and the temporary files of writes that never finished (``.<id>.…`` and
    ``.<id>_…``). Ids end in eight hex digits (see ``RECORD_ID``), so no other
    id starts with ``<id>.`` or ``<id>_``.
    """
    prefixes = tuple(
        f"{dot}{record_id}{separator}" for dot in ("", ".") for separator in "._"
    )
    return [
        path
        for path in folder.iterdir()
        if path.name == record_id or path.name.startswith(prefixes)
    ]


def remove_abandoned_files(workspace: Workspace) -> list[str]:
    """Delete the files of results whose writing process was killed outright.

    Each marker left by ``_stored_models`` names a process on a machine. When
    that machine is this one and the process no longer runs, the result's
    files are deleted, unless its record was added after all, and then the
    marker goes. A marker of a running process, of another machine or that
    cannot be read is left alone.

    A file that cannot be deleted, as in a folder the user cannot write, is
    logged as a warning and kept with its marker, so a later call tries
    again. The command goes on, since the leftover takes nothing from its
    own result. A command that writes into that same folder is stopped by
    ``Workspace.check_writable`` before it starts its work.

    Returns:
        The ids of the results whose files were all deleted.
    """
    removed: list[str] = []
    runs = workspace.root / "runs"
    if not runs.is_dir():
        return removed
    host = socket.gethostname()
    for marker in sorted(runs.glob(f"*/*/*{PENDING_SUFFIX}")):
        table = marker.parent.name
        record_id = marker.name.removesuffix(PENDING_SUFFIX)
        if not RECORD_ID.fullmatch(record_id):
            # Not a marker that _stored_models writes.
            continue
        try:
            owner = json.loads(marker.read_text())
            owner_gone = owner["host"] == host and _process_gone(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not owner_gone or table not in RECORD_TABLES:
            continue
        if not workspace.has_record(table, record_id):
            failed = _delete_files_of(marker, record_id)
            if failed:
                continue
            removed.append(record_id)
            logger.warning(
                "Deleted the saved models of %s, whose process was killed before "
                "it stored the record.",
                record_id,
            )
        try:
            marker.unlink(missing_ok=True)
        except OSError as error:
            logger.warning(
                "Could not delete %s, the marker left by the killed process that "
                "wrote %s: %s. Make its folder writable, or delete it by hand.",
                marker,
                record_id,
                error.strerror or error,
            )
    return removed


def _delete_files_of(marker: Path, record_id: str) -> list[str]:
    """Delete the files of the abandoned result ``record_id`` beside its
    ``marker``, which stays. Return the paths that could not be deleted,
    after logging one warning about them."""
    failed: list[tuple[Path, OSError]] = []
    for path in _files_of(marker.parent, record_id):
        if path == marker:
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            failed.append((path, error))
    if failed:
        path, error = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        logger.warning(
            "Could not delete %s%s, saved models of %s, whose process was killed "
            "before it stored the record: %s. They stay until their folder is "
            "writable and another command stores a result, or until deleted by "
            "hand.",
            path,
            more,
            record_id,
            error.strerror or error,
        )
    return [str(path) for path, _ in failed]


def train_run(
    workspace: Workspace,
    config: RunConfig,
    *,
    progress: TrainProgress | None = None,
    status: Progress | None = None,
) -> dict[str, Any]:
    """Load data, apply the noise scenario, train, evaluate and store a run.

    Returns:
        The run summary: ``run_id``, ``failure_set_id``, ``device`` and the
        metrics ``n_train``, ``n_test``, ``test_accuracy``, ``n_failures``,
        ``n_query``, ``n_holdout``, ``n_corrupted``, ``best_epoch``,
        ``epochs_run``, ``seconds`` and ``history`` (per epoch: ``epoch``,
        ``loss``, ``val_loss`` and ``val_acc``).
    """
    workspace.check_writable()
    started = time.perf_counter()
    device = select_device(config.device)
    report = status or (lambda fraction, message: None)
    if ":" in config.model:
        raise ConfigError(
            f"Model {config.model!r} is a user factory. Train it yourself and "
            "register it with 'python -m repair_core import', or pick a built-in "
            f"model: {', '.join(models.MODEL_CHOICES)}."
        )

    report(0.0, "Loading data")
    config = _with_absolute_root(config)
    data = _load_new_data(config, trains=True)
    clean_train = data.train
    report(0.05, f"Applying the {config.scenario} scenario")
    noisy = apply_scenario(
        config.scenario,
        clean_train,
        seed=config.seed,
        params=config.scenario_params,
        train_victim=_victim_trainer(config, data, device),
    )
    data = DataSplit(train=noisy.dataset, test=data.test, source=data.source)

    report(0.1, "Training")
    with seeded(config.seed):
        model = _build_architecture(config, data)
    train_config = dataclasses.replace(config.train, seed=config.seed)
    result = train_model(
        model,
        data.train.images,
        data.train.labels,
        train_config,
        device=device,
        progress=progress,
    )
    run_metrics = {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "history": result.history,
        "device": str(device),
    }
    run_id = new_id("run")
    with _run_removed_on_failure(workspace, run_id):
        chosen = result.checkpoints[-MAX_SAVED_CHECKPOINTS:]
        workspace.save_tensor(run_id, "checkpoints.pt", chosen)
        if result.trajectory is not None:
            workspace.save_tensor(
                run_id, "trajectory.pt", dataclasses.asdict(result.trajectory)
            )
        summary = _store_run(
            workspace,
            run_id,
            kind="train",
            config=config,
            data=data,
            clean_train=clean_train,
            mask=noisy.mask if config.scenario != "none" else None,
            model=model,
            scenario_params=noisy.params,
            extra_config={},
            extra_metrics=run_metrics,
            started=started,
        )
    report(1.0, "Done")
    return summary


def import_run(
    workspace: Workspace,
    config: RunConfig,
    checkpoint: str | Path,
) -> dict[str, Any]:
    """Register a model trained elsewhere as a run, without training.

    ``config.model`` is ``module:callable`` (or a built-in name) and
    ``checkpoint`` its state dict. The model is evaluated on the test set and
    its failures split exactly as for a trained run.

    Raises:
        CheckpointError: the checkpoint is missing, a folder or unreadable,
            the factory fails, or the state dict does not fit the model.
    """
    workspace.check_writable()
    started = time.perf_counter()
    device = select_device(config.device)
    # Read the checkpoint first, so a bad path fails before the data loads.
    # resolve() raises ValueError on a NUL character, so the name is checked
    # before it.
    check_path_name(Path(checkpoint).expanduser(), "Checkpoint", CheckpointError)
    checkpoint = Path(checkpoint).expanduser().resolve()
    state = models.read_state_dict(checkpoint)
    for key, tensor in state.items():
        # A parameter that the forward pass never uses escapes the logits
        # check below, yet a NaN there still breaks every Fisher and fit.
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"Checkpoint {str(checkpoint)!r} has NaN or infinite values in "
                f"{key!r}. Save the model's weights again from a finite state."
            )
    config = _with_absolute_root(config)
    data = _load_new_data(config, trains=False)
    clean_train = data.train
    if config.scenario == "fgsm":
        raise ConfigError(
            "The fgsm scenario trains a victim model, which an imported run does "
            "not do. Use --scenario none, label-flip or input-noise with import."
        )
    noisy = apply_scenario(
        config.scenario, clean_train, seed=config.seed, params=config.scenario_params
    )
    data = DataSplit(train=noisy.dataset, test=data.test, source=data.source)

    factory_folder = checkpoint.parent
    model = _build_architecture(config, data, factory_folder)
    models.load_checked_state(model, state, source=f"checkpoint {str(checkpoint)!r}")
    models.check_output_size(model, data.test.images[:1], data.num_classes)
    model.to(device)
    run_id = new_id("run")
    with _run_removed_on_failure(workspace, run_id):
        return _store_run(
            workspace,
            run_id,
            kind="import",
            config=config,
            data=data,
            clean_train=clean_train,
            mask=noisy.mask if config.scenario != "none" else None,
            model=model,
            scenario_params=noisy.params,
            extra_config={
                "checkpoint": str(checkpoint),
                "factory_folder": str(factory_folder),
            },
            extra_metrics={"device": str(device)},
            started=started,
        )


#: Files a run folder may hold, each read by :func:`load_run` when present.
RUN_FILES = (
    "model.pt",
    "train_labels.pt",
    "train_images.pt",
    "corrupted_mask.pt",
    "test_logits.pt",
    DATA_INDEX_FILE,
)


def run_files_stamp(workspace: Workspace, run_id: str) -> str:
    """Return a digest of the size and modification time of each of the run's
    ``RUN_FILES``, so a cache of :func:`load_run` can tell that one was
    deleted, replaced or restored."""
    entries = []
    for name in RUN_FILES:
        try:
            info = workspace.path(run_id, name).stat()
            entries.append((name, info.st_size, info.st_mtime_ns))
        except OSError:
            entries.append((name, -1, -1))
    return hashlib.blake2b(repr(entries).encode(), digest_size=16).hexdigest()


def load_run(
    workspace: Workspace, run_id: str, *, device: str | None = None
) -> LoadedRun:
    """Read a run back: its data as trained on, its model and test predictions."""
    record = workspace.get_run(run_id)
    config = RunConfig.from_dict(record["config"])
    chosen_device = select_device(device or config.device)
    data = _load_run_data(workspace, run_id, config)
    _check_same_data(workspace, run_id, record, data)
    train = data.train
    labels = workspace.load_tensor(run_id, "train_labels.pt")
    images = train.images
    if workspace.path(run_id, "train_images.pt").is_file():
        images = workspace.load_tensor(run_id, "train_images.pt")
    train = ImageDataset(
        images=images,
        labels=labels,
        class_names=train.class_names,
        description=train.description,
    )
    clean_labels = data.train.labels
    data = DataSplit(train=train, test=data.test, source=data.source)
    mask = None
    if workspace.path(run_id, "corrupted_mask.pt").is_file():
        mask = workspace.load_tensor(run_id, "corrupted_mask.pt")

    factory_folder = record["config"].get("factory_folder")
    model = _build_architecture(
        config, data, Path(factory_folder) if factory_folder else None
    )
    models.load_checked_state(
        model, workspace.load_tensor(run_id, "model.pt"), source=f"run {run_id!r}"
    )
    model.to(chosen_device).eval()
    test_logits = workspace.load_tensor(run_id, "test_logits.pt")
    if ":" in config.model:
        _check_same_predictions(run_id, config.model, model, data, test_logits)
    return LoadedRun(
        run_id=run_id,
        record=record,
        config=config,
        data=data,
        corrupted_mask=mask,
        clean_train_labels=clean_labels if mask is not None else None,
        model=model,
        device=chosen_device,
        test_logits=test_logits,
    )


def _relocate_hint(workspace: Workspace, run_id: str) -> str:
    command = shlex.join(
        ["python", "-m", "repair_core", "relocate", "--workspace", str(workspace.root)]
        + ["--run", run_id, "--root", "NEW_FOLDER"]
    )
    return (
        "If the data moved, point the run at its new folder with "
        f"'{command}', or with 'Data folder moved?' on the dashboard."
    )


def _load_run_data(workspace: Workspace, run_id: str, config: RunConfig) -> DataSplit:
    """Load a stored run's data; a missing data folder names the way to relocate
    the run rather than to download the data again."""
    if config.root is not None and config.data != "mnist-embedded":
        folder = Path(config.root).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"Run {run_id!r} reads its {config.data} data from "
                f"{str(folder)!r}, which is not a folder any more. Move the data "
                f"back there. {_relocate_hint(workspace, run_id)}"
            )
    try:
        return _load_data(config)
    except DataError as error:
        if config.root is None:
            raise
        raise DataError(f"{error} {_relocate_hint(workspace, run_id)}") from error


def _with_absolute_root(config: RunConfig) -> RunConfig:
    """Return ``config`` with its data folder as an absolute path, so that the
    stored run opens from any working directory."""
    if config.root is None or not str(config.root).strip():
        return config
    return dataclasses.replace(config, root=absolute_root(config.root))


def absolute_root(root: str | Path) -> str:
    """Return a data folder as an absolute path without ``~``, ``.`` or ``..``,
    so that the stored path does not depend on the working directory."""
    return os.path.abspath(Path(root).expanduser())


def _same_folder(old_root: str, new_root: str) -> bool:
    """Return whether two paths name one folder, through links too."""
    if absolute_root(old_root) == new_root:
        return True
    try:
        return os.path.samefile(old_root, new_root)
    except OSError:
        # The old folder is gone, so it cannot be the new one.
        return False


def relocate_run(workspace: Workspace, run_id: str, root: str | Path) -> dict[str, Any]:
    """Point a stored run at the new folder of its data.

    The images, labels and class names in ``root`` must be those the run was
    stored with, checked as when the run is opened. Otherwise nothing is
    changed.

    Returns:
        ``run_id``, ``old_root``, ``root`` (absolute) and ``other_runs``,
        the ids of other runs in the workspace that still read ``old_root``.

    Raises:
        ConfigError: the run reads the embedded data, which has no folder.
        DataError: ``root`` is not a folder of the run's data source, or its
            data differ from the run's.
    """
    record = workspace.get_run(run_id)
    old_root = record["config"].get("root")
    config = RunConfig.from_dict(record["config"])
    if old_root is None or config.data == "mnist-embedded":
        raise ConfigError(
            f"Run {run_id!r} reads the {config.data} data, which has no folder to "
            "point elsewhere."
        )
    folder = Path(root).expanduser()
    check_path_name(folder, "Data root")
    if not folder.is_dir():
        raise DataError(
            f"New data root {str(folder)!r} is not a folder. Give the folder that "
            f"now holds the data of run {run_id!r}."
        )
    new_root = absolute_root(folder)
    if _same_folder(old_root, new_root):
        raise ConfigError(
            f"Run {run_id!r} already reads its data from {new_root!r}; nothing was "
            "changed. Give the folder the data moved to."
        )
    # No download: the run's images must already be in the new folder.
    moved = dataclasses.replace(config, root=new_root, download=False)
    data = _load_data(moved)
    changed = _data_changes(workspace, run_id, record, data)
    if changed:
        raise DataError(
            f"Folder {new_root!r} does not hold the data of run {run_id!r}: "
            f"{'; '.join(changed)}. The run still reads {old_root!r}; nothing was "
            "changed. Give the folder that holds the run's own images."
        )
    workspace.set_run_root(run_id, new_root, description=data.train.description)
    logger.info("Run %s now reads its data from %s", run_id, new_root)
    other_runs = [
        other["id"]
        for other in workspace.list_runs()
        if other["id"] != run_id and other["config"].get("root") == old_root
    ]
    return {
        "run_id": run_id,
        "old_root": old_root,
        "root": new_root,
        "other_runs": other_runs,
    }


def _check_same_predictions(
    run_id: str,
    factory: str,
    model: nn.Module,
    data: DataSplit,
    stored: torch.Tensor,
) -> None:
    """Raise CheckpointError when a user factory no longer rebuilds the run's model.

    The run keeps the factory's name, not its code, so an edit to the factory
    or to a module it imports would change every later result silently. The
    tolerance (1% of the largest stored logit) allows for another device.
    """
    logits = predict_logits(model, data.test.images)
    if logits.shape != stored.shape:
        change = (
            f"it gives logits of shape {tuple(logits.shape)}, not {tuple(stored.shape)}"
        )
    elif len(stored) == 0:
        return
    else:
        difference = (logits - stored).abs().max().item()
        if difference <= 0.01 * max(1.0, stored.abs().max().item()):
            return
        changed = int((logits.argmax(1) != stored.argmax(1)).sum())
        change = f"its test logits differ by up to {difference:.3g}"
        if changed:
            change += (
                f", and its predicted class differs on {changed} of the "
                f"{len(stored)} test images"
            )
    raise CheckpointError(
        f"Model factory {factory!r} no longer rebuilds the model of run "
        f"{run_id!r}: {change}. The factory or a module it imports changed since "
        "the run was imported. Restore that code, or import the run again."
    )


def check_failure_set_run(
    workspace: Workspace, run_id: str, failure_set_id: str
) -> None:
    """Raise ConfigError unless the failure set belongs to ``run_id``, and
    WorkspaceError, naming the run's failure sets, when it is not stored."""
    if not workspace.has_record("failure_sets", failure_set_id):
        known = [record["id"] for record in workspace.list_failure_sets(run_id)]
        if known:
            of_run = f"Failure sets of run {run_id!r}: {listed_ids(known)}."
        else:
            of_run = f"Run {run_id!r} has no failure set yet."
        raise WorkspaceError(
            f"Failure set {failure_set_id!r} not found in workspace "
            f"{str(workspace.root)!r}. {of_run} 'python -m repair_core runs --run "
            f"{run_id}' lists them."
        )
    record = workspace.get_failure_set(failure_set_id)
    if record["run_id"] != run_id:
        raise ConfigError(
            f"Failure set {failure_set_id!r} belongs to run {record['run_id']!r}, "
            f"not {run_id!r}. Pass a failure set of this run."
        )


def load_failure_split(
    workspace: Workspace, run: str | LoadedRun, failure_set_id: str
) -> FailureSplit:
    """Read a stored failure split of ``run`` (a run id or a loaded run) back.

    Raises:
        ConfigError: the failure set belongs to another run, or ``run`` is
            neither a run id nor a loaded run.
        WorkspaceError: the failure set's file is missing, unreadable, or
            does not contain a failure split.
    """
    if isinstance(run, LoadedRun):
        run_id = run.run_id
    elif isinstance(run, str):
        run_id = run
    else:
        raise ConfigError(
            f"load_failure_split takes a run id or a loaded run, not a "
            f"{type(run).__name__}. Pass the run's id, such as 'run-1a2b3c4d'."
        )
    check_failure_set_run(workspace, run_id, failure_set_id)
    relative = f"failure_sets/{failure_set_id}.pt"
    listing = shlex.join(
        ["python", "-m", "repair_core", "runs"]
        + ["--workspace", str(workspace.root), "--run", run_id]
    )
    remedy = (
        "Restore the file from a backup of the workspace, or use another failure "
        f"set of run {run_id!r}. Pass a stored one with --failure-set (list them "
        f"with '{listing}'), or create a new one on the dashboard's Failures page "
        "or with a --query-fraction that no stored failure set of the run uses."
    )
    values = workspace.load_tensor(run_id, relative, remedy=remedy)
    fields = {f.name for f in dataclasses.fields(FailureSplit)}
    if not isinstance(values, dict) or set(values) != fields:
        raise WorkspaceError(
            f"File {str(workspace.path(run_id, relative))!r} of failure set "
            f"{failure_set_id!r} does not contain a failure split. {remedy}"
        )
    return FailureSplit(**values)


def default_failure_set(workspace: Workspace, run_id: str) -> str:
    """Return the newest failure set of a run."""
    sets = workspace.list_failure_sets(run_id)
    if not sets:
        raise EmptyFailureSetError(
            f"Run {run_id!r} has no failure set because its model makes no mistakes "
            "on the test set. There is nothing to repair."
        )
    return sets[-1]["id"]


def create_failure_set(
    workspace: Workspace,
    run: LoadedRun,
    *,
    query_fraction: float = 0.5,
    seed: int = 0,
    candidates: torch.Tensor | None = None,
    origin: str = "selection",
) -> tuple[str, FailureSplit]:
    """Split chosen failures (all when ``candidates`` is None) and store the split."""
    split = split_failures(
        run.test_predictions,
        run.data.test.labels,
        query_fraction=query_fraction,
        seed=seed,
        candidates=candidates,
    )
    return _save_failure_set(workspace, run.run_id, split, origin), split


# Identification ------------------------------------------------------------


def _load_optional(workspace: Workspace, run_id: str, relative: str) -> Any:
    if workspace.path(run_id, relative).is_file():
        return workspace.load_tensor(run_id, relative)
    return None


def identification_context(workspace: Workspace, run: LoadedRun):
    """Collect what the methods may need from a stored run."""
    from repair_core.identification import IdentificationContext
    from repair_core.training import Trajectory

    checkpoints = _load_optional(workspace, run.run_id, "checkpoints.pt")
    trajectory = _load_optional(workspace, run.run_id, "trajectory.pt")
    if trajectory is not None:
        trajectory = Trajectory(**trajectory)
    return IdentificationContext(
        checkpoints=[state for _, state in checkpoints] if checkpoints else None,
        trajectory=trajectory,
        corrupted_mask=run.corrupted_mask,
        model_factory=run.build_model,
        train_config=run.config.train,
        fisher=_load_optional(workspace, run.run_id, "fisher.pt"),
    )


def run_identification(
    workspace: Workspace,
    run: LoadedRun,
    method: str,
    *,
    failure_set_id: str | None = None,
    config: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score every training example with ``method`` and store the scores.

    Returns:
        The summary: ``scores_id``, ``run_id``, ``failure_set_id``,
        ``method``, ``config`` (the settings requested), ``resolved`` (values
        chosen for settings left unset, only when there are any), ``seed``,
        ``device``, ``seconds``, ``n_train``, ``n_query``, ``n_positive`` and,
        when the run has ground truth,
        ``detection`` with ``found_at_10pct``, ``found_at_20pct`` and
        ``precision_at_100``, and for a label-changing corruption
        ``n_implicated`` and ``implicated_found_at_20pct`` (see
        ``implicated_by``). When the same ranking (same failure set, method,
        settings, seed and device) is stored already, or by the time this one
        is computed, as by another command that computed it at the same
        time, the summary is that ranking's, with ``reused`` True, and
        nothing new is stored. Each method gives the same scores for the same
        settings on the same device, so nothing is computed again.
    """
    from repair_core.identification import config_json, resolve_config

    workspace.check_writable(run.run_id, "scores")
    failure_set_id = failure_set_id or default_failure_set(workspace, run.run_id)
    split = load_failure_split(workspace, run.run_id, failure_set_id)
    config = resolve_config(method, config)
    stored = workspace.find_ranking(
        run.run_id,
        failure_set_id,
        method,
        config_json(config),
        str(model_device(run.model)),
    )
    if stored is not None:
        logger.info("Reused ranking %s of %s", stored["id"], method)
        if progress is not None:
            progress(1.0, f"{method}: reused stored ranking {stored['id']}")
        return _reused_summary(stored)
    with workspace.claim_failure_set(run.run_id, failure_set_id):
        return _identify_and_store(
            workspace, run, method, failure_set_id, split, config, progress
        )


def _identify_and_store(
    workspace: Workspace,
    run: LoadedRun,
    method: str,
    failure_set_id: str,
    split: FailureSplit,
    config: Any,
    progress: Progress | None,
) -> dict[str, Any]:
    from repair_core.identification import identify
    from repair_core.metrics import detection_summary

    test = run.data.test
    context = identification_context(workspace, run)
    result = identify(
        method,
        private_model(run),
        run.data.train.images,
        run.data.train.labels,
        test.images[split.query],
        test.labels[split.query],
        config,
        context=context,
        progress=progress,
    )
    scores_id = new_id("sc")
    scores_file = f"scores/{scores_id}.pt"
    fisher = result.extras.get("fisher")
    # A Fisher computed here is kept for later methods and treatments.
    new_fisher = fisher is not None and context.fisher is None
    written = [scores_file, "fisher.pt"] if new_fisher else [scores_file]
    summary: dict[str, Any] = {
        "scores_id": scores_id,
        "run_id": run.run_id,
        "failure_set_id": failure_set_id,
        "method": method,
        "seconds": result.seconds,
        "device": result.device,
        "seed": result.seed,
        "n_train": len(result.scores),
        "n_query": len(split.query),
        "n_positive": int((result.scores > 0).sum()),
    }
    if run.corrupted_mask is not None:
        summary["detection"] = detection_summary(
            result.scores, run.corrupted_mask, implicated_by(run, split.query)
        )
    if result.resolved:
        # Settings left None, such as a searched LiSSA scale, with the values
        # used. They stay out of ``config``, which a request is matched on.
        summary["resolved"] = result.resolved
    with _removed_on_failure(workspace, run.run_id, *written):
        workspace.save_tensor(run.run_id, scores_file, result.scores)
        if new_fisher:
            workspace.save_tensor(
                run.run_id, "fisher.pt", {k: v.cpu() for k, v in fisher.items()}
            )
        stored = workspace.add_scores(
            scores_id,
            run.run_id,
            failure_set_id,
            method,
            result.config,
            summary,
            reuse_stored=True,
        )
    if stored is not None:
        # Another command stored the same ranking while this one computed.
        # A fisher.pt saved above stays for later methods, as after a store.
        workspace.path(run.run_id, scores_file).unlink(missing_ok=True)
        return _reused_summary(stored)
    return {**summary, "config": result.config}


def _reused_summary(stored: dict[str, Any]) -> dict[str, Any]:
    """Return the summary of the stored ranking ``stored``, marked as reused."""
    return {
        **stored["metrics"],
        "scores_id": stored["id"],
        "config": stored["config"],
        "reused": True,
    }


@contextlib.contextmanager
def _removed_on_failure(
    workspace: Workspace, run_id: str, *relatives: str
) -> Iterator[None]:
    """Delete the run files ``relatives`` if the body raises, as when the
    record that names them cannot be written or Ctrl-C arrives before it is,
    so no file is left without its record."""
    try:
        yield
    except BaseException:
        for relative in relatives:
            workspace.path(run_id, relative).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _run_removed_on_failure(workspace: Workspace, run_id: str) -> Iterator[None]:
    """Delete the folder of ``run_id`` if the body raises before the run's
    record is stored, so an interrupted train or import leaves no files."""
    try:
        yield
    except BaseException:
        try:
            recorded = workspace.has_record("runs", run_id)
        except WorkspaceError:
            recorded = True
        if not recorded:
            shutil.rmtree(workspace.run_dir(run_id), ignore_errors=True)
        raise


def implicated_by(run: LoadedRun, failures: torch.Tensor) -> torch.Tensor | None:
    """Return the corrupted examples whose label change matches one of ``failures``.

    ``failures`` are test indices; see ``metrics.implicated_mask``. None when
    the run's corruption is unknown or changed no label.
    """
    from repair_core.metrics import implicated_mask

    if run.corrupted_mask is None or run.clean_train_labels is None:
        return None
    return implicated_mask(
        run.corrupted_mask,
        run.data.train.labels,
        run.clean_train_labels,
        run.data.test.labels[failures],
        run.test_predictions[failures],
    )


def load_scores(workspace: Workspace, scores_id: str) -> torch.Tensor:
    """Return stored scores, float64, shape (n_train,).

    Raises:
        WorkspaceError: the scores file is missing, cannot be read, or does
            not hold one finite score per training example.
    """
    record = workspace.get_scores(scores_id)
    relative = f"scores/{scores_id}.pt"
    remedy = (
        "Restore the file from a backup of the workspace, or rank the "
        f"training examples again with {record['method']}."
    )
    scores = workspace.load_tensor(record["run_id"], relative, remedy=remedy)
    problem = scores_problem(scores, record["metrics"].get("n_train"))
    if problem is not None:
        path = workspace.path(record["run_id"], relative)
        raise WorkspaceError(
            f"File {str(path)!r} of ranking {scores_id!r} is damaged: {problem}. "
            f"{remedy}"
        )
    return scores


def scores_record(workspace: Workspace, run: LoadedRun, scores_id: str) -> dict:
    """Return the stored record of scores after checking they belong to ``run``.

    Raises:
        ConfigError: the scores belong to another run.
    """
    record = workspace.get_scores(scores_id)
    if record["run_id"] != run.run_id:
        raise ConfigError(
            f"Scores {scores_id!r} belong to run {record['run_id']!r}, not "
            f"{run.run_id!r}. Pass --run {record['run_id']}, or score this run "
            "with 'python -m repair_core identify'."
        )
    return record


def scores_of_run(
    workspace: Workspace, run: LoadedRun, scores_id: str, failure_set_id: str
) -> torch.Tensor:
    """Return stored scores after checking they rank this run's training set
    against this failure set.

    Scores computed from another failure set's query half may have seen the
    holdout failures that the repair is judged on, so they are rejected.

    Raises:
        ConfigError: the scores belong to another run or failure set.
    """
    check_failure_set_run(workspace, run.run_id, failure_set_id)
    record = scores_record(workspace, run, scores_id)
    if record["failure_set_id"] != failure_set_id:
        raise ConfigError(
            f"Scores {scores_id!r} were computed from failure set "
            f"{record['failure_set_id']!r}, not {failure_set_id!r}, so the "
            "holdout failures may have been used to rank the causes. Pass "
            f"--failure-set {record['failure_set_id']}, or score failure set "
            f"{failure_set_id!r} with 'python -m repair_core identify'."
        )
    return load_scores(workspace, scores_id)


# Treatment -----------------------------------------------------------------


_CAUSE_OPTIONS = {
    "top_k": "--top-k",
    "positive": "--causes positive",
    "causes_file": "--causes-file",
    "confirmed": "--causes confirmed",
}


def resolve_causes(
    workspace: Workspace,
    run: LoadedRun,
    *,
    failure_set_id: str | None,
    scores_id: str | None = None,
    top_k: int | None = None,
    positive: bool = False,
    causes_file: str | Path | None = None,
    confirmed: bool = False,
) -> tuple[torch.Tensor, str]:
    """Turn one way of naming the causes C into training indices.

    Exactly one of ``top_k`` (the k highest scores), ``positive`` (every
    positive score), ``causes_file`` (one training index per line, or a CSV
    file with a ``train_index`` column) or ``confirmed`` (the examples
    confirmed in review) must be given.

    Returns:
        (sorted int64 indices, a short description of where they came from)
    """
    from repair_core.evaluation import MIN_REMAINING
    from repair_core.metrics import ranking
    from repair_core.treatments import read_causes_table, validate_causes

    chosen = [
        name
        for name, value in (
            ("top_k", top_k is not None),
            ("positive", positive),
            ("causes_file", causes_file is not None),
            ("confirmed", confirmed),
        )
        if value
    ]
    if len(chosen) != 1:
        named = " and ".join(_CAUSE_OPTIONS[name] for name in chosen) or "none"
        raise ConfigError(
            "Name the causes in exactly one way: --top-k K, --causes positive, "
            f"--causes-file FILE or --causes confirmed (got {named})."
        )
    n_train = len(run.data.train)
    if scores_id is not None:
        # Also checked when the causes come from a file or from review, because
        # the repair records these scores as where its causes came from.
        scores = scores_of_run(workspace, run, scores_id, failure_set_id)
    if causes_file is not None:
        causes, _ = read_causes_table(
            causes_file,
            n_train,
            check_sources=lambda sources: _check_file_sources(
                workspace, run, causes_file, sources, failure_set_id, scores_id
            ),
        )
        # The absolute path still names the file when the record is read
        # from another folder.
        return _leave_enough(causes, n_train, f"file {Path(causes_file).resolve()}")
    if confirmed:
        decisions = workspace.get_decisions(run.run_id, failure_set_id)
        indices = [i for i, d in decisions.items() if d == "confirmed"]
        if not indices:
            where = (
                f"failure set {failure_set_id!r}"
                if failure_set_id is not None
                else "this split of the failures, which no command has used yet"
            )
            raise ConfigError(
                f"No training example is confirmed for {where}. Confirm culprits "
                "on the Causes page first, or use --top-k."
            )
        causes = validate_causes(indices, n_train)
        return _leave_enough(causes, n_train, "confirmed in review")

    if scores_id is None:
        raise ConfigError(
            "--top-k and --causes positive need scores: pass --scores SCORES_ID "
            "from 'python -m repair_core identify'."
        )
    if len(scores) != n_train:
        raise ConfigError(
            f"Scores {scores_id!r} cover {len(scores)} examples but run "
            f"{run.run_id!r} has {n_train}. Use scores of this run."
        )
    # The method shows a reader whether C contains suspects or a reference
    # such as the oracle.
    method = workspace.get_scores(scores_id)["method"]
    if positive:
        indices = torch.nonzero(scores > 0).flatten()
        causes = validate_causes(indices, n_train)
        return _leave_enough(
            causes, n_train, f"positive scores of {method} ranking {scores_id}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ConfigError(
            f"Top K = {top_k!r} is not a whole number. Give the number of "
            "highest-ranked training examples to remove, such as 300."
        )
    if top_k < 1 or top_k > n_train - MIN_REMAINING:
        raise ConfigError(
            f"Top K = {top_k} must lie between 1 and {n_train - MIN_REMAINING}, so "
            f"that at least {MIN_REMAINING} training examples remain: one to train "
            "on and one to validate on."
        )
    return validate_causes(ranking(scores)[:top_k], n_train), (
        f"top {top_k} of {method} ranking {scores_id}"
    )


def _check_file_sources(
    workspace: Workspace,
    run: LoadedRun,
    path: str | Path,
    sources: dict[str, dict[str, int]],
    failure_set_id: str | None,
    scores_id: str | None,
) -> None:
    """Raise unless every ranking and repair a CSV export names fits the repair.

    Each must be a result of ``run``, on the failure set ``failure_set_id``
    that the repair is judged on, and a ranking must be ``scores_id`` when
    that is given. Runs of one data set share their index range, so an export
    of another run would otherwise remove unrelated examples without a word,
    and causes found from another failure set may come from this set's
    holdout failures.
    """
    getters = {"scores_id": workspace.get_scores, "repair_id": workspace.get_repair}
    kinds = {"scores_id": "ranking", "repair_id": "repair"}
    for column, ids in sources.items():
        for record_id, line in ids.items():
            display_id = shortened_id(record_id)
            where = (
                f"Line {line} of causes file {str(path)!r} names the {kinds[column]} "
                f"{display_id!r} in its {column} column"
            )
            try:
                record = getters[column](record_id)
            except WorkspaceError:
                raise ConfigError(
                    f"{where}, which this workspace does not hold. Export the "
                    f"causes of run {run.run_id!r} from this workspace's Causes or "
                    "Repair page, or, for a file made by hand, delete the "
                    f"{column} column."
                ) from None
            if record["run_id"] != run.run_id:
                raise ConfigError(
                    f"{where}, which belongs to run {record['run_id']!r}, not "
                    f"{run.run_id!r}. Export the causes of run {run.run_id!r}."
                )
            if record["failure_set_id"] != failure_set_id:
                judged = (
                    f"failure set {failure_set_id!r}"
                    if failure_set_id is not None
                    else "a new split of the failures"
                )
                raise ConfigError(
                    f"{where}, which was made on failure set "
                    f"{record['failure_set_id']!r}, but this repair is judged on "
                    f"{judged}, whose holdout failures may have helped find these "
                    f"causes. Add --failure-set {record['failure_set_id']}."
                )
            if column == "scores_id" and scores_id not in (None, record_id):
                raise ConfigError(
                    f"{where}, but --scores names {scores_id!r}, and the repair "
                    "would record the wrong ranking as its source. Pass --scores "
                    f"{display_id}, or leave --scores out."
                )


#: Characters of an id from a file or an address that a message quotes.
SHOWN_ID_CHARACTERS = 40


def shortened_id(record_id: str) -> str:
    """Return ``record_id`` cut to ``SHOWN_ID_CHARACTERS`` with "…" if longer."""
    if len(record_id) <= SHOWN_ID_CHARACTERS:
        return record_id
    return record_id[:SHOWN_ID_CHARACTERS] + "…"


def _leave_enough(
    causes: torch.Tensor, n_train: int, origin: str
) -> tuple[torch.Tensor, str]:
    """Return (causes, origin), or raise if too few training examples remain."""
    from repair_core.evaluation import MIN_REMAINING

    if n_train - len(causes) < MIN_REMAINING:
        raise ConfigError(
            f"The causes from {origin} name {len(causes)} of the {n_train} training "
            f"examples, so fewer than {MIN_REMAINING} would remain: one to train on "
            f"and one to validate on. Name at most {n_train - MIN_REMAINING}."
        )
    return causes, origin


def _repair_inputs(
    workspace: Workspace, run: LoadedRun, failure_set_id: str
) -> dict[str, Any]:
    split = load_failure_split(workspace, run.run_id, failure_set_id)
    if len(split.holdout) == 0:
        warnings.warn(
            f"Failure set {failure_set_id!r} has no holdout failures, so F_h "
            "accuracy cannot show whether the repair fixes failures it was not "
            "ranked on. Use a failure set with a query fraction below 1.",
            stacklevel=3,
        )
    return {
        "split": split,
        "train": (run.data.train.images, run.data.train.labels),
        "test": (run.data.test.images, run.data.test.labels),
        "fisher": _load_optional(workspace, run.run_id, "fisher.pt"),
        "train_config": run.config.train,
    }


def run_repair(
    workspace: Workspace,
    run: LoadedRun,
    treatment: str,
    causes: Any,
    *,
    failure_set_id: str,
    scores_id: str | None = None,
    causes_origin: str = "",
    config: Any = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    controls: tuple[str, ...] = ("nothing", "random"),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Repair the run's model, beside the controls, and store the result.

    ``causes`` are training indices in any integer sequence or tensor, checked
    with repair_core.treatments.validate_causes (sorted, duplicates dropped).
    The repaired model of the first seed is saved as
    ``runs/<run_id>/repairs/<repair_id>.pt``, and every other model, of each
    seed and control arm, as ``repairs/<repair_id>/<arm>-seed<seed>.pt``.
    Each ``per_seed`` record names its file in ``model_file``.

    Returns:
        The summary: ``repair_id``, ``treatment``, ``n_removed``, ``seconds``,
        ``device``, ``config`` (the settings used), ``gain_over_nothing``,
        ``before`` and ``after`` (each with ``query_acc``, ``holdout_acc``,
        ``remaining_acc``, ``test_acc``; ``after`` is the mean over seeds),
        ``spread`` (their standard
        deviation), ``controls`` (mean and spread of each control arm),
        ``per_seed`` records per arm, and ``holdout_fixed_idx`` and
        ``remaining_broken_idx`` of the first treated model.
    """
    workspace.check_writable(run.run_id, "repairs")
    from repair_core.evaluation import check_seeds, repair_with_controls
    from repair_core.treatments import REMOVES_NOTHING, validate_causes

    started = time.perf_counter()
    seeds = check_seeds(seeds)
    causes = validate_causes(
        causes, len(run.data.train), allow_empty=treatment in REMOVES_NOTHING
    )
    inputs = _repair_inputs(workspace, run, failure_set_id)
    split = inputs["split"]
    repair_id = new_id("rp")
    first_seed = seeds[0]
    with (
        workspace.claim_failure_set(run.run_id, failure_set_id),
        _stored_models(
            workspace,
            run.run_id,
            f"repairs/{repair_id}",
            main_name=f"treatment-seed{first_seed}",
            main_file=f"repairs/{repair_id}.pt",
        ) as store,
    ):
        outcome = repair_with_controls(
            treatment,
            private_model(run),
            inputs["train"],
            causes,
            inputs["test"],
            split,
            seeds=seeds,
            config=config,
            fisher=inputs["fisher"],
            train_config=inputs["train_config"],
            controls=controls,
            model_factory=run.build_model,
            store_model=store,
            progress=progress,
        )
        return _store_repair(
            workspace,
            run,
            outcome,
            inputs,
            repair_id=repair_id,
            failure_set_id=failure_set_id,
            scores_id=scores_id,
            causes=causes,
            causes_origin=causes_origin,
            started=started,
        )


def _store_repair(
    workspace: Workspace,
    run: LoadedRun,
    outcome: dict[str, Any],
    inputs: dict[str, Any],
    *,
    repair_id: str,
    failure_set_id: str,
    scores_id: str | None,
    causes: torch.Tensor,
    causes_origin: str,
    started: float,
) -> dict[str, Any]:
    """Summarise a finished repair, save its causes and add its record."""
    from repair_core.evaluation import compare
    from repair_core.treatments import REMOVES_NOTHING, training_settings

    split = inputs["split"]
    treatment = outcome["treatment"]
    comparison = compare(run.model, outcome["model"], *inputs["test"], split)
    arms = outcome["arms"]
    keys = ("query_acc", "holdout_acc", "remaining_acc", "test_acc")
    summary = {
        "repair_id": repair_id,
        "run_id": run.run_id,
        "failure_set_id": failure_set_id,
        "scores_id": scores_id,
        "treatment": treatment,
        "causes": causes_origin,
        # fit-failures records C but fits F_q without removing anything.
        "n_removed": 0 if treatment in REMOVES_NOTHING else outcome["n_causes"],
        "seeds": list(outcome["seeds"]),
        "seconds": time.perf_counter() - started,
        "device": str(run.device),
        # ``seeds`` lists every seed; the config's own seed is only the first.
        "config": {
            name: value
            for name, value in outcome["result"].config.items()
            if name != "seed"
        },
        "training": training_settings(
            treatment, outcome["result"].config, inputs["train_config"]
        ),
        "gain_over_nothing": outcome["gain_over_nothing"],
        "controls_note": outcome["controls_note"],
        "notes": outcome["notes"],
        "before": {k: outcome["before"][k] for k in keys},
        "after": {k: arms["treatment"]["mean"][k] for k in keys},
        "spread": {k: arms["treatment"]["std"][k] for k in keys},
        "controls": {
            arm: {"mean": values["mean"], "std": values["std"]}
            for arm, values in arms.items()
            if arm != "treatment"
        },
        "per_seed": {
            arm: [
                {k: v for k, v in record.items() if k != "removed"}
                for record in values["per_seed"]
            ]
            for arm, values in arms.items()
        },
        "holdout_fixed_idx": comparison["holdout_fixed_idx"],
        "remaining_broken_idx": comparison["remaining_broken_idx"],
    }
    causes_file = f"repairs/{repair_id}_causes.pt"
    workspace.save_tensor(run.run_id, causes_file, causes.clone().cpu())
    with _removed_on_failure(workspace, run.run_id, causes_file):
        workspace.add_repair(
            repair_id,
            run.run_id,
            failure_set_id,
            scores_id,
            treatment,
            summary["config"],
            summary,
        )
    return summary


def run_sweep(
    workspace: Workspace,
    run: LoadedRun,
    treatment: str,
    causes: torch.Tensor,
    *,
    failure_set_id: str,
    strengths: list[float] | None = None,
    causes_origin: str = "",
    config: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Trace the trade-off between fixing failures and keeping the rest over a
    treatment's strength, and store it as a sweep. Without ``strengths`` the
    treatment's grid in repair_core.evaluation.DEFAULT_STRENGTHS is swept.

    Returns:
        The stored sweep: ``sweep_id``, ``run_id``, ``failure_set_id``,
        ``treatment``, ``causes`` (``causes_origin``), ``n_removed``,
        ``strengths``, ``config`` (the resolved treatment settings, less the
        swept one), ``points``, one per strength as from
        repair_core.evaluation.sweep, and ``device``.
        Each point's model is saved as ``sweeps/<sweep_id>/<setting>-<value>.pt``
        under the run folder and named in its ``model_file``.
    """
    workspace.check_writable(run.run_id, "sweeps")
    from repair_core.evaluation import DEFAULT_STRENGTHS, sweep

    if strengths is None:
        strengths = list(DEFAULT_STRENGTHS.get(treatment, ()))

    inputs = _repair_inputs(workspace, run, failure_set_id)
    sweep_id = new_id("sw")
    with (
        workspace.claim_failure_set(run.run_id, failure_set_id),
        _stored_models(workspace, run.run_id, f"sweeps/{sweep_id}") as store,
    ):
        points = sweep(
            treatment,
            private_model(run),
            inputs["train"],
            causes,
            inputs["test"],
            inputs["split"],
            strengths=strengths,
            config=config,
            fisher=inputs["fisher"],
            train_config=inputs["train_config"],
            store_model=store,
            progress=progress,
        )
        return _store_sweep(
            workspace,
            run,
            sweep_id,
            treatment,
            causes,
            failure_set_id=failure_set_id,
            causes_origin=causes_origin,
            config=config,
            points=points,
        )


def _store_sweep(
    workspace: Workspace,
    run: LoadedRun,
    sweep_id: str,
    treatment: str,
    causes: torch.Tensor,
    *,
    failure_set_id: str,
    causes_origin: str,
    config: Any,
    points: list[dict[str, Any]],
) -> dict[str, Any]:
    from repair_core.evaluation import SWEEPABLE
    from repair_core.treatments import resolve_config, validate_causes

    # The swept setting takes each of the strengths in turn, so the settings
    # record leaves it out rather than show its default.
    settings = resolve_config(treatment, config).to_dict()
    settings.pop(SWEEPABLE[treatment], None)
    summary = {
        "sweep_id": sweep_id,
        "run_id": run.run_id,
        "failure_set_id": failure_set_id,
        "treatment": treatment,
        "causes": causes_origin,
        "n_removed": len(validate_causes(causes, len(run.data.train))),
        # As each point states it: whole epochs for fine-tuning, else floats.
        "strengths": [point["strength"] for point in points],
        "config": settings,
        "points": points,
        "device": str(run.device),
    }
    workspace.add_sweep(
        summary["sweep_id"],
        run.run_id,
        failure_set_id,
        treatment,
        causes_origin,
        summary["n_removed"],
        summary["strengths"],
        summary["config"],
        points,
        device=summary["device"],
    )
    return summary


def run_removal_curve(
    workspace: Workspace,
    run: LoadedRun,
    scores_id: str,
    *,
    failure_set_id: str,
    ks: tuple[int, ...] = (10, 30, 100, 300, 600, 1000),
    seeds: tuple[int, ...] = (0, 1, 2),
    config: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Remove the top k by the stored scores, fine-tune, record the accuracies
    and store them as a removal curve.

    ``config`` holds the fine-tuning settings (a ``FinetuneConfig``, a dict or
    None for the defaults); each of ``seeds`` replaces its seed.

    Returns:
        The stored curve: ``removal_curve_id``, ``run_id``,
        ``failure_set_id``, ``scores_id``, ``ks`` (those that leave something
        to train on), ``skipped_ks`` (the rest), ``seeds``, ``config`` (the
        settings without the seed), ``points``, one per k in ``ks``, as from
        repair_core.evaluation.removal_curve, and ``device``.
    """
    workspace.check_writable(run.run_id, "removal_curves")
    from repair_core.evaluation import removal_curve
    from repair_core.treatments import resolve_config

    settings = resolve_config("finetune", config)

    inputs = _repair_inputs(workspace, run, failure_set_id)
    scores = scores_of_run(workspace, run, scores_id, failure_set_id)
    curve_id = new_id("rc")
    with (
        workspace.claim_failure_set(run.run_id, failure_set_id),
        _stored_models(workspace, run.run_id, f"removal_curves/{curve_id}") as store,
    ):
        points = removal_curve(
            scores,
            private_model(run),
            inputs["train"],
            inputs["test"],
            inputs["split"],
            ks=ks,
            seeds=seeds,
            config=settings,
            train_config=inputs["train_config"],
            store_model=store,
            progress=progress,
        )
        stored_settings = settings.to_dict()
        stored_settings.pop("seed")
        return _store_removal_curve(
            workspace,
            run,
            curve_id,
            scores_id,
            failure_set_id=failure_set_id,
            ks=ks,
            seeds=seeds,
            config=stored_settings,
            points=points,
        )


def _store_removal_curve(
    workspace: Workspace,
    run: LoadedRun,
    curve_id: str,
    scores_id: str,
    *,
    failure_set_id: str,
    ks: tuple[int, ...],
    seeds: tuple[int, ...],
    config: dict[str, Any],
    points: list[dict[str, Any]],
) -> dict[str, Any]:
    run_ks = [int(point["k"]) for point in points]
    summary = {
        "removal_curve_id": curve_id,
        "run_id": run.run_id,
        "failure_set_id": failure_set_id,
        "scores_id": scores_id,
        "ks": run_ks,
        "skipped_ks": [int(k) for k in ks if int(k) not in run_ks],
        "seeds": [int(seed) for seed in seeds],
        "config": config,
        "points": points,
        "device": str(run.device),
    }
    workspace.add_removal_curve(
        summary["removal_curve_id"],
        run.run_id,
        failure_set_id,
        scores_id,
        summary["ks"],
        summary["seeds"],
        points,
        skipped_ks=summary["skipped_ks"],
        device=summary["device"],
        config=config,
    )
    return summary


def load_repaired_model(
    workspace: Workspace,
    run: LoadedRun,
    repair_id: str,
    *,
    arm: str = "treatment",
    seed: int | None = None,
) -> nn.Module:
    """Return a stored model of ``repair_id``, on the run's device.

    By default this is the treated model of the first seed. ``arm``
    ("treatment", "nothing" or "random") and ``seed`` pick any other run of
    the repair.
    """
    record = workspace.get_repair(repair_id)
    if record["run_id"] != run.run_id:
        raise ConfigError(
            f"Repair {repair_id!r} belongs to run {record['run_id']!r}, not "
            f"{run.run_id!r}. Open that run first."
        )
    relative = f"repairs/{repair_id}.pt"
    if arm != "treatment" or seed is not None:
        relative = _repair_model_file(record, arm, seed)
    return load_model_file(workspace, run, relative, source=f"repair {repair_id!r}")


def _repair_model_file(record: dict[str, Any], arm: str, seed: int | None) -> str:
    repair_id = record["id"]
    per_seed = record["metrics"].get("per_seed", {})
    if arm not in per_seed:
        raise ConfigError(
            f"Repair {repair_id!r} has no {arm!r} arm. Choose one of "
            f"{', '.join(per_seed)}."
        )
    runs = per_seed[arm]
    seeds = [entry["seed"] for entry in runs]
    chosen = (
        runs[0]
        if seed is None
        else next((entry for entry in runs if entry["seed"] == seed), None)
    )
    if chosen is None:
        raise ConfigError(
            f"Repair {repair_id!r} ran no seed {seed}. Choose one of "
            f"{', '.join(str(value) for value in seeds)}."
        )
    if "model_file" not in chosen:
        raise ConfigError(
            f"Repair {repair_id!r} kept only the treated model of its first seed. "
            "Run the repair again to keep every model."
        )
    return chosen["model_file"]


def load_model_file(
    workspace: Workspace, run: LoadedRun, model_file: str, *, source: str = ""
) -> nn.Module:
    """Return the model saved as ``model_file`` in the run folder.

    ``model_file`` is the path that repairs, sweep points and removal-curve
    points record, relative to the run folder.

    Raises:
        ConfigError: ``model_file`` leads outside the run folder, or the file
            contains no model state dict, such as a scores file.
    """
    relative = Path(model_file)
    if relative.is_absolute() or ".." in relative.parts:
        raise ConfigError(
            f"Model file {model_file!r} is not a path inside the folder of run "
            f"{run.run_id!r}. Pass the model_file that a repair, sweep point or "
            "removal-curve point records, such as 'repairs/rp-1a2b3c4d.pt'."
        )
    model = run.build_model()
    state = workspace.load_tensor(run.run_id, model_file)
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"File {model_file!r} of run {run.run_id!r} contains a "
            f"{type(state).__name__}, not a model's state dict. Pass the "
            "model_file that a repair, sweep point or removal-curve point records."
        )
    models.load_checked_state(model, state, source=source or repr(model_file))
    return model.to(run.device).eval()


RECORD_KINDS = {
    "run": "a run",
    "fs": "a failure set",
    "sc": "scores",
    "rp": "a repair",
    "sw": "a sweep",
    "rc": "a removal curve",
}


def stored_result(workspace: Workspace, record_id: str) -> dict[str, Any]:
    """Return what the command that made ``record_id`` printed, from the workspace.

    The id's prefix gives the kind of record: ``run-``, ``fs-`` (failure set),
    ``sc-`` (scores), ``rp-`` (repair), ``sw-`` (sweep) or ``rc-`` (removal
    curve). A run also reports its configuration and training history, and
    scores and repairs their resolved settings under ``config``.
    """
    prefix = record_id.split("-", 1)[0]
    if prefix not in RECORD_KINDS or "-" not in record_id:
        kinds = ", ".join(f"{key}- ({what})" for key, what in RECORD_KINDS.items())
        listing = shlex.join(
            ["python", "-m", "repair_core", "runs", "--workspace", str(workspace.root)]
        )
        raise ConfigError(
            f"Record id {record_id!r} does not start with a known prefix. Ids start "
            f"with {kinds}; '{listing} --run RUN_ID' lists them."
        )
    if prefix == "run":
        record = workspace.get_run(record_id)
        return {
            "run_id": record["id"],
            "created_at": record["created_at"],
            "kind": record["kind"],
            **record["metrics"],
            "config": record["config"],
        }
    if prefix == "fs":
        record = workspace.get_failure_set(record_id)
        return {
            "failure_set_id": record["id"],
            "run_id": record["run_id"],
            "created_at": record["created_at"],
            **record["config"],
            **record["metrics"],
        }
    if prefix == "sc":
        record = workspace.get_scores(record_id)
        result = {
            **record["metrics"],
            "created_at": record["created_at"],
            "config": record["config"],
        }
        scores_file = f"scores/{record_id}.pt"
        if not workspace.path(record["run_id"], scores_file).is_file():
            result["missing_scores_file"] = scores_file
        return result
    if prefix == "rp":
        record = workspace.get_repair(record_id)
        result = {
            **record["metrics"],
            "created_at": record["created_at"],
            "config": record["config"],
        }
    elif prefix == "sw":
        # A sweep or curve record has its command's fields as its columns,
        # except that its id column is named "id".
        record = workspace.get_sweep(record_id)
        result = {"sweep_id": record.pop("id"), **record}
    else:
        record = workspace.get_removal_curve(record_id)
        # The removal-curve command prints its points as "curve".
        record["curve"] = record.pop("points")
        result = {"removal_curve_id": record.pop("id"), **record}
    missing = [
        name
        for name in _model_files(result)
        if not workspace.path(result["run_id"], name).is_file()
    ]
    if missing:
        result["missing_model_files"] = missing
    return result


def _model_files(value: Any) -> list[str]:
    """Return every ``model_file`` named anywhere in a stored record."""
    if isinstance(value, dict):
        found = (
            [value["model_file"]] if isinstance(value.get("model_file"), str) else []
        )
        return found + [name for item in value.values() for name in _model_files(item)]
    if isinstance(value, list):
        return [name for item in value for name in _model_files(item)]
    return []
