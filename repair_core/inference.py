"""Batched, gradient-free forward passes in eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from repair_core.errors import ConfigError

EVAL_BATCH_SIZE = 512


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's mode afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.train(mode)


def check_tensor(value: object, name: str) -> None:
    """Raise ConfigError unless ``value`` is a torch tensor; ``name`` names it,
    such as "Training images"."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"{name} are of type {type(value).__name__}, not a torch tensor. "
            "Convert them first, for example with torch.as_tensor(values)."
        )


def check_finite_images(images: torch.Tensor, name: str) -> None:
    """Raise ConfigError naming the first of ``images`` with a NaN or infinity.

    ``name`` names the set in the message, such as "Training image".
    """
    check_tensor(images, f"{name}s")
    if not images.is_floating_point() or len(images) == 0:
        return
    bad = torch.nonzero(~torch.isfinite(images.reshape(len(images), -1)).all(1))
    if len(bad):
        more = f", and so do {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ConfigError(
            f"{name} {bad[0].item()} contains NaN or infinite values{more}. "
            "Repair or drop those images first."
        )


def check_labels(labels: torch.Tensor, n_classes: int, name: str) -> None:
    """Raise ConfigError naming the first of ``labels`` outside 0..n_classes-1.

    ``name`` names the set in the message, such as "Training label". The loss
    would otherwise raise an IndexError, or skip the label -100 without an error.
    """
    check_tensor(labels, f"{name}s")
    if labels.dim() != 1:
        raise ConfigError(
            f"{name}s have shape {tuple(labels.shape)}. Pass one class index per "
            "example, shape (N,)."
        )
    if labels.dtype != torch.long:
        raise ConfigError(
            f"{name}s have dtype {labels.dtype}, not torch.int64, which the loss "
            "needs. Pass class indices as labels.long()."
        )
    bad = torch.nonzero((labels < 0) | (labels >= n_classes)).flatten()
    if len(bad):
        index = bad[0].item()
        more = f", and so are {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ConfigError(
            f"{name} {labels[index].item()} at index {index} is outside the valid "
            f"range 0..{n_classes - 1} of the model's {n_classes} outputs{more}. "
            f"Pass labels in 0..{n_classes - 1}, or a model with one output per "
            "class."
        )


def output_size(model: nn.Module, images: torch.Tensor) -> int:
    """Return the number of logits per example, from one forward pass on the
    first of ``images`` in eval mode.

    Raises:
        ConfigError: the images have another floating dtype than the model's
            parameters, or the model cannot take them, naming their shape.
    """
    weights = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if weights and images.is_floating_point() and images.dtype != weights[0]:
        raise ConfigError(
            f"The images are {images.dtype} but the model's parameters are "
            f"{weights[0]}. Convert one to the other, for example "
            f"images.to({weights[0]}) or model.to({images.dtype})."
        )
    try:
        logits = predict_logits(model, images[:1])
    except RuntimeError as error:
        if weights and not images.is_floating_point():
            advice = (
                f"Convert the images to the model's dtype, for example "
                f"images.to({weights[0]}) / 255 for 8-bit pixels."
            )
        else:
            advice = "Pass images of the shape the model was built for."
        raise ConfigError(
            f"The model cannot take images of shape {tuple(images.shape[1:])} "
            f"and dtype {images.dtype}: {str(error).rstrip('.')}. {advice}"
        ) from error
    if logits.dim() != 2:
        raise ConfigError(
            f"The model returns outputs of shape {tuple(logits.shape)} for one "
            "image; it must return one row of class logits per image, shape (B, K)."
        )
    return logits.shape[-1]


def check_model_labels(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
) -> None:
    """Raise ConfigError naming the first training or query label that is not
    one of ``model``'s classes, or query images shaped or typed unlike the
    training images. The class count comes from one forward pass."""
    if len(train_images) and len(query_images):
        if query_images.shape[1:] != train_images.shape[1:]:
            raise ConfigError(
                f"Query images have shape {tuple(query_images.shape[1:])} but "
                f"training images {tuple(train_images.shape[1:])}. Pass failures "
                "from data shaped like the training set."
            )
        if query_images.dtype != train_images.dtype:
            raise ConfigError(
                f"Query images are {query_images.dtype} but training images "
                f"{train_images.dtype}. Convert both to the model's dtype."
            )
    sample = train_images if len(train_images) else query_images
    if len(sample) == 0:
        return
    n_classes = output_size(model, sample)
    check_labels(train_labels, n_classes, "Training label")
    check_labels(query_labels, n_classes, "Query label")


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def checked_logits(outputs: object) -> torch.Tensor:
    """Return ``outputs`` if it is a tensor, else raise ConfigError naming its type."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise ConfigError(
        f"The model returns a {type(outputs).__name__}, not a tensor of class "
        "logits. Wrap it in a module whose forward returns only the logits, for "
        "example the .logits field or the first element of what it returns."
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> torch.Tensor:
    """Return logits, shape (N, K), on the CPU. Runs on the model's device."""
    device = model_device(model)
    outputs = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            outputs.append(checked_logits(model(batch)).float().cpu())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


@torch.no_grad()
def log_likelihoods(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
) -> torch.Tensor:
    """Return log p(y | x, theta) for every example, shape (N,), on the CPU."""
    logits = predict_logits(model, images, batch_size)
    return -F.cross_entropy(logits, labels.cpu(), reduction="none")


def share(hits: torch.Tensor) -> float:
    """Return the share of True entries of a boolean tensor as a Python float,
    counted exactly, so 2/3 reads 0.6666666666666666 and not the float32
    0.6666666865348816; NaN for an empty tensor."""
    if hits.numel() == 0:
        return float("nan")
    return int(hits.sum()) / hits.numel()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correctly predicted examples; NaN for an empty set."""
    if len(labels) == 0:
        return float("nan")
    predictions = predict_logits(model, images).argmax(1)
    return share(predictions == labels.cpu())
