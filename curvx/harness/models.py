"""Small models for edge-of-stability experiments.

All models map inputs to ``[N, n_classes]`` outputs (logits, or regression outputs
for the MSE loss) and use PyTorch's default initialization. Construction runs under
:func:`torch.random.fork_rng` with ``torch.manual_seed(seed)``, so the same seed gives
the same weights and the caller's global RNG state is left untouched. Weights are
drawn in float32 on the CPU and then moved to the requested device and dtype, so a
seed gives the same initial model on every device (up to the cast).

Models:

- ``fc-tanh`` / ``fc-relu``: ``depth`` hidden layers of ``width`` units with tanh /
  ReLU, then a linear output layer (``depth + 1`` linear layers). Input ``[N, d]``.
- ``deep-linear``: ``depth`` linear layers with no activation; hidden widths
  ``width``; ``depth = 1`` is a plain linear model ``[N, d] -> [N, n_classes]``.
  Biases are off by default (the depth-driven rotation results are stated for
  bias-free deep linear networks); pass ``bias=True`` to add them.
- ``cnn``: two 3x3 convolutions (``width`` channels each, padding 1), each followed
  by ReLU and 2x2 max pooling, then one linear layer. Input ``[N, C, H, W]`` with
  ``H, W >= 4`` (works on 1x8x8, 1x28x28 and 3x32x32).

No model has BatchNorm or dropout, so train and eval modes give the same function.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "DEFAULT_WIDTH", "DEFAULT_DEPTH", "build_model", "needs_images"]

MODELS = ("fc-tanh", "fc-relu", "deep-linear", "cnn")

#: Default width per model: hidden units (fc, deep-linear) or channels (cnn).
DEFAULT_WIDTH = {"fc-tanh": 200, "fc-relu": 200, "deep-linear": 200, "cnn": 32}
#: Default depth per model: hidden layers (fc), linear layers (deep-linear).
DEFAULT_DEPTH = {"fc-tanh": 2, "fc-relu": 2, "deep-linear": 2, "cnn": 2}


def needs_images(name: str) -> bool:
    """Whether model ``name`` takes ``[N, C, H, W]`` inputs instead of ``[N, d]``."""
    return name == "cnn"


def _mlp(
    d_in: int,
    n_out: int,
    depth: int,
    width: int,
    act: type[nn.Module] | None,
    bias: bool,
) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers.append(nn.Linear(d, width, bias=bias))
        if act is not None:
            layers.append(act())
        d = width
    layers.append(nn.Linear(d, n_out, bias=bias))
    return nn.Sequential(*layers)


def _cnn(image_shape: tuple[int, int, int], n_out: int, width: int, bias: bool):
    c, h, w = image_shape
    if h < 4 or w < 4:
        raise ValueError(f"cnn needs images of at least 4x4, got {h}x{w}")
    h_out, w_out = h // 2 // 2, w // 2 // 2
    return nn.Sequential(
        nn.Conv2d(c, width, kernel_size=3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width, kernel_size=3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * h_out * w_out, n_out, bias=bias),
    )


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    n_classes: int,
    *,
    depth: int | None = None,
    width: int | None = None,
    bias: bool | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Builds a seeded model.

    Args:
        name: One of :data:`MODELS`.
        image_shape: ``(C, H, W)`` of one input example; fully connected models take
            its flattened size ``C * H * W``.
        n_classes: Number of outputs.
        depth: Hidden layers (fc), linear layers (deep-linear, >= 1); ignored by cnn
            (always two conv layers). ``None``: :data:`DEFAULT_DEPTH`.
        width: Hidden units (fc, deep-linear) or conv channels (cnn). ``None``:
            :data:`DEFAULT_WIDTH`.
        bias: Use biases. ``None``: on, except off for ``deep-linear``.
        seed: Seed for the default initialization (global RNG forked, not disturbed).
        device: Device of the returned model.
        dtype: Floating dtype of the returned model's parameters.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: Unknown name or invalid depth / width.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    depth = DEFAULT_DEPTH[name] if depth is None else depth
    width = DEFAULT_WIDTH[name] if width is None else width
    bias = (name != "deep-linear") if bias is None else bias
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    min_depth = 1 if name == "deep-linear" else 0
    if depth < min_depth:
        raise ValueError(f"depth must be >= {min_depth} for {name}, got {depth}")
    d_in = math.prod(image_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "fc-tanh":
            model = _mlp(d_in, n_classes, depth, width, nn.Tanh, bias)
        elif name == "fc-relu":
            model = _mlp(d_in, n_classes, depth, width, nn.ReLU, bias)
        elif name == "deep-linear":
            model = _mlp(d_in, n_classes, depth - 1, width, None, bias)
        else:
            model = _cnn(image_shape, n_classes, width, bias)
    model = model.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s with %d parameters", name, n_params)
    return model.train()


def model_facts(model: nn.Module) -> dict:
    """JSON-ready facts about ``model``: parameter count and layer summary."""
    return {
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "architecture": str(model),
        "has_batchnorm": any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ),
        "has_dropout": any(
            isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()
        ),
    }
