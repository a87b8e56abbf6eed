"""Loss functions with the reductions the edge-of-stability literature uses.

Each loss is a callable ``loss_fn(output, target) -> scalar`` that takes the MEAN over
the examples of the batch it is given, which is what :func:`curvx.track` expects; a
full-batch loss over chunks is then the sum of chunk losses weighted by
``n_c / N``.

- ``mse``: ``1/2 ||f(x) - onehot(y)||^2`` summed over the outputs, mean over examples
  (Cohen et al. 2021). Note this is ``n_classes / 2`` times
  :func:`torch.nn.functional.mse_loss`, and its Hessian differs by that factor: the
  2/lr comparison depends on the exact reduction.
- ``ce``: cross entropy with integer labels, mean over examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

__all__ = ["LOSSES", "LOSS_REDUCTIONS", "accuracy", "ce_loss", "get_loss", "mse_loss"]

LOSSES = ("mse", "ce")

#: Human-readable reduction of each loss, recorded in a run's config.json.
LOSS_REDUCTIONS = {
    "mse": "0.5 * sum over the n_classes outputs of (f(x) - onehot(y))^2, "
    "mean over examples",
    "ce": "cross entropy of softmax(f(x)) with integer labels, mean over examples",
}


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half squared error summed over outputs, averaged over examples.

    Args:
        output: Model outputs, ``[N, K]``.
        target: One-hot (or any real) targets, ``[N, K]``.

    Returns:
        Scalar ``mean_n 1/2 sum_k (output[n, k] - target[n, k])^2``.
    """
    if output.shape != target.shape:
        raise ValueError(
            f"mse_loss: output {list(output.shape)} and target "
            f"{list(target.shape)} must have the same shape [N, K]"
        )
    return 0.5 * (output - target).square().sum(dim=1).mean()


def ce_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over examples.

    Args:
        output: Logits, ``[N, K]``.
        target: Labels, ``[N]`` int64.

    Returns:
        Scalar mean cross entropy.
    """
    return F.cross_entropy(output, target, reduction="mean")


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Returns the loss function called ``name`` (one of :data:`LOSSES`)."""
    if name == "mse":
        return mse_loss
    if name == "ce":
        return ce_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def accuracy(output: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose largest output is the label.

    Args:
        output: Model outputs, ``[N, K]``.
        labels: Labels, ``[N]`` int64.

    Returns:
        Accuracy in [0, 1] (``nan`` for an empty batch).
    """
    if labels.numel() == 0:
        return float("nan")
    return (output.argmax(dim=1) == labels).double().mean().item()
