import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from repair_core import ihvp
from repair_core.errors import ConfigError, DivergenceError
from repair_core.identification import (
    EWCInfluenceConfig,
    LinearInfluenceConfig,
    default_config,
    identify,
)
from repair_core.identification.base import summed_log_likelihood_gradient
from repair_core.ihvp import (
    EXACT_ACTIVATION_FACTOR,
    EXACT_BLOCK_BYTES,
    exact_block_shape,
    exact_curvature,
    exact_ihvp,
    flatten,
    gd_ihvp,
    hvp_fn,
    lissa,
)
from repair_core.inference import eval_mode
from tests.convex import (
    L2,
    fit_logistic,
    fitted_slope,
    noisy_problem,
    query_log_likelihood,
)
from tests.factories import blobs, mlp

MIN_LOO_SPEARMAN = 0.8
#: The scores estimate the change in log p(F_q) when an example is left out,
#: so the actual changes should follow them about one for one.
LOO_SLOPE_RANGE = (0.8, 1.25)
MAX_SOLVER_RELATIVE_ERROR = 0.03
MIN_SOLVER_SPEARMAN = 0.99
TOP_K = 10
#: A duplicated failure must rank within this lowest share of the scores.
HELPFUL_RANK_FRACTION = 0.05
DUPLICATED_FAILURES = 3
#: On this problem the Hessian of the mean loss has nonzero eigenvalues from
#: 0.018 to 2.4. With damping L2 the GD error (step 1 / 2.41) shrinks by at
#: least 1.2% per step and the LiSSA error (scale 4) by 0.7%, so 1000 steps
#: bring both below 1e-3, far inside MAX_SOLVER_RELATIVE_ERROR.
SOLVER_STEPS = 1000


@pytest.fixture(scope="module")
def problem():
    return noisy_problem()


def exact_config():
    return LinearInfluenceConfig(solver="exact", damping=L2)


def test_exact_tracks_leave_one_out(problem):
    model, x, y, qx, qy, _ = problem
    assert len(qy) >= 5
    scores = identify("linear-influence-exact", model, x, y, qx, qy, exact_config())
    base = query_log_likelihood(model, qx, qy)
    actual = []
    for i in range(len(y)):
        keep = torch.cat([torch.arange(i), torch.arange(i + 1, len(y))])
        refit = fit_logistic(copy.deepcopy(model), x, y, keep=keep)
        actual.append(query_log_likelihood(refit, qx, qy) - base)
    rho = spearmanr(scores.scores.numpy(), actual).statistic
    assert rho >= MIN_LOO_SPEARMAN
    low, high = LOO_SLOPE_RANGE
    assert low <= fitted_slope(scores.scores, actual) <= high


def test_iterative_solvers_match_exact(problem):
    model, x, y, qx, qy, _ = problem
    with eval_mode(model):
        g = flatten(summed_log_likelihood_gradient(model, qx, qy))
    exact = exact_ihvp(model, x, y, g, damping=L2)
    scale = 4.0
    via_lissa = lissa(
        model,
        x,
        y,
        g,
        scale=scale,
        damping=L2 / scale,
        depth=SOLVER_STEPS,
        batch_size=len(y),
    )
    via_gd = gd_ihvp(model, x, y, g, damping=L2, steps=SOLVER_STEPS, batch_size=None)
    for solver, estimate in (("lissa", via_lissa), ("gd", via_gd)):
        relative = ((estimate - exact).norm() / exact.norm()).item()
        assert relative <= MAX_SOLVER_RELATIVE_ERROR, solver


