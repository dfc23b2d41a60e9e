"""Training with Adam, early stopping, seeds and trajectory recording."""

import pytest
import torch
from conftest import make_blobs, make_mlp

from repair_core.errors import ConfigError
from repair_core.training import (
    MAX_KEPT_CHECKPOINTS,
    TrainConfig,
    _thin_checkpoints,
    train_model,
)

SMALL = {"batch_size": 32, "max_epochs": 6, "patience": 2}


def test_same_seed_same_weights(blobs):
    images, labels = blobs
    first = train_model(make_mlp(), images, labels, TrainConfig(seed=4, **SMALL))
    second = train_model(make_mlp(), images, labels, TrainConfig(seed=4, **SMALL))

    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_other_seed_other_weights(blobs):
    images, labels = blobs
    first = train_model(make_mlp(), images, labels, TrainConfig(seed=4, **SMALL))
    second = train_model(make_mlp(), images, labels, TrainConfig(seed=5, **SMALL))

    assert not torch.equal(
        first.model[1].weight.detach(), second.model[1].weight.detach()
    )


def test_progress_reports_every_epoch(blobs):
    images, labels = blobs
    reports = []

    result = train_model(
        make_mlp(),
        images,
        labels,
        TrainConfig(**SMALL),
        progress=lambda *values: reports.append(values),
    )

    assert [r[0] for r in reports] == list(range(1, result.epochs_run + 1))
    assert all(0.0 <= r[2] <= 1.0 for r in reports)
    assert all(r[1] > 0 for r in reports)


def test_restores_best_validation_loss(blobs):
    images, labels = blobs
    config = TrainConfig(lr=0.05, batch_size=16, max_epochs=30, patience=3)

    result = train_model(make_mlp(), images, labels, config)

    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert result.epochs_run - result.best_epoch <= config.patience
    val_images = images[result.val_indices]
    val_labels = labels[result.val_indices]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            result.model(val_images), val_labels
        ).item()
    assert loss == pytest.approx(min(losses), rel=1e-5)


def test_trajectory_records_training_steps(blobs):
    images, labels = blobs
    config = TrainConfig(record_trajectory=True, **SMALL)

    result = train_model(make_mlp(), images, labels, config)

    trajectory = result.trajectory
    steps_per_epoch = -(-int(0.9 * len(labels)) // config.batch_size)
    assert len(trajectory.steps) == result.best_epoch * steps_per_epoch
    assert len(trajectory.epoch_states) == result.best_epoch
    assert trajectory.lrs == [config.lr] * len(trajectory.steps)
    seen = torch.cat(trajectory.steps)
    assert not set(seen.tolist()) & set(result.val_indices.tolist())
    first_epoch = torch.cat(trajectory.steps[:steps_per_epoch]).sort().values
    assert len(first_epoch.unique()) == len(first_epoch)


def test_subset_never_trains_outside(blobs):
    images, labels = blobs
    subset = torch.arange(0, len(labels), 2)
    config = TrainConfig(record_trajectory=True, **SMALL)

    result = train_model(make_mlp(), images, labels, config, subset=subset)

    seen = set(torch.cat(result.trajectory.steps).tolist())
    assert seen <= set(subset.tolist())
    assert set(result.val_indices.tolist()) <= set(subset.tolist())


def test_checkpoints_end_at_best_epoch(blobs):
    images, labels = blobs

    result = train_model(make_mlp(), images, labels, TrainConfig(**SMALL))

    epochs = [epoch for epoch, _ in result.checkpoints]
    assert epochs[-1] == result.best_epoch
    assert epochs == sorted(epochs)


def test_thinning_keeps_the_best_epoch():
    checkpoints = [(epoch, {}) for epoch in range(1, 12)]

    thinned = _thin_checkpoints(checkpoints, best_epoch=5)

    assert [epoch for epoch, _ in thinned] == [1, 3, 5, 7, 9, 11]


def test_checkpoints_kept_past_best_epoch():
    images, _ = make_blobs(120)
    # Random labels: the validation loss is lowest early and then rises
    # while training goes on for the whole patience.
    labels = torch.randint(0, 3, (120,), generator=torch.Generator().manual_seed(1))
    config = TrainConfig(lr=1e-2, batch_size=16, max_epochs=30, patience=30)

    result = train_model(make_mlp(), images, labels, config)

    epochs = [epoch for epoch, _ in result.checkpoints]
    assert result.epochs_run == 30
    assert result.best_epoch <= 10
    assert epochs[-1] == result.best_epoch
    assert len(epochs) <= MAX_KEPT_CHECKPOINTS


def test_training_restores_random_stream(blobs):
    images, labels = blobs
    model = make_mlp()
    torch.manual_seed(5)
    expected = torch.rand(3)

    torch.manual_seed(5)
    train_model(model, images, labels, TrainConfig(seed=3, **SMALL))

    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": 0.0}, "Learning rate 0.0 must be a finite positive number"),
        ({"lr": float("inf")}, "Setting 'lr' of TrainConfig is inf; give a finite"),
        ({"batch_size": 0}, "Batch size 0 must be at least 1"),
        ({"val_fraction": 1.0}, "Validation fraction 1.0 must lie strictly"),
        ({"patience": 0}, "Patience 0 must be at least 1"),
    ],
)
def test_bad_config_messages(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_nan_input_raises_clear_error():
    images, labels = make_blobs(n=60)
    images[0, 0, 0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match="check the inputs for NaN"):
        train_model(make_mlp(), images, labels, TrainConfig(batch_size=60))


@pytest.mark.slow
def test_reference_cnn_reaches_95_percent_on_embedded_mnist():
    from repair_core.data import load_data
    from repair_core.inference import accuracy
    from repair_core.models import build_model

    data = load_data("mnist-embedded")
    torch.manual_seed(0)
    model = build_model(
        "mnist-cnn",
        in_channels=1,
        num_classes=10,
        mean=data.train.images.mean(dim=(0, 2, 3)).tolist(),
    )

    train_model(model, data.train.images, data.train.labels, TrainConfig(seed=0))

    assert accuracy(model, data.test.images, data.test.labels) >= 0.95
