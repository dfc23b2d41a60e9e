import copy
import dataclasses
import re
import types
import weakref

import pytest
import torch
from torch import nn

from repair_core.errors import ConfigError, DivergenceError
from repair_core.identification import (
    METHODS,
    EWCInfluenceConfig,
    IdentificationContext,
    default_config,
    identify,
    resolve_config,
)
from repair_core.identification.base import summed_log_likelihood_gradient
from repair_core.ihvp import find_lissa_scale, flatten, lissa
from repair_core.inference import eval_mode
from repair_core.training import TrainConfig, train_model
from tests.factories import blobs, mlp, tiny_cnn, tiny_images, train_briefly

FAST_METHODS = ("ewc-influence", "linear-influence-exact", "training-loss", "random")

# The briefly trained CNN is away from a minimum, so the exact solve warns that
# its damped Hessian is indefinite. The tests in this file check other things.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The damped hessian .* is not positive definite"
)


def small_config(method):
    config = default_config(method)
    if method == "ewc-influence":
        config.max_steps, config.min_steps = 20, 10
    if method == "linear-influence-lissa":
        config.lissa_depth = 20
    if method == "linear-influence-gd":
        config.gd_steps = 20
    if method == "confident-learning":
        config.n_folds, config.max_epochs = 2, 1
    return config


@pytest.fixture(scope="module")
def trained():
    x, y = tiny_images(48)
    model = tiny_cnn(batchnorm=True, dropout=0.3)
    train_config = TrainConfig(max_epochs=2, batch_size=16, record_trajectory=True)
    result = train_model(model, x, y, train_config)
    context = IdentificationContext(
        checkpoints=[state for _, state in result.checkpoints],
        trajectory=result.trajectory,
        corrupted_mask=torch.arange(48) % 5 == 0,
        model_factory=lambda: tiny_cnn(batchnorm=True, dropout=0.3),
        train_config=train_config,
    )
    qx, qy = tiny_images(6, seed=3)
    return model, x, y, qx, qy, context


@pytest.mark.parametrize("method", list(METHODS))
def test_method_returns_finite_scores(trained, method):
    model, x, y, qx, qy, context = trained
    result = identify(
        method, model, x, y, qx, qy, small_config(method), context=context
    )
    assert result.scores.shape == (48,)
    assert result.scores.dtype == torch.float64
    assert torch.isfinite(result.scores).all()
    assert result.method == method


@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_same_scores(trained, method):
    model, x, y, qx, qy, context = trained
    first = identify(method, model, x, y, qx, qy, small_config(method), context=context)
    second = identify(
        method, model, x, y, qx, qy, small_config(method), context=context
    )
    assert torch.equal(first.scores, second.scores)


@pytest.mark.parametrize("method", list(METHODS))
def test_train_mode_gives_eval_scores(trained, method):
    model, x, y, qx, qy, context = trained
    model.eval()
    config = small_config(method)
    expected = identify(method, model, x, y, qx, qy, config, context=context)
    model.train()
    model.norm.eval()
    scores = identify(method, model, x, y, qx, qy, config, context=context).scores
    assert torch.allclose(scores, expected.scores, atol=1e-6)
    assert model.training
    assert not model.norm.training
    assert model.drop.training


def frozen_cnn():
    model = tiny_cnn()
    model.conv.weight.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def frozen():
    """A network trained with its first layer frozen, with its context."""
    x, y = tiny_images(32)
    model = frozen_cnn()
    first_layer = model.conv.weight.detach().clone()
    train_config = TrainConfig(max_epochs=2, batch_size=16, record_trajectory=True)
    result = train_model(model, x, y, train_config)
    assert torch.equal(model.conv.weight, first_layer)
    context = IdentificationContext(
        checkpoints=[state for _, state in result.checkpoints],
        trajectory=result.trajectory,
        corrupted_mask=torch.arange(32) % 4 == 0,
        model_factory=frozen_cnn,
        train_config=train_config,
    )
    return model, x, y, context


@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_first_layer(frozen, method):
    model, x, y, context = frozen
    result = identify(
        method, model, x, y, x[:4], y[:4], small_config(method), context=context
    )
    assert torch.isfinite(result.scores).all()
    assert not model.conv.weight.requires_grad


