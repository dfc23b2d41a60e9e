"""Shared types and helpers of the treatments: causes, results and gradients.

A treatment takes the trained model θ̂, the training set D (N examples) and a
set of causes C ⊂ D (training indices), and returns a repaired copy of the
model that approximates training on D\\C. Only parameters with
``requires_grad`` change.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repair_core.data import check_path_name
from repair_core.errors import ConfigError, looked_up_as
from repair_core.fisher import LogLikelihood, categorical_log_likelihood
from repair_core.identification.base import option, settings_from_dict
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress
from repair_core.training import min_examples_to_split, validation_size

logger = logging.getLogger(__name__)


@dataclass
class TreatmentConfig:
    """Settings every treatment shares."""

    seed: int = option(
        0, "Seed for minibatch order, random restarts and stochastic solvers."
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TreatmentConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        return settings_from_dict(cls, values)


@dataclass
class RepairResult:
    """A repaired model and the record needed to reproduce it.

    ``model`` has each submodule's ``training`` flag as in the input model,
    so an input in eval mode comes back in eval mode. ``causes`` are the
    removed training indices, shape (|C|,), sorted int64. ``metrics`` gives
    accuracy before and after the repair on the query failures F_q
    (``query_acc``) and on the causes with their training labels
    (``causes_acc``, None when C is empty), each as ``{"before", "after"}``.
    ``extras`` holds treatment-specific diagnostics such as the step at which
    early stopping kept the parameters.
    """

    model: nn.Module
    treatment: str
    config: dict[str, Any]
    causes: torch.Tensor
    seconds: float
    seed: int
    device: str = "cpu"
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def validate_causes(
    causes: Any, n_train: int, *, allow_empty: bool = False
) -> torch.Tensor:
    """Check a list of training indices and return them sorted and unique.

    Args:
        causes: training-set indices, any sequence or tensor of integers.
            Duplicates are dropped.
        n_train: size N of the training set.
        allow_empty: accept an empty list, as the nothing-removed control does.

    Returns:
        Sorted unique indices, int64, shape (|C|,).

    Raises:
        ConfigError: the list is empty (unless ``allow_empty``), an index is
            outside 0..N-1, a value is not an integer, or the causes cover all
            of D.
    """
    # torch reads a string as a sequence of characters and names its own
    # internals in the error, so text gets its own message.
    text = isinstance(causes, (str, bytes)) or (
        isinstance(causes, (list, tuple))
        and any(isinstance(item, (str, bytes)) for item in causes)
    )
    if text:
        preview = _shortened(str(causes))
        raise ConfigError(
            f"Causes must be integer training indices, got text {preview!r}. Pass "
            "indices such as [12, 40, 311], or read a file with read_causes_file."
        )
    if isinstance(causes, (set, frozenset)):
        causes = sorted(causes)
    if causes is None:
        raise ConfigError(
            "Causes are None. Pass integer training indices such as [12, 40, 311]."
        )
    try:
        values = torch.as_tensor(causes)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"Causes must be a list of integer training indices ({error})."
        ) from error
    values = values.flatten()
    if len(values) == 0 and allow_empty:
        return torch.zeros(0, dtype=torch.long)
    if len(values) == 0:
        raise ConfigError(
            "The list of causes is empty, so there is nothing to remove. Choose at "
            "least one training example."
        )
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ConfigError(
            f"Causes must be integer training indices, got dtype {values.dtype}. "
            "Pass indices such as [12, 40, 311], not a mask or scores."
        )
    values = values.cpu().long().unique()
    bad = values[(values < 0) | (values >= n_train)]
    if len(bad):
        raise ConfigError(
            f"Training index {bad[0].item()} is out of range 0..{n_train - 1}. "
            "Choose causes from this training set."
        )
    if len(values) >= n_train:
        raise ConfigError(
            f"The causes cover all {n_train} training examples, so nothing would "
            "remain to train on. Remove fewer examples."
        )
    return values


def check_remaining(
    treatment: str, n_causes: int, n_train: int, val_fraction: float
) -> None:
    """Check that removing the causes leaves enough examples to train on.

    A treatment that trains on D\\C holds out a validation split for early
    stopping, so D\\C needs ``min_examples_to_split(val_fraction)`` examples,
    which is 2 at the default fraction 0.1.

    Raises:
        ConfigError: fewer examples would remain, naming the largest number
            of causes allowed.
    """
    needed = min_examples_to_split(val_fraction)
    n_validate = validation_size(needed, val_fraction)
    needs = (
        f"Treatment {treatment!r} needs at least {needed - n_validate} to train on "
        f"and {n_validate} to validate on at validation fraction {val_fraction}."
    )
    if n_train < needed:
        raise ConfigError(
            f"The training set has {n_train} of the {needed} examples needed. "
            f"{needs} Use more training examples or a smaller validation fraction."
        )
    if n_train - n_causes < needed:
        raise ConfigError(
            f"The causes name {n_causes} of the {n_train} training examples, so "
            f"fewer than {needed} would remain. {needs} Name at most "
            f"{n_train - needed} causes."
        )


#: Digits read from one line of a causes file; longer numbers are out of range.
MAX_INDEX_DIGITS = 30
#: Characters of a bad line quoted in an error message.
QUOTED_CHARACTERS = 40


def _shortened(text: str) -> str:
    """Return ``text`` cut to ``QUOTED_CHARACTERS``, with its length if cut."""
    if len(text) <= QUOTED_CHARACTERS:
        return text
    return f"{text[:QUOTED_CHARACTERS]}… ({len(text)} characters)"


#: Column of the dashboard's CSV exports that contains the training indices.
INDEX_COLUMN = "train_index"
#: Columns of the dashboard's CSV exports that name the ranking or the repair
#: the indices were taken from.
SOURCE_COLUMNS = ("scores_id", "repair_id")
#: Field separators of CSV files: the comma, and the semicolon and tab that
#: spreadsheets write in locales where the comma is the decimal mark.
CSV_DELIMITERS = (",", ";", "\t")


def _column_name(field: str) -> str:
    """Return a CSV header field as compared with the known column names:
    without surrounding spaces and in lower case, so "Train_Index" names
    ``train_index``."""
    return field.strip().lower()


def _index_header_delimiter(line: str) -> str | None:
    """Return the separator of ``line`` as a CSV header naming ``train_index``,
    or None when it is no such header."""
    for delimiter in CSV_DELIMITERS:
        try:
            names = next(csv.reader([line], delimiter=delimiter))
        except csv.Error:
            continue
        if INDEX_COLUMN in (_column_name(name) for name in names):
            return delimiter
    return None


def _several_indices(line: str) -> bool:
    """Return whether ``line`` is two or more integers separated by one of
    ``CSV_DELIMITERS`` or by spaces, such as "1,2,3"."""
    for delimiter in (*CSV_DELIMITERS, " "):
        parts = [part.strip(" \t") for part in line.split(delimiter)]
        if delimiter == " ":
            parts = [part for part in parts if part]
        if len(parts) > 1 and all(
            part.lstrip("+-").isascii() and part.lstrip("+-").isdigit()
            for part in parts
        ):
            return True
    return False


@dataclass
class CausesFile:
    """The training indices and source ids read from a causes file."""

    entries: list[tuple[int, str]]
    """(line number, index text) of each training index."""
    is_csv: bool
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """For each of ``SOURCE_COLUMNS`` in a CSV header: {id: first line}."""


def _csv_entries(text: str, path: Path, delimiter: str) -> CausesFile:
    """Read the ``train_index`` column, and the source ids, below the header.

    A row's line number is that of the line it starts on; a quoted field may
    span several lines.
    """
    reader = csv.reader(io.StringIO(text), strict=True, delimiter=delimiter)
    column = None
    source_columns: dict[str, int] = {}
    result = CausesFile(entries=[], is_csv=True)
    first_line = 1
    try:
        for row in reader:
            number, first_line = first_line, reader.line_num + 1
            if not any(field.strip() for field in row):
                continue
            if column is None:
                names = [_column_name(name) for name in row]
                for name in (INDEX_COLUMN, *SOURCE_COLUMNS):
                    if names.count(name) > 1:
                        raise ConfigError(
                            f"The header of {str(path)!r} names {name!r} "
                            f"{names.count(name)} times. Keep one such column."
                        )
                column = names.index(INDEX_COLUMN)
                source_columns = {
                    name: names.index(name) for name in SOURCE_COLUMNS if name in names
                }
                result.sources = {name: {} for name in source_columns}
                continue
            if len(row) <= column:
                raise ConfigError(
                    f"Line {number} of {str(path)!r} has no {INDEX_COLUMN!r} value: "
                    f"the header puts it in field {column + 1}, and the row has "
                    f"{len(row)}. Give every row the header's columns."
                )
            if not row[column].strip():
                raise ConfigError(
                    f"Line {number} of {str(path)!r} has an empty {INDEX_COLUMN!r} "
                    "value. Give every row a training index."
                )
            result.entries.append((number, row[column].strip()))
            for name, position in source_columns.items():
                value = row[position].strip() if position < len(row) else ""
                if value:
                    result.sources[name].setdefault(value, number)
    except csv.Error as error:
        # ``first_line`` is where the row that failed starts, such as the line
        # that opens a quote the file never closes.
        raise ConfigError(
            f"Line {first_line} of {str(path)!r} starts a row that is not valid CSV "
            f"({error}). Check its quotes, or write one training index per line."
        ) from None
    if not result.entries:
        raise ConfigError(
            f"Causes file {str(path)!r} has a {INDEX_COLUMN!r} header but no rows "
            "below it. Export at least one training example."
        )
    return result


def _entries(text: str, path: Path) -> CausesFile:
    """Return the index text of each non-blank line of a causes file.

    A first line that names the ``train_index`` column, separated by commas,
    semicolons or tabs, marks a CSV file, such as the dashboard's exports of
    confirmed culprits and of a repair's causes. Only the ``train_index``
    column and the ids in ``SOURCE_COLUMNS`` of such a file are read.
    """
    # The text has "\n" line ends (universal newlines). str.splitlines would
    # also split at form feeds and other separators that editors do not count.
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    delimiter = _index_header_delimiter(lines[0][1]) if lines else None
    if delimiter is not None:
        return _csv_entries(text, path, delimiter)
    return CausesFile(entries=lines, is_csv=False)


def read_causes_file(path: str | Path, n_train: int) -> torch.Tensor:
    """Read training indices from a text file, one per line, or from a CSV file.

    Blank lines and a leading UTF-8 byte-order mark are ignored. A file whose
    first line is a CSV header with a ``train_index`` column, as the
    dashboard's exports have, is read from that column. Header names are
    matched ignoring case and surrounding spaces. The indices are then
    checked as in :func:`validate_causes`.

    :func:`read_causes_table` also returns the ranking and repair ids that a
    CSV export names.

    Raises:
        ConfigError: the file is missing, is a folder, a pipe or a device
            rather than a regular file, is not UTF-8 text, a
            line is not an integer or is out of range (naming the line number
            and its text), an index is listed twice, or an index fails
            validation.
    """
    return read_causes_table(path, n_train)[0]


def _special_file_kind(path: Path) -> str:
    """Return the kind of an existing path that is neither a folder nor a
    regular file, such as "a named pipe"."""
    for is_kind, kind in (
        (path.is_fifo, "a named pipe"),
        (path.is_char_device, "a character device"),
        (path.is_block_device, "a block device"),
        (path.is_socket, "a socket"),
    ):
        if is_kind():
            return kind
    return "a special file"


def read_causes_table(
    path: str | Path,
    n_train: int,
    check_sources: Callable[[dict[str, dict[str, int]]], None] | None = None,
) -> tuple[torch.Tensor, dict[str, dict[str, int]]]:
    """Read a causes file as :func:`read_causes_file` does.

    ``check_sources``, when given, is called with the source ids before the
    indices are checked, so that an export of another run is named as such
    rather than by an index that run does not have.

    Returns:
        (the indices, {column: {id: first line}} for each column of
        ``SOURCE_COLUMNS`` that a CSV header names; empty for plain text)
    """
    if not str(path).strip():
        # Path("") would name the current folder.
        raise ConfigError("The causes file path is empty. Give the path of a file.")
    check_path_name(path, "Causes file", ConfigError)
    path = Path(path)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"Causes file {str(path)!r}{looked_up_as(path)} not found. Check the path."
        ) from None
    except OSError as error:
        # stat fails this way on a symbolic link loop, or when a folder of the
        # path lacks search permission.
        raise ConfigError(
            f"Causes file {str(path)!r} could not be read ({error.strerror or error})."
            " Check the path and the permissions of its folders."
        ) from None
    if path.is_dir():
        raise ConfigError(
            f"Causes file {str(path)!r} is a folder. Pass a text file with one "
            "training index per line."
        )
    if not path.is_file():
        # Reading a named pipe blocks until another process writes to it, and
        # a device such as /dev/zero never ends.
        raise ConfigError(
            f"Causes file {str(path)!r} is {_special_file_kind(path)}, not a "
            "regular file. Pass a text file with one training index per line, or "
            f"a CSV file with a {INDEX_COLUMN!r} column."
        )
    try:
        # utf-8-sig drops the byte-order mark that some Windows editors write.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(
            f"Causes file {str(path)!r} is not UTF-8 text. Save it with UTF-8 "
            "encoding, as plain text with one training index per line or as CSV "
            f"with a {INDEX_COLUMN!r} column."
        ) from None
    except OSError as error:
        raise ConfigError(
            f"Causes file {str(path)!r} could not be read ({error.strerror or error})."
            " Check that the file is readable."
        ) from None
    indices: list[int] = []
    first_line: dict[int, int] = {}
    table = _entries(text, path)
    if check_sources is not None:
        check_sources(table.sources)
    is_csv = table.is_csv
    for number, entry in table.entries:
        # int() would also read "5_0" as 50 and other scripts' digits.
        digits = entry[1:] if entry[:1] in ("+", "-") else entry
        if not (digits.isascii() and digits.isdigit()):
            if is_csv:
                raise ConfigError(
                    f"Line {number} of {str(path)!r} has {INDEX_COLUMN} "
                    f"{_shortened(entry)!r}, not an integer training index."
                )
            if _several_indices(entry):
                raise ConfigError(
                    f"Line {number} of {str(path)!r} is {_shortened(entry)!r}, "
                    "several training indices on one line. Write one index per "
                    f"line, or a CSV file with a {INDEX_COLUMN!r} header and one "
                    "index per row."
                )
            if number == table.entries[0][0] and any(
                delimiter in entry for delimiter in CSV_DELIMITERS
            ):
                raise ConfigError(
                    f"Line {number} of {str(path)!r} is {_shortened(entry)!r}, a CSV "
                    f"header without a {INDEX_COLUMN!r} column. Name the column of "
                    f"training indices {INDEX_COLUMN!r}, or write one index per "
                    "line."
                )
            raise ConfigError(
                f"Line {number} of {str(path)!r} is {_shortened(entry)!r}, not an "
                "integer training index. Write one index per line, or export a "
                f"CSV file with a {INDEX_COLUMN!r} column."
            )
        # Python refuses to convert more than 4300 digits, and an index that
        # long is out of range anyway.
        index = int(entry) if len(digits) <= MAX_INDEX_DIGITS else None
        if index is None or not 0 <= index < n_train:
            raise ConfigError(
                f"Line {number} of {str(path)!r}: training index "
                f"{_shortened(entry)} is out of range 0..{n_train - 1}. Choose "
                "causes from this training set."
            )
        if index in first_line:
            raise ConfigError(
                f"Line {number} of {str(path)!r} repeats training index {index} "
                f"from line {first_line[index]}. List each index once."
            )
        first_line[index] = number
        indices.append(index)
    if not indices:
        raise ConfigError(
            f"Causes file {str(path)!r} lists no training index. Write one index "
            "per line."
        )
    if len(indices) >= n_train:
        raise ConfigError(
            f"Causes file {str(path)!r} lists all {n_train} training examples, so "
            "nothing would remain to train on. Remove fewer examples."
        )
    return validate_causes(indices, n_train), table.sources


def complement(indices: torch.Tensor, n_train: int) -> torch.Tensor:
    """Return the training indices not in ``indices``, sorted, shape (N-|C|,)."""
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[indices.long().cpu()] = False
    return torch.nonzero(keep).flatten()


def copy_training_flags(source: nn.Module, target: nn.Module) -> None:
    """Set the ``training`` flag of each submodule of ``target`` as in ``source``.

    Submodules are matched by qualified name. A submodule of ``target`` that
    ``source`` lacks gets the flag of ``source`` itself.
    """
    flags = {name: module.training for name, module in source.named_modules()}
    for name, module in target.named_modules():
        module.training = flags.get(name, source.training)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def summed_log_likelihood_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    log_likelihood: LogLikelihood = categorical_log_likelihood,
) -> torch.Tensor:
    """Return ∇_θ Σ_n log p(y_n|x_n, θ) over trainable parameters, in eval mode.

    Args:
        images: inputs, shape (M, ...).
        labels: targets, shape (M, ...).

    Returns:
        Flat gradient in ``parameters_to_vector`` order, shape (P,).
    """
    params = trainable(model)
    device = model_device(model)
    total = [torch.zeros_like(p) for p in params]
    with eval_mode(model):
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            objective = log_likelihood(model(x), y).sum()
            # A parameter the forward pass never uses has gradient zero.
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            for accumulated, grad in zip(total, grads, strict=True):
                if grad is not None:
                    accumulated.add_(grad)
    return torch.nn.utils.parameters_to_vector(total)


def retain_sample(
    n_train: int, causes: torch.Tensor, size: int, seed: int
) -> torch.Tensor:
    """Draw up to ``size`` training indices outside ``causes``, seeded, sorted."""
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[causes] = False
    candidates = torch.nonzero(keep).flatten()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(candidates), generator=generator)[:size]
    return candidates[order].sort().values


def report(progress: Progress | None, fraction: float, message: str) -> None:
    """Call ``progress`` when given, with the fraction clipped to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), message)


def check_finite_positive(name: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a finite positive number."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} is {value!r}; it must be a finite positive number.")