def test_minibatch_lissa_repeats_converge(problem):
    model, x, y, qx, qy, _ = problem
    with eval_mode(model):
        g = flatten(summed_log_likelihood_gradient(model, qx, qy))
    exact = exact_ihvp(model, x, y, g, damping=L2)
    scale = 4.0

    def error(repeats: int) -> float:
        estimate = lissa(
            model,
            x,
            y,
            g,
            scale=scale,
            damping=L2 / scale,
            depth=SOLVER_STEPS,
            batch_size=len(y) // 10,
            repeats=repeats,
        )
        return ((estimate - exact).norm() / exact.norm()).item()

    single, averaged = error(1), error(16)

    # Minibatch curvature makes one run noisy, and averaging repeats removes
    # most of that noise.
    assert averaged <= MAX_SOLVER_RELATIVE_ERROR
    assert single > 2 * averaged


def test_removing_top_ranked_raises_query_likelihood(problem):
    model, x, y, qx, qy, _ = problem
    base = query_log_likelihood(model, qx, qy)
    ewc = EWCInfluenceConfig(max_steps=300, min_steps=300, val_fraction=0.0, lr=0.01)
    for method, config in (
        ("linear-influence-exact", exact_config()),
        ("ewc-influence", ewc),
    ):
        scores = identify(method, model, x, y, qx, qy, config).scores
        top = torch.argsort(scores, descending=True)[:TOP_K]
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[top] = False
        refit = fit_logistic(copy.deepcopy(model), x, y, keep=keep)
        assert query_log_likelihood(refit, qx, qy) > base, method


def test_duplicate_failure_ranks_helpful(problem):
    # The query is the duplicated failure alone. With all 79 failures as the
    # query, the duplicate is one of 79 terms in the query gradient. Exact
    # leave-one-out refits then find 18 examples more helpful than it (exact
    # influence finds 17), so that ranking does not show this property.
    model, x, y, qx, qy, _ = problem
    with torch.no_grad():
        true_probability = model(qx).softmax(1).gather(1, qy[:, None]).squeeze(1)
    ewc = EWCInfluenceConfig(max_steps=200, min_steps=200, val_fraction=0.0, lr=0.01)
    for k in torch.argsort(true_probability)[:DUPLICATED_FAILURES].tolist():
        fx, fy = qx[k : k + 1], qy[k : k + 1]
        x2, y2 = torch.cat([x, fx]), torch.cat([y, fy])
        refit = fit_logistic(copy.deepcopy(model), x2, y2)
        with torch.no_grad():
            still_wrong = refit(fx).argmax(1) != fy
        assert still_wrong.item(), f"failure {k} is fitted after the refit"
        for method, config in (
            ("linear-influence-exact", exact_config()),
            ("ewc-influence", ewc),
        ):
            scores = identify(method, refit, x2, y2, fx, fy, config).scores
            rank_from_bottom = (scores < scores[-1]).sum().item()
            assert rank_from_bottom < HELPFUL_RANK_FRACTION * len(scores), (method, k)


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
def test_lissa_and_gd_scores_agree_with_exact(problem, curvature):
    model, x, y, qx, qy, _ = problem
    exact_settings = exact_config()
    exact_settings.curvature = curvature
    exact = identify("linear-influence-exact", model, x, y, qx, qy, exact_settings)
    lissa_config = default_config("linear-influence-lissa")
    lissa_config.curvature = curvature
    lissa_config.damping = L2
    lissa_config.lissa_batch_size = len(y)
    lissa_config.lissa_depth = SOLVER_STEPS
    via_lissa = identify("linear-influence-lissa", model, x, y, qx, qy, lissa_config)
    assert via_lissa.extras["scale"] > 0
    gd_config = default_config("linear-influence-gd")
    gd_config.curvature = curvature
    gd_config.damping = L2
    gd_config.gd_batch_size = None
    gd_config.gd_steps = SOLVER_STEPS
    via_gd = identify("linear-influence-gd", model, x, y, qx, qy, gd_config)
    for method, result in (("lissa", via_lissa), ("gd", via_gd)):
        rho = spearmanr(exact.scores.numpy(), result.scores.numpy()).statistic
        assert rho > MIN_SOLVER_SPEARMAN, method