def query_gradient(model, qx, qy):
    with eval_mode(model):
        return flatten(summed_log_likelihood_gradient(model, qx, qy))


@pytest.mark.parametrize("method", FAST_METHODS)
def test_nan_training_image_is_named(trained, method):
    model, x, y, qx, qy, context = trained
    bad = x.clone()
    bad[3, 0, 1, 1] = float("nan")
    bad[7] = float("inf")

    with pytest.raises(ConfigError, match="Training image 3 .* so do 1 more"):
        identify(method, model, bad, y, qx, qy, small_config(method), context=context)


def test_non_finite_output_raises(trained):
    model, x, y, qx, qy, context = trained
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("inf"))

    with pytest.raises(FloatingPointError, match="non-finite scores out of 48"):
        identify("training-loss", broken, x, y, qx, qy, context=context)


def test_lissa_divergence_names_scale_and_step(trained):
    model, x, y, qx, qy, _ = trained
    g = query_gradient(model, qx, qy)
    with pytest.raises(DivergenceError, match=r"scale 0\.001 at step \d+"):
        lissa(model, x, y, g, scale=0.001, damping=0.0, depth=200, batch_size=16)


def test_found_scale_does_not_diverge(trained):
    model, x, y, qx, qy, _ = trained
    g = query_gradient(model, qx, qy)
    scale = find_lissa_scale(model, x, y, g, start=0.01, probe_depth=50, batch_size=16)
    estimate = lissa(model, x, y, g, scale=scale, damping=0.01, depth=50, batch_size=16)
    assert torch.isfinite(estimate).all()


def test_found_scale_is_smallest_stable(trained):
    model, x, y, qx, qy, _ = trained
    g = query_gradient(model, qx, qy)
    probe = {"damping": 0.01, "depth": 50, "batch_size": 16}

    messages = []

    scale = find_lissa_scale(
        model,
        x,
        y,
        g,
        start=0.01,
        probe_depth=50,
        batch_size=16,
        progress=lambda fraction, message: messages.append((fraction, message)),
    )

    assert scale > 0.01
    with pytest.raises(DivergenceError):
        lissa(model, x, y, g, scale=scale / 2, **probe)
    # Each candidate is announced before its probe, the found one last.
    assert messages[0] == (0.0, "LiSSA scale search: trying scale 0.01")
    assert messages[-1][1] == f"LiSSA scale search: trying scale {scale:g}"
    assert [fraction for fraction, _ in messages] == sorted({f for f, _ in messages})


def test_lissa_keeps_no_graph(trained):
    model, x, y, qx, qy, _ = trained
    g = query_gradient(model, qx, qy).requires_grad_(True)
    estimate = lissa(model, x, y, g, scale=100.0, depth=30, batch_size=16)
    assert estimate.grad_fn is None
    assert not estimate.requires_grad


class SavedTensorBytes:
    """Counter of the bytes that autograd graphs save for backward, live and peak.

    Use ``hooks()`` as a context manager. A saved tensor is counted from the
    moment autograd saves it until its graph is freed.
    """

    class _Saved:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor) -> None:
            # Detached, because a saved output keeps its grad_fn, and that
            # node keeps this holder, a cycle the garbage collector cannot see.
            self.tensor = tensor.detach()

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        holder = self._Saved(tensor)
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._release, size)
        return holder

    def _release(self, size: int) -> None:
        self.live -= size

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda holder: holder.tensor
        )


def test_saved_bytes_grow_with_kept_graph():
    v = torch.ones(100, requires_grad=True)
    peaks = []
    for depth in (5, 50):
        probe = SavedTensorBytes()
        with probe.hooks():
            w = v
            for _ in range(depth):
                w = torch.tanh(w)
        peaks.append(probe.peak)
    assert peaks[1] == 10 * peaks[0]


