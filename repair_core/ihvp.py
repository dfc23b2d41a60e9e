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
from collections.abc import Callable

import torch
from torch import nn
from torch.func import vjp

from repair_core.errors import ConfigError, DivergenceError
from repair_core.fisher import (
    LogLikelihood,
    batch_log_likelihood,
    detached_parameters,
    per_example_gradients_at,
)
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress

logger = logging.getLogger(__name__)

CURVATURES = ("hessian", "fisher")
#: LiSSA stops with DivergenceError once ||v|| exceeds this multiple of ||g||.
DIVERGENCE_RATIO = 1e4
#: exact_ihvp refuses models with more trainable parameters than this.
MAX_EXACT_PARAMETERS = 20_000


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

        def gradient(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            def loss(q: dict[str, torch.Tensor]) -> torch.Tensor:
                return -batch_log_likelihood(
                    model, q, images, labels, log_likelihood
                ).mean()

            return torch.func.grad(loss)(p)

        _, pullback = vjp(gradient, params)
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
        gradient = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    # A gradient entry that does not depend on the parameters has a zero
    # Hessian row block, and autograd cannot differentiate it again.
    connected = [i for i, g in enumerate(gradient) if g.requires_grad]
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
    params = detached_parameters(model)
    if not params:
        raise ConfigError(
            "The model has no trainable parameters to take products over."
        )
    size = sum(p.numel() for p in params.values())
    if vector.ndim != 1 or vector.numel() != size:
        raise ConfigError(
            f"Vector has shape {tuple(vector.shape)} but the model has {size} "
            "trainable "
            "parameter entries. Pass a flat vector over trainable_parameters(model)."
        )
    first = next(iter(params.values()))
    return params, vector.detach().to(first.device, first.dtype)


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
        progress: called with (fraction done, message).

    Returns:
        The estimate of (H + damping * scale * I)^-1 g, shape (P,), detached.

    Raises:
        DivergenceError: ||v|| grew past ``divergence_ratio * ||g||`` or became
            non-finite; the message names the scale and the step.
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
                    raise DivergenceError(
                        f"LiSSA diverged with scale {scale} at step {step} of repeat "
                        f"{repeat + 1} (|v| = {norm:.3g}, "
                        f"|g| = {g.norm().item():.3g}). The scale may be below "
                        "half the largest eigenvalue of the curvature: use a larger "
                        "scale, or find one with find_lissa_scale. Or the curvature "
                        "has an eigenvalue below minus the effective damping "
                        f"{damping * scale:.3g}, as the Hessian of a non-convex "
                        "network can: raise the damping, or use curvature='fisher'."
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
                raise DivergenceError(
                    f"GD inverse-HVP diverged at step {step} with step size {lr:.3g} "
                    f"(|x| = {norm:.3g}). The curvature has negative eigenvalues "
                    "larger than the damping, or the step size is too large: raise "
                    "the damping, lower lr, or use curvature='fisher'."
                )
            if progress is not None and step % 10 == 0:
                progress(step / steps, f"GD inverse-HVP: step {step}/{steps}")
    return x.detach()


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
) -> torch.Tensor:
    """Solve (H + damping I) x = g with a dense matrix; for small models only.

    H is the curvature of the mean loss over all N examples, built column by
    column with ``torch.func.vmap`` over products with the identity, then
    solved with ``torch.linalg.solve``.

    Raises:
        ConfigError: the model has more than ``MAX_EXACT_PARAMETERS`` trainable
            entries.
    """
    _check_curvature(curvature)
    params, g = _prepare(model, vector)
    size = g.numel()
    if size > MAX_EXACT_PARAMETERS:
        raise ConfigError(
            f"The exact solve needs a {size} x {size} matrix; it is limited to "
            f"{MAX_EXACT_PARAMETERS} trainable parameters. Use the 'lissa' or 'gd' "
            "solver for this model."
        )
    n = len(labels)
    hessian = torch.zeros(size, size, dtype=g.dtype, device=g.device)
    identity = torch.eye(size, dtype=g.dtype, device=g.device)
    with eval_mode(model):
        for start in range(0, n, chunk_size):
            x = images[start : start + chunk_size].to(g.device)
            y = labels[start : start + chunk_size].to(g.device)

            def column(e: torch.Tensor, x=x, y=y) -> torch.Tensor:
                hv = hvp_at(
                    model,
                    params,
                    x,
                    y,
                    unflatten(e, params),
                    curvature=curvature,
                    log_likelihood=log_likelihood,
                )
                return flatten(hv)

            hessian += torch.vmap(column)(identity).detach() * (len(y) / n)
    hessian = (hessian + hessian.T) / 2 + damping * identity
    return torch.linalg.solve(hessian, g)
