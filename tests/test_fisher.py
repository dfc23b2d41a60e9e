import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repair_core.errors import ConfigError
from repair_core.fisher import (
    diagonal_fisher,
    per_example_gradients,
    trainable_parameters,
)
from tests.factories import blobs, mlp

FISHER_TOLERANCE = 1e-10


def loop_fisher(model, x, y):
    """Reference: one backward pass per example, squared and averaged."""
    params = trainable_parameters(model)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(len(y)):
        log_p = -F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(log_p, list(params.values()))
        for name, g in zip(params, grads, strict=True):
            total[name] += g.pow(2)
    return {name: t / len(y) for name, t in total.items()}


@pytest.mark.parametrize("batch_size", [1, 64])
def test_fisher_matches_loop(batch_size):
    x, y = blobs(100, dtype=torch.float64)
    model = mlp().double()
    expected = loop_fisher(model, x, y)
    fisher = diagonal_fisher(model, x, y, batch_size=batch_size)
    assert set(fisher) == set(expected)
    for name in fisher:
        assert torch.allclose(
            fisher[name], expected[name], atol=FISHER_TOLERANCE, rtol=0
        )


def test_fisher_is_not_squared_mean():
    x, y = blobs(50, dtype=torch.float64)
    model = mlp().double()
    fisher = diagonal_fisher(model, x, y, batch_size=50)
    grads = per_example_gradients(model, x, y)
    squared_mean = {n: g.mean(0).pow(2) for n, g in grads.items()}
    assert any(not torch.allclose(fisher[n], squared_mean[n]) for n in fisher)


def test_per_example_gradients_skip_frozen():
    x, y = blobs(10)
    model = mlp()
    model[0].weight.requires_grad_(False)
    grads = per_example_gradients(model, x, y)
    assert "0.weight" not in grads
    assert grads["2.weight"].shape == (10, *model[2].weight.shape)


def test_fisher_leaves_out_frozen_parameters():
    x, y = blobs(20, dtype=torch.float64)
    model = mlp().double()
    model[0].weight.requires_grad_(False)

    fisher = diagonal_fisher(model, x, y, batch_size=8)

    assert "0.weight" not in fisher
    assert set(fisher) == {"0.bias", "2.weight", "2.bias"}
    expected = loop_fisher(model, x, y)
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=0, atol=1e-10)


def test_fisher_of_train_mode_model_uses_eval_statistics():
    # In train mode BatchNorm would normalise with each batch's statistics
    # (and update its running ones) and Dropout would drop units, so the
    # Fisher must be that of the model in eval mode, whatever its mode.
    x, y = blobs(40, dtype=torch.float64)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, 3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    running = {k: v.clone() for k, v in model[1].state_dict().items()}
    expected = loop_fisher(model.eval(), x, y)

    fisher = diagonal_fisher(model.train(), x, y, batch_size=16)

    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=0, atol=1e-10)
    for key, value in model[1].state_dict().items():
        torch.testing.assert_close(value, running[key])
    assert all(module.training for module in model.modules())


def test_fisher_restores_train_mode():
    x, y = blobs(10)
    model = mlp().train()
    diagonal_fisher(model, x, y)
    assert all(m.training for m in model.modules())


def test_fisher_reports_progress():
    x, y = blobs(30)
    seen = []
    diagonal_fisher(mlp(), x, y, batch_size=10, progress=lambda f, m: seen.append(f))
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])


class _SharedLayer(nn.Module):
    """Applies one hidden layer twice, reached under two attribute names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 4)
        self.again = self.inner
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.again(torch.tanh(self.inner(x)))))


class _SharedWeight(nn.Module):
    """Two layers that share one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("model_class", [_SharedLayer, _SharedWeight])
def test_fisher_shared_weights_match_loop(model_class):
    x, y = blobs(30, dtype=torch.float64)
    model = model_class().double()
    expected = loop_fisher(model, x, y)
    fisher = diagonal_fisher(model, x, y, batch_size=16)
    assert set(fisher) == set(expected)
    for name in fisher:
        assert torch.allclose(
            fisher[name], expected[name], atol=FISHER_TOLERANCE, rtol=0
        )
    # The model keeps its own parameters, so it can be copied and trained.
    assert all(type(p) is nn.Parameter for p in model.parameters())
    copy.deepcopy(model)


def test_shared_layer_and_shared_weight_together_are_refused():
    model = _SharedWeight()
    model.alias = model.first
    x, y = blobs(4)
    with pytest.raises(ConfigError, match="under two attribute names"):
        per_example_gradients(model, x, y)
    assert all(type(p) is nn.Parameter for p in model.parameters())


class _Recurrent(nn.Module):
    """A GRU over the rows of each input, which torch.func.vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(2, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.gru(x.reshape(len(x), 2, 2))
        return self.head(out[:, -1])


def test_model_that_vmap_cannot_batch_is_named():
    x, y = blobs(6)

    with pytest.raises(ConfigError, match="failed under torch.func.vmap: .*nn.GRU"):
        per_example_gradients(_Recurrent(), x, y)