@pytest.mark.parametrize("batch_size", [16, 48])
def test_lissa_memory_flat_in_depth(batch_size):
    x, y = blobs(48)
    model = train_briefly(mlp(), x, y)
    g = query_gradient(model, x[:6], (y[:6] + 1) % 3)
    peaks, left = {}, {}
    for depth in (50, 500):
        probe = SavedTensorBytes()
        with probe.hooks():
            lissa(model, x, y, g, scale=10.0, depth=depth, batch_size=batch_size)
        peaks[depth], left[depth] = probe.peak, probe.live
    # Every step's graph has the same size and is freed before the next step
    # builds its own, so the peak does not depend on the depth.
    assert peaks[50] > 0
    assert peaks[500] == peaks[50]
    assert left == {50: 0, 500: 0}


def test_oracle_needs_mask(trained):
    model, x, y, qx, qy, _ = trained
    with pytest.raises(ConfigError, match="corrupted_mask"):
        identify("oracle", model, x, y, qx, qy)


def test_oracle_ranks_mask_first(trained):
    model, x, y, qx, qy, context = trained
    scores = identify("oracle", model, x, y, qx, qy, context=context).scores
    top = torch.argsort(scores, descending=True)[: int(context.corrupted_mask.sum())]
    assert context.corrupted_mask[top].all()


@pytest.mark.parametrize("tie_break", [1e-6, 0.0])
def test_oracle_positive_only_for_corrupted(trained, tie_break):
    model, x, y, qx, qy, context = trained
    config = default_config("oracle")
    config.tie_break = tie_break

    scores = identify("oracle", model, x, y, qx, qy, config, context=context).scores

    mask = context.corrupted_mask
    assert (scores[mask] > 0).all()
    assert (scores[~mask] <= 0).all()
    assert int((scores > 0).sum()) == int(mask.sum())


def test_oracle_keeps_tie_break_order(trained):
    model, x, y, qx, qy, context = trained
    config = default_config("oracle")
    config.tie_break = 1e-3
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.rand(len(y), generator=generator, dtype=torch.float64)
    expected = torch.argsort(context.corrupted_mask.double() + 1e-3 * noise)

    scores = identify("oracle", model, x, y, qx, qy, config, context=context).scores

    assert torch.equal(torch.argsort(scores), expected)


def test_unknown_method_and_wrong_config(trained):
    model, x, y, qx, qy, _ = trained
    with pytest.raises(ConfigError, match="Unknown identification method"):
        identify("shapley", model, x, y, qx, qy)
    with pytest.raises(ConfigError, match="takes a"):
        identify("tracin", model, x, y, qx, qy, default_config("random"))
    with pytest.raises(ConfigError, match="Unknown setting 'steps' for EWCInf"):
        identify("ewc-influence", model, x, y, qx, qy, {"steps": 5})


def test_config_dict_matches_dataclass(trained):
    model, x, y, qx, qy, _ = trained
    settings = {"max_steps": 20, "min_steps": 10, "seed": 4}

    from_dict = identify("ewc-influence", model, x, y, qx, qy, settings)
    from_class = identify(
        "ewc-influence", model, x, y, qx, qy, EWCInfluenceConfig(**settings)
    )

    assert torch.equal(from_dict.scores, from_class.scores)
    assert from_dict.config == from_class.config
    assert from_dict.seed == 4


@pytest.mark.parametrize("method", ["ewc-influence", "linear-influence-lissa"])
def test_progress_rises_to_one(trained, method):
    model, x, y, qx, qy, _ = trained
    seen = []
    identify(
        method,
        model,
        x,
        y,
        qx,
        qy,
        small_config(method),
        progress=lambda fraction, message: seen.append(fraction),
    )
    assert seen[-1] == 1.0
    assert seen == sorted(seen)
    assert all(0.0 <= f <= 1.0 for f in seen)


def test_config_dict_keeps_method_defaults(trained):
    model, x, y, qx, qy, _ = trained

    result = identify("linear-influence-gd", model, x, y, qx, qy, {"gd_steps": 5})

    expected = dataclasses.asdict(default_config("linear-influence-gd"))
    expected["gd_steps"] = 5
    # The LiSSA settings, which the gd solver ignores, are not stored.
    for name in ("lissa_scale", "lissa_depth", "lissa_repeats", "lissa_batch_size"):
        del expected[name]
    assert result.config["solver"] == "gd"
    assert result.config == expected