def test_lissa_scale_search_accepts_large_damping(problem):
    model, x, y, qx, qy, _ = problem
    damping = 2.0
    exact_settings = LinearInfluenceConfig(solver="exact", damping=damping)
    exact = identify("linear-influence-exact", model, x, y, qx, qy, exact_settings)
    config = default_config("linear-influence-lissa")
    config.curvature = "hessian"
    config.damping = damping
    config.lissa_batch_size = len(y)
    config.lissa_depth = SOLVER_STEPS
    via_lissa = identify("linear-influence-lissa", model, x, y, qx, qy, config)
    rho = spearmanr(exact.scores.numpy(), via_lissa.scores.numpy()).statistic
    assert rho > MIN_SOLVER_SPEARMAN


def test_iterative_defaults_handle_negative_curvature():
    # An untrained MLP sits far from a minimum, so its Hessian is indefinite.
    x, y = blobs(48)
    model = mlp()
    qx, qy = x[:6], (y[:6] + 1) % 3
    with eval_mode(model):
        g = flatten(summed_log_likelihood_gradient(model, qx, qy))
    hessian = torch.stack([hvp_fn(model, x, y)(e) for e in torch.eye(len(g))])
    eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    lissa_config = default_config("linear-influence-lissa")
    gd_config = default_config("linear-influence-gd")
    damping = lissa_config.damping
    assert gd_config.damping == damping
    assert -damping < eigenvalues[0].item() < -0.01
    with pytest.raises(DivergenceError):
        lissa(model, x, y, g, scale=4.0, damping=0.01 / 4.0, depth=1000)
    exact_settings = LinearInfluenceConfig(solver="exact", damping=damping)
    exact = identify("linear-influence-exact", model, x, y, qx, qy, exact_settings)
    for method, config in (
        ("linear-influence-lissa", lissa_config),
        ("linear-influence-gd", gd_config),
    ):
        scores = identify(method, model, x, y, qx, qy, config).scores
        rho = spearmanr(exact.scores.numpy(), scores.numpy()).statistic
        assert rho > MIN_SOLVER_SPEARMAN, method


def test_config_rejects_damping_above_lissa_scale():
    with pytest.raises(ConfigError, match="below lissa_scale"):
        LinearInfluenceConfig(damping=3.0, lissa_scale=2.0)


def autograd_curvature(model, x, y, curvature):
    """Build the curvature of the mean cross-entropy row by row with autograd."""
    params = list(model.parameters())

    def flat_gradient(loss, **options):
        parts = torch.autograd.grad(loss, params, **options)
        return torch.cat([part.reshape(-1) for part in parts])

    if curvature == "hessian":
        gradient = flat_gradient(F.cross_entropy(model(x), y), create_graph=True)
        rows = [flat_gradient(entry, retain_graph=True) for entry in gradient]
        return torch.stack(rows)
    jacobian = torch.stack(
        [
            flat_gradient(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]))
            for i in range(len(y))
        ]
    )
    return jacobian.T @ jacobian / len(y)


def small_float64_problem():
    x, y = blobs(30, dtype=torch.float64)
    model = mlp().double()
    return model, x, y


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
@pytest.mark.parametrize("block_columns", [None, 1, 5])
def test_exact_curvature_matches_autograd(curvature, block_columns):
    model, x, y = small_float64_problem()
    expected = autograd_curvature(model, x, y, curvature)
    size = expected.shape[0]
    assert size % 5 != 0
    assert len(y) % 7 != 0

    # Blocks of seven of the 30 examples leave a partial last block, and so
    # do blocks of five of the 67 columns.
    actual = exact_curvature(
        model,
        x,
        y,
        curvature=curvature,
        chunk_size=7,
        block_columns=block_columns,
    )

    assert actual.shape == (size, size)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
