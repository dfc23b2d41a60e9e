"""Per-example gradients and the diagonal empirical Fisher over trainable parameters.

Only parameters with ``requires_grad`` take part, so a frozen layer is left out
of every gradient, Fisher and penalty. Gradients are taken with the model in
eval mode, so BatchNorm uses its running statistics and Dropout is off, and
each example's gradient does not depend on the rest of its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from repair_core.errors import ConfigError
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress

logger = logging.getLogger(__name__)

#: Maps (outputs, targets) of a batch to log p(y | x, theta), shape (B,).
LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def categorical_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Return log p(y | x) of a softmax classifier, shape (B,)."""
    return -F.cross_entropy(logits, labels, reduction="none")


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the parameters with ``requires_grad``, keyed by name, in module order."""
    return {
        name: param for name, param in model.named_parameters() if param.requires_grad
    }


def detached_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return detached views of the trainable parameters, keyed by name."""
    return {name: p.detach() for name, p in trainable_parameters(model).items()}


def checked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return detached trainable parameters, raising ConfigError if there are none."""
    params = detached_parameters(model)
    if not params:
        raise ConfigError(
            "The model has no trainable parameters (every parameter has "
            "requires_grad=False), so there is no gradient to compute. Unfreeze at "
            "least one layer."
        )
    return params


def batch_log_likelihood(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    log_likelihood: LogLikelihood | None = None,
) -> torch.Tensor:
    """Return log p(y | x, params) per example, shape (B,), via ``functional_call``.

    Parameters missing from ``params`` (the frozen ones) and all buffers are
    taken from ``model``.
    """
    log_likelihood = log_likelihood or categorical_log_likelihood
    outputs = functional_call(
        model, params, (images,), strict=False, tie_weights=_ties_weights(model)
    )
    return log_likelihood(outputs, labels)


def _ties_weights(model: nn.Module) -> bool:
    """Return whether ``functional_call`` should follow shared parameters.

    A parameter shared by two layers needs ``tie_weights=True``, so that the
    value passed under one name reaches both layers. One layer reachable under
    two names needs ``tie_weights=False``: with True, torch 2.14 leaves that
    layer holding the wrapped tensor after the call, which breaks the model.
    A model with both cannot be differentiated correctly either way.
    """
    named = list(model.named_modules(remove_duplicate=False))
    if len(named) == len({id(module) for _, module in named}):
        return True
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), set()).add(id(module))
    if any(len(modules) > 1 for modules in owners.values()):
        raise ConfigError(
            "The model reaches one layer under two attribute names and also shares "
            "a parameter between two layers, which torch.func cannot differentiate "
            "correctly. Keep each layer under one attribute name."
        )
    return False


def per_example_gradients_at(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    log_likelihood: LogLikelihood | None = None,
) -> dict[str, torch.Tensor]:
    """Return the gradients of log p(y | x, params) for each example of a batch.

    The caller puts ``model`` in eval mode. Each entry has shape
    (B, *param.shape).
    """

    def single(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        return batch_log_likelihood(
            model, p, x.unsqueeze(0), y.unsqueeze(0), log_likelihood
        ).sum()

    try:
        return vmap(grad(single), in_dims=(None, 0, 0))(params, images, labels)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise ConfigError(
            "Per-example gradients of this model failed under torch.func.vmap: "
            f"{str(error).rstrip('.')}. Some layers, such as nn.GRU, and some "
            "in-place operations do not run under vmap. The "
            "training-loss, confident-learning and random rankings need no "
            "per-example gradients."
        ) from error


def per_example_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    log_likelihood: LogLikelihood | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the gradient of log p(y | x, theta) for every example of a batch.

    Uses ``torch.func.vmap`` over ``grad`` of a ``functional_call``, with the
    model in eval mode (its modes are restored afterwards) and buffers taken
    from the model.

    Args:
        model: the network; its device is used.
        images: inputs, shape (B, ...).
        labels: targets, shape (B,).
        log_likelihood: per-example log-likelihood of (outputs, targets);
            softmax cross-entropy when None.

    Returns:
        Parameter name to gradients, each of shape (B, *param.shape), for the
        trainable parameters only.
    """
    device = model_device(model)
    params = checked_parameters(model)
    with eval_mode(model):
        return per_example_gradients_at(
            model,
            params,
            images.to(device),
            labels.to(device),
            log_likelihood=log_likelihood,
        )


def diagonal_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    log_likelihood: LogLikelihood | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the diagonal empirical Fisher at the model's parameters.

    F_i = (1/N) sum_z (d log p(z | theta) / d theta_i)^2, the mean over examples
    of squared per-example gradients (not the square of a batch mean).

    Args:
        model: the network, evaluated in eval mode on its own device.
        images: training inputs, shape (N, ...).
        labels: training labels, shape (N,).
        batch_size: examples per vectorised gradient batch; affects memory only.
        log_likelihood: per-example log-likelihood; softmax cross-entropy when None.
        progress: called with (fraction done, message) after each batch.

    Returns:
        Parameter name to Fisher diagonal, each shaped like the parameter, on
        the model's device, for the trainable parameters only.
    """
    if batch_size < 1:
        raise ConfigError(f"Fisher batch size {batch_size} must be at least 1.")
    n = len(labels)
    if n == 0:
        raise ConfigError("Cannot compute a Fisher from zero training examples.")
    device = model_device(model)
    params = checked_parameters(model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    with eval_mode(model), torch.no_grad():
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            grads = per_example_gradients_at(
                model, params, x, y, log_likelihood=log_likelihood
            )
            for name, g in grads.items():
                fisher[name] += g.pow(2).sum(0)
            if progress is not None:
                done = min(start + batch_size, n)
                progress(done / n, f"Fisher: {done}/{n} examples")
    for name in fisher:
        fisher[name] /= n
    logger.debug("Diagonal Fisher over %d examples and %d tensors", n, len(fisher))
    return fisher
