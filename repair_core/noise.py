"""Seeded corruptions of a training set whose corrupted examples are known.

Each scenario returns a corrupted copy of the training set together with a
boolean mask of the examples it changed, so that a method that ranks training
examples by harm can be scored against the truth. The input dataset is never
modified.

Scenarios (``SCENARIOS``):

* ``none``: an unchanged copy.
* ``label-flip``: each label is redrawn from the row of a K x K flip matrix
  for its true class (:func:`flip_labels`).
* ``input-noise``: salt-and-pepper noise (greyscale) or Gaussian noise (colour)
  on a share of the images of some target classes (:func:`add_input_noise`).
* ``fgsm``: a share of the images of some target classes is replaced by
  fast-gradient-sign adversarial images crafted against a victim model trained
  on the clean data, labelled with the victim's prediction (:func:`fgsm_poison`).

Defaults and why:

* Share of each target class corrupted by input noise and FGSM: 0.3. On the
  ``mnist-embedded`` training set (300 images per class, target classes 1, 7,
  6 and 9) that corrupts 360 of 3000 examples. The default MNIST flip matrix
  changes 420 labels in expectation, so the scenarios are of similar size.
* Salt-and-pepper amount (greyscale): 0.1, about 78 of 784 MNIST pixels. A
  MnistCNN trained with ``train_model`` (TrainConfig with seed 1, early stop
  after 29 epochs, test accuracy 0.955, on 2 CPU cores) on the seed-0
  ``mnist-embedded`` training set classified 95% of the target-class test
  images correctly. After noise it classified 17-19% correctly at 0.1 (two
  noise seeds), 0.6-1.1% at 0.17 and 0-0.3% at 0.2. So 0.1 moves the images
  far from their class while leaving some digit signal. MNIST-C
  (github.com/google-research/mnist-c, corruptions.py) uses amounts of 0.03
  to 0.27 for its impulse noise.
* Gaussian standard deviation (colour): 0.1, the strongest Gaussian-noise
  severity of CIFAR-10-C (github.com/hendrycks/robustness,
  ImageNet-C/create_c/make_cifar_c.py).
* FGSM epsilon: 0.2 for greyscale images. Against the MnistCNN above it
  changed the victim's prediction on 96% of the crafted training images (26%
  at 0.1, 71% at 0.15, 98% at 0.3). For colour images it is 8/255, the
  L-infinity budget of the RobustBench CIFAR-10 leaderboard
  (github.com/RobustBench/robustbench).

NOTE: the colour defaults follow the cited benchmarks and were not measured
on this package's models.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repair_core.data import ImageDataset, check_path_name
from repair_core.errors import ConfigError, looked_up_as
from repair_core.inference import eval_mode, model_device

logger = logging.getLogger(__name__)

SCENARIOS = ("none", "label-flip", "input-noise", "fgsm")

#: Largest allowed distance of a flip-matrix row sum from 1.
ROW_SUM_TOLERANCE = 1e-6

#: Share of the images of each target class that input noise and FGSM corrupt.
DEFAULT_FRACTION = 0.3
#: Share of pixels that salt-and-pepper noise sets to 0 or 1 (greyscale images).
DEFAULT_SALT_PEPPER_AMOUNT = 0.1
#: Standard deviation of Gaussian noise in [0, 1] pixel units (colour images).
DEFAULT_GAUSSIAN_STD = 0.1
#: FGSM step size in [0, 1] pixel units for greyscale images.
DEFAULT_EPSILON_GREYSCALE = 0.2
#: FGSM step size in [0, 1] pixel units for colour images.
DEFAULT_EPSILON_COLOUR = 8 / 255

MNIST_CLASS_NAMES = [str(digit) for digit in range(10)]
CIFAR10_CLASS_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

#: Parameters that ``apply_scenario`` accepts for each scenario.
SCENARIO_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "label-flip": ("matrix", "matrix_file"),
    "input-noise": ("target_classes", "fraction", "amount"),
    "fgsm": ("target_classes", "fraction", "epsilon", "batch_size"),
}


@dataclass
class NoisyTrainSet:
    """A corrupted copy of a training set and the truth about what changed.

    Attributes:
        dataset: the corrupted copy, with the same length and classes as the
            input.
        mask: bool tensor of shape (N,), True where the scenario changed the
            example (its image, its label or both).
        scenario: the name from ``SCENARIOS``.
        params: the resolved parameters, JSON-serialisable (lists, numbers,
            strings), including the seed and counts of changed examples.
    """

    dataset: ImageDataset
    mask: torch.Tensor
    scenario: str
    params: dict[str, Any]


# Label flips ---------------------------------------------------------------------


def default_flip_matrix(class_names: Sequence[str]) -> np.ndarray:
    """Build the default flip matrix for MNIST or CIFAR-10.

    MNIST (class names "0" to "9"): 1 and 7 swap with probability 0.4 each way,
    6 and 9 with probability 0.3. CIFAR-10 (torchvision's class names):
    airplane and bird swap with probability 0.4, cat becomes dog with 0.4 and
    dog becomes cat with 0.3. Every other class keeps its label.

    Args:
        class_names: the K class names of the data.

    Returns:
        float64 array of shape (K, K), rows indexed by true class.

    Raises:
        ConfigError: the classes are neither MNIST's nor CIFAR-10's.
    """
    names = list(class_names)
    if names == MNIST_CLASS_NAMES:
        flips = [("1", "7", 0.4), ("7", "1", 0.4), ("6", "9", 0.3), ("9", "6", 0.3)]
    elif names == CIFAR10_CLASS_NAMES:
        flips = [
            ("airplane", "bird", 0.4),
            ("bird", "airplane", 0.4),
            ("cat", "dog", 0.4),
            ("dog", "cat", 0.3),
        ]
    else:
        raise ConfigError(
            f"No default flip matrix for the classes {names}. Write a "
            f"{len(names)} x {len(names)} CSV of flip probabilities (rows = true "
            "class, each row summing to 1) and give it as the flip matrix file: "
            "'Flip matrix CSV' on the dashboard's Setup page, --flip-matrix on the "
            "command line, or scenario_params={'matrix_file': PATH} in Python."
        )
    matrix = np.eye(len(names))
    for source, target, probability in flips:
        row, column = names.index(source), names.index(target)
        matrix[row, row] -= probability
        matrix[row, column] += probability
    return matrix


def read_flip_matrix(path: str | Path, num_classes: int) -> np.ndarray:
    """Read a K x K flip matrix from a CSV file of probabilities.

    Args:
        path: a comma-separated file with K rows of K numbers. Row i contains the
            probabilities of each new label for true class i. Lines starting
            with ``#`` are ignored.
        num_classes: K.

    Returns:
        The validated float64 matrix, shape (K, K).

    Raises:
        ConfigError: the path is invalid, the file is missing or unreadable, or
            the matrix is invalid (see :func:`validate_flip_matrix`).
    """
    path = Path(path)
    check_path_name(path, "Flip matrix file", ConfigError)
    if path.is_dir():
        raise ConfigError(
            f"Flip matrix file {str(path)!r} is a folder. Pass a CSV file of "
            f"{num_classes} lines of {num_classes} comma-separated numbers."
        )
    if not path.is_file():
        raise ConfigError(
            f"Flip matrix file {str(path)!r}{looked_up_as(path)} not found. Check "
            "the path."
        )
    try:
        # utf-8-sig drops the byte-order mark of spreadsheet CSV exports.
        # numpy warns about a file without data, which is reported below.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")
            matrix = np.loadtxt(
                path, delimiter=",", ndmin=2, dtype=np.float64, encoding="utf-8-sig"
            )
    except OSError as error:
        raise ConfigError(
            f"Flip matrix file {str(path)!r} could not be read "
            f"({error.strerror or error}). Check that the file is readable."
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"Flip matrix file {str(path)!r} is not UTF-8 text. Save it as CSV "
            "with UTF-8 encoding."
        ) from None
    except ValueError as error:
        problem = _locate_parse_problem(path) or _parse_problem(error)
        raise ConfigError(
            f"Flip matrix file {str(path)!r} could not be parsed "
            f"({problem}). Write "
            f"{num_classes} lines of {num_classes} comma-separated numbers, with "
            "no header."
        ) from error
    if matrix.size == 0:
        raise ConfigError(
            f"Flip matrix file {str(path)!r} contains no numbers. Write "
            f"{num_classes} lines of {num_classes} comma-separated numbers."
        )
    return validate_flip_matrix(matrix, num_classes)


def _locate_parse_problem(path: Path) -> str | None:
    """Return the first cell or line of a CSV file of numbers that numpy
    could not read, by its line and column counted from 1, or None.

    numpy counts the row of a cell it cannot convert from 0 and its column
    from 1 (numpy 2.x), so its own message points one line too high.
    """
    columns = None
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = line.split(",")
        for column, cell in enumerate(cells, start=1):
            try:
                float(cell)
            except ValueError:
                return (
                    f"line {line_number}, column {column}: {cell.strip()!r} is not "
                    "a number"
                )
        if columns is None:
            columns = len(cells)
        elif len(cells) != columns:
            noun = "column" if len(cells) == 1 else "columns"
            return (
                f"line {line_number} has {len(cells)} {noun}, but the first line "
                f"has {columns}"
            )
    return None


def _parse_problem(error: ValueError) -> str:
    """Return numpy's parse error without its advice on loadtxt arguments,
    which a user of a CSV file cannot pass."""
    return str(error).split("; use `usecols`")[0].rstrip(".")


def validate_flip_matrix(
    matrix: np.ndarray | Sequence[Sequence[float]], num_classes: int
) -> np.ndarray:
    """Check that ``matrix`` is a K x K row-stochastic matrix.

    Args:
        matrix: flip probabilities, rows indexed by true class, shape (K, K).
        num_classes: K.

    Returns:
        The matrix as a new float64 array of shape (K, K).

    Raises:
        ConfigError: the shape is not (K, K), an entry is not finite or is
            negative, or a row sum differs from 1 by more than
            ``ROW_SUM_TOLERANCE``. The message names the offending row.
    """
    try:
        values = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"The flip matrix is not a table of numbers ({error}). Give "
            f"{num_classes} rows of {num_classes} probabilities."
        ) from error
    if values.shape != (num_classes, num_classes):
        raise ConfigError(
            f"The flip matrix has shape {values.shape} but the data has "
            f"{num_classes} classes. Give a {num_classes} x {num_classes} matrix."
        )
    # Rows and columns are counted from 1, as the lines and fields of a CSV
    # file are, and each is named with the class index it stands for.
    for row_index, row in enumerate(values):
        where = f"Row {row_index + 1} of the flip matrix (true class {row_index})"
        if not np.all(np.isfinite(row)):
            column = int(np.flatnonzero(~np.isfinite(row))[0])
            raise ConfigError(
                f"{where} has the non-finite entry {row[column]} in column "
                f"{column + 1} (new label {column}). Use probabilities between 0 "
                "and 1."
            )
        if np.any(row < 0):
            column = int(np.argmin(row))
            raise ConfigError(
                f"{where} has the negative entry {row[column]} in column "
                f"{column + 1} (new label {column}). Use probabilities between 0 "
                "and 1."
            )
        total = float(row.sum())
        if abs(total - 1.0) > ROW_SUM_TOLERANCE:
            raise ConfigError(
                f"{where} sums to {total:.9g}, not 1 "
                f"(tolerance {ROW_SUM_TOLERANCE:g}). Each row contains the "
                "probabilities of the new label for one true class, so make it "
                "sum to 1."
            )
    return values


def flip_labels(
    dataset: ImageDataset,
    matrix: np.ndarray | Sequence[Sequence[float]],
    *,
    seed: int,
) -> NoisyTrainSet:
    """Redraw every label from the flip-matrix row of its true class.

    Args:
        dataset: the clean training set, N examples of K classes.
        matrix: flip probabilities, shape (K, K), rows indexed by true class.
        seed: seed of the draws.

    Returns:
        A copy with the new labels. The mask is True exactly where the new
        label differs from the old one.
    """
    num_classes = len(dataset.class_names)
    matrix = validate_flip_matrix(matrix, num_classes)
    generator = np.random.default_rng(seed)
    old_labels = dataset.labels.numpy()

    # Inverse-CDF sampling: the new label is the first class whose cumulative
    # probability exceeds a uniform draw. Dividing by the row total makes the
    # last cumulative value exactly 1, so the draw (< 1) always lands in a
    # class of non-zero probability.
    cumulative = np.cumsum(matrix, axis=1)
    cumulative /= cumulative[:, -1:]
    draws = generator.random(len(old_labels))
    new_labels = (cumulative[old_labels] <= draws[:, None]).sum(axis=1)

    labels = torch.from_numpy(new_labels.astype(np.int64))
    mask = labels != dataset.labels
    changed = _count_per_class(dataset, mask)
    noisy = ImageDataset(
        images=dataset.images.clone(),
        labels=labels,
        class_names=list(dataset.class_names),
        description=f"{dataset.description}, labels flipped (seed {seed})",
    )
    params = {
        "matrix": matrix.tolist(),
        "class_names": list(dataset.class_names),
        "seed": seed,
        "n_changed": int(mask.sum()),
        "changed_per_class": changed,
    }
    logger.info("Flipped %d of %d labels: %s", int(mask.sum()), len(mask), changed)
    if not mask.any():
        logger.warning(
            "The flip matrix changed none of the %d labels, so the run has no "
            "corrupted examples to find. Give some class a probability of "
            "becoming another class to flip labels.",
            len(mask),
        )
    return NoisyTrainSet(dataset=noisy, mask=mask, scenario="label-flip", params=params)


# Image corruptions ---------------------------------------------------------------


def default_target_classes(class_names: Sequence[str]) -> list[int]:
    """Return the classes that input noise and FGSM corrupt by default.

    These are the classes of the default flip matrix: 1, 7, 6 and 9 for MNIST,
    and airplane, bird, cat and dog for CIFAR-10.

    Raises:
        ConfigError: the classes are neither MNIST's nor CIFAR-10's.
    """
    names = list(class_names)
    if names == MNIST_CLASS_NAMES:
        return [1, 7, 6, 9]
    if names == CIFAR10_CLASS_NAMES:
        return [names.index(name) for name in ("airplane", "bird", "cat", "dog")]
    raise ConfigError(
        f"No default target classes for the classes {names}. Pass the classes to "
        "corrupt as target_classes (--target-classes), for example 0,1."
    )


def add_input_noise(
    dataset: ImageDataset,
    *,
    target_classes: Sequence[int | str] | None = None,
    fraction: float = DEFAULT_FRACTION,
    amount: float | None = None,
    seed: int,
) -> NoisyTrainSet:
    """Add pixel noise to a share of the images of each target class.

    Greyscale images (C = 1) get salt-and-pepper noise: each pixel is replaced
    with probability ``amount`` by 0 or 1 (equally likely). Other images get
    Gaussian noise with standard deviation ``amount``. Both are clipped to
    [0, 1]. Labels stay unchanged.

    Args:
        dataset: the clean training set, images of shape (N, C, H, W).
        target_classes: class indices or names to corrupt; the classes of
            :func:`default_target_classes` when None.
        fraction: share of each target class to corrupt, in (0, 1]. A class
            of n images gets ``round(fraction * n)`` corrupted images.
        amount: share of replaced pixels (salt-and-pepper, in (0, 1]) or noise
            standard deviation (Gaussian, > 0). Defaults to
            ``DEFAULT_SALT_PEPPER_AMOUNT`` or ``DEFAULT_GAUSSIAN_STD``.
        seed: seed of the choice of images and of the noise.

    Returns:
        A copy with the noisy images. The mask marks the corrupted images.
    """
    targets = _resolve_target_classes(target_classes, dataset.class_names)
    _check_fraction(fraction)
    salt_and_pepper = dataset.images.shape[1] == 1
    if salt_and_pepper:
        amount = DEFAULT_SALT_PEPPER_AMOUNT if amount is None else float(amount)
        if not 0 < amount <= 1:
            raise ConfigError(
                f"Salt-and-pepper amount {amount} must lie in (0, 1]. It is the "
                "share of pixels set to 0 or 1."
            )
    else:
        amount = DEFAULT_GAUSSIAN_STD if amount is None else float(amount)
        if not (math.isfinite(amount) and amount > 0):
            raise ConfigError(
                f"Gaussian noise amount {amount} must be a positive number. It is "
                "the standard deviation in [0, 1] pixel units."
            )

    generator = torch.Generator().manual_seed(seed)
    chosen = _choose_per_class(dataset.labels, targets, fraction, generator)
    originals = dataset.images[chosen]
    if salt_and_pepper:
        replaced = torch.rand(originals.shape, generator=generator) < amount
        salt = torch.rand(originals.shape, generator=generator) < 0.5
        noisy = torch.where(replaced, salt.to(originals.dtype), originals)
    else:
        noise = torch.randn(originals.shape, generator=generator) * amount
        noisy = (originals + noise).clamp_(0.0, 1.0)

    images = dataset.images.clone()
    images[chosen] = noisy
    mask = torch.zeros(len(dataset), dtype=torch.bool)
    mask[chosen] = True
    _warn_unchanged(noisy, originals, None, None, "input-noise")
    kind = "salt-and-pepper" if salt_and_pepper else "gaussian"
    corrupted = ImageDataset(
        images=images,
        labels=dataset.labels.clone(),
        class_names=list(dataset.class_names),
        description=f"{dataset.description}, {kind} noise on {len(chosen)} images "
        f"(seed {seed})",
    )
    params = {
        "target_classes": targets,
        "target_class_names": [dataset.class_names[c] for c in targets],
        "fraction": float(fraction),
        "noise": kind,
        "amount": amount,
        "seed": seed,
        "n_changed": int(mask.sum()),
        "changed_per_class": _count_per_class(dataset, mask),
    }
    logger.info("Added %s noise to %d images", kind, len(chosen))
    return NoisyTrainSet(
        dataset=corrupted, mask=mask, scenario="input-noise", params=params
    )


def fgsm_poison(
    dataset: ImageDataset,
    victim: nn.Module,
    *,
    target_classes: Sequence[int | str] | None = None,
    fraction: float = DEFAULT_FRACTION,
    epsilon: float | None = None,
    seed: int,
    batch_size: int = 256,
) -> NoisyTrainSet:
    """Replace a share of each target class by FGSM images labelled by the victim.

    For each chosen example (x, y) the crafted image is
    ``x' = clip(x + epsilon * sign(grad_x CE(victim(x), y)), 0, 1)`` with the
    victim in eval mode, and its label becomes the victim's prediction on x'.
    Where the attack succeeds that label is wrong for the image.

    Args:
        dataset: the clean training set, images of shape (N, C, H, W).
        victim: a model trained by the caller on the clean training set. Its
            weights, gradients and train/eval modes are left as they were.
        target_classes: class indices or names to poison; the classes of
            :func:`default_target_classes` when None.
        fraction: share of each target class to replace, in (0, 1]. A class of
            n images gets ``round(fraction * n)`` crafted images.
        epsilon: step size in [0, 1] pixel units, in (0, 1]. Defaults to
            ``DEFAULT_EPSILON_GREYSCALE`` for 1-channel images and to
            ``DEFAULT_EPSILON_COLOUR`` otherwise.
        seed: seed of the choice of images.
        batch_size: images per forward and backward pass.

    Returns:
        A copy with the crafted images and labels. The mask marks the replaced
        examples. ``params`` records the victim's accuracy on the chosen
        originals and on the crafted images, and how many labels changed.
    """
    targets = _resolve_target_classes(target_classes, dataset.class_names)
    _check_fraction(fraction)
    if epsilon is None:
        greyscale = dataset.images.shape[1] == 1
        epsilon = DEFAULT_EPSILON_GREYSCALE if greyscale else DEFAULT_EPSILON_COLOUR
    epsilon = float(epsilon)
    if not 0 < epsilon <= 1:
        raise ConfigError(
            f"FGSM epsilon {epsilon} must lie in (0, 1]. It is the step size in "
            "[0, 1] pixel units."
        )
    if batch_size < 1:
        raise ConfigError(f"FGSM batch size {batch_size} must be at least 1.")

    generator = torch.Generator().manual_seed(seed)
    chosen = _choose_per_class(dataset.labels, targets, fraction, generator)
    originals = dataset.images[chosen]
    true_labels = dataset.labels[chosen]
    crafted, clean_predictions, crafted_predictions = _craft_fgsm(
        victim, originals, true_labels, epsilon, batch_size, len(dataset.class_names)
    )

    images = dataset.images.clone()
    images[chosen] = crafted
    labels = dataset.labels.clone()
    labels[chosen] = crafted_predictions
    mask = torch.zeros(len(dataset), dtype=torch.bool)
    mask[chosen] = True
    _warn_unchanged(crafted, originals, crafted_predictions, true_labels, "fgsm")

    n_chosen = len(chosen)
    clean_accuracy = _share(clean_predictions == true_labels)
    crafted_accuracy = _share(crafted_predictions == true_labels)
    poisoned = ImageDataset(
        images=images,
        labels=labels,
        class_names=list(dataset.class_names),
        description=f"{dataset.description}, {n_chosen} images replaced by FGSM "
        f"images (epsilon {epsilon:g}, seed {seed})",
    )
    params = {
        "target_classes": targets,
        "target_class_names": [dataset.class_names[c] for c in targets],
        "fraction": float(fraction),
        "epsilon": epsilon,
        "seed": seed,
        "batch_size": batch_size,
        "n_changed": int(mask.sum()),
        "changed_per_class": _count_per_class(dataset, mask),
        "n_label_changed": int((crafted_predictions != true_labels).sum()),
        "victim_accuracy_clean": clean_accuracy,
        "victim_accuracy_crafted": crafted_accuracy,
    }
    logger.info(
        "Replaced %d images by FGSM images (epsilon %g); victim accuracy %.3f on the "
        "originals, %.3f on the crafted images",
        n_chosen,
        epsilon,
        clean_accuracy,
        crafted_accuracy,
    )
    return NoisyTrainSet(dataset=poisoned, mask=mask, scenario="fgsm", params=params)


def _craft_fgsm(
    victim: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    batch_size: int,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return FGSM images (M, C, H, W) and the victim's predictions (M,) on the
    originals and on the crafted images, all on the CPU."""
    device = model_device(victim)
    crafted, clean_predictions, crafted_predictions = [], [], []
    with eval_mode(victim), torch.enable_grad():
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device).requires_grad_(True)
            y = labels[start : start + batch_size].to(device)
            logits = victim(x)
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ConfigError(
                    f"The FGSM victim outputs shape {tuple(logits.shape)} but the "
                    f"data has {num_classes} classes. Pass a victim trained on this "
                    "training set."
                )
            loss = F.cross_entropy(logits, y, reduction="sum")
            # autograd.grad leaves the parameters' .grad fields untouched.
            (gradient,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                adversarial = (x + epsilon * gradient.sign()).clamp_(0.0, 1.0)
                crafted.append(adversarial.cpu())
                clean_predictions.append(logits.argmax(1).cpu())
                crafted_predictions.append(victim(adversarial).argmax(1).cpu())
    if not crafted:
        empty = torch.empty(0, dtype=torch.long)
        return images.clone(), empty, empty.clone()
    return (
        torch.cat(crafted),
        torch.cat(clean_predictions),
        torch.cat(crafted_predictions),
    )


# Scenario dispatch ---------------------------------------------------------------


def apply_scenario(
    name: str,
    dataset: ImageDataset,
    *,
    seed: int,
    params: dict[str, Any] | None = None,
    train_victim: Callable[[ImageDataset], nn.Module] | None = None,
) -> NoisyTrainSet:
    """Apply the noise scenario ``name`` to a clean training set.

    Args:
        name: one of ``SCENARIOS``.
        dataset: the clean training set; it is not modified.
        seed: seed of the scenario's random choices.
        params: scenario parameters, keys as in ``SCENARIO_PARAMS``.
            ``label-flip`` takes ``matrix`` (nested lists) or ``matrix_file`` (a
            CSV path), and uses :func:`default_flip_matrix` without either.
            ``input-noise`` takes keyword arguments of :func:`add_input_noise`,
            and ``fgsm`` those of :func:`fgsm_poison`.
        train_victim: required for ``fgsm``. It is called once with the clean
            ``dataset`` and returns the trained victim model. The caller
            chooses the victim's seed, normally a different one from the model
            trained on the poisoned data.

    Returns:
        The corrupted copy and its mask. For ``none`` the copy is unchanged
        and the mask is all False.

    Raises:
        ConfigError: the scenario is unknown, ``params`` has a key the scenario
            does not take, a value is out of range, or ``fgsm`` lacks
            ``train_victim``.
    """
    if name not in SCENARIOS:
        raise ConfigError(
            f"Unknown noise scenario {name!r}. Use one of {', '.join(SCENARIOS)}."
        )
    params = dict(params or {})
    allowed = SCENARIO_PARAMS[name]
    for key in params:
        if key not in allowed:
            choices = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"Scenario {name!r} does not take the parameter {key!r}. Allowed "
                f"parameters: {choices}."
            )

    if name == "none":
        copy = ImageDataset(
            images=dataset.images.clone(),
            labels=dataset.labels.clone(),
            class_names=list(dataset.class_names),
            description=dataset.description,
        )
        mask = torch.zeros(len(dataset), dtype=torch.bool)
        return NoisyTrainSet(
            dataset=copy, mask=mask, scenario="none", params={"seed": seed}
        )
    if name == "label-flip":
        matrix = _resolve_flip_matrix(params, dataset.class_names)
        result = flip_labels(dataset, matrix, seed=seed)
        if "matrix_file" in params:
            result.params["matrix_file"] = str(params["matrix_file"])
        return result
    if name == "input-noise":
        return add_input_noise(dataset, seed=seed, **params)

    if train_victim is None:
        raise ConfigError(
            "Scenario 'fgsm' needs train_victim, a function that trains the "
            "victim model on the clean training set and returns it."
        )
    victim = train_victim(dataset)
    if not isinstance(victim, nn.Module):
        raise ConfigError(
            f"train_victim returned {type(victim).__name__}, not a torch.nn.Module. "
            "Return the trained victim model."
        )
    return fgsm_poison(dataset, victim, seed=seed, **params)


