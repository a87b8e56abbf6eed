"""Dense float64 references and small models shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call


def trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def flat_params(model: nn.Module) -> torch.Tensor:
    _, params = trainable(model)
    return torch.cat([p.detach().reshape(-1) for p in params])


def dense_hessian(
    model: nn.Module, loss_fn, X, y, train_mode: bool = False, autograd: bool = False
):
    """``[n, n]`` Hessian of ``loss_fn(model(X), y)`` by torch.func.hessian, or
    row by row with plain double backward (``autograd=True``, and always in
    ``train_mode``)."""
    if train_mode:
        # Batch statistics without running-stat updates (they would mutate buffers)
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    names, params = trainable(model)
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flat0 = flat_params(model)
    was = [(m, m.training) for m in model.modules()]

    def f(flat):
        parts = flat.split(numels)
        ps = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, (ps, buffers), (X,)), y)

    try:
        for m, _ in was:
            m.training = train_mode
        if train_mode or autograd:
            # torch.func.hessian of train-mode BatchNorm and of LayerNorm
            # disagrees with double backward and with finite differences here,
            # and is not even symmetric (seen on torch 2.14): build the rows
            # with plain autograd instead.
            x = flat0.clone().requires_grad_()
            (g,) = torch.autograd.grad(f(x), x, create_graph=True)
            rows = [
                torch.autograd.grad(g[i], x, retain_graph=True)[0]
                for i in range(g.numel())
            ]
            H = torch.stack(rows).detach()
        else:
            H = torch.func.hessian(f)(flat0)
    finally:
        for m, flag in was:
            m.training = flag
    return H.to(torch.float64)


def mlp(sizes, act=nn.Tanh, dtype=torch.float64, seed=0, bias=True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2 and act is not None:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def mse_sum(out, y):
    """1/2 ||f(x) - y||^2 summed over outputs, mean over examples."""
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


class Quadratic(nn.Module):
    """``f(w) = 1/2 w^T A w``: a 'model' whose output is its parameter vector."""

    def __init__(self, A: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.A = A
        self.w = nn.Parameter(w0.clone())

    def forward(self, X):
        return self.w.expand(X.shape[0], -1)


def quadratic_loss(A: torch.Tensor):
    def loss(out, y):
        return 0.5 * torch.einsum("bi,ij,bj->b", out, A, out).mean()

    return loss


class UV(nn.Module):
    """The two-parameter model ``f = a * b`` of science.md."""

    def __init__(self, a: float, b: float, dtype=torch.float64):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(b, dtype=dtype))

    def forward(self, X):
        return (self.a * self.b).expand(X.shape[0])


def uv_loss(out, y):
    return 0.5 * ((out - y) ** 2).mean()


def data(n_examples, d_in, d_out, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_examples, d_in, generator=g, dtype=dtype)
    y = torch.randn(n_examples, d_out, generator=g, dtype=dtype)
    return X, y


def tol(dtype: torch.dtype, mult: float = 100.0) -> float:
    return mult * torch.finfo(dtype).eps
