"""Inverse Hessian-vector products over the trainable parameters.

Vectors are flat tensors in the order of ``torch.nn.utils.parameters_to_vector``
applied to ``trainable_parameters(model).values()``. The curvature is either

* ``"hessian"``: the Hessian of the mean training loss -(1/B) sum log p(z | theta)
  on a batch, computed as reverse-over-reverse ``torch.func.vjp`` of ``grad``
  (exact, and indefinite away from a minimum), or
* ``"fisher"``: the empirical Fisher (1/B) sum g_z g_z^T of the per-example
  log-likelihood gradients g_z, the full matrix applied without forming it
  (positive semi-definite; it equals the Gauss-Newton matrix only at a
  well-fitted model).

Every function evaluates the model in eval mode and restores its modes.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import vjp

from repair_core.errors import ConfigError, DivergenceError
from repair_core.fisher import (
    LogLikelihood,
    batch_log_likelihood,
    checked_parameters,
    detached_parameters,
    per_example_gradients_at,
)
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress

logger = logging.getLogger(__name__)

CURVATURES = ("hessian", "fisher")
#: LiSSA stops with DivergenceError once ||v|| exceeds this multiple of ||g||.
DIVERGENCE_RATIO = 1e4
#: Share of a LiSSA progress bar given to the scale search, when it runs.
SCALE_SEARCH_SHARE = 0.1
#: exact_ihvp refuses models with more trainable parameters than this.
MAX_EXACT_PARAMETERS = 20_000
#: Memory, in bytes, that exact_curvature allows by estimate for the vmapped
#: Hessian columns of one block, and separately for its first-order graph.
EXACT_BLOCK_BYTES = 256 * 2**20
#: One Hessian column of one example is estimated to take this multiple of the
#: bytes autograd saves for that example's forward pass. With torch 2.14 on an
#: x86 CPU, the peak resident memory of vmapped Hessian columns of a
#: two-convolution CNN on 28 x 28 images grew by 0.97 times the saved bytes per
#: example and column, so 2 leaves a margin.
EXACT_ACTIVATION_FACTOR = 2


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector, in dictionary order."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(
    vector: torch.Tensor, like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split a flat vector into tensors shaped like the values of ``like``."""
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = vector[offset : offset + ref.numel()].view_as(ref)
        offset += ref.numel()
    if offset != vector.numel():
        raise ConfigError(
            f"Vector has {vector.numel()} entries but the trainable parameters have "
            f"{offset}. Build it with parameters_to_vector over trainable_parameters."
        )
    return out


def _check_curvature(curvature: str) -> None:
    if curvature not in CURVATURES:
        raise ConfigError(
            f"Unknown curvature {curvature!r}. Use one of {', '.join(CURVATURES)}."
        )