def _resolve_flip_matrix(
    params: dict[str, Any], class_names: Sequence[str]
) -> np.ndarray:
    if "matrix" in params and "matrix_file" in params:
        raise ConfigError(
            "Label-flip parameters give both 'matrix' and 'matrix_file'. Pass only "
            "one of them."
        )
    if "matrix" in params:
        return validate_flip_matrix(params["matrix"], len(class_names))
    if "matrix_file" in params:
        return read_flip_matrix(params["matrix_file"], len(class_names))
    return default_flip_matrix(class_names)


# Helpers -------------------------------------------------------------------------


def _resolve_target_classes(
    target_classes: Sequence[int | str] | None, class_names: Sequence[str]
) -> list[int]:
    if target_classes is None:
        return default_target_classes(class_names)
    if isinstance(target_classes, str | int):
        target_classes = [target_classes]
    names = list(class_names)
    resolved = []
    for value in target_classes:
        if isinstance(value, str) and value in names:
            index = names.index(value)
        elif isinstance(value, int | np.integer) and not isinstance(value, bool):
            index = int(value)
        else:
            raise ConfigError(
                f"Target class {value!r} is neither a class index nor one of the "
                f"class names {names}. Give indices in [0, {len(names)}) or names."
            )
        if not 0 <= index < len(names):
            raise ConfigError(
                f"Target class {index} is out of range for {len(names)} classes. "
                f"Give indices in [0, {len(names)})."
            )
        if index in resolved:
            raise ConfigError(
                f"Target class {value!r} is listed twice. List each class once."
            )
        resolved.append(index)
    if not resolved:
        raise ConfigError("The list of target classes is empty. Give at least one.")
    return resolved


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"Fraction {fraction} must lie in (0, 1]. It is the share of each "
            "target class that is corrupted."
        )


