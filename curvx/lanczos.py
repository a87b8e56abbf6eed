"""Block Lanczos for a few eigenpairs of a symmetric operator, certified by residuals.

The solver sees a symmetric operator only as a callable on blocks ``[n, b] ->
[n, b]``; it knows nothing about models. The algorithm is block Lanczos
(Golub & Underwood 1977) with full reorthogonalization in float64 (two passes of
classical Gram-Schmidt, "twice is enough"), and thick restart (Wu & Simon 2000,
block form as in Zhou & Saad 2008): when the basis is full, the best Ritz vectors
are kept and the recurrence goes on from the last residual block.

Notation (as in the papers): ``Q`` the orthonormal basis ``[n, m]``, ``T`` the
projected block tridiagonal matrix with diagonal blocks ``A_j`` (``alphas``) and
subdiagonal blocks ``B_j`` (``betas``), ``theta`` the Ritz values, ``Y`` the
eigenvectors of ``T``, ``U = Q Y`` the Ritz vectors, ``b`` the block size, ``m`` the
basis size (ARPACK's ncv), ``k`` the wanted pairs.

Certificates: the solver keeps ``H Q`` next to ``Q`` (the products it has already
paid for), so each Ritz pair's residual ``||H u - theta u||`` is computed
explicitly, not estimated from the recurrence. Each wanted value gets the smaller
of two bounds on ``|theta - lambda|``: the residual norm ``r`` (Krylov-Bogoliubov:
some eigenvalue lies within ``r``) and, when the gap ``delta`` to the rest of the
spectrum exceeds ``r``, the Kato-Temple bound ``r**2 / delta`` (``delta`` from the
other Ritz values and the caller's hint, see :func:`_certify`). A pair is
converged when its bound is at most ``tol * ||H||_est`` (``||H||_est`` is the
largest ``|theta|`` seen): ``tol`` is the relative accuracy of the eigenvalues, as
in ARPACK. ``EigResult.certificate`` names the bound that did it, and
``residual / delta`` bounds the eigenvector's angle. The bounds hold for the
operator as it was applied.

Note:
    Residuals certify that each returned pair is an eigenpair; that it is the
    *largest* (or smallest) rests on the Krylov space having found the end of the
    spectrum, which a random block start makes overwhelmingly likely but cannot
    prove. By default a solve therefore fills its basis once (ARPACK's rule)
    before it may stop, which also keeps a start vector that is an exact but
    non-extreme eigenvector (a warm start after a crossing) from being accepted.
    A tracker that passes a small ``min_iterations`` trades that margin for
    speed and must bring its own safeguards (see :mod:`curvx.track`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvx import _ops
from curvx._validate import as_int

__all__ = ["EigResult", "LanczosState", "NotSymmetricError", "lanczos", "solve"]

logger = logging.getLogger(__name__)

_WHICH = ("LA", "SA", "BE")
_F64 = torch.float64


class NotSymmetricError(ValueError):
    """The operator's products are not those of a symmetric matrix."""


@dataclass
class EigResult:
    """Eigenpairs from one solve, with their certificates.

    Attributes:
        eigenvalues: ``[k]`` float64. LA: descending; SA: ascending; BE: the
            largest ``ceil(k/2)`` then the smallest ``floor(k/2)``, all descending.
        eigenvectors: ``[n, k]`` float64, orthonormal columns.
        residuals: ``[k]`` ``||H u - theta u||`` (absolute).
        bounds: ``[k]`` a bound on ``|theta - lambda|``: the smaller of the
            residual norm and the Kato-Temple bound ``residual**2 / gap``.
        certificate: per pair, the bound that certified it (``"residual"`` or
            ``"kato-temple"``), or ``"none"`` when it is not converged.
        gaps: ``[k]`` the gap used by the Kato-Temple bound (0 where none was
            known); ``residual / gap`` bounds the sine of the eigenvector's error.
        converged: ``[k]`` bool, ``bound <= tol * norm_estimate + atol``.
        iterations: block Lanczos steps (each applies the operator to one block).
        restarts: thick restarts.
        hvps: operator applications, counted in vectors.
        status: ``"converged"``, ``"max_hvps"``, ``"stagnated"``, ``"stopped"``
            (by the callback) or ``"dense"`` (small operator solved exactly).
        which, tol: as requested.
        norm_estimate: the largest ``|theta|`` seen, the scale of ``tol``.
        ritz_values, ritz_vectors, ritz_residuals, ritz_products: the wanted
            pairs plus up to a block of neighbours at each wanted end (``[r]``,
            ``[n, r]``, ``[r]``, and ``H U`` as ``[n, r]``), in the order top
            (descending) then bottom (ascending). Trackers use them to see
            clusters that straddle the k-th value and to warm start.
        top_count: how many of the ``ritz_*`` entries belong to the top end.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    bounds: Tensor
    certificate: list[str]
    converged: Tensor
    iterations: int
    restarts: int
    hvps: int
    status: str
    which: str
    tol: float
    norm_estimate: float
    ritz_values: Tensor = field(repr=False, default=None)
    ritz_vectors: Tensor = field(repr=False, default=None)
    ritz_residuals: Tensor = field(repr=False, default=None)
    ritz_products: Tensor = field(repr=False, default=None)
    top_count: int = 0
    gaps: Tensor = field(repr=False, default=None)

    @property
    def n_converged(self) -> int:
        return int(self.converged.sum())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no eigenvectors)."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "bounds": self.bounds.tolist(),
            "certificate": list(self.certificate),
            "gaps": self.gaps.tolist() if self.gaps is not None else None,
            "converged": self.converged.tolist(),
            "iterations": self.iterations,
            "restarts": self.restarts,
            "hvps": self.hvps,
            "status": self.status,
            "which": self.which,
            "tol": self.tol,
            "norm_estimate": self.norm_estimate,
        }


@dataclass
class LanczosState:
    """Read-only view handed to the callback after each block step.

    ``residuals`` are the recurrence's estimates ``||B_j y_last||`` unless the
    explicit residuals were computed at that step (when the estimates met the
    tolerance); ``converged`` follows them.
    """

    iteration: int
    hvps: int
    restarts: int
    basis_size: int
    ritz_values: Tensor
    residuals: Tensor
    converged: Tensor


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance that the operator's arithmetic can reach."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 1e-2


def _check_symmetric(M: Tensor, tol: float) -> None:
    """Raise :class:`NotSymmetricError` if ``M`` (a projection ``Q^T H Q`` or the
    dense ``H``) is further from symmetric than ``tol`` times its largest entry."""
    asym = float((M - M.T).abs().max()) / max(float(M.abs().max()), 1e-300)
    if asym > tol:
        raise NotSymmetricError(
            f"the operator is not symmetric: max |M - M^T| is {asym:.3g} of max |M| "
            f"for M = Q^T H Q (tolerance {tol:g}); its products are wrong (for a "
            "model: a layer whose double backward is silently incomplete, e.g. a "
            "custom autograd.Function marked @once_differentiable; try "
            "method='finite-difference')"
        )


def _random_block(
    n: int, b: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``[n, b]`` standard normal float64, drawn on the CPU for reproducibility."""
    return torch.randn(n, b, generator=generator, dtype=_F64).to(device)