@pytest.mark.parametrize(
    ("method", "solver", "advice"),
    [
        (
            "linear-influence-lissa",
            "gd",
            "Choose the method linear-influence-gd instead",
        ),
        (
            "linear-influence-exact",
            "lissa",
            "Choose the method linear-influence-lissa instead",
        ),
    ],
)
def test_method_name_fixes_its_solver(trained, method, solver, advice):
    # A ranking stored as linear-influence-lissa must come from LiSSA.
    model, x, y, qx, qy, _ = trained
    expected = default_config(method).solver
    config = default_config(method)
    config.solver = solver
    message = f"Method {method} uses solver {expected!r}, not {solver!r}. {advice}."
    for settings in ({"solver": solver}, config):
        with pytest.raises(ConfigError, match=re.escape(message)):
            identify(method, model, x, y, qx, qy, settings)


SOLVER_SETTINGS = {
    "linear-influence-lissa": {
        "lissa_scale",
        "lissa_depth",
        "lissa_repeats",
        "lissa_batch_size",
    },
    "linear-influence-gd": {"gd_steps", "gd_lr", "gd_batch_size"},
    "linear-influence-exact": set(),
}


@pytest.mark.parametrize("method", list(SOLVER_SETTINGS))
def test_linear_methods_hide_other_solver_settings(trained, method):
    model, x, y, qx, qy, _ = trained
    other = set().union(*SOLVER_SETTINGS.values()) - SOLVER_SETTINGS[method]

    result = identify(method, model, x, y, qx, qy, small_config(method))

    # The CLI's '--set help' and the Causes form leave out the fixed settings.
    assert other <= set(METHODS[method].fixed)
    assert not SOLVER_SETTINGS[method] & set(METHODS[method].fixed)
    assert not other & set(result.config)
    assert SOLVER_SETTINGS[method] <= set(result.config)


def test_ignored_solver_setting_is_rejected(trained):
    model, x, y, qx, qy, _ = trained
    message = (
        "Method linear-influence-lissa ignores the setting gd_steps, which only "
        "linear-influence-gd reads. Leave gd_steps out, or choose "
        "linear-influence-gd."
    )

    with pytest.raises(ConfigError, match=re.escape(message)):
        identify("linear-influence-lissa", model, x, y, qx, qy, {"gd_steps": 5})


def test_stored_config_with_ignored_settings_resolves():
    # Rankings stored before the other solver's settings were left out hold
    # them at the class defaults.
    stored = dataclasses.asdict(default_config("linear-influence-lissa"))
    assert stored["gd_steps"] == 300

    config = resolve_config("linear-influence-lissa", stored)

    assert config == default_config("linear-influence-lissa")


def test_lissa_records_searched_scale(trained):
    model, x, y, qx, qy, _ = trained

    result = identify(
        "linear-influence-lissa",
        model,
        x,
        y,
        qx,
        qy,
        small_config("linear-influence-lissa"),
    )

    assert result.config["lissa_scale"] is None
    assert result.resolved == {"lissa_scale": result.extras["scale"]}
    assert result.resolved["lissa_scale"] > 0


def test_tracin_records_training_learning_rate(trained):
    model, x, y, qx, qy, context = trained

    default = identify("tracin", model, x, y, qx, qy, context=context)
    given = identify(
        "tracin", model, x, y, qx, qy, {"learning_rate": 0.5}, context=context
    )

    assert default.config["learning_rate"] is None
    assert default.resolved == {"learning_rate": 1e-3}
    assert given.resolved == {}


def test_tracin_names_checkpoints_of_another_model(trained):
    model, x, y, qx, qy, context = trained
    other_head = tiny_cnn(batchnorm=True, dropout=0.3, n_classes=4).state_dict()
    no_norm = tiny_cnn(dropout=0.3).state_dict()

    for states, message in (
        ([context.checkpoints[0], other_head], r"checkpoint 1 holds 'head.weight' "),
        ([no_norm], "checkpoint 0 lacks the model's entry 'norm.bias'"),
    ):
        other = dataclasses.replace(context, checkpoints=states)
        with pytest.raises(ConfigError, match=message):
            identify("tracin", model, x, y, qx, qy, context=other)


