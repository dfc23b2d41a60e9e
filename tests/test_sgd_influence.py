import copy
import logging

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from repair_core.errors import ConfigError
from repair_core.identification import (
    IdentificationContext,
    identify,
    record_sgd,
    replay_sgd,
)
from repair_core.training import TrainConfig, train_model
from tests.convex import fitted_slope, query_log_likelihood
from tests.factories import blobs, tiny_cnn, tiny_images

MIN_REPLAY_SPEARMAN = 0.9
#: The estimates are changes in log p(F_q), so the replayed changes should
#: follow them about one for one. A step credited with the wrong learning rate
#: or batch size scales them, and a step order error bends them.
REPLAY_SLOPE_RANGE = (0.9, 1.15)


@pytest.fixture(scope="module")
def recorded():
    x, y = blobs(80, n_features=3, n_classes=3, dtype=torch.float64, spread=1.0)
    y = y.clone()
    y[:6] = (y[:6] + 1) % 3
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    trajectory = record_sgd(model, x, y, lr=0.2, batch_size=16, epochs=5)
    qx, qy = blobs(
        60, n_features=3, n_classes=3, dtype=torch.float64, spread=1.0, seed=0
    )
    with torch.no_grad():
        wrong = model(qx).argmax(1) != qy
    return model, trajectory, x, y, qx[wrong], qy[wrong]


def test_replay_reproduces_recorded_run(recorded):
    model, trajectory, x, y, _, _ = recorded
    replayed = replay_sgd(copy.deepcopy(model), x, y, trajectory)
    assert torch.allclose(replayed.weight, model.weight, atol=1e-12)


def test_scores_track_replay_without_example(recorded):
    model, trajectory, x, y, qx, qy = recorded
    assert len(qy) >= 3
    context = IdentificationContext(trajectory=trajectory)
    scores = identify("sgd-influence", model, x, y, qx, qy, context=context).scores
    base = query_log_likelihood(model, qx, qy)
    actual = [
        query_log_likelihood(
            replay_sgd(copy.deepcopy(model), x, y, trajectory, exclude=i), qx, qy
        )
        - base
        for i in range(len(y))
    ]
    rho = spearmanr(scores.numpy(), actual).statistic
    assert rho >= MIN_REPLAY_SPEARMAN
    low, high = REPLAY_SLOPE_RANGE
    assert low <= fitted_slope(scores, actual) <= high


def test_removing_top_ranked_raises_query_likelihood(recorded):
    model, trajectory, x, y, qx, qy = recorded
    context = IdentificationContext(trajectory=trajectory)
    scores = identify("sgd-influence", model, x, y, qx, qy, context=context).scores
    top = torch.argsort(scores, descending=True)[:10]
    replayed = replay_sgd(copy.deepcopy(model), x, y, trajectory, exclude=top)
    assert query_log_likelihood(replayed, qx, qy) > query_log_likelihood(model, qx, qy)


def test_missing_trajectory_names_flag():
    x, y = blobs(20)
    model = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="--record-trajectory"):
        identify("sgd-influence", model, x, y, x[:3], y[:3])


def test_adam_trajectory_runs():
    x, y = tiny_images(64)
    model = tiny_cnn()
    config = TrainConfig(max_epochs=2, batch_size=16, record_trajectory=True)
    result = train_model(model, x, y, config)
    context = IdentificationContext(trajectory=result.trajectory)
    scores = identify("sgd-influence", model, x, y, x[:5], y[:5], context=context)
    assert scores.scores.shape == (64,)
    assert torch.isfinite(scores.scores).all()


def replay_warnings(caplog, model, trajectory, x, y):
    """Run SGD-influence and return the warnings it logged."""
    context = IdentificationContext(trajectory=trajectory)
    logger = "repair_core.identification.sgd_influence"
    with caplog.at_level(logging.WARNING, logger=logger):
        identify("sgd-influence", model, x, y, x[:5], y[:5], context=context)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def train_with_dropout(dropout: float):
    x, y = tiny_images(64)
    model = tiny_cnn(dropout=dropout)
    # identify seeds torch with 0 before the replay, and train_model seeds it
    # with the training seed before the first epoch. Training seed 0 would
    # make the replay of the first epoch draw the recorded masks again.
    config = TrainConfig(
        max_epochs=2, batch_size=8, lr=0.01, seed=1, record_trajectory=True
    )
    result = train_model(model, x, y, config)
    return model, result.trajectory, x, y


def test_replay_warning_names_dropout(caplog):
    model, trajectory, x, y = train_with_dropout(0.5)

    messages = replay_warnings(caplog, model, trajectory, x, y)

    assert len(messages) == 1
    assert messages[0].startswith("Replayed end state differs from the model")
    assert "the model has Dropout modules (drop)" in messages[0]
    assert "may have changed after recording" not in messages[0]


def test_replay_without_dropout_matches(caplog):
    # The same training with a dropout rate of 0 replays exactly.
    model, trajectory, x, y = train_with_dropout(0.0)

    messages = replay_warnings(caplog, model, trajectory, x, y)

    assert messages == []


def test_replay_warning_names_changed_model(recorded, caplog):
    model, trajectory, x, y, _, _ = recorded
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.weight.add_(0.1)

    messages = replay_warnings(caplog, changed, trajectory, x, y)

    assert len(messages) == 1
    assert "may have changed after recording" in messages[0]
    assert "Dropout" not in messages[0]


def test_progress_prints_bounded_lines(recorded, capsys):
    from repair_core.cli import _ProgressPrinter

    model, trajectory, x, y, qx, qy = recorded
    context = IdentificationContext(trajectory=trajectory)
    messages = []
    printer = _ProgressPrinter()

    def report(fraction: float, message: str) -> None:
        messages.append(message)
        printer(fraction, message)

    identify("sgd-influence", model, x, y, qx, qy, context=context, progress=report)

    lines = capsys.readouterr().err.splitlines()
    assert len(trajectory.steps) == 25
    assert len(messages) > 25
    # At most one line per 5% of the walk, its end and the final message.
    assert len(lines) <= 22
    assert lines[-1].endswith("sgd-influence done")