def _next_block(
    W: Tensor,
    basis: Tensor,
    rank_tol: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Factor ``W = Q_next B`` with ``Q_next`` orthonormal and orthogonal to basis.

    ``W [n, b]`` is already orthogonal to ``basis [n, c]``. Directions of ``W``
    below ``rank_tol`` (an invariant subspace was found, or the block is rank
    deficient) are replaced by random ones orthogonal to everything, with zero
    coupling, so the block size stays ``b``.

    Returns:
        ``Q_next [n, b]`` and ``B [b, b]`` (not triangular: an SVD is used).
    """
    n, b = W.shape

    # SVD through the b x b Gram matrix (a tall-skinny SVD or QR costs ~10x more):
    # W^T W = V S^2 V^T, U = W V S^-1. Directions below sqrt(eps) * max(S) are
    # not resolved by the Gram matrix and count as lost (the certificates are
    # explicit residuals, so dropping them costs convergence speed, not accuracy).
    evals, V = torch.linalg.eigh(W.T @ W)
    S = evals.clamp(min=0.0).sqrt().flip(0)
    V = V.flip(1)
    cut = (1e-7 * S[0]).clamp(min=rank_tol)  # on the device: one sync, the rank
    rank = int((S > cut).sum())
    B = torch.zeros(b, b, dtype=_F64, device=W.device)
    U = W @ (V[:, :rank] / S[:rank])
    B[:rank] = S[:rank, None] * V[:, :rank].T

    # Second pass (CholeskyQR2): restore orthonormality, fold the factor into B
    if rank:
        L, info = torch.linalg.cholesky_ex(U.T @ U)
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L, U.T, upper=False).T
            B[:rank] = L.T @ B[:rank]
        else:  # not positive definite in floating point: Householder instead
            U, R = torch.linalg.qr(U)
            B[:rank] = R @ B[:rank]
    if rank == b:
        return U, B

    # Replace the lost directions: random, orthogonal to the basis and to U[:, :rank]
    keep = U
    R = _random_block(n, b - rank, generator, W.device)
    full = torch.cat([basis, keep], dim=1)
    R, _ = _ops.orthogonalize(full, R, 2)
    R, _ = torch.linalg.qr(R)
    R, _ = _ops.orthogonalize(full, R, 1)
    R, _ = torch.linalg.qr(R)
    return torch.cat([keep, R], dim=1), B


def _next_block_lazy(
    W: Tensor, rank_tol: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_next_block` without reading anything back to the host.

    CholeskyQR2 through the ``b x b`` Gram matrix, and a verdict kept on the
    device: False when a factorization failed, the block is (nearly) rank
    deficient (a Cholesky diagonal below ``1e-7`` of the largest or below
    ``rank_tol``), or the result is not orthonormal to ``1e-12``. The caller
    reads the verdicts of several blocks with one sync and, when one is False,
    redoes those blocks with :func:`_next_block` (which replaces lost
    directions).

    Returns:
        ``Q_next [n, b]``, ``B [b, b]`` with ``W = Q_next B``, and ``ok`` (0-dim
        bool on ``W``'s device).
    """
    b = W.shape[1]
    rank_tol = torch.as_tensor(rank_tol, dtype=W.dtype, device=W.device)
    L1, info1 = torch.linalg.cholesky_ex(W.T @ W)
    U = torch.linalg.solve_triangular(L1, W.T, upper=False).T
    L2, info2 = torch.linalg.cholesky_ex(U.T @ U)
    U = torch.linalg.solve_triangular(L2, U.T, upper=False).T
    B = L2.T @ L1.T
    d = L1.diagonal()
    E = U.T @ U - torch.eye(b, dtype=U.dtype, device=U.device)
    ok = (
        (info1 == 0)
        & (info2 == 0)
        & torch.isfinite(B).all()
        & (d.min() > (1e-7 * d.max()).clamp(min=rank_tol))
        & (E.abs().max() <= 1e-12)
    )
    # An unsound block is redone after the next test; until then it must not
    # carry NaN into the operator
    U = torch.where(ok, U, torch.zeros((), dtype=U.dtype, device=U.device))
    return U, B, ok


def _start_block(
    v0: Tensor | None, n: int, b: int, generator, device: torch.device
) -> Tensor:
    """Orthonormal ``[n, b]`` start: the columns of ``v0`` then random ones.

    A ``v0`` of ``b`` columns that is already orthonormal to ``1e-12`` (a
    tracker's prediction) is used as it is: one Gram matrix checks it.
    """
    parts = []
    if v0 is not None:
        parts.append(v0.to(device=device, dtype=_F64))
    have = sum(p.shape[1] for p in parts)
    if have >= b:
        X = parts[0][:, :b]
        G = X.T @ X
        G.diagonal().sub_(1.0)
        if float(G.abs().max()) <= 1e-12:
            return X
    else:
        parts.append(_random_block(n, b - have, generator, device))
        X = torch.cat(parts, dim=1)[:, :b]
    empty = torch.zeros(n, 0, dtype=_F64, device=device)
    scale = float(X.norm()) or 1.0
    Q, _ = _next_block(X, empty, 1e-10 * scale, generator)
    return Q


def _basis_size(k_total: int, b: int, max_basis: int | None = None) -> int:
    """Basis columns ``m`` before a restart: whole blocks, default
    ``max(3 k + 3 b, 8 b, 40)``."""
    m = max_basis if max_basis is not None else max(3 * k_total + 3 * b, 8 * b, 40)
    return -(-m // b) * b


def solves_densely(n: int, k_total: int, b: int, max_basis: int | None = None) -> bool:
    """Whether :func:`solve` builds the dense matrix (``n`` products) instead of
    a Krylov basis for an operator of size ``n``."""
    return n <= _basis_size(k_total, max(1, min(b, n)), max_basis) + b


def _select(theta: Tensor, k_top: int, k_bottom: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k_top`` largest (descending) and ``k_bottom`` smallest."""
    order = torch.argsort(theta)
    top = order.flip(0)[:k_top]
    bottom = order[:k_bottom]
    return top, bottom


def _certify(
    theta: Tensor,
    wanted: Tensor,
    res: Tensor,
    n_top: int,
    hints: tuple[float | None, float | None],
    theta_res: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Error bounds of the wanted Ritz values: residual or Kato-Temple.

    For a unit Ritz vector with residual ``r`` and an eigenvalue ``lambda`` that
    is the only one within ``gap`` of ``theta``, ``|theta - lambda| <= r**2 / gap``
    (Kato 1949, Temple 1952), far below ``r`` once ``r << gap``. The gap of a
    wanted value is its distance to the other wanted values (less their
    residuals) and to the unwanted side: the nearest unwanted Ritz value of this
    basis, moved toward the wanted ones by its residual estimate (an unwanted Ritz
    value of a small basis lies below the eigenvalue it approximates), or the
    caller's hint (an estimate of the next eigenvalue beyond the
    wanted ones, e.g. a tracker's last measurement), whichever is closer. That
    the unwanted side holds no eigenvalue closer than that is the assumption
    every Krylov solver makes about which eigenvalues it has found; the residual
    bound is used where the gap is not larger than ``r``.

    Args:
        theta: ``[c]`` all Ritz values of the basis.
        wanted: ``[w]`` indices into ``theta``; the first ``n_top`` are the top end.
        res: ``[w]`` residual norms of the wanted pairs.
        hints: estimates of the largest unwanted eigenvalue below the top end and
            the smallest above the bottom end (None: unknown).
        theta_res: ``[c]`` residual estimates of all Ritz values (None: zeros).

    Returns:
        ``bounds [w]``, ``gaps [w]`` (0 where unknown) and ``kato [w]`` (bool:
        the Kato-Temple bound is the smaller one).
    """
    w = wanted.numel()
    tw = theta[wanted]
    inf = torch.full((), math.inf, dtype=theta.dtype, device=theta.device)

    # Distances to the other wanted values, less their residuals
    D = (tw[:, None] - tw[None, :]).abs() - res[None, :]
    D.fill_diagonal_(math.inf)
    gaps = D.min(dim=1).values if w > 1 else inf.expand(w).clone()

    # The unwanted side of each end: nearest unwanted Ritz value or the hint
    unwanted = torch.ones(theta.numel(), dtype=torch.bool, device=theta.device)
    unwanted[wanted] = False
    rest = theta[unwanted]
    if theta_res is not None and rest.numel():
        rest_res = theta_res[unwanted]
        rest_hi, rest_lo = rest + rest_res, rest - rest_res
    else:
        rest_hi = rest_lo = rest
    for end, sl in ((0, slice(0, n_top)), (1, slice(n_top, w))):
        if sl.start == sl.stop:
            continue
        edge = []
        if rest.numel():
            edge.append(float(rest_hi.max() if end == 0 else rest_lo.min()))
        if hints[end] is not None and math.isfinite(hints[end]):
            edge.append(float(hints[end]))
        if not edge:
            gaps[sl] = 0.0  # nothing known beyond the wanted values
            continue
        near = max(edge) if end == 0 else min(edge)
        side = tw[sl] - near if end == 0 else near - tw[sl]
        gaps[sl] = torch.minimum(gaps[sl], side)
    gaps = gaps.clamp(min=0.0)
    gaps = torch.where(torch.isfinite(gaps), gaps, torch.zeros_like(gaps))

    # The smaller bound wins; Kato-Temple only where the gap exceeds the residual
    kato = gaps > res
    kt = res.square() / torch.where(kato, gaps, torch.ones_like(gaps))
    bounds = torch.where(kato, torch.minimum(kt, res), res)
    return bounds, gaps, kato & (kt < res)


def _select_neighbours(
    theta: Tensor,
    k_top: int,
    k_bottom: int,
    b: int,
    extend_rtol: float | None,
    extend_max: int,
) -> tuple[Tensor, Tensor]:
    """The wanted indices plus a block of neighbours at each wanted end.

    With ``extend_rtol``, each end grows further while the next Ritz value is
    within ``extend_rtol * max|theta|`` of the last one taken (up to
    ``extend_max`` extra), so that a cluster is never cut at the end of the set.
    """
    r = theta.numel()
    order = torch.argsort(theta)
    scale = float(theta.abs().max()) if r else 0.0

    def grow(seq: Tensor, count: int) -> Tensor:
        count = min(count, r)
        if extend_rtol is not None and count:
            limit = min(r, count + extend_max)
            while (
                count < limit
                and abs(float(theta[seq[count]] - theta[seq[count - 1]]))
                <= extend_rtol * scale
            ):
                count += 1
        return seq[:count]

    top = grow(order.flip(0), k_top + b) if k_top else order[:0]
    bottom = grow(order, k_bottom + b) if k_bottom else order[:0]
    return top, bottom


def _dense_solve(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    k_top: int,
    k_bottom: int,
    b: int,
    device: torch.device,
    extend_rtol: float | None,
    extend_max: int,
    symmetry_tol: float | None,
) -> tuple:
    """Small operators: build ``H`` column by column and solve exactly."""
    step = max(b, 64)
    cols = []
    for j in range(0, n, step):
        E = torch.zeros(n, min(step, n - j), dtype=_F64, device=device)
        E[j : j + E.shape[1]].copy_(torch.eye(E.shape[1], dtype=_F64, device=device))
        cols.append(matmat(E).to(_F64))
    H = torch.cat(cols, dim=1)
    if symmetry_tol is not None:
        _check_symmetric(H, symmetry_tol)
    theta, Y = torch.linalg.eigh((H + H.T) / 2)
    top, bottom = _select_neighbours(theta, k_top, k_bottom, b, extend_rtol, extend_max)
    norm_est = float(theta.abs().max()) if n else 0.0
    return H, theta, Y, top, bottom, norm_est


def _form_pairs(
    Q: Tensor,
    HQ: Tensor,
    cols: int,
    theta: Tensor,
    Y: Tensor,
    k_top: int,
    k_bottom: int,
    b: int,
    extend_rtol: float | None,
    extend_max: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The returned Ritz pairs (wanted and neighbours) and their explicit
    residuals ``||H u - theta u||``.

    Returns:
        ``top``, ``bottom`` (indices into ``theta``), ``idx [s]`` (the formed
        ones), ``pos [c]`` (an index's column among the formed ones, -1 if not
        formed), ``U [n, s]``, ``HU [n, s]`` and ``res [s]``.
    """
    top, bottom = _select_neighbours(theta, k_top, k_bottom, b, extend_rtol, extend_max)
    # Columns in the order the results list them (top descending, then bottom
    # ascending), so that each result's vectors are a slice, not a gather
    idx = torch.cat([top, bottom[~torch.isin(bottom, top)]])
    pos = torch.full((theta.numel(),), -1, dtype=torch.long, device=theta.device)
    pos[idx] = torch.arange(idx.numel(), device=theta.device)
    Y_sel = Y[:, idx]
    U = Q[:, :cols] @ Y_sel
    HU = HQ[:, :cols] @ Y_sel
    res = torch.linalg.vector_norm(HU - U * theta[idx], dim=0)
    return top, bottom, idx, pos, U, HU, res


def solve(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    k_top: int,
    k_bottom: int = 0,
    *,
    block_size: int | None = None,
    max_basis: int | None = None,
    tol: float = 1e-8,
    atol: float = 0.0,
    max_hvps: int | None = None,
    min_iterations: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[LanczosState], bool | None] | None = None,
    extend_rtol: float | None = None,
    extend_max: int = 32,
    symmetry_tol: float | None = 1e-2,
    gap_hints: tuple[float | None, float | None] = (None, None),
    kato_temple: bool = True,
    refine: float | None = None,
    check_every: int | None = None,
) -> tuple[EigResult, EigResult | None]:
    """Block Lanczos for both ends of the spectrum; the engine behind :func:`lanczos`.

    Args:
        matmat: ``V [n, b] float64 -> H V [n, b]`` (any float dtype; cast to
            float64).
        n: operator size.
        k_top, k_bottom: wanted pairs at the top (largest algebraic) and bottom
            (smallest algebraic) ends.
        block_size: ``b``; default ``k_top + k_bottom + 1`` (at most ``n``).
        max_basis: ``m``, basis columns before a thick restart; default
            ``max(3 (k_top + k_bottom) + 3 b, 8 b, 40)``.
        tol: relative residual tolerance (scale: the largest ``|theta|`` seen).
        atol: absolute residual tolerance added to ``tol * scale``.
        max_hvps: budget of operator applications, in vectors.
        min_iterations: block steps before convergence may be declared;
            default: enough to fill the basis once (``m / b``).
        v0: ``[n]`` or ``[n, j]`` start vectors (a warm start); random columns
            fill the block. ``j > b`` raises the block size to ``j``.
        generator: private RNG for random start and replacement vectors.
        device: where the basis lives (default: ``v0``'s device, else CPU).
        callback: called with a :class:`LanczosState` after each step; returning
            True stops the solve (status ``"stopped"``).
        symmetry_tol: largest relative asymmetry of ``Q_1^T H Q_1`` (checked on
            the first block) accepted; rounding in float32 products is ~1e-6.
            Above it :class:`NotSymmetricError` is raised. None skips the check
            (a caller that has checked this operator before).
        extend_rtol, extend_max: grow the returned neighbour set (``ritz_*``) to
            the end of a cluster of Ritz values closer than
            ``extend_rtol * max|theta|``, by at most ``extend_max`` pairs.
        gap_hints: estimates of the largest eigenvalue below the wanted top end
            and the smallest above the wanted bottom end, used (with this basis's
            own unwanted Ritz values) as the gap of the Kato-Temple bound; a
            tracker passes its last measurement. None: the basis alone.
        kato_temple: accept the Kato-Temple bound ``r**2 / gap`` (see
            :func:`_certify`); False: residual bounds only.
        refine: when the solve needs more than ``min_iterations`` steps, go on
            until the bounds are below ``refine * tol`` (within the budget): a
            tracker's next warm start then begins well inside the tolerance.
            The result is converged by ``tol`` either way.
        check_every: test convergence every this many blocks after
            ``min_iterations`` (default 1). The test reads values back to the
            host; between tests the solver's own steps read nothing back (the
            next block is factored by CholeskyQR2 with its soundness kept on
            the device and read at the test; an unsound one sends the solve
            back to the first untested block, which is redone with the
            synced factorization). On a GPU a larger value keeps the device
            queue full at the price of up to ``check_every - 1`` blocks past
            convergence. Restarts, the last block of the budget and a
            ``callback`` always see a test. The operator's own checks are its
            business (:class:`curvx.HessianOperator` reads back one
            finiteness flag per product).

    Returns:
        ``(top, bottom)`` results; ``bottom`` is None when ``k_bottom == 0``. Both
        share the counters of the one solve.
    """
    k_total = k_top + k_bottom
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if k_top < 0 or k_bottom < 0 or k_total < 1:
        raise ValueError(
            f"need at least one wanted pair; got k_top={k_top}, k_bottom={k_bottom}"
        )
    if k_total > n:
        raise ValueError(
            f"asked for {k_total} eigenpairs but the operator has only n = {n} "
            "dimensions (the number of trainable parameters)"
        )
    if not (tol >= 0 and math.isfinite(tol)) or not (atol >= 0):
        raise ValueError(f"tol and atol must be finite and >= 0; got {tol}, {atol}")
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != n:
            raise ValueError(
                f"v0 must have shape [n] or [n, j] with n = {n}; got "
                f"{list(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__}"
            )
        if v0.dim() == 1:
            v0 = v0[:, None]
        if not torch.isfinite(v0).all():
            raise ValueError("v0 holds NaN or inf")
        if device is None:
            device = v0.device
    device = torch.device(device if device is not None else "cpu")
    if block_size is not None:
        block_size = as_int(block_size, "block_size")
    if max_hvps is not None:
        max_hvps = as_int(max_hvps, "max_hvps")
    if min_iterations is not None:
        min_iterations = as_int(min_iterations, "min_iterations")
    b = block_size if block_size is not None else k_total + 1
    if v0 is not None:
        b = max(b, v0.shape[1])
    b = max(1, min(b, n))
    m = _basis_size(k_total, b, max_basis)
    if max_basis is not None and m < k_total + 2 * b:
        raise ValueError(
            f"max_basis={max_basis} is too small for {k_total} wanted pairs with "
            f"block size {b}: need at least {k_total + 2 * b}"
        )
    if max_hvps is None:
        max_hvps = max(1000, 40 * k_total * b)
    dense = solves_densely(n, k_total, b, max_basis)
    if max_hvps < (n if dense else b):
        raise ValueError(
            f"max_hvps={max_hvps} cannot pay for one step: "
            + (
                f"the operator is small (n = {n}) and is solved densely with n products"
                if dense
                else f"one block step costs block_size = {b} products"
            )
        )
    if min_iterations is None:
        min_iterations = m // b
    if symmetry_tol is not None:
        try:
            ok = math.isfinite(float(symmetry_tol)) and float(symmetry_tol) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(symmetry_tol, bool):
            raise ValueError(
                f"symmetry_tol must be a finite number >= 0 or None; got "
                f"{symmetry_tol!r}"
            )
        symmetry_tol = float(symmetry_tol)
    check_every = 1 if check_every is None else as_int(check_every, "check_every")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1; got {check_every}")

    def apply(V: Tensor) -> Tensor:
        HV = matmat(V)
        if not isinstance(HV, Tensor) or HV.shape != V.shape:
            raise ValueError(
                f"matmat returned {getattr(HV, 'shape', type(HV).__name__)} for a "
                f"block of shape {list(V.shape)}"
            )
        return HV.to(device=device, dtype=_F64)

    # Small operators: the dense matrix is cheaper than a Krylov basis
    if dense:
        H, theta, Y, top, bottom, norm_est = _dense_solve(
            apply, n, k_top, k_bottom, b, device, extend_rtol, extend_max, symmetry_tol
        )
        U_all = Y
        HU_all = H @ Y
        res = torch.linalg.vector_norm(HU_all - U_all * theta, dim=0)
        return _finish(
            theta,
            torch.arange(n, device=device),
            U_all,
            res,
            top,
            bottom,
            k_top,
            k_bottom,
            tol,
            atol,
            norm_est,
            iterations=1,
            restarts=0,
            hvps=n,
            status="dense",
            HU_all=HU_all,
            hints=gap_hints if kato_temple else None,
        )

    # Storage: the basis Q and the products H Q, m columns plus one block
    # (allocated for a few blocks and grown on demand: a warm start usually
    # stops after one or two, and a full [n, m] float64 pair costs more to
    # allocate and touch than those steps)
    capacity = min(m + b, 4 * b)
    Q = torch.empty(n, capacity, dtype=_F64, device=device)
    HQ = torch.empty_like(Q)

    def grow(needed: int) -> None:
        nonlocal Q, HQ, capacity
        if needed <= capacity:
            return
        capacity = min(m + b, max(needed, 2 * capacity))
        Q2 = torch.empty(n, capacity, dtype=_F64, device=device)
        HQ2 = torch.empty_like(Q2)
        Q2[:, :cols].copy_(Q[:, :cols])
        HQ2[:, :cols].copy_(HQ[:, :cols])
        Q, HQ = Q2, HQ2

    cols = 0
    head = torch.zeros(0, 0, dtype=_F64, device=device)
    coupling = torch.zeros(b, 0, dtype=_F64, device=device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    Q_cur = _start_block(v0, n, b, generator, device)
    Q[:, :b] = Q_cur
    Q_cur = Q[:, :b]
    Q_prev, B_prev = Q[:, :0], coupling
    iterations = restarts = hvps = 0
    norm_est = 0.0
    best_worst, stalls = math.inf, 0
    status = "max_hvps"
    # Blocks between convergence checks factor their next block lazily (no
    # host sync); `saved` is the state before the first of them, `pending` the
    # device-side verdict of all of them, read at the next check
    lazy = check_every > 1
    saved: tuple | None = None
    pending: Tensor | None = None
    prev_cols = (0, 0)  # Q_prev's columns in Q
    # ||H|| scale between tests, kept on the device: the largest entry of the
    # blocks of T so far (Rayleigh-Ritz gives norm_est only at tests)
    scale = torch.zeros((), dtype=_F64, device=device)

    def is_check(hvps: int, cols: int, iterations: int) -> bool:
        """Whether this block ends with Rayleigh-Ritz and a convergence test."""
        return (
            check_every == 1
            or callback is not None
            or hvps + b > max_hvps
            or cols + b > m
            or (
                iterations >= min_iterations
                and (iterations - min_iterations) % check_every == 0
            )
        )

    while True:
        # 1. Expand: W = H Q_j, kept for explicit residuals
        W = apply(Q_cur)
        hvps += b
        iterations += 1
        HQ[:, cols : cols + b] = W
        cols += b

        # 2. Three-term recurrence: W <- W - Q_j A_j - Q_{j-1} B_{j-1}^T
        #    (A_j is symmetrized inside; once, on the first block, check that
        #    Q_1^T H Q_1 is symmetric: if not, the products themselves are wrong)
        if iterations == 1 and symmetry_tol is not None:
            _check_symmetric(Q_cur.T @ W, symmetry_tol)
        W, A = _ops.lanczos_step(W, Q_cur, Q_prev, B_prev)

        alphas.append(A)
        scale = torch.maximum(scale, A.abs().max())

        # Between convergence checks the loop runs without reading anything
        # back from the device (no host sync): Rayleigh-Ritz and the test come
        # every check_every blocks, and always before a restart, on the last
        # block the budget pays for, and when a callback watches
        check = is_check(hvps, cols, iterations)
        if check and pending is not None:
            # The one sync of a run of lazy blocks. A failed factorization
            # (rare: a breakdown) sends the solve back to the state before
            # the run, whose products are lost, and on without lazy blocks
            sound = bool(pending)
            pending = None
            if not sound:
                c0, n_alpha, n_beta, prev_cols, B_prev, W = saved
                cols, alphas, betas = c0, alphas[:n_alpha], betas[:n_beta]
                Q_cur, Q_prev = Q[:, c0 - b : c0], Q[:, prev_cols[0] : prev_cols[1]]
                lazy = False
                logger.debug("lazy block factorization failed: redone with syncs")
                check = is_check(hvps, cols, iterations)
            saved = None
        if not check:
            W, _ = _ops.orthogonalize(Q[:, :cols], W, 2)
            if lazy:
                rank_tol = 1e-12 * scale.clamp(min=max(norm_est, 1e-300))
                if saved is None:
                    saved = (
                        cols,
                        len(alphas),
                        len(betas),
                        prev_cols,
                        B_prev,
                        W.clone(),
                    )
                Q_next, B, ok = _next_block_lazy(W, rank_tol)
                pending = ok if pending is None else pending & ok
            else:
                rank_tol = 1e-12 * max(norm_est, float(scale), 1e-300)
                Q_next, B = _next_block(W, Q[:, :cols], rank_tol, generator)
            scale = torch.maximum(scale, B.abs().max())
            betas.append(B)
            Q_prev, B_prev, prev_cols = Q_cur, B, (cols - b, cols)
            grow(cols + b)
            Q[:, cols : cols + b] = Q_next
            Q_cur = Q[:, cols : cols + b]
            continue

        # 3. Rayleigh-Ritz on T = Q^T H Q (block tridiagonal with an arrow head)
        T = _ops.assemble_tridiag(
            head,
            coupling,
            torch.stack(alphas),
            torch.stack(betas)
            if betas
            else torch.zeros(0, b, b, dtype=_F64, device=device),
        )
        theta, Y = torch.linalg.eigh(T)
        norm_est = max(norm_est, float(theta.abs().max()))

        # 4. Convergence: the recurrence's residual estimate ||W Y_last|| (W is
        #    the residual block, = Q_{j+1} B_j; from its b x b Gram matrix) first,
        #    then the explicit residual ||H u - theta u|| (from the stored H Q),
        #    which alone decides. The explicit pairs are formed for the returned
        #    set (wanted and neighbours), so a converged step forms them once.
        enough = T.shape[0] >= k_total
        top, bottom = _select(theta, k_top, k_bottom)
        wanted = torch.cat([top, bottom])
        thresh = tol * norm_est + atol
        if refine is not None and iterations > min_iterations:
            thresh *= refine
        hints = gap_hints if kato_temple else (None, None)
        Y_last = Y[-b:]
        theta_res = ((W.T @ W) @ Y_last * Y_last).sum(0).clamp(min=0.0).sqrt()
        res = theta_res[wanted]
        bound = (
            _certify(theta, wanted, res, top.numel(), hints, theta_res)[0]
            if kato_temple
            else res
        )
        conv = bound <= thresh
        done = False
        formed = None
        if enough and iterations >= min_iterations and bool(conv.all()):
            formed = _form_pairs(
                Q, HQ, cols, theta, Y, k_top, k_bottom, b, extend_rtol, extend_max
            )
            pos, U_sel, HU_sel, res_sel = formed[3:]
            res = res_sel[pos[wanted]]
            bound = (
                _certify(theta, wanted, res, top.numel(), hints, theta_res)[0]
                if kato_temple
                else res
            )
            conv = bound <= thresh
            done = bool(conv.all())
        if callback is not None:
            state = LanczosState(
                iteration=iterations,
                hvps=hvps,
                restarts=restarts,
                basis_size=cols,
                ritz_values=theta[wanted].clone(),
                residuals=res.clone(),
                converged=conv.clone(),
            )
            if callback(state):
                status = "stopped"
                break
        if done:
            status = "converged"
            break
        if hvps + b > max_hvps:
            status = "max_hvps"
            break

        # 5. Full reorthogonalization against the whole basis (two CGS passes),
        #    only now that the solve goes on
        W, _ = _ops.orthogonalize(Q[:, :cols], W, 2)

        # 6. Next block and its coupling: W = Q_{j+1} B_j
        Q_next, B = _next_block(
            W, Q[:, :cols], 1e-12 * max(norm_est, 1e-300), generator
        )

        if cols + b > m:
            # 7a. Thick restart: keep the wanted Ritz vectors and a block of guards
            unconv = bound[~conv] / max(thresh, 1e-300)
            worst = float(unconv.max()) if unconv.numel() else 0.0
            if worst < 0.9 * best_worst:
                best_worst, stalls = worst, 0
            else:
                stalls += 1
                if stalls >= 5:
                    status = "stagnated"
                    break
            extra = max(0, min(b, m - 2 * b - k_total))
            top_k, bottom_k = _select(
                theta,
                k_top + (extra if k_top else 0),
                k_bottom + (extra if k_bottom else 0),
            )
            keep = torch.unique(torch.cat([top_k, bottom_k]))
            r = keep.numel()
            U_keep = Q[:, :cols] @ Y[:, keep]
            HU_keep = HQ[:, :cols] @ Y[:, keep]
            Q[:, :r] = U_keep
            HQ[:, :r] = HU_keep
            cols = r
            head = torch.diag(theta[keep])
            coupling = B @ Y[-b:, keep]
            alphas, betas = [], []
            Q_prev, B_prev, prev_cols = Q[:, :r], coupling, (0, r)
            restarts += 1
            logger.debug(
                "restart %d after %d HVPs, worst residual/threshold %.3g",
                restarts,
                hvps,
                worst,
            )
        else:
            # 7b. Extend: the coupling B_j becomes the next step's B_{j-1}
            betas.append(B)
            Q_prev, B_prev, prev_cols = Q_cur, B, (cols - b, cols)
        grow(cols + b)
        Q[:, cols : cols + b] = Q_next
        Q_cur = Q[:, cols : cols + b]

    # Final Ritz pairs: the wanted ones and a block of neighbours at each end
    # (only their columns are formed: pos maps a Ritz index to its column)
    if formed is None:
        formed = _form_pairs(
            Q, HQ, cols, theta, Y, k_top, k_bottom, b, extend_rtol, extend_max
        )
    top, bottom, idx, pos, U_sel, HU_sel, res_sel = formed
    return _finish(
        theta,
        pos,
        U_sel,
        res_sel,
        top,
        bottom,
        k_top,
        k_bottom,
        tol,
        atol,
        norm_est,
        iterations=iterations,
        restarts=restarts,
        hvps=hvps,
        status=status,
        HU_all=HU_sel,
        hints=gap_hints if kato_temple else None,
        theta_res=theta_res.index_copy(0, idx, res_sel),
    )


def _as_run(cols: Tensor) -> Tensor | slice:
    """``cols`` as a slice when it is a run ``j, j+1, ...`` (indexing with it
    then gives views instead of copies)."""
    r = cols.numel()
    if r == 0:
        return cols
    j = int(cols[0])
    if bool((cols == torch.arange(j, j + r, device=cols.device)).all()):
        return slice(j, j + r)
    return cols


def _finish(
    theta,
    pos,
    U_all,
    res_all,
    top,
    bottom,
    k_top,
    k_bottom,
    tol,
    atol,
    norm_est,
    *,
    iterations,
    restarts,
    hvps,
    status,
    HU_all,
    hints,
    theta_res=None,
) -> tuple[EigResult, EigResult | None]:
    """Package the top and bottom ends as results, with their bounds.

    ``U_all``, ``HU_all`` and ``res_all`` hold the formed Ritz pairs; ``pos`` maps
    an index into ``theta`` to its column there.
    """
    thresh = tol * norm_est + atol
    wanted = torch.cat([top[:k_top], bottom[:k_bottom]])
    res_w = res_all[pos[wanted]]
    if hints is None:
        bounds_w, gaps_w = res_w, torch.zeros_like(res_w)
        kato_w = torch.zeros_like(res_w, dtype=torch.bool)
    else:
        bounds_w, gaps_w, kato_w = _certify(
            theta, wanted, res_w, k_top, hints, theta_res
        )

    def make(idx: Tensor, k: int, which: str, ext_top: int, sl: slice) -> EigResult:
        want = idx[:k]
        pw, pi = _as_run(pos[want]), _as_run(pos[idx])
        bound, gap, kato = bounds_w[sl], gaps_w[sl], kato_w[sl]
        conv = bound <= thresh
        if bool(conv.all()):
            final = "converged"
        elif status in ("dense", "converged"):
            final = "not_converged"
        else:
            final = status
        return EigResult(
            eigenvalues=theta[want].clone(),
            eigenvectors=U_all[:, pw],
            residuals=res_all[pw],
            bounds=bound.clone(),
            certificate=[
                ("kato-temple" if kt else "residual") if c else "none"
                for c, kt in zip(conv.tolist(), kato.tolist())
            ],
            gaps=gap.clone(),
            converged=conv,
            iterations=iterations,
            restarts=restarts,
            hvps=hvps,
            status=final,
            which=which,
            tol=tol,
            norm_estimate=norm_est,
            ritz_values=theta[idx].clone(),
            ritz_vectors=U_all[:, pi],
            ritz_residuals=res_all[pi],
            ritz_products=HU_all[:, pi],
            top_count=ext_top,
        )

    top_res = make(top, k_top, "LA", top.numel(), slice(0, k_top)) if k_top else None
    bottom_res = (
        make(bottom, k_bottom, "SA", 0, slice(k_top, k_top + k_bottom))
        if k_bottom
        else None
    )
    if top_res is None:
        return bottom_res, None
    return top_res, bottom_res


def _as_matmat(A: Any) -> tuple[Callable[[Tensor], Tensor], int, torch.device]:
    """A dense symmetric matrix, an object with ``matmat`` and ``n``, or a callable."""
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"a dense operator must be square [n, n]; got {list(A.shape)}"
            )
        return (lambda V: A.to(V.dtype) @ V), A.shape[0], A.device
    if hasattr(A, "matmat") and hasattr(A, "n"):
        return A.matmat, int(A.n), getattr(A, "device", torch.device("cpu"))
    raise TypeError(
        "operator must be a square tensor or have .matmat and .n (pass a callable "
        f"with n=...); got {type(A).__name__}"
    )


def lanczos(
    operator: Any,
    k: int = 1,
    which: str = "LA",
    *,
    n: int | None = None,
    tol: float = 1e-8,
    **kwargs: Any,
) -> EigResult:
    """``k`` eigenpairs of a symmetric operator by block Lanczos.

    Args:
        operator: a dense symmetric ``[n, n]`` tensor, an object with ``matmat``
            and ``n`` (e.g. :class:`curvx.operators.HessianOperator`), or a
            callable ``[n, b] -> [n, b]`` together with ``n``.
        k: wanted pairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"BE"``
            both ends (``ceil(k/2)`` largest and ``floor(k/2)`` smallest).
        n: operator size when ``operator`` is a plain callable.
        tol: relative residual tolerance.
        **kwargs: passed to :func:`solve` (``block_size``, ``max_basis``,
            ``max_hvps``, ``v0``, ``generator``, ``callback``, ...).

    Returns:
        An :class:`EigResult`.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
        >>> lanczos(A, k=1, which="LA").eigenvalues
        tensor([3.], dtype=torch.float64)
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}")
    k = as_int(k, "k")
    if (
        callable(operator)
        and not isinstance(operator, Tensor)
        and not hasattr(operator, "matmat")
    ):
        if n is None:
            raise ValueError("pass n= with a plain callable operator")
        matmat, size, device = operator, n, kwargs.pop("device", None)
    else:
        matmat, size, device = _as_matmat(operator)
        device = kwargs.pop("device", device)
    if which == "LA":
        k_top, k_bottom = k, 0
    elif which == "SA":
        k_top, k_bottom = 0, k
    else:
        k_top, k_bottom = (k + 1) // 2, k // 2
    top, bottom = solve(matmat, size, k_top, k_bottom, tol=tol, device=device, **kwargs)
    if which != "BE" or bottom is None:
        return top
    # Both ends: largest ceil(k/2) then smallest floor(k/2), all descending
    flip = torch.arange(bottom.eigenvalues.numel() - 1, -1, -1)
    return EigResult(
        eigenvalues=torch.cat([top.eigenvalues, bottom.eigenvalues[flip]]),
        eigenvectors=torch.cat([top.eigenvectors, bottom.eigenvectors[:, flip]], 1),
        residuals=torch.cat([top.residuals, bottom.residuals[flip]]),
        bounds=torch.cat([top.bounds, bottom.bounds[flip]]),
        certificate=top.certificate + [bottom.certificate[i] for i in flip.tolist()],
        gaps=torch.cat([top.gaps, bottom.gaps[flip]]),
        converged=torch.cat([top.converged, bottom.converged[flip]]),
        iterations=top.iterations,
        restarts=top.restarts,
        hvps=top.hvps,
        status=top.status if top.status != "converged" else bottom.status,
        which="BE",
        tol=tol,
        norm_estimate=top.norm_estimate,
        ritz_values=torch.cat([top.ritz_values, bottom.ritz_values]),
        ritz_vectors=torch.cat([top.ritz_vectors, bottom.ritz_vectors], 1),
        ritz_residuals=torch.cat([top.ritz_residuals, bottom.ritz_residuals]),
        ritz_products=torch.cat([top.ritz_products, bottom.ritz_products], 1),
        top_count=top.top_count,
    )