def test_exact_ihvp_solves_autograd_system(curvature):
    model, x, y = small_float64_problem()
    matrix = autograd_curvature(model, x, y, curvature)
    g = torch.randn(matrix.shape[0], dtype=torch.float64)
    damping = 0.1
    symmetric = (matrix + matrix.T) / 2 + damping * torch.eye(len(g), dtype=g.dtype)
    expected = torch.linalg.solve(symmetric, g)

    indefinite = torch.linalg.eigvalsh(symmetric).min() < 0
    # The untrained MLP's Hessian is indefinite, the Fisher never is.
    assert indefinite == (curvature == "hessian")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = exact_ihvp(
            model, x, y, g, damping=damping, curvature=curvature, block_columns=4
        )

    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    messages = [str(warning.message) for warning in caught]
    if indefinite:
        assert len(messages) == 1
        assert (
            "The damped hessian (damping 0.1) is not positive definite" in (messages[0])
        )
    else:
        assert messages == []


@pytest.mark.parametrize(
    ("saved_bytes", "size", "chunk_size"),
    [
        # A two-convolution CNN with 4,594 parameters saves 126,556 bytes per
        # 28 x 28 image.
        (126_556, 4_594, 400),
        (126_556, 4_356, 400),
        (126_556, 20_000, 512),
        (10_000, 67, 512),
        (400, 67, 30),
    ],
)
def test_exact_block_shape_fits_budget(saved_bytes, size, chunk_size):
    itemsize = 4

    examples, columns = exact_block_shape(saved_bytes, size, itemsize, chunk_size)

    assert 1 <= examples <= chunk_size
    assert 1 <= columns <= size
    activations = EXACT_ACTIVATION_FACTOR * examples * saved_bytes * columns
    assert activations <= EXACT_BLOCK_BYTES
    per_example = EXACT_ACTIVATION_FACTOR * saved_bytes + size * itemsize
    assert examples * per_example <= EXACT_BLOCK_BYTES


def test_exact_block_shape_takes_small_model_whole():
    examples, columns = exact_block_shape(400, 67, 8, 30)

    assert examples == 30
    assert columns == 67


def test_exact_block_shape_single_large_example():
    # One example saves more than the whole budget, so a block can only be
    # one column of one example.
    examples, columns = exact_block_shape(EXACT_BLOCK_BYTES, 20_000, 4, 512)

    assert examples == 1
    assert columns == 1


def test_exact_rejects_matrix_beyond_memory(monkeypatch):
    model, x, y = small_float64_problem()
    g = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    monkeypatch.setattr(ihvp, "_available_bytes", lambda device: 1000)

    with pytest.raises(ConfigError, match=r"2 dense 67 x 67 torch\.float64 matrices,"):
        exact_ihvp(model, x, y, g)
    with pytest.raises(ConfigError, match=r"1 dense 67 x 67 torch\.float64 matrix,"):
        exact_curvature(model, x, y)


def test_exact_rejects_too_many_parameters():
    x, y = blobs(10, n_features=200)
    model = mlp(n_in=200, hidden=100)

    with pytest.raises(ConfigError, match="limited to 20000 trainable parameters"):
        exact_curvature(model, x, y)
    # The method names what to run instead, not a solver setting it lacks.
    with pytest.raises(
        ConfigError,
        match="Use the method linear-influence-lissa or linear-influence-gd for",
    ):
        identify("linear-influence-exact", model, x, y, x[:2], y[:2])


def diverging_problem():
    # An untrained MLP sits far from a minimum. Its Hessian has an eigenvalue
    # between -3 and -0.01, as test_iterative_defaults_handle_negative_curvature
    # checks, so LiSSA and GD with damping 0.01 diverge.
    x, y = blobs(48)
    model = mlp()
    return model, x, y, x[:6], (y[:6] + 1) % 3


