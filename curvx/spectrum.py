"""Eigenpairs of a model's loss Hessian: the operator and the solver put together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvx._validate import as_int
from curvx.lanczos import EigResult, default_tol, lanczos
from curvx.operators import HessianOperator

__all__ = ["eigsh"]


def eigsh(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = 1,
    which: str = "LA",
    tol: float | None = None,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    mode: str = "eval",
    block_size: int | None = None,
    max_basis: int | None = None,
    max_hvps: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    callback: Callable | None = None,
    autocast: torch.dtype | None = None,
    check_every: int | None = None,
) -> EigResult:
    """Certified extreme eigenpairs of the Hessian of the mean loss over ``data``.

    Block Lanczos with full reorthogonalization in float64, restarted until every
    wanted pair's error bound (the residual ``||H u - theta u||``, or the
    Kato-Temple bound ``residual**2 / gap`` when that is smaller) is at most
    ``tol * ||H||_est``, or the HVP budget runs out (then ``converged`` says which
    pairs made it).

    Args:
        model, loss_fn, data, chunk_size, method, mode: see
            :class:`curvx.operators.HessianOperator`.
        k: wanted pairs.
        which: ``"LA"`` (largest algebraic, descending: the sharpness first),
            ``"SA"`` (smallest algebraic, ascending) or ``"BE"`` (both ends).
        tol: relative accuracy of the eigenvalues; default from the dtype the
            products are computed in (1e-8 float64, 1e-4 float32, 1e-2 lower).
        block_size, max_basis, max_hvps, v0, callback, check_every: see
            :func:`curvx.lanczos.solve` (``check_every`` > 1 spares the GPU a
            host sync per block between convergence tests).
        seed: seed of the private generator for random start vectors, and of
            the fixed dropout masks under ``mode="train"``.
        autocast: products under ``torch.autocast`` with this dtype (mixed
            precision; the solver stays float64).

    Returns:
        :class:`curvx.lanczos.EigResult`; eigenvectors are ``[n, k]`` in the
        flattened order of the model's trainable parameters.
    """
    op = HessianOperator(
        model,
        loss_fn,
        data,
        chunk_size=chunk_size,
        method=method,
        mode=mode,
        dropout_seed=seed,
        autocast=autocast,
    )
    k = as_int(k, "k")
    if k > op.n:
        raise ValueError(
            f"k={k} is larger than the number of trainable parameters n = {op.n}"
        )
    gen = torch.Generator().manual_seed(seed)
    return lanczos(
        op,
        k,
        which,
        tol=default_tol(op.compute_dtype) if tol is None else tol,
        block_size=block_size,
        max_basis=max_basis,
        max_hvps=max_hvps,
        v0=v0,
        generator=gen,
        device=op.device,
        callback=callback,
        check_every=check_every,
    )
