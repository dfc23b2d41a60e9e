"""TracIn (Pruthi et al. 2020) through Captum's ``captum.influence``.

TracIn's influence of a training example z on a test example x is
sum over checkpoints of lr * <grad l(z), grad l(x)>; positive marks a
proponent, whose training step lowered the loss on x with its label. The
failures carry their true labels, so the examples that oppose them are the
harmful ones: the score is minus the influence summed over F_q.

By default only the gradients of the output layer are used
(``TracInCPFast``): the trainable ``nn.Linear`` whose output the model
returns as its logits. ``final_layer_only=False``, or a model whose logits
come from no such layer, uses every module with trainable parameters that
the forward pass calls (``TracInCP``). TracIn always uses softmax
cross-entropy, whatever log-likelihood the context names.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from repair_core.errors import ConfigError
from repair_core.identification.base import (
    IdentificationContext,
    check_finite,
    check_setting_types,
    option,
)
from repair_core.inference import eval_mode, model_device
from repair_core.progress import Progress

logger = logging.getLogger(__name__)


@dataclass
class TracInConfig:
    """Settings of TracIn."""

    final_layer_only: bool = option(
        True,
        "Use only the output layer (TracInCPFast); False uses every trainable layer.",
    )
    learning_rate: float | None = option(
        None,
        "Step size weighting every checkpoint; None uses the training lr of the "
        "context's train_config, or 1.0 without one.",
    )
    batch_size: int = option(64, "Training examples per Captum batch.")
    query_batch_size: int = option(64, "Failures per influence call.")

    def __post_init__(self) -> None:
        check_setting_types(self)
        if self.batch_size < 1 or self.query_batch_size < 1:
            raise ConfigError("TracIn batch sizes must be at least 1.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(
                f"TracIn learning_rate {self.learning_rate} must be positive."
            )


class _Holder(nn.Module):
    """Wrapper that makes the model a named submodule. Captum addresses layers
    by name, and a model that is itself one layer, such as ``nn.Linear``, has
    no name of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _model_name(name: str | None) -> str | None:
    """Return a layer's name in the held model ("" for the model itself)."""
    if name is None:
        return None
    return name.removeprefix("model").removeprefix(".")


def _called_layers(
    model: nn.Module, sample: torch.Tensor
) -> tuple[list[str], str | None]:
    """Run ``model`` on ``sample`` and return two things. The first is the
    names of the submodules with trainable parameters of their own, in the
    order the forward pass called them. The second is the name of the
    trainable ``nn.Linear`` whose output is the model's output, or None when
    no such layer produces the logits."""
    called: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not name or not any(p.requires_grad for p in own):
            continue

        def record(module, inputs, output, name=name):
            if name not in outputs:
                called.append(name)
            outputs[name] = output

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            logits = model(sample)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    output_layer = None
    for name in reversed(called):
        module, output = modules[name], outputs[name]
        if (
            isinstance(module, nn.Linear)
            and all(p.requires_grad for p in module.parameters(recurse=False))
            and isinstance(output, torch.Tensor)
            and output.shape == logits.shape
            and torch.equal(output, logits)
        ):
            output_layer = name
            break
    return called, output_layer


def _check_checkpoints_fit(model: nn.Module, states: list[dict]) -> None:
    """Raise ConfigError naming the first checkpoint whose entries differ
    from ``model``'s state dict in name or shape."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    for index, state in enumerate(states):
        if not isinstance(state, dict):
            problem = f"is a {type(state).__name__}, not a state dict"
        else:
            missing = sorted(set(expected) - set(state))
            extra = sorted(set(state) - set(expected))
            resized = [
                name
                for name in expected
                if name in state and tuple(state[name].shape) != expected[name]
            ]
            if missing:
                problem = f"lacks the model's entry {missing[0]!r}"
            elif extra:
                problem = f"has the entry {extra[0]!r}, which the model lacks"
            elif resized:
                name = resized[0]
                problem = (
                    f"holds {name!r} of shape {tuple(state[name].shape)}, but the "
                    f"model's has shape {expected[name]}"
                )
            else:
                continue
        raise ConfigError(
            f"TracIn checkpoint {index} {problem}. Pass checkpoints saved from "
            "this model's architecture during its training."
        )


def score_tracin(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    config: TracInConfig,
    context: IdentificationContext,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict]:
    """Return TracIn scores, float64 (N,): minus the influence summed over F_q."""
    from captum.influence import TracInCP, TracInCPFast

    if not context.checkpoints:
        raise ConfigError(
            "TracIn needs the checkpoints saved during training. Runs made by "
            "'python -m repair_core train' store them; an imported run has none. "
            "From Python, pass the states in IdentificationContext.checkpoints "
            "(train_model's TrainResult.checkpoints)."
        )
    states = [c[1] if isinstance(c, tuple) else c for c in context.checkpoints]
    _check_checkpoints_fit(model, states)
    lr = config.learning_rate
    if lr is None:
        lr = context.train_config.lr if context.train_config is not None else 1.0
    device = model_device(model)
    work = _Holder(copy.deepcopy(model))

    def load(net: nn.Module, index: int) -> float:
        net.model.load_state_dict(states[index])
        return lr

    def to_device(batch):
        x, y = zip(*batch, strict=True)
        return torch.stack(x).to(device), torch.stack(y).to(device)

    loader = DataLoader(
        TensorDataset(train_images, train_labels),
        batch_size=config.batch_size,
        shuffle=False,
        collate_fn=to_device,
    )
    loss = nn.CrossEntropyLoss(reduction="sum")
    with eval_mode(work):
        called, output_layer = _called_layers(work, train_images[:1].to(device))
        layer = output_layer if config.final_layer_only else None
        if layer is not None:
            tracer = TracInCPFast(
                work,
                layer,
                loader,
                list(range(len(states))),
                checkpoints_load_func=load,
                loss_fn=loss,
                batch_size=config.batch_size,
            )
        else:
            if config.final_layer_only:
                logger.warning(
                    "No trainable nn.Linear layer gives the model's output; TracIn "
                    "uses all trainable layers."
                )
            tracer = TracInCP(
                work,
                loader,
                list(range(len(states))),
                checkpoints_load_func=load,
                layers=called,
                loss_fn=loss,
                batch_size=config.batch_size,
                sample_wise_grads_per_batch=True,
            )
        total = torch.zeros(len(train_labels), dtype=torch.float64)
        n_query = len(query_labels)
        for start in range(0, n_query, config.query_batch_size):
            x = query_images[start : start + config.query_batch_size].to(device)
            y = query_labels[start : start + config.query_batch_size].to(device)
            influence = tracer.influence((x, y))
            total += influence.detach().double().sum(0).cpu()
            if progress is not None:
                done = min(start + config.query_batch_size, n_query)
                progress(done / n_query, f"TracIn: {done}/{n_query} failures")
    scores = check_finite(
        -total, "TracIn", "Check the checkpoints for non-finite weights."
    )
    return scores, {
        "n_checkpoints": len(states),
        "learning_rate": lr,
        "layer": _model_name(layer),
        "resolved": {"learning_rate": lr} if config.learning_rate is None else {},
    }