def test_resolved_values_of_other_methods(trained):
    model, x, y, qx, qy, context = trained
    settings = small_config("confident-learning")
    settings.max_epochs = None
    settings.n_folds = 2

    learning = identify(
        "confident-learning", model, x, y, qx, qy, settings, context=context
    )
    walked = identify("sgd-influence", model, x, y, qx, qy, context=context)
    random = identify("random", model, x, y, qx, qy)

    assert learning.resolved == {"max_epochs": 2}
    assert walked.resolved == {"max_steps": len(context.trajectory.steps)}
    assert random.resolved == {}


@pytest.mark.parametrize(
    "method", [m for m, spec in METHODS.items() if spec.uses_query]
)
def test_empty_query_is_rejected(trained, method):
    model, x, y, qx, qy, context = trained

    with pytest.raises(ConfigError, match=f"F_q is empty, so {method} has no"):
        identify(
            method, model, x, y, qx[:0], qy[:0], small_config(method), context=context
        )


@pytest.mark.parametrize("method", ["training-loss", "random", "oracle"])
def test_query_free_methods_accept_empty_query(trained, method):
    model, x, y, qx, qy, context = trained

    result = identify(method, model, x, y, qx[:0], qy[:0], context=context)

    assert result.scores.shape == (48,)


@pytest.mark.parametrize(
    "method", [m for m, spec in METHODS.items() if spec.uses_gradients]
)
def test_frozen_model_is_rejected_by_name(trained, method):
    model, x, y, qx, qy, context = trained
    frozen = copy.deepcopy(model).requires_grad_(False)

    with pytest.raises(ConfigError, match="no trainable parameters"):
        identify(method, frozen, x, y, qx, qy, small_config(method), context=context)


def test_labels_must_be_int64(trained):
    model, x, y, qx, qy, _ = trained

    with pytest.raises(ConfigError, match="Training labels have dtype torch.int32"):
        identify("training-loss", model, x, y.int(), qx, qy)


def test_images_the_model_cannot_take_are_named(trained):
    model, x, y, qx, qy, _ = trained

    with pytest.raises(ConfigError, match="images are torch.float64 but the model"):
        identify("training-loss", model, x.double(), y, qx.double(), qy)
    with pytest.raises(ConfigError, match=r"cannot take images of shape \(2, 8, 8\)"):
        identify("training-loss", model, x.repeat(1, 2, 1, 1), y, qx[:0], qy[:0])
    # The pooled CNN takes any image size, so only the comparison catches it.
    with pytest.raises(ConfigError, match=r"Query images have shape \(1, 6, 6\)"):
        identify("ewc-influence", model, x, y, qx[:, :, :6, :6], qy)
    with pytest.raises(ConfigError, match="Query images are torch.float64 but"):
        identify("ewc-influence", model, x, y, qx.double(), qy)


class _Wrapped(nn.Module):
    """Returns the logits inside a tuple, a dict or an object, as some
    libraries' models do."""

    def __init__(self, model: nn.Module, packing: str) -> None:
        super().__init__()
        self.model = model
        self.packing = packing

    def forward(self, x):
        logits = self.model(x)
        if self.packing == "tuple":
            return logits, x
        if self.packing == "dict":
            return {"logits": logits}
        return types.SimpleNamespace(logits=logits)


@pytest.mark.parametrize("packing", ["tuple", "dict", "object"])
@pytest.mark.parametrize("method", ["training-loss", "ewc-influence"])
def test_model_that_returns_no_tensor_is_named(trained, method, packing):
    model, x, y, qx, qy, _ = trained
    kind = {"tuple": "tuple", "dict": "dict", "object": "SimpleNamespace"}[packing]

    with pytest.raises(ConfigError, match=f"The model returns a {kind}, not a tensor"):
        identify(method, _Wrapped(model, packing), x, y, qx, qy)


def test_data_that_is_no_tensor_is_named(trained):
    model, x, y, qx, qy, _ = trained

    with pytest.raises(ConfigError, match="Training images are of type ndarray"):
        identify("training-loss", model, x.numpy(), y, qx, qy)
    with pytest.raises(ConfigError, match="Training labels are of type list"):
        identify("training-loss", model, x, y.tolist(), qx, qy)
    with pytest.raises(ConfigError, match="Query images are of type ndarray"):
        identify("training-loss", model, x, y, qx.numpy(), qy)