def _choose_per_class(
    labels: torch.Tensor,
    targets: Sequence[int],
    fraction: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pick round(fraction * n_c) random positions of each target class c, with
    Python's round (halves go to the even number).

    Returns the sorted positions, shape (M,).
    """
    chosen = []
    for target in targets:
        positions = torch.nonzero(labels == target).flatten()
        count = round(fraction * len(positions))
        order = torch.randperm(len(positions), generator=generator)
        chosen.append(positions[order[:count]])
    return torch.cat(chosen).sort().values


def _count_per_class(dataset: ImageDataset, mask: torch.Tensor) -> dict[str, int]:
    """Count the masked examples of each original class that has any."""
    counts = torch.bincount(
        dataset.labels[mask], minlength=len(dataset.class_names)
    ).tolist()
    return {
        name: count
        for name, count in zip(dataset.class_names, counts, strict=True)
        if count
    }


def _share(hits: torch.Tensor) -> float | None:
    """Return the share of True values, or None (JSON null) when there are none."""
    return float(hits.float().mean()) if len(hits) else None


def _warn_unchanged(
    new_images: torch.Tensor,
    old_images: torch.Tensor,
    new_labels: torch.Tensor | None,
    old_labels: torch.Tensor | None,
    scenario: str,
) -> None:
    """Log the masked examples that came out identical to their originals."""
    same = (new_images == old_images).flatten(1).all(1)
    if new_labels is not None and old_labels is not None:
        same &= new_labels == old_labels
    if same.any():
        logger.warning(
            "%s left %d of %d chosen examples unchanged, yet the mask marks them",
            scenario,
            int(same.sum()),
            len(same),
        )