def test_lissa_divergence_names_scale_search():
    model, x, y, qx, qy = diverging_problem()
    config = default_config("linear-influence-lissa")
    config.damping = 0.01

    with pytest.raises(DivergenceError) as caught:
        identify("linear-influence-lissa", model, x, y, qx, qy, config)

    message = str(caught.value)
    assert "came from the automatic scale search" in message
    assert "Set lissa_scale to a larger value, for example" in message
    assert "set damping to a larger value (now 0.01)" in message
    assert "curvature to 'fisher'" in message
    assert "find_lissa_scale" not in message
    assert "curvature='fisher'" not in message


def test_lissa_divergence_names_fixed_scale():
    model, x, y, qx, qy = diverging_problem()
    config = default_config("linear-influence-lissa")
    config.damping = 0.01
    config.lissa_scale = 4.0

    with pytest.raises(DivergenceError) as caught:
        identify("linear-influence-lissa", model, x, y, qx, qy, config)

    message = str(caught.value)
    assert "LiSSA diverged with scale 4.0 at step" in message
    assert "set lissa_scale to a larger value (now 4)" in message
    assert "set damping to a larger value (now 0.01)" in message
    assert "curvature to 'fisher'" in message
    assert "automatic scale search" not in message


def test_lissa_divergence_fisher_names_scale_only():
    model, x, y, qx, qy = diverging_problem()
    config = default_config("linear-influence-lissa")
    config.curvature = "fisher"
    config.damping = 0.0
    config.lissa_scale = 0.001

    with pytest.raises(DivergenceError) as caught:
        identify("linear-influence-lissa", model, x, y, qx, qy, config)

    message = str(caught.value)
    assert "set lissa_scale to a larger value (now 0.001)" in message
    assert "damping" not in message
    assert "'fisher'" not in message


def test_lissa_divergence_default_names_arguments():
    model, x, y, qx, qy = diverging_problem()
    with eval_mode(model):
        g = flatten(summed_log_likelihood_gradient(model, qx, qy))

    with pytest.raises(DivergenceError) as caught:
        lissa(model, x, y, g, scale=4.0, damping=0.0025, depth=1000)

    message = str(caught.value)
    assert "set scale to a larger value" in message
    assert "effective damping 0.01 (damping times scale)" in message
    assert "set damping to a larger value (now 0.0025)" in message
    assert "curvature='fisher'" not in message


def test_gd_divergence_names_settings():
    model, x, y, qx, qy = diverging_problem()
    config = default_config("linear-influence-gd")
    config.damping = 0.01

    with pytest.raises(DivergenceError) as caught:
        identify("linear-influence-gd", model, x, y, qx, qy, config)

    message = str(caught.value)
    assert "Set damping to a larger value (now 0.01)" in message
    assert "gd_lr to a smaller value" in message
    assert "curvature to 'fisher'" in message
    assert "curvature='fisher'" not in message


class _WithUnusedLayer(torch.nn.Module):
    """A model whose ``spare`` layer never takes part in the forward pass."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.spare = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@pytest.mark.parametrize("method", ["linear-influence-gd", "linear-influence-lissa"])
def test_unused_parameter_leaves_scores_unchanged(method):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    images, labels = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    config = default_config(method)

    bare = identify(method, head, images, labels, images[:5], labels[:5], config=config)
    wrapped = identify(
        method,
        _WithUnusedLayer(head),
        images,
        labels,
        images[:5],
        labels[:5],
        config=config,
    )

    torch.testing.assert_close(wrapped.scores, bare.scores, rtol=1e-4, atol=1e-6)


def test_setting_help_names_methods_not_functions():
    helps = {
        entry.name: entry.metadata["help"]
        for entry in dataclasses.fields(LinearInfluenceConfig)
    }

    assert not [name for name, text in helps.items() if "default_config" in text]
    assert (
        "linear-influence-lissa and linear-influence-gd default to 3"
        in (helps["damping"])
    )
    assert "linear-influence-gd defaults to 100" in helps["gd_steps"]
