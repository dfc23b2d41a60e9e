"""The elastic weight consolidation (EWC) penalty of Kirkpatrick et al. 2017.

The penalty is a regulariser handed to a training loop, so cause
identification (fit the failures) and treatment (unlearn the causes) share it.
"""

from __future__ import annotations

import torch
from torch import nn

from repair_core.errors import ConfigError
from repair_core.fisher import trainable_parameters


class EWCPenalty:
    """Quadratic pull towards an anchor, weighted by a diagonal Fisher.

    penalty(theta) = fisher_weight * (n_train / 2) * sum_i F_i (theta_i - a_i)^2
    + (l2 / 2) * ||theta - a||^2, which is the negative log of a Laplace
    approximation of p(theta | D) around the anchor ``a``, up to a constant.
    It is zero at the anchor.
    """

    def __init__(
        self,
        fisher: dict[str, torch.Tensor],
        anchor: dict[str, torch.Tensor],
        *,
        n_train: int,
        fisher_weight: float = 1.0,
        l2: float = 0.0,
    ) -> None:
        """Store detached copies of the Fisher and the anchor.

        Args:
            fisher: diagonal Fisher per trainable parameter name.
            anchor: parameter values theta-hat per name; same keys and shapes.
            n_train: number of training examples N the Fisher averages over.
            fisher_weight: multiplier on the Fisher term.
            l2: precision of the isotropic term (lambda).
        """
        if set(fisher) != set(anchor):
            missing = sorted(set(fisher) ^ set(anchor))
            raise ConfigError(
                f"The Fisher and the anchor cover different parameters ({missing[0]!r} "
                "is in one only). Compute both for the same trainable parameters."
            )
        for name, value in fisher.items():
            if value.shape != anchor[name].shape:
                raise ConfigError(
                    f"Fisher of {name!r} has shape {tuple(value.shape)} but its anchor "
                    f"has {tuple(anchor[name].shape)}. Use the same model for both."
                )
        if n_train < 1:
            raise ConfigError(f"n_train {n_train} must be at least 1.")
        if fisher_weight < 0:
            raise ConfigError(f"Fisher weight {fisher_weight} must not be negative.")
        if l2 < 0:
            raise ConfigError(f"L2 weight {l2} must not be negative.")
        self.fisher = {k: v.detach().clone() for k, v in fisher.items()}
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.n_train = n_train
        self.fisher_weight = fisher_weight
        self.l2 = l2

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """Return the penalty at the model's current parameters, a scalar tensor."""
        params = trainable_parameters(model)
        missing = [name for name in self.fisher if name not in params]
        if missing:
            raise ConfigError(
                f"Parameter {missing[0]!r} of the penalty is not a trainable parameter "
                "of the model. Build the penalty from this model."
            )
        fisher_term = 0.0
        l2_term = 0.0
        for name, fisher in self.fisher.items():
            param = params[name]
            diff = param - self.anchor[name].to(param.device, param.dtype)
            fisher_term = fisher_term + (fisher.to(param.device) * diff.pow(2)).sum()
            if self.l2:
                l2_term = l2_term + diff.pow(2).sum()
        total = self.fisher_weight * (self.n_train / 2) * fisher_term
        if self.l2:
            total = total + (self.l2 / 2) * l2_term
        return total
