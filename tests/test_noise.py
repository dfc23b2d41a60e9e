"""Tests for the noise scenarios in repair_core.noise."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from repair_core.data import ImageDataset, load_data
from repair_core.errors import ConfigError
from repair_core.noise import (
    CIFAR10_CLASS_NAMES,
    DEFAULT_EPSILON_GREYSCALE,
    MNIST_CLASS_NAMES,
    SCENARIOS,
    add_input_noise,
    apply_scenario,
    default_flip_matrix,
    default_target_classes,
    fgsm_poison,
    flip_labels,
    read_flip_matrix,
    validate_flip_matrix,
)
from repair_core.training import TrainConfig, train_model


def make_dataset(
    counts: list[int],
    class_names: list[str] | None = None,
    channels: int = 1,
    size: int = 3,
    fill: float | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Random images in [0, 1] (or all ``fill``) with counts[k] images of class k."""
    names = class_names or [f"class{k}" for k in range(len(counts))]
    labels = torch.cat(
        [torch.full((count,), k, dtype=torch.long) for k, count in enumerate(counts)]
    )
    shape = (len(labels), channels, size, size)
    if fill is None:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    else:
        images = torch.full(shape, fill)
    return ImageDataset(images, labels, names, "test images")


def changed_images(noisy: ImageDataset, clean: ImageDataset) -> torch.Tensor:
    return (noisy.images != clean.images).flatten(1).any(1)


# Flip matrices -------------------------------------------------------------------


def test_default_flip_matrix_mnist():
    matrix = default_flip_matrix(MNIST_CLASS_NAMES)
    assert matrix.shape == (10, 10)
    assert matrix[1, 7] == pytest.approx(0.4)
    assert matrix[1, 1] == pytest.approx(0.6)
    assert matrix[7, 1] == pytest.approx(0.4)
    assert matrix[6, 9] == pytest.approx(0.3)
    assert matrix[9, 6] == pytest.approx(0.3)
    assert matrix[9, 9] == pytest.approx(0.7)
    assert matrix[0].tolist() == np.eye(10)[0].tolist()
    assert np.allclose(matrix.sum(axis=1), 1.0)
    assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 4


def test_default_flip_matrix_cifar10():
    names = CIFAR10_CLASS_NAMES
    matrix = default_flip_matrix(names)
    airplane, bird, cat, dog = (
        names.index(n) for n in ("airplane", "bird", "cat", "dog")
    )
    assert matrix[airplane, bird] == pytest.approx(0.4)
    assert matrix[bird, airplane] == pytest.approx(0.4)
    assert matrix[cat, dog] == pytest.approx(0.4)
    assert matrix[dog, cat] == pytest.approx(0.3)
    assert matrix[dog, dog] == pytest.approx(0.7)
    assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 4


def test_default_flip_matrix_unknown_classes():
    with pytest.raises(
        ConfigError, match=r"No default flip matrix .* 3 x 3 CSV"
    ) as caught:
        default_flip_matrix(["a", "b", "c"])

    # Each way of starting a run is named, with the place to give the file.
    message = str(caught.value)
    assert "'Flip matrix CSV' on the dashboard's Setup page" in message
    assert "--flip-matrix on the command line" in message
    assert "scenario_params={'matrix_file': PATH} in Python" in message


def test_validate_rejects_bad_row_sum():
    matrix = np.eye(3)
    matrix[2] = [0.5, 0.2, 0.2]
    with pytest.raises(
        ConfigError, match=r"Row 3 of the flip matrix \(true class 2\) sums to 0.9,"
    ):
        validate_flip_matrix(matrix, 3)


def test_validate_rejects_negative_entry():
    matrix = [[1, 0, 0], [-0.1, 1.1, 0], [0, 0, 1]]
    with pytest.raises(
        ConfigError, match=r"Row 2 .* entry -0.1 in column 1 \(new label 0\)"
    ):
        validate_flip_matrix(matrix, 3)