def test_eight_bit_images_are_told_to_convert(trained):
    model, x, y, qx, qy, _ = trained
    pixels = (x.clamp(0, 1) * 255).to(torch.uint8)

    with pytest.raises(ConfigError, match=r"images.to\(torch.float32\) / 255"):
        identify("training-loss", model, pixels, y, qx[:0].to(torch.uint8), qy[:0])


def test_labels_must_be_one_dimensional(trained):
    model, x, y, qx, qy, _ = trained

    with pytest.raises(ConfigError, match=r"Training labels have shape \(48, 1\)"):
        identify("training-loss", model, x, y[:, None], qx, qy)


def test_identify_restores_random_stream(trained):
    model, x, y, qx, qy, _ = trained
    torch.manual_seed(5)
    expected = torch.rand(3)

    torch.manual_seed(5)
    identify("random", model, x, y, qx, qy, {"seed": 9})

    torch.testing.assert_close(torch.rand(3), expected)


def test_seed_is_none_for_method_without_one(trained):
    model, x, y, qx, qy, _ = trained

    assert identify("training-loss", model, x, y, qx, qy).seed is None
    assert identify("random", model, x, y, qx, qy, {"seed": 3}).seed == 3


def test_overshooting_ewc_fit_raises(trained):
    model, x, y, qx, qy, _ = trained
    settings = {"lr": 1e6, "max_steps": 20, "min_steps": 10}

    with pytest.raises(DivergenceError, match="Adam at lr 1e\\+06 overshot"):
        identify("ewc-influence", model, x, y, qx, qy, settings)
    # Larger steps make the objective non-finite, which raises the same class.
    with pytest.raises(DivergenceError, match="fit objective became"):
        identify("ewc-influence", model, x, y, qx, qy, {**settings, "lr": 1e30})


class _HeadFirst(nn.Module):
    """The TinyCNN with an unused linear layer registered after its head."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.spare = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_tracin_uses_logits_layer(trained):
    model, x, y, qx, qy, context = trained
    wrapped = _HeadFirst(copy.deepcopy(model))
    spare = wrapped.spare.state_dict()
    wrapped_context = dataclasses.replace(
        context,
        checkpoints=[
            {
                **{f"net.{k}": v for k, v in state.items()},
                **{f"spare.{k}": v for k, v in spare.items()},
            }
            for state in context.checkpoints
        ],
    )

    plain = identify("tracin", model, x, y, qx, qy, context=context)
    result = identify("tracin", wrapped, x, y, qx, qy, context=wrapped_context)

    assert plain.extras["layer"] == "head"
    assert result.extras["layer"] == "net.head"
    torch.testing.assert_close(result.scores, plain.scores)


def test_tracin_matches_hand_computed_influence():
    # For a model that is one linear layer W x + b with softmax cross-entropy,
    # the loss gradient in W is the outer product of (softmax - one-hot) and x,
    # so <grad_W l(z), grad_W l(q)> = (x_z . x_q)(delta_z . delta_q).
    # TracInCPFast uses the weights of that layer, not its bias, and the score
    # is minus lr times that product summed over checkpoints and failures.
    torch.manual_seed(0)
    x, y = blobs(20)
    first = nn.Linear(x.shape[1], 3)
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.weight.mul_(2.0)
    qx, qy = x[:4], (y[:4] + 1) % 3
    context = IdentificationContext(
        checkpoints=[first.state_dict(), second.state_dict()]
    )

    result = identify(
        "tracin", second, x, y, qx, qy, {"learning_rate": 0.5}, context=context
    )

    expected = torch.zeros(len(y), dtype=torch.float64)
    for net in (first, second):
        with torch.no_grad():
            delta = net(x).softmax(1) - nn.functional.one_hot(y, 3)
            delta_q = net(qx).softmax(1) - nn.functional.one_hot(qy, 3)
        expected -= 0.5 * ((x @ qx.T) * (delta @ delta_q.T)).sum(1).double()
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-5)
    assert result.extras["layer"] == ""