def _hessian_pullback(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    log_likelihood: LogLikelihood | None,
) -> Callable:
    """Return the ``torch.func.vjp`` pullback of the mean-loss gradient at
    ``params``, which maps a vector by name to a 1-tuple of Hessian products.

    The forward and the first backward pass run here once, so the pullback can
    be applied, or vmapped, over many vectors.
    """

    def gradient(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def loss(q: dict[str, torch.Tensor]) -> torch.Tensor:
            return -batch_log_likelihood(
                model, q, images, labels, log_likelihood
            ).mean()

        return torch.func.grad(loss)(p)

    _, pullback = vjp(gradient, params)
    return pullback


def hvp_at(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: dict[str, torch.Tensor],
    *,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
) -> dict[str, torch.Tensor]:
    """Apply the batch curvature at ``params`` to ``vector`` (both by name).

    The caller puts ``model`` in eval mode and moves the batch to its device.
    """
    if curvature == "hessian":
        pullback = _hessian_pullback(model, params, images, labels, log_likelihood)
        (result,) = pullback(vector)
        return {name: t.detach() for name, t in result.items()}

    grads = per_example_gradients_at(
        model, params, images, labels, log_likelihood=log_likelihood
    )
    dots = sum(
        (g.flatten(1) * vector[name].reshape(1, -1)).sum(1) for name, g in grads.items()
    )
    scale = dots / len(labels)
    return {
        name: torch.tensordot(scale, g, dims=1).detach() for name, g in grads.items()
    }


def _curvature_operator(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    curvature: str,
    log_likelihood: LogLikelihood | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return flat v -> C v for the curvature C of one batch at ``params``.

    The first-order work is done once, so repeated products on the same batch
    cost one backward pass (Hessian) or two matrix-vector products (Fisher).
    The operator keeps as much memory as a single ``hvp_at`` call needs at its
    peak: the create_graph graph of the batch gradient, or the (B, P)
    per-example gradients. The caller puts ``model`` in eval mode and moves the batch to
    its device.
    """
    if curvature == "fisher":
        grads = per_example_gradients_at(
            model, params, images, labels, log_likelihood=log_likelihood
        )
        jacobian = torch.cat([g.flatten(1) for g in grads.values()], 1).detach()
        count = len(labels)
        return lambda vector: jacobian.T @ (jacobian @ vector) / count

    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        loss = -batch_log_likelihood(
            model, leaves, images, labels, log_likelihood
        ).mean()
        # A parameter that the forward pass never uses has no gradient.
        gradient = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=True, allow_unused=True
        )
    # A gradient entry that does not depend on the parameters has a zero
    # Hessian row block, and autograd cannot differentiate it again.
    connected = [i for i, g in enumerate(gradient) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in leaves.values()]

    def apply(vector: torch.Tensor) -> torch.Tensor:
        if not connected:
            return torch.zeros_like(vector)
        pieces = vector.split(sizes)
        with torch.enable_grad():
            products = torch.autograd.grad(
                [gradient[i] for i in connected],
                list(leaves.values()),
                grad_outputs=[pieces[i].view_as(gradient[i]) for i in connected],
                retain_graph=True,
                allow_unused=True,
            )
        return torch.cat(
            [
                torch.zeros_like(piece) if product is None else product.reshape(-1)
                for piece, product in zip(pieces, products, strict=True)
            ]
        )

    return apply


def hvp_fn(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    curvature: str = "hessian",
    damping: float = 0.0,
    log_likelihood: LogLikelihood | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build v -> (C + damping I) v for the curvature C of one batch.

    The gradient graph (Hessian) or the per-example gradients (Fisher) of the
    batch are computed here once, at a copy of the current parameters. Each
    call then costs one backward pass or two matrix-vector products, and later
    changes to the model do not affect the returned function.

    Args:
        model: the network at the parameters where the curvature is taken.
        images: the batch inputs, shape (B, ...).
        labels: the batch targets, shape (B,).
        curvature: ``"hessian"`` of the mean loss or empirical ``"fisher"``.
        damping: added multiple of the identity.
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.

    Returns:
        A function from a flat vector, shape (P,), to a flat vector, shape (P,),
        with P the number of trainable parameter entries.
    """
    _check_curvature(curvature)
    device = model_device(model)
    params = {name: p.clone() for name, p in detached_parameters(model).items()}
    if not params:
        raise ConfigError(
            "The model has no trainable parameters to take products over."
        )
    first = next(iter(params.values()))
    with eval_mode(model):
        operator = _curvature_operator(
            model,
            params,
            images.to(device),
            labels.to(device),
            curvature=curvature,
            log_likelihood=log_likelihood,
        )

    def apply(vector: torch.Tensor) -> torch.Tensor:
        vector = vector.to(device, first.dtype)
        return operator(vector) + damping * vector

    return apply


def _full_batch_hvp(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: torch.Tensor,
    *,
    curvature: str,
    log_likelihood: LogLikelihood | None,
    chunk_size: int,
) -> torch.Tensor:
    """Curvature of the whole data set applied to ``vector``, in chunks."""
    device = vector.device
    n = len(labels)
    total = torch.zeros_like(vector)
    for start in range(0, n, chunk_size):
        x = images[start : start + chunk_size].to(device)
        y = labels[start : start + chunk_size].to(device)
        operator = _curvature_operator(
            model, params, x, y, curvature=curvature, log_likelihood=log_likelihood
        )
        total += operator(vector) * (len(y) / n)
    return total


def _prepare(
    model: nn.Module, vector: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = checked_parameters(model)
    size = sum(p.numel() for p in params.values())
    if vector.ndim != 1 or vector.numel() != size:
        raise ConfigError(
            f"Vector has shape {tuple(vector.shape)} but the model has {size} "
            "trainable "
            "parameter entries. Pass a flat vector over trainable_parameters(model)."
        )
    first = next(iter(params.values()))
    return params, vector.detach().to(first.device, first.dtype)


def _lissa_divergence_advice(scale: float, damping: float, curvature: str) -> str:
    """Return the hints of a LiSSA DivergenceError, in the argument names of
    ``lissa``: scale, damping (the shrink per step) and curvature."""
    scale_hint = (
        "If the scale is below half the largest eigenvalue of the curvature, set "
        "scale to a larger value."
    )
    if curvature == "fisher":
        # The empirical Fisher is positive semi-definite, so only the scale
        # can make the recursion diverge.
        return scale_hint
    return (
        f"{scale_hint} If the curvature has an eigenvalue below minus "
        f"the effective damping {damping * scale:.3g} (damping times scale), as "
        "the Hessian of a non-convex network can, set damping to a larger value "
        f"(now {damping:g}) or curvature to 'fisher'."
    )


def lissa(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: torch.Tensor,
    *,
    scale: float = 10.0,
    damping: float = 0.01,
    depth: int = 1000,
    repeats: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
    divergence_ratio: float = DIVERGENCE_RATIO,
    divergence_advice: str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Estimate H^-1 g with the stochastic recursion of Agarwal et al. 2017 (LiSSA).

    Each step draws a fresh random minibatch B_t (the whole set when
    ``batch_size`` >= N) and updates
    v <- g + (1 - damping) v - H_{B_t} v / scale, starting from v = g; the
    estimate is v / scale, averaged over ``repeats`` independent runs. Its
    fixed point is (H + damping * scale * I)^-1 g, so the effective damping of
    the solve is ``damping * scale``. The recursion converges when the
    eigenvalues of H / scale lie in (-damping, 2 - damping), so ``scale`` must
    exceed about half the largest eigenvalue of H. An eigenvalue of H below
    minus the effective damping makes it diverge, and no scale fixes that. The
    Hessian of a non-convex network can have such eigenvalues, but the
    positive semi-definite Fisher cannot. Each step is detached, so memory
    does not grow with ``depth``.

    Args:
        model: the network at theta-hat.
        images: training inputs, shape (N, ...), the pool minibatches come from.
        labels: training targets, shape (N,).
        vector: g, shape (P,).
        scale: divisor of the curvature; larger is more stable and slower.
        damping: shrink factor of v per step.
        depth: recursion steps per repeat.
        repeats: independent runs averaged.
        batch_size: examples per step, drawn without replacement.
        seed: seed of the minibatch draws.
        curvature: ``"hessian"`` or ``"fisher"`` (see the module docstring).
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.
        divergence_ratio: the bound on ||v|| / ||g|| before the run is stopped.
        divergence_advice: the text after the first sentence of the
            DivergenceError message. None gives hints that name the arguments
            of this function (scale, damping and curvature). Callers whose
            settings have other names pass their own.
        progress: called with (fraction done, message).

    Returns:
        The estimate of (H + damping * scale * I)^-1 g, shape (P,), detached.

    Raises:
        DivergenceError: ||v|| grew past ``divergence_ratio * ||g||`` or became
            non-finite. The message names the scale and the step.
    """
    _check_curvature(curvature)
    for name, value, low in (
        ("depth", depth, 1),
        ("repeats", repeats, 1),
        ("batch_size", batch_size, 1),
    ):
        if value < low:
            raise ConfigError(f"LiSSA {name} {value} must be at least {low}.")
    if not scale > 0:
        raise ConfigError(f"LiSSA scale {scale} must be positive.")
    if not 0 <= damping < 1:
        raise ConfigError(f"LiSSA damping {damping} must lie in [0, 1).")
    params, g = _prepare(model, vector)
    device = g.device
    n = len(labels)
    bound = divergence_ratio * max(g.norm().item(), 1e-30)
    generator = torch.Generator().manual_seed(seed)
    estimate = torch.zeros_like(g)
    total_steps = depth * repeats
    common = {"curvature": curvature, "log_likelihood": log_likelihood}
    with eval_mode(model), torch.no_grad():
        # A minibatch of at least N examples is the whole training set, so
        # every step applies the same curvature and its graph is built once.
        whole = None
        if batch_size >= n:
            whole = _curvature_operator(
                model, params, images.to(device), labels.to(device), **common
            )
        for repeat in range(repeats):
            v = g.clone()
            for step in range(1, depth + 1):
                if whole is None:
                    batch = torch.randperm(n, generator=generator)[:batch_size]
                    x, y = images[batch].to(device), labels[batch].to(device)
                    hv = _curvature_operator(model, params, x, y, **common)(v)
                else:
                    hv = whole(v)
                v = (g + (1 - damping) * v - hv / scale).detach()
                norm = v.norm().item()
                if not math.isfinite(norm) or norm > bound:
                    if divergence_advice is None:
                        divergence_advice = _lissa_divergence_advice(
                            scale, damping, curvature
                        )
                    raise DivergenceError(
                        f"LiSSA diverged with scale {scale} at step {step} of repeat "
                        f"{repeat + 1} (|v| = {norm:.3g}, "
                        f"|g| = {g.norm().item():.3g}). {divergence_advice}"
                    )
                if progress is not None and step % 10 == 0:
                    done = repeat * depth + step
                    progress(done / total_steps, f"LiSSA: step {done}/{total_steps}")
            estimate += v / scale
    return (estimate / repeats).detach()


def find_lissa_scale(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: torch.Tensor,
    *,
    start: float = 1.0,
    factor: float = 2.0,
    max_tries: int = 20,
    probe_depth: int = 100,
    damping: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
    divergence_ratio: float = DIVERGENCE_RATIO,
    progress: Progress | None = None,
) -> float:
    """Return the smallest scale on the grid start * factor^k that does not diverge.

    Each candidate runs ``probe_depth`` LiSSA steps. A scale that survives the
    probe can still diverge over a much longer run with rare minibatches, so
    callers may add a margin (one more grid step). ``progress`` hears of each
    candidate before its probe, with the fraction of ``max_tries`` used.

    Raises:
        DivergenceError: every scale up to start * factor^(max_tries - 1) diverged.
    """
    if not start > 0 or not factor > 1:
        raise ConfigError(
            f"Scale search needs start > 0 and factor > 1, got {start} and {factor}."
        )
    if max_tries < 1 or probe_depth < 1:
        raise ConfigError("max_tries and probe_depth must be at least 1.")
    scale = start
    for attempt in range(max_tries):
        if progress is not None:
            progress(attempt / max_tries, f"LiSSA scale search: trying scale {scale:g}")
        try:
            lissa(
                model,
                images,
                labels,
                vector,
                scale=scale,
                damping=damping,
                depth=probe_depth,
                batch_size=batch_size,
                seed=seed,
                curvature=curvature,
                log_likelihood=log_likelihood,
                divergence_ratio=divergence_ratio,
            )
        except DivergenceError:
            logger.debug("LiSSA scale %g diverged; trying %g", scale, scale * factor)
            scale *= factor
            continue
        logger.info("LiSSA scale %g survived %d probe steps", scale, probe_depth)
        return scale
    raise DivergenceError(
        f"LiSSA diverged for every scale from {start} to {scale / factor} "
        f"({max_tries} tries). Raise the damping or the start scale."
    )


def gd_ihvp(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: torch.Tensor,
    *,
    damping: float = 0.01,
    steps: int = 300,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
    chunk_size: int = 512,
    divergence_ratio: float = DIVERGENCE_RATIO,
    divergence_advice: str | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Solve (H + damping I) x = g by gradient descent on 0.5 x^T (H + damping I) x
    - g^T x, starting from x = 0.

    Args:
        model: the network at theta-hat.
        images: training inputs, shape (N, ...).
        labels: training targets, shape (N,).
        vector: g, shape (P,).
        damping: added multiple of the identity; it also bounds the condition
            number, which sets how many steps are needed.
        steps: gradient steps.
        lr: step size; when None, 1 / (lambda_max + damping) with lambda_max
            estimated by 20 power iterations on the same curvature.
        batch_size: examples per step drawn at random, or None for the full
            data set every step (exact GD, one pass over the data per step).
        seed: seed of the minibatch draws.
        curvature: ``"hessian"`` or ``"fisher"``.
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.
        chunk_size: examples per forward pass of a full-batch product.
        divergence_ratio: the bound on ||x|| / ||g|| * (lambda_max + damping)
            before the run is stopped.
        divergence_advice: the text after the first sentence of the
            DivergenceError message. None gives hints that name the arguments
            of this function (damping, lr and curvature).
        progress: called with (fraction done, message).

    Returns:
        The approximate solution x, shape (P,), detached.

    Raises:
        DivergenceError: x grew past the bound or became non-finite, which
            happens when H + damping I has negative eigenvalues.
    """
    _check_curvature(curvature)
    if steps < 1:
        raise ConfigError(f"GD steps {steps} must be at least 1.")
    if damping < 0:
        raise ConfigError(f"Damping {damping} must not be negative.")
    params, g = _prepare(model, vector)
    device = g.device
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    common = {"curvature": curvature, "log_likelihood": log_likelihood}
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None

    def product(v: torch.Tensor) -> torch.Tensor:
        if whole is not None:
            hv = whole(v)
        elif batch_size is None:
            hv = _full_batch_hvp(
                model,
                params,
                images,
                labels,
                v,
                chunk_size=chunk_size,
                **common,
            )
        else:
            batch = torch.randperm(n, generator=generator)[:batch_size]
            x, y = images[batch].to(device), labels[batch].to(device)
            hv = _curvature_operator(model, params, x, y, **common)(v)
        return hv + damping * v

    with eval_mode(model), torch.no_grad():
        # When every step applies the curvature of the whole set in a single
        # forward pass, its graph is built once. A full pass over more than
        # chunk_size examples is rebuilt chunk by chunk at every step instead,
        # because keeping every chunk's graph would hold the activations of
        # the whole set.
        single_pass = n <= chunk_size if batch_size is None else batch_size >= n
        if single_pass:
            whole = _curvature_operator(
                model, params, images.to(device), labels.to(device), **common
            )
        if lr is None:
            probe = torch.randn(g.shape, generator=generator).to(device, g.dtype)
            top = 0.0
            for _ in range(20):
                probe = probe / probe.norm()
                image = product(probe)
                top = torch.dot(probe, image).item()
                probe = image
            lr = 1.0 / max(abs(top), damping, 1e-12)
            logger.info("GD inverse-HVP step size %.3g (lambda_max ~ %.3g)", lr, top)
        bound = divergence_ratio * lr * max(g.norm().item(), 1e-30)
        x = torch.zeros_like(g)
        for step in range(1, steps + 1):
            x = (x - lr * (product(x) - g)).detach()
            norm = x.norm().item()
            if not math.isfinite(norm) or norm > bound:
                if divergence_advice is None and curvature == "fisher":
                    divergence_advice = (
                        "The step size is too large. Set lr to a smaller value."
                    )
                elif divergence_advice is None:
                    divergence_advice = (
                        "The curvature has negative eigenvalues larger than the "
                        "damping, or the step size is too large. Set damping to a "
                        f"larger value (now {damping:g}), lr to a smaller value, or "
                        "curvature to 'fisher'."
                    )
                raise DivergenceError(
                    f"GD inverse-HVP diverged at step {step} with step size {lr:.3g} "
                    f"(|x| = {norm:.3g}). {divergence_advice}"
                )
            if progress is not None and step % 10 == 0:
                progress(step / steps, f"GD inverse-HVP: step {step}/{steps}")
    return x.detach()


def _saved_bytes_per_example(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    log_likelihood: LogLikelihood | None,
) -> int:
    """Return the bytes autograd saves for the backward pass of a forward pass
    over one example, ``image`` of shape (1, ...).

    The count includes the parameters that the layers save, so it overestimates
    the activations a little.
    """
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with (
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        batch_log_likelihood(model, leaves, image, label, log_likelihood)
    return total


def exact_block_shape(
    saved_bytes: int,
    size: int,
    itemsize: int,
    chunk_size: int,
    budget: int = EXACT_BLOCK_BYTES,
) -> tuple[int, int]:
    """Choose (examples, columns) per block of ``exact_curvature``.

    One Hessian column of one example is estimated at ``EXACT_ACTIVATION_FACTOR``
    times ``saved_bytes``, the bytes autograd saves for that example's forward
    pass, and each column also takes a few vectors of ``size`` entries. The
    examples per block are at most ``chunk_size`` and are cut further until
    their first-order graph, or their per-example gradients for the Fisher,
    fits in ``budget``. The columns are then as many as fit in ``budget``. A
    single example with a single column can exceed ``budget``, and then the
    block takes that one column of that one example.
    """
    per_example = EXACT_ACTIVATION_FACTOR * max(saved_bytes, 1) + size * itemsize
    examples = max(1, min(chunk_size, budget // per_example))
    column_bytes = EXACT_ACTIVATION_FACTOR * (
        examples * max(saved_bytes, 1) + size * itemsize
    )
    columns = max(1, min(size, budget // column_bytes))
    return examples, columns


def _available_bytes(device: torch.device) -> int | None:
    """Return the free memory of ``device`` in bytes, or None where it is unknown.

    NOTE: on the CPU this reads MemAvailable from /proc/meminfo, which ignores
    a container's cgroup memory limit.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: Default alternative that the size errors of the exact solve suggest.
ITERATIVE_SOLVERS = "the 'lissa' or 'gd' solver"


def _check_dense_size(
    size: int, like: torch.Tensor, matrices: int, alternative: str = ITERATIVE_SOLVERS
) -> None:
    """Raise ConfigError when ``matrices`` dense (size, size) matrices of
    ``like``'s dtype do not fit in the free memory of its device; the message
    suggests ``alternative``."""
    if size > MAX_EXACT_PARAMETERS:
        raise ConfigError(
            f"The exact solve needs a {size} x {size} matrix, so it is limited to "
            f"{MAX_EXACT_PARAMETERS} trainable parameters. Use {alternative} for "
            "this model."
        )
    needed = matrices * size * size * like.element_size()
    available = _available_bytes(like.device)
    if available is not None and needed > available:
        noun = "matrix" if matrices == 1 else "matrices"
        raise ConfigError(
            f"The exact solve needs {needed / 2**30:.2f} GiB for {matrices} dense "
            f"{size} x {size} {like.dtype} {noun}, but {like.device} has "
            f"{available / 2**30:.2f} GiB available. Use {alternative} for this "
            "model, or free memory."
        )


def _identity_rows(
    first: int, count: int, size: int, like: torch.Tensor
) -> torch.Tensor:
    """Return rows first..first+count-1 of the (size, size) identity matrix."""
    rows = torch.zeros(count, size, dtype=like.dtype, device=like.device)
    rows.diagonal(offset=first).fill_(1)
    return rows


def exact_curvature(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
    chunk_size: int = 512,
    block_columns: int | None = None,
) -> torch.Tensor:
    """Build the dense curvature of the mean loss over all N examples.

    The examples are taken in blocks, and the blocks' curvatures are summed
    with weights (block size) / N. For the Hessian, each block runs the
    forward and first backward pass once, and the ``torch.func.vjp`` pullback
    is vmapped over ``block_columns`` columns of the identity at a time. For
    the empirical Fisher, each block adds J^T J / N with J its per-example
    gradients. ``exact_block_shape`` sizes the blocks from an estimate, so
    that a block's vmapped columns, and separately its first-order graph or
    per-example gradients, take about ``EXACT_BLOCK_BYTES`` at most. The memory
    beyond the (P, P) result therefore does not grow with P times N.

    Args:
        model: the network at the parameters where the curvature is taken.
        images: inputs, shape (N, ...).
        labels: targets, shape (N,).
        curvature: ``"hessian"`` or ``"fisher"`` (see the module docstring).
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.
        chunk_size: the maximum number of examples per forward pass.
        block_columns: identity columns per vmapped Hessian product, in place
            of the number chosen from the memory budget. The Fisher ignores it.

    Returns:
        The curvature, shape (P, P), with row i the product with the i-th
        identity column.

    Raises:
        ConfigError: the model has more than ``MAX_EXACT_PARAMETERS`` trainable
            entries, its device has too little free memory for the matrix, or
            ``images`` is empty.
    """
    _check_curvature(curvature)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size {chunk_size} must be at least 1.")
    if block_columns is not None and block_columns < 1:
        raise ConfigError(f"block_columns {block_columns} must be at least 1.")
    params = checked_parameters(model)
    first = next(iter(params.values()))
    device = first.device
    size = sum(p.numel() for p in params.values())
    _check_dense_size(size, first, matrices=1)
    n = len(labels)
    if n == 0:
        raise ConfigError("The exact curvature needs at least one training example.")
    with eval_mode(model):
        saved = _saved_bytes_per_example(
            model,
            params,
            images[:1].to(device),
            labels[:1].to(device),
            log_likelihood,
        )
        examples, columns = exact_block_shape(
            saved, size, first.element_size(), min(chunk_size, n)
        )
        if block_columns is not None:
            columns = min(block_columns, size)
        logger.debug(
            "Exact %s: %d saved bytes per example, blocks of %d examples and "
            "%d columns",
            curvature,
            saved,
            examples,
            columns,
        )
        matrix = torch.zeros(size, size, dtype=first.dtype, device=device)
        for start in range(0, n, examples):
            x = images[start : start + examples].to(device)
            y = labels[start : start + examples].to(device)
            if curvature == "fisher":
                grads = per_example_gradients_at(
                    model, params, x, y, log_likelihood=log_likelihood
                )
                jacobian = torch.cat([g.flatten(1) for g in grads.values()], 1)
                matrix.addmm_(jacobian.T.detach(), jacobian.detach(), alpha=1 / n)
                continue
            pullback = _hessian_pullback(model, params, x, y, log_likelihood)

            def column(e: torch.Tensor, pullback=pullback) -> torch.Tensor:
                (product,) = pullback(unflatten(e, params))
                return flatten(product)

            for row in range(0, size, columns):
                count = min(columns, size - row)
                identity = _identity_rows(row, count, size, first)
                block = torch.vmap(column)(identity).detach()
                matrix[row : row + count] += block * (len(y) / n)
    return matrix


def exact_ihvp(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    vector: torch.Tensor,
    *,
    damping: float = 0.0,
    curvature: str = "hessian",
    log_likelihood: LogLikelihood | None = None,
    chunk_size: int = 512,
    block_columns: int | None = None,
    alternative: str = ITERATIVE_SOLVERS,
) -> torch.Tensor:
    """Solve (H + damping I) x = g with a dense matrix; for small models only.

    H is the curvature of the mean loss over all N examples from
    ``exact_curvature``, made exactly symmetric, and the system is solved with
    ``torch.linalg.solve``. ``chunk_size`` and ``block_columns`` are passed
    to ``exact_curvature``; ``alternative`` is what the errors about the
    model's size suggest instead.

    Raises:
        ConfigError: the model has more than ``MAX_EXACT_PARAMETERS`` trainable
            entries, its device has too little free memory for two dense P x P
            matrices, or ``images`` is empty.
    """
    _check_curvature(curvature)
    _, g = _prepare(model, vector)
    _check_dense_size(g.numel(), g, matrices=2, alternative=alternative)
    hessian = exact_curvature(
        model,
        images,
        labels,
        curvature=curvature,
        log_likelihood=log_likelihood,
        chunk_size=chunk_size,
        block_columns=block_columns,
    )
    # At most two P x P matrices exist at a time: the curvature and the sum,
    # then the sum and its Cholesky factor (or the LU factors).
    symmetric = hessian + hessian.T
    del hessian
    symmetric.mul_(0.5).diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if info.item() == 0:
        del symmetric
        return torch.cholesky_solve(g.unsqueeze(1), factor).squeeze(1)
    del factor
    warnings.warn(
        f"The damped {curvature} (damping {damping:g}) is not positive definite: "
        f"the {curvature} has an eigenvalue at or below -{damping:g}, as away from a "
        "minimum, so the solve mixes directions of rising and falling loss and "
        "the influence scores can change sign. Raise the damping or use "
        "curvature='fisher'.",
        RuntimeWarning,
        stacklevel=2,
    )
    return torch.linalg.solve(symmetric, g)