def test_validate_rejects_nan():
    matrix = [[float("nan"), 1, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(
        ConfigError,
        match=r"Row 1 of the flip matrix \(true class 0\) has the non-finite entry "
        r"nan in column 1 \(new label 0\)",
    ):
        validate_flip_matrix(matrix, 3)


def test_validate_rejects_wrong_shape():
    with pytest.raises(ConfigError, match=r"shape \(2, 3\) but the data has 3 classes"):
        validate_flip_matrix(np.ones((2, 3)) / 3, 3)


def test_validate_accepts_rounding_within_tolerance():
    matrix = [[0.3333333, 0.3333333, 0.3333334], [0, 1, 0], [0, 0, 1 + 5e-7]]
    checked = validate_flip_matrix(matrix, 3)
    assert checked.dtype == np.float64
    assert checked[0, 2] == pytest.approx(0.3333334)


def test_read_flip_matrix_csv(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("# rows = true class\n0.5,0.5,0\n0,1,0\n0.1,0.2,0.7\n")
    matrix = read_flip_matrix(path, 3)
    assert matrix.tolist() == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.1, 0.2, 0.7]]


def test_read_flip_matrix_with_byte_order_mark(tmp_path):
    # Spreadsheets save "CSV UTF-8" with a byte-order mark.
    path = tmp_path / "flips.csv"
    path.write_bytes(b"\xef\xbb\xbf0.5,0.5\r\n0,1\r\n")
    assert read_flip_matrix(path, 2).tolist() == [[0.5, 0.5], [0.0, 1.0]]


def test_read_flip_matrix_not_utf8(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("0.5,0.5\n0,1\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"flips\.csv' is not UTF-8 text\."):
        read_flip_matrix(path, 2)


def test_read_flip_matrix_folder_or_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=r"^Flip matrix file .* is a folder\."):
        read_flip_matrix(tmp_path, 2)
    # Reading /proc/self/mem from its start fails with an I/O error, which a
    # permission check cannot avoid even for root.
    unreadable = Path("/proc/self/mem")
    if not unreadable.is_file():
        pytest.skip("needs Linux's /proc/self/mem")
    with pytest.raises(ConfigError, match=r"could not be read \(Input/output error\)"):
        read_flip_matrix(unreadable, 2)


def test_read_flip_matrix_relative_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        read_flip_matrix(Path("flips.csv"), 2)
    assert str(caught.value) == (
        f"Flip matrix file 'flips.csv' (looked up as {tmp_path / 'flips.csv'}) not "
        "found. Check the path."
    )
    with pytest.raises(ConfigError) as caught:
        read_flip_matrix(tmp_path / "flips.csv", 2)
    assert str(caught.value) == (
        f"Flip matrix file {str(tmp_path / 'flips.csv')!r} not found. Check the path."
    )


def test_read_flip_matrix_bad_row(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("0.5,0.5\n0.3,0.3\n")
    with pytest.raises(ConfigError, match="Row 2 of the flip matrix .* sums to 0.6"):
        read_flip_matrix(path, 2)


def test_read_flip_matrix_header_rejected(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("a,b\n1,0\n0,1\n")
    with pytest.raises(ConfigError, match=r"flips.csv' could not be parsed") as error:
        read_flip_matrix(path, 2)
    assert ".)" not in str(error.value)
    assert "(line 1, column 1: 'a' is not a number)" in str(error.value)


def test_read_flip_matrix_names_bad_cell_line(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("\n0.5,0.5\n0.5, abc\n")
    with pytest.raises(ConfigError) as error:
        read_flip_matrix(path, 2)
    assert "(line 3, column 2: 'abc' is not a number)" in str(error.value)


def test_read_flip_matrix_short_row(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("1,0\n0\n")
    with pytest.raises(ConfigError) as error:
        read_flip_matrix(path, 2)
    message = str(error.value)
    assert "(line 2 has 1 column, but the first line has 2)" in message
    assert "usecols" not in message


def test_read_flip_matrix_empty_file(tmp_path):
    path = tmp_path / "flips.csv"
    path.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="flips.csv' contains no numbers"):
            read_flip_matrix(path, 2)


def test_read_flip_matrix_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.csv' not found"):
        read_flip_matrix(tmp_path / "absent.csv", 2)


def test_read_flip_matrix_name_too_long(tmp_path):
    path = tmp_path / ("a" * 300 + ".csv")

    with pytest.raises(ConfigError) as caught:
        read_flip_matrix(path, 2)

    message = str(caught.value)
    assert message.startswith(f"Flip matrix file {str(path)!r} is too long for")
    assert "Check the path." in message


def test_read_flip_matrix_nul_character(tmp_path):
    path = f"{tmp_path}/flips\0.csv"

    with pytest.raises(ConfigError) as caught:
        apply_scenario(
            "label-flip",
            make_dataset([2, 2]),
            seed=0,
            params={"matrix_file": path},
        )

    assert str(caught.value) == (
        f"Flip matrix file {path!r} contains a NUL character, which no file name "
        "can contain. Check the path."
    )


# Label flips ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_digits() -> ImageDataset:
    """2000 tiny images of each MNIST class, enough to measure flip rates."""
    return make_dataset([2000] * 10, MNIST_CLASS_NAMES, size=1)


def test_flip_mask_matches_changed_labels(many_digits):
    result = flip_labels(many_digits, default_flip_matrix(MNIST_CLASS_NAMES), seed=0)
    assert result.mask.dtype == torch.bool
    assert torch.equal(result.mask, result.dataset.labels != many_digits.labels)
    assert torch.equal(result.dataset.images, many_digits.images)
    assert result.scenario == "label-flip"


def test_flip_rates_follow_matrix(many_digits):
    result = flip_labels(many_digits, default_flip_matrix(MNIST_CLASS_NAMES), seed=0)
    old, new = many_digits.labels, result.dataset.labels
    for source, target, rate in ((1, 7, 0.4), (7, 1, 0.4), (6, 9, 0.3), (9, 6, 0.3)):
        of_class = old == source
        # Binomial standard error with 2000 draws is at most 0.011.
        assert (new[of_class] == target).float().mean().item() == pytest.approx(
            rate, abs=0.04
        )
        assert torch.all((new[of_class] == target) | (new[of_class] == source))
    for untouched in (0, 2, 3, 4, 5, 8):
        assert torch.all(new[old == untouched] == untouched)
    assert result.params["n_changed"] == int(result.mask.sum())
    assert result.params["changed_per_class"]["1"] == int(result.mask[old == 1].sum())


def test_flip_never_draws_zero_probability_class():
    dataset = make_dataset([500, 500, 500])
    matrix = [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    new = flip_labels(dataset, matrix, seed=3).dataset.labels
    assert torch.all(new[:500] == 1)
    assert set(new[500:1000].tolist()) == {0, 1}
    assert torch.all(new[1000:] == 2)


def test_identity_flip_matrix_warns(caplog):
    dataset = make_dataset([50, 50])

    with caplog.at_level(logging.WARNING, logger="repair_core.noise"):
        result = flip_labels(dataset, [[1.0, 0.0], [0.0, 1.0]], seed=0)

    assert not result.mask.any()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged == [
        "The flip matrix changed none of the 100 labels, so the run has no "
        "corrupted examples to find. Give some class a probability of becoming "
        "another class to flip labels."
    ]


def test_flip_seeded(many_digits):
    matrix = default_flip_matrix(MNIST_CLASS_NAMES)
    first = flip_labels(many_digits, matrix, seed=4)
    again = flip_labels(many_digits, matrix, seed=4)
    other = flip_labels(many_digits, matrix, seed=5)
    assert torch.equal(first.dataset.labels, again.dataset.labels)
    assert not torch.equal(first.dataset.labels, other.dataset.labels)


def test_flip_leaves_input_and_records_params():
    dataset = make_dataset([50] * 10, MNIST_CLASS_NAMES)
    labels_before = dataset.labels.clone()
    images_before = dataset.images.clone()
    result = flip_labels(dataset, default_flip_matrix(MNIST_CLASS_NAMES), seed=0)
    assert torch.equal(dataset.labels, labels_before)
    assert torch.equal(dataset.images, images_before)
    assert result.dataset.images.data_ptr() != dataset.images.data_ptr()
    params = json.loads(json.dumps(result.params))
    assert params["seed"] == 0
    assert params["matrix"][1][7] == pytest.approx(0.4)
    assert params["class_names"] == MNIST_CLASS_NAMES


# Input noise ---------------------------------------------------------------------


def test_default_target_classes():
    assert default_target_classes(MNIST_CLASS_NAMES) == [1, 7, 6, 9]
    assert default_target_classes(CIFAR10_CLASS_NAMES) == [0, 2, 3, 5]
    with pytest.raises(ConfigError, match="No default target classes"):
        default_target_classes(["a", "b"])


def test_salt_and_pepper_counts_and_mask():
    counts = [25, 30, 11, 40]
    dataset = make_dataset(counts, size=8)
    result = add_input_noise(
        dataset, target_classes=[0, 1, 2], fraction=0.3, amount=0.2, seed=0
    )
    changed = changed_images(result.dataset, dataset)
    assert torch.equal(result.mask, changed)
    per_class = dataset.labels[result.mask].bincount(minlength=4).tolist()
    # round() sends 7.5 to 8 (the even neighbour) and 3.3 to 3. Class 3 is not
    # a target.
    assert per_class == [round(0.3 * 25), round(0.3 * 30), round(0.3 * 11), 0]
    assert per_class == [8, 9, 3, 0]
    assert torch.equal(result.dataset.labels, dataset.labels)
    assert result.params["n_changed"] == 20
    assert result.params["noise"] == "salt-and-pepper"


def test_salt_and_pepper_pixels():
    dataset = make_dataset([200, 200], size=10)
    result = add_input_noise(
        dataset, target_classes=[1], fraction=0.5, amount=0.2, seed=1
    )
    before = dataset.images[result.mask]
    after = result.dataset.images[result.mask]
    differs = after != before
    # The images are uniform random, so almost every replaced pixel changes.
    assert differs.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert set(after[differs].unique().tolist()) == {0.0, 1.0}
    assert (after[differs] == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(
        result.dataset.images[~result.mask], dataset.images[~result.mask]
    )


def test_gaussian_noise_for_colour():
    dataset = make_dataset([100, 100], channels=3, size=6, fill=0.5)
    result = add_input_noise(
        dataset, target_classes=[0], fraction=0.4, amount=0.05, seed=2
    )
    assert result.params["noise"] == "gaussian"
    assert torch.equal(result.mask, changed_images(result.dataset, dataset))
    assert int(result.mask.sum()) == 40
    assert torch.all(dataset.labels[result.mask] == 0)
    difference = result.dataset.images[result.mask] - 0.5
    assert difference.std().item() == pytest.approx(0.05, rel=0.05)
    assert difference.mean().item() == pytest.approx(0.0, abs=0.005)


def test_gaussian_noise_clipped():
    dataset = make_dataset([50], channels=3, size=4, fill=0.9)
    result = add_input_noise(
        dataset, target_classes=[0], fraction=1.0, amount=0.5, seed=0
    )
    assert result.dataset.images.min().item() >= 0.0
    assert result.dataset.images.max().item() == 1.0


def test_input_noise_default_amounts():
    grey = add_input_noise(make_dataset([20] * 10, MNIST_CLASS_NAMES), seed=0)
    colour = add_input_noise(
        make_dataset([20] * 10, CIFAR10_CLASS_NAMES, channels=3), seed=0
    )
    assert grey.params["amount"] == 0.1
    assert colour.params["amount"] == 0.1
    assert grey.params["target_classes"] == [1, 7, 6, 9]
    assert colour.params["target_class_names"] == ["airplane", "bird", "cat", "dog"]
    assert int(grey.mask.sum()) == 4 * 6


def test_input_noise_seeded_and_input_untouched():
    dataset = make_dataset([60, 60], size=5)
    images_before = dataset.images.clone()
    first = add_input_noise(dataset, target_classes=[0, 1], seed=7)
    again = add_input_noise(dataset, target_classes=[0, 1], seed=7)
    other = add_input_noise(dataset, target_classes=[0, 1], seed=8)
    assert torch.equal(dataset.images, images_before)
    assert torch.equal(first.dataset.images, again.dataset.images)
    assert torch.equal(first.mask, again.mask)
    assert not torch.equal(first.mask, other.mask)


def test_input_noise_target_classes_by_name():
    dataset = make_dataset([10, 10, 10], class_names=["ant", "bee", "cow"])
    result = add_input_noise(dataset, target_classes=["cow"], fraction=0.5, seed=0)
    assert result.params["target_classes"] == [2]
    assert torch.all(dataset.labels[result.mask] == 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, r"Fraction 0.0 must lie in \(0, 1\]"),
        ({"fraction": 1.5}, r"Fraction 1.5 must lie in \(0, 1\]"),
        ({"amount": 1.5}, r"Salt-and-pepper amount 1.5 must lie in \(0, 1\]"),
        ({"target_classes": [5]}, "Target class 5 is out of range for 3 classes"),
        ({"target_classes": ["emu"]}, "Target class 'emu' is neither"),
        ({"target_classes": [1, 1]}, "Target class 1 is listed twice"),
        ({"target_classes": []}, "target classes is empty"),
    ],
)
def test_input_noise_rejects_bad_arguments(kwargs, message):
    dataset = make_dataset([10, 10, 10])
    arguments = {"target_classes": [0], **kwargs}
    with pytest.raises(ConfigError, match=message):
        add_input_noise(dataset, seed=0, **arguments)


# FGSM ----------------------------------------------------------------------------


def train_linear_victim(dataset: ImageDataset, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    config = TrainConfig(max_epochs=epochs, patience=epochs, seed=seed, batch_size=32)
    train_model(model, dataset.images, dataset.labels, config)
    return model


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_data("mnist-embedded", seed=0, n_train=300, n_test=10).train


@pytest.fixture(scope="module")
def victims(digits) -> tuple[nn.Module, nn.Module]:
    """Two victims trained on the clean digits with different seeds and lengths."""
    return train_linear_victim(digits, 0, 8), train_linear_victim(digits, 1, 1)


def reference_fgsm(model: nn.Module, image: torch.Tensor, label: int, epsilon: float):
    """FGSM for one image, written out without batching."""
    x = image.unsqueeze(0).clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([label]))
    (gradient,) = torch.autograd.grad(loss, x)
    return (x + epsilon * gradient.sign()).clamp(0, 1).detach()[0]


def test_fgsm_matches_reference_and_victim(digits, victims):
    victim = victims[0]
    result = fgsm_poison(digits, victim, seed=0, epsilon=0.2, batch_size=16)
    chosen = torch.nonzero(result.mask).flatten()
    assert len(chosen) == 4 * 9  # round(0.3 * 30) for each of 1, 7, 6, 9
    assert sorted(set(digits.labels[chosen].tolist())) == [1, 6, 7, 9]
    for index in chosen.tolist():
        expected = reference_fgsm(
            victim, digits.images[index], int(digits.labels[index]), 0.2
        )
        assert torch.allclose(result.dataset.images[index], expected, atol=1e-6)
    with torch.no_grad():
        predictions = victim(result.dataset.images[chosen]).argmax(1)
    assert torch.equal(result.dataset.labels[chosen], predictions)
    assert torch.equal(result.dataset.images[~result.mask], digits.images[~result.mask])
    assert torch.equal(result.dataset.labels[~result.mask], digits.labels[~result.mask])


def test_fgsm_mask_marks_changed_examples(digits, victims):
    result = fgsm_poison(digits, victims[0], seed=1)
    changed = changed_images(result.dataset, digits) | (
        result.dataset.labels != digits.labels
    )
    assert torch.equal(result.mask, changed)
    step = (result.dataset.images - digits.images).abs().max().item()
    assert step == pytest.approx(DEFAULT_EPSILON_GREYSCALE, abs=1e-6)


def test_fgsm_params(digits, victims):
    victim = victims[0]
    result = fgsm_poison(digits, victim, seed=0)
    params = json.loads(json.dumps(result.params))
    chosen = result.mask
    true_labels = digits.labels[chosen]
    new_labels = result.dataset.labels[chosen]
    with torch.no_grad():
        clean_predictions = victim(digits.images[chosen]).argmax(1)
    assert params["epsilon"] == DEFAULT_EPSILON_GREYSCALE
    assert params["n_changed"] == 36
    assert params["target_classes"] == [1, 7, 6, 9]
    assert params["n_label_changed"] == int((new_labels != true_labels).sum())
    assert params["victim_accuracy_crafted"] == pytest.approx(
        (new_labels == true_labels).float().mean().item()
    )
    assert params["victim_accuracy_clean"] == pytest.approx(
        (clean_predictions == true_labels).float().mean().item()
    )
    # A linear model is easy to fool, so most crafted images change class.
    assert params["victim_accuracy_crafted"] < params["victim_accuracy_clean"]


def test_fgsm_depends_on_victim(digits, victims):
    first = fgsm_poison(digits, victims[0], seed=0)
    second = fgsm_poison(digits, victims[1], seed=0)
    assert torch.equal(first.mask, second.mask)
    assert not torch.equal(first.dataset.images, second.dataset.images)
    chosen = first.mask
    with torch.no_grad():
        second_on_second = victims[1](second.dataset.images[chosen]).argmax(1)
    assert torch.equal(second.dataset.labels[chosen], second_on_second)


def test_fgsm_uses_eval_mode(digits, victims):
    # Dropout is the identity in eval mode, so this victim computes the same
    # function as victims[0] there, but not in train mode.
    linear = victims[0][1]
    with_dropout = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10))
    with_dropout[2].load_state_dict(linear.state_dict())
    with_dropout.train()
    result = fgsm_poison(digits, with_dropout, seed=0)
    plain = fgsm_poison(digits, victims[0], seed=0)
    assert torch.allclose(result.dataset.images, plain.dataset.images, atol=1e-6)
    assert torch.equal(result.dataset.labels, plain.dataset.labels)
    assert with_dropout.training


def test_fgsm_leaves_victim_and_input(digits, victims):
    victim = victims[0]
    victim.train()
    victim.zero_grad(set_to_none=True)
    weights = [p.detach().clone() for p in victim.parameters()]
    images_before = digits.images.clone()
    fgsm_poison(digits, victim, seed=0)
    assert victim.training
    for before, after in zip(weights, victim.parameters(), strict=True):
        assert torch.equal(before, after)
        assert after.grad is None
    assert torch.equal(digits.images, images_before)


def test_fgsm_rejects_wrong_victim_output(digits):
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    with pytest.raises(
        ConfigError, match=r"outputs shape \(\d+, 3\) but the data has 10"
    ):
        fgsm_poison(digits, wrong, seed=0)


def test_fgsm_rejects_bad_epsilon(digits, victims):
    with pytest.raises(ConfigError, match=r"FGSM epsilon 0.0 must lie in \(0, 1\]"):
        fgsm_poison(digits, victims[0], seed=0, epsilon=0.0)


# apply_scenario ------------------------------------------------------------------


def test_scenario_names():
    assert SCENARIOS == ("none", "label-flip", "input-noise", "fgsm")


def test_scenario_none_copies():
    dataset = make_dataset([5, 5])
    result = apply_scenario("none", dataset, seed=3)
    assert result.scenario == "none"
    assert result.mask.tolist() == [False] * 10
    assert torch.equal(result.dataset.images, dataset.images)
    assert torch.equal(result.dataset.labels, dataset.labels)
    assert result.dataset.images.data_ptr() != dataset.images.data_ptr()
    assert result.params == {"seed": 3}


def test_scenario_unknown_parameter():
    dataset = make_dataset([5] * 10, MNIST_CLASS_NAMES)
    with pytest.raises(
        ConfigError,
        match="'label-flip' does not take the parameter 'amount'. Allowed "
        "parameters: matrix, matrix_file",
    ):
        apply_scenario("label-flip", dataset, seed=0, params={"amount": 0.1})


def test_scenario_unknown_name():
    with pytest.raises(ConfigError, match="Unknown noise scenario 'blur'. Use one of"):
        apply_scenario("blur", make_dataset([5]), seed=0)


def test_scenario_label_flip_sources(tmp_path):
    dataset = make_dataset([100, 100])
    swap = [[0.0, 1.0], [1.0, 0.0]]
    from_list = apply_scenario("label-flip", dataset, seed=0, params={"matrix": swap})
    assert torch.equal(from_list.dataset.labels, 1 - dataset.labels)
    assert bool(from_list.mask.all())

    path = tmp_path / "swap.csv"
    path.write_text("0,1\n1,0\n")
    from_file = apply_scenario(
        "label-flip", dataset, seed=0, params={"matrix_file": str(path)}
    )
    assert torch.equal(from_file.dataset.labels, 1 - dataset.labels)
    assert from_file.params["matrix_file"] == str(path)

    with pytest.raises(ConfigError, match="both 'matrix' and 'matrix_file'"):
        apply_scenario(
            "label-flip",
            dataset,
            seed=0,
            params={"matrix": swap, "matrix_file": str(path)},
        )


def test_scenario_label_flip_default_needs_known_classes():
    with pytest.raises(ConfigError, match="No default flip matrix"):
        apply_scenario("label-flip", make_dataset([5, 5]), seed=0)


def test_scenario_input_noise_matches_direct_call():
    dataset = make_dataset([40] * 10, MNIST_CLASS_NAMES)
    params = {"fraction": 0.5, "amount": 0.25, "target_classes": [3]}
    via_scenario = apply_scenario("input-noise", dataset, seed=2, params=params)
    direct = add_input_noise(dataset, seed=2, **params)
    assert torch.equal(via_scenario.dataset.images, direct.dataset.images)
    assert torch.equal(via_scenario.mask, direct.mask)
    assert int(via_scenario.mask.sum()) == 20


def test_scenario_fgsm_needs_victim_trainer(digits):
    with pytest.raises(ConfigError, match="'fgsm' needs train_victim"):
        apply_scenario("fgsm", digits, seed=0)


def test_scenario_fgsm_trains_victim_on_clean_data(digits, victims):
    received = []

    def train_victim(clean: ImageDataset) -> nn.Module:
        received.append(clean)
        return victims[0]

    result = apply_scenario(
        "fgsm", digits, seed=0, params={"epsilon": 0.1}, train_victim=train_victim
    )
    assert len(received) == 1
    assert torch.equal(received[0].labels, digits.labels)
    assert torch.equal(received[0].images, digits.images)
    direct = fgsm_poison(digits, victims[0], seed=0, epsilon=0.1)
    assert torch.equal(result.dataset.images, direct.dataset.images)
    assert torch.equal(result.dataset.labels, direct.dataset.labels)
    assert result.params["epsilon"] == 0.1
