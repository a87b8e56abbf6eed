"""Per-step tracking of the Hessian's extreme eigenpairs during training.

A :class:`Tracker` owns the warm-start state (the last Ritz vectors and what is
known of the gap below them), a private ``torch.Generator`` and one
:class:`~curvx.operators.HessianOperator`. Each :meth:`Tracker.step` recomputes the
eigenpairs at the model's current parameters, starting from the previous ones, and
returns a :class:`TrackRecord`.

The cost model (Wang & Roberts 2024 track every step; peers.md for what the usual
tools spend):

1. *Warm start.* The start block is the previous step's Ritz vectors, moved one
   shifted power step along ``H`` with the products the last solve already paid
   for: ``U <- orth(H U - sigma U)`` (no extra HVPs). Usually one block of ``k``
   products then certifies every pair.
2. *Cheap certificates.* A pair is accepted when ``|theta - lambda|`` is below the
   tolerance by the residual bound or the Kato-Temple bound ``||r||^2 / gap``
   (:func:`curvx.lanczos._certify`). The gap below the k-th value is the
   tracker's estimate of ``lambda_{k+1}``: measured by guard columns every
   ``guard_every`` evaluations (and by every cold solve), widened by the drift of
   ``theta_k`` since.
3. *Expansion, then fallback.* Uncertified pairs extend the Krylov space block by
   block (block Lanczos with thick restart) up to ``max_hvps`` products; past
   that budget, or when the warm answer has lost its start subspace, a cold solve
   runs and the record says so (``fallback``).
4. *Fused step.* ``step(backward=True)`` also writes the gradient into ``.grad``
   from the same forward and first backward whose graph serves the HVPs, so a
   training loop does not pay for a second pass.
5. *Between certified steps* (``certify_every > 1``): the secant of consecutive
   gradients, ``g_t - g_{t-1} = H s + O(|s|^2)`` along the step ``s``, gives an
   uncertified sharpness estimate for the price of the gradient alone.

Example:
    >>> import torch, curvx
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 2))
    >>> X, y = torch.randn(64, 4), torch.randn(64, 2)
    >>> loss_fn = torch.nn.functional.mse_loss
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> tracker = curvx.track(model, loss_fn, (X, y), k=2, optimizer=opt)
    >>> for t in range(3):
    ...     opt.zero_grad()
    ...     rec = tracker.step(step=t, backward=True)  # fills .grad too
    ...     opt.step()
    >>> rec.status, rec.threshold
    ('ok', 20.0)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvx import rotation
from curvx._validate import as_bool, as_float, as_int
from curvx.lanczos import EigResult, _as_run, default_tol, solve, solves_densely
from curvx.operators import HessianOperator, NonFiniteError, ParametersChangedError

__all__ = ["Tracker", "TrackRecord", "stability_threshold", "track"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become None, tensors become lists."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def stability_threshold(
    optimizer: torch.optim.Optimizer | None, lr: float | None
) -> tuple[float | None, str, bool]:
    """The sharpness at which the optimizer's quadratic model turns unstable.

    Returns ``(threshold, rule, preconditioned)``: ``2 / lr`` for gradient descent,
    ``2 (1 + beta) / lr`` for heavy-ball momentum, ``(2 + 2 beta) / ((1 + 2 beta)
    lr)`` for Nesterov momentum, and for Adam/AdamW ``(2 + 2 beta1) / ((1 - beta1)
    lr)`` (``38 / lr`` at ``beta1 = 0.9``), which bounds the *preconditioned*
    sharpness (Cohen et al. 2021, 2022). ``lr`` defaults to the optimizer's first
    parameter group's.
    """
    group = optimizer.param_groups[0] if optimizer is not None else {}
    if lr is None:
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            lr = float(lr)
    if not lr:
        return None, "2/lr", False
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        b1 = float(group["betas"][0])
        return (2 + 2 * b1) / ((1 - b1) * lr), f"(2+2b1)/((1-b1)lr), b1={b1:g}", True
    beta = float(group.get("momentum", 0.0) or 0.0)
    if beta and group.get("nesterov", False):
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr), f"nesterov b={beta:g}", False
    if beta:
        return 2 * (1 + beta) / lr, f"2(1+b)/lr, b={beta:g}", False
    return 2.0 / lr, "2/lr", False


@dataclass
class TrackRecord:
    """One tracked evaluation.

    Attributes:
        step, lr: as passed to :meth:`Tracker.step` (``lr`` from the optimizer
            when it was given and ``lr`` was not).
        loss: the mean loss the tracker evaluated (the operator's own forward).
        certified: whether this evaluation ran a certified solve (False on the
            steps between ``certify_every``; then only the estimate is filled).
        sharpness: the largest algebraic eigenvalue (``eigenvalues[0]``); of the
            preconditioned Hessian when ``preconditioned``.
        eigenvalues: top-k Ritz values, descending.
        residuals: their ``||H u - theta u||``.
        bounds: certified bounds on ``|theta - lambda|`` (residual or Kato-Temple).
        certificates: per value, the bound that certified it: ``"residual"``,
            ``"kato-temple"`` or ``"none"``.
        gaps: the gap each Kato-Temple bound used (0: none known);
            ``residual / gap`` bounds the eigenvector's angle.
        converged: per value, ``bound <= tol * ||H||_est``.
        bottom_eigenvalues, bottom_residuals, bottom_bounds, bottom_converged: the
            ``k_bottom`` smallest algebraic eigenpairs (ascending), when tracked.
        lambda_min, lambda_min_residual, lambda_min_converged: the first of those.
        sharpness_estimate, estimate_method: the secant estimate from consecutive
            gradients (``"secant-eigvec"``: ``u.y / u.s`` along the last certified
            top eigenvector ``u``; ``"secant-step"``: ``s.y / s.s``). Uncertified:
            ``y = H s + O(|s|^2)``. Recorded when ``certify_every > 1`` (on every
            step then); with every step certified it is not computed.
        rotation_top1: ``|cos|`` between the previous top eigenvector and its
            match by overlap among this step's top-k (cluster-aware; None on the
            first evaluation): an eigenvalue crossing is not a rotation.
        top1_cosine: ``|cos|`` between the previous and the current top
            eigenvector as ordered (cluster-aware), the crossing included.
        crossings: ``[i_prev, j_new]`` pairs that changed places (eigenvalue
            crossings; clusters excluded).
        subspace_similarity: cos of the rms principal angle between consecutive
            top-k subspaces (None on the first evaluation).
        max_principal_angle: largest principal angle (radians) between them.
        reference_similarity, reference_step: subspace similarity to the
            reference (the first evaluation, or the one pinned with
            :meth:`Tracker.pin_reference`) and that evaluation's step.
        matching: ``[i_prev, j_new, overlap]``: top-k vectors matched by overlap
            (inside a cluster, the overlap of the cluster subspaces).
        grad_norm: norm of the gradient at this point (of the preconditioned
            coordinates ``P^-1/2 g`` when ``preconditioned``).
        grad_projection: ``<u_i, g> / ||g||`` for the top-k eigenvectors.
        lr_lambda_over_2: ``lr * theta_i / 2``; 1 is gradient descent's limit.
        threshold, threshold_rule: the optimizer's stability threshold and its
            formula (:func:`stability_threshold`).
        crossed: ``"up"`` / ``"down"`` when the sharpness crossed the threshold
            since the previous certified evaluation, else None.
        preconditioned: the eigenpairs are those of ``P^-1/2 H P^-1/2`` with
            Adam's preconditioner ``P`` (read from the optimizer's state).
        hvps: Hessian-vector products (vectors) spent on this evaluation.
        iterations, restarts: block Lanczos steps and thick restarts.
        track_seconds: wall time of this evaluation.
        status: ``"ok"``, ``"unconverged"`` (some pair missed the tolerance),
            ``"estimate"`` (an uncertified step) or ``"nonfinite"`` (NaN/inf loss
            or products: no eigenvalues; see ``message``). Other errors (a bug in
            the model, say) are raised.
        solver_status: the solver's own status.
        method: the HVP path used.
        warm_start: whether the solve started from the previous vectors.
        fallback: why a cold solve replaced the warm one (``"budget"``: the warm
            solve ran out of ``max_hvps``; ``"lost-subspace"``: its answer kept
            too little of the start block), else None.
        guard_refresh: whether this solve carried guard columns (re-measuring
            the gap below the k-th value).
        message: detail for non-ok statuses.
    """

    step: int | None
    lr: float | None
    loss: float | None
    sharpness: float | None
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    certified: bool = True
    bounds: list[float] = field(default_factory=list)
    certificates: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    bottom_eigenvalues: list[float] = field(default_factory=list)
    bottom_residuals: list[float] = field(default_factory=list)
    bottom_bounds: list[float] = field(default_factory=list)
    bottom_converged: list[bool] = field(default_factory=list)
    lambda_min: float | None = None
    lambda_min_residual: float | None = None
    lambda_min_converged: bool | None = None
    sharpness_estimate: float | None = None
    estimate_method: str | None = None
    rotation_top1: float | None = None
    top1_cosine: float | None = None
    crossings: list[list[int]] = field(default_factory=list)
    subspace_similarity: float | None = None
    max_principal_angle: float | None = None
    reference_similarity: float | None = None
    reference_step: int | None = None
    matching: list[list[float]] = field(default_factory=list)
    grad_norm: float | None = None
    grad_projection: list[float] = field(default_factory=list)
    lr_lambda_over_2: list[float] = field(default_factory=list)
    threshold: float | None = None
    threshold_rule: str | None = None
    crossed: str | None = None
    preconditioned: bool = False
    hvps: int = 0
    iterations: int = 0
    restarts: int = 0
    track_seconds: float = 0.0
    status: str = "ok"
    solver_status: str | None = None
    method: str | None = None
    warm_start: bool = False
    fallback: str | None = None
    guard_refresh: bool = False
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        return _clean(asdict(self))


class _Preconditioned:
    """``P^-1/2 H P^-1/2`` for a diagonal ``P`` given as ``d = P^-1/2`` ``[n]``."""

    def __init__(self, op: HessianOperator, d: Tensor) -> None:
        self.op, self.d = op, d.to(_F64)[:, None]

    def __call__(self, V: Tensor) -> Tensor:
        return self.d * self.op.matmat(self.d * V)


class Tracker:
    """Warm-started tracking of the top-k (and optionally the bottom) Hessian
    eigenpairs, certified at every step at about the cost of one HVP block.

    Args:
        model, loss_fn, data, chunk_size, method, mode: see
            :class:`curvx.operators.HessianOperator` (``mode`` is the
            BatchNorm/dropout policy).
        k: top eigenpairs to track.
        k_bottom: smallest algebraic eigenpairs to track in the same solve.
        lambda_min: shorthand for ``k_bottom=1``.
        tol: relative accuracy of the eigenvalues: a pair is converged when its
            bound on ``|theta - lambda|`` is at most ``tol * ||H||_est`` (default
            from the parameters' dtype).
        seed: seed of the tracker's private generator (random guard vectors,
            dropout masks in ``mode="train"``).
        guard: guard columns added to the block on refresh and cold solves, so
            that a cluster or an eigenvalue crossing at the k-th value is seen.
        guard_every: a warm solve carries the guard columns every this many
            evaluations (0: only when no gap is known), re-measuring the gap the
            Kato-Temple bound relies on.
        max_hvps: HVP budget (vectors) of a warm solve; past it a cold solve
            runs (``fallback="budget"``). Default ``12 * (k + k_bottom + guard)``.
        cold_every: every this many certified evaluations the solve starts cold
            (0: never), a safety net for extremality.
        certify_every: run a certified solve every this many evaluations; the
            ones between record only the secant estimate (``status="estimate"``).
        lost_overlap: a warm answer whose top-k subspace has similarity below
            this with its start block is re-solved cold (``"lost-subspace"``).
        optimizer: the training optimizer: gives ``lr`` and the stability
            threshold (momentum, Nesterov, Adam), and for Adam/AdamW the
            preconditioner (see :attr:`precondition`).
        precondition: with an Adam/AdamW optimizer, track ``P^-1/2 H P^-1/2``
            with ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` from the
            optimizer's state, the quantity its ``38/lr`` threshold bounds
            (default True; before the optimizer has a state the plain Hessian).
        kato_temple: accept Kato-Temple bounds (False: residual bounds only).
        cluster_rtol: relative gap under which eigenvalues form one cluster (no
            rotation reported inside it).
        min_iterations: block steps a warm solve makes before it may stop.
        autocast: products under ``torch.autocast`` with this dtype (mixed
            precision; see :class:`~curvx.operators.HessianOperator`); the
            default ``tol`` follows it (1e-2 for bfloat16/float16).
        refine: a warm solve that needed more than ``min_iterations`` blocks
            goes on until its bounds are below ``refine * tol`` (budget
            permitting), so the next steps start well inside the tolerance.
        extrapolate_max_angle: the next start block extrapolates the top
            vectors along their last move unless they rotated by more than this
            (radians).

    Note:
        Certificates say each value is within its bound of *an* eigenvalue. That
        it is the k-th *largest* rests on the start block, the guard columns and
        the Krylov expansion having seen everything above it: an eigenvalue that
        jumps above the k-th between guard refreshes, from a direction none of
        them holds, can be missed until the next refresh (``guard_every``) or
        cold solve (``cold_every``). Continuous training moves eigenvalues through
        the neighbours first, so this needs a jump.

    The model's mode flags, buffers, ``.grad`` (unless ``backward=True``) and the
    global RNG are left as they were by every call.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        k: int = 2,
        *,
        k_bottom: int = 0,
        lambda_min: bool = False,
        chunk_size: int | None = None,
        tol: float | None = None,
        seed: int = 0,
        method: str = "auto",
        mode: str = "eval",
        guard: int = 1,
        guard_every: int = 5,
        max_hvps: int | None = None,
        cold_every: int = 50,
        certify_every: int = 1,
        lost_overlap: float = 0.2,
        optimizer: torch.optim.Optimizer | None = None,
        precondition: bool = True,
        kato_temple: bool = True,
        cluster_rtol: float = 1e-3,
        min_iterations: int = 1,
        autocast: torch.dtype | None = None,
        refine: float = 0.05,
        extrapolate_max_angle: float = 0.3,
    ) -> None:
        k = as_int(k, "k")
        k_bottom = as_int(k_bottom, "k_bottom", 0)
        if as_bool(lambda_min, "lambda_min"):
            k_bottom = max(k_bottom, 1)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer; got "
                f"{type(optimizer).__name__}"
            )
        if tol is not None:
            tol = as_float(tol, "tol", low=0.0, high=1.0, low_open=True, high_open=True)
        lost_overlap = as_float(lost_overlap, "lost_overlap", low=0.0, high=1.0)
        refine = as_float(refine, "refine", low=0.0, high=1.0, low_open=True)
        cluster_rtol = as_float(cluster_rtol, "cluster_rtol", low=0.0)
        extrapolate_max_angle = as_float(
            extrapolate_max_angle, "extrapolate_max_angle", low=0.0
        )
        seed = as_int(seed, "seed", 0)
        self.operator = HessianOperator(
            model,
            loss_fn,
            data,
            chunk_size=chunk_size,
            method=method,
            mode=mode,
            dropout_seed=seed,
            autocast=autocast,
        )
        self.model = model
        self.k = k
        self.k_bottom = k_bottom
        self._tol = None if tol is None else float(tol)
        self.guard = as_int(guard, "guard", 0)
        self.guard_every = as_int(guard_every, "guard_every", 0)
        self.max_hvps = None if max_hvps is None else as_int(max_hvps, "max_hvps")
        self.cold_every = as_int(cold_every, "cold_every", 0)
        self.certify_every = as_int(certify_every, "certify_every")
        self.min_iterations = as_int(min_iterations, "min_iterations")
        self.lost_overlap = float(lost_overlap)
        self.refine = float(refine)
        self.extrapolate_max_angle = float(extrapolate_max_angle)
        self.optimizer = optimizer
        self.precondition = as_bool(precondition, "precondition")
        self.kato_temple = as_bool(kato_temple, "kato_temple")
        self.cluster_rtol = cluster_rtol
        self.seed = seed
        self._check_size()
        self.generator = torch.Generator().manual_seed(seed)
        self.evaluations = 0
        self.certified_evaluations = 0
        self.reset()
        self._reference: tuple[Tensor, Tensor, Tensor] | None = None
        self._reference_step: int | None = None
        self._last_point: tuple[Tensor, Tensor] | None = None
        self._last_above: bool | None = None

    # ------------------------------------------------------------ settings

    @property
    def lambda_min(self) -> bool:
        """Whether the bottom of the spectrum is tracked."""
        return self.k_bottom > 0

    @property
    def policy(self) -> dict[str, Any]:
        """BatchNorm/dropout policy, HVP path and solver settings (run metadata)."""
        return {
            **self.operator.policy,
            "k": self.k,
            "k_bottom": self.k_bottom,
            "tol": self.tol,
            "tol_meaning": "relative eigenvalue accuracy: bound <= tol * ||H||_est",
            "kato_temple": self.kato_temple,
            "guard": self.guard,
            "guard_every": self.guard_every,
            "max_hvps": self.budget,
            "cold_every": self.cold_every,
            "certify_every": self.certify_every,
            "lost_overlap": self.lost_overlap,
            "min_iterations": self.min_iterations,
            "cluster_rtol": self.cluster_rtol,
            "seed": self.seed,
            "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
        }

    @property
    def eigenvectors(self) -> Tensor | None:
        """The last certified evaluation's top-k eigenvectors, ``[n, k]`` float64
        (descending values, as ``TrackRecord.eigenvalues``); None before the first
        certified evaluation. Of ``P^-1/2 H P^-1/2`` when tracking Adam."""
        return None if self._prev is None else self._prev.eigenvectors[:, : self.k]

    @property
    def tol(self) -> float:
        """Relative eigenvalue accuracy (default from the parameters' dtype)."""
        if self._tol is not None:
            return self._tol
        return default_tol(self.operator.compute_dtype)

    @property
    def block_size(self) -> int:
        """Block columns of a cold solve: the tracked pairs and the guards."""
        return min(self.operator.n, self.k + self.k_bottom + self.guard)

    @property
    def budget(self) -> int:
        """HVP budget of a warm solve (vectors)."""
        if self.max_hvps is not None:
            return self.max_hvps
        return 12 * (self.k + self.k_bottom + self.guard)

    def _check_size(self) -> None:
        if self.k + self.k_bottom > self.operator.n:
            extra = f" + {self.k_bottom} (bottom)" if self.k_bottom else ""
            raise ValueError(
                f"k={self.k}{extra} is larger than the number of trainable "
                f"parameters n = {self.operator.n}"
            )

    # ---------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the warm-start state (the next step is a cold solve)."""
        self._prev: EigResult | None = None
        self._prev_bottom: EigResult | None = None
        self._start: Tensor | None = None
        self._start_bottom: Tensor | None = None
        # gap hints: (value, theta_k then, evaluation, rate per evaluation)
        self._hint: tuple[float, float, int, float] | None = None
        self._hint_bottom: tuple[float, float, int, float] | None = None
        self._nb_top: Tensor | None = None
        self._nb_bottom: Tensor | None = None
        self._last_refresh = -1
        self._k_taken = self.k
        self._anchors_top: list[tuple[int, Tensor]] = []
        self._anchors_bottom: list[tuple[int, Tensor]] = []
        self._prev_step: int | None = None
        self._grad_now: Tensor | None = None
        # per end, the last pair of anchors and their motion (see _predict)
        self._motion: dict[int, tuple] = {}

    def _rebind(self) -> None:
        """Follow a model whose trainable parameters were replaced, (un)frozen or
        converted: new variables, so the warm start and the reference go."""
        self.operator.rebind()
        self._check_size()
        self.reset()
        self._reference = None
        self._reference_step = None
        self._last_point = None

    def pin_reference(self) -> None:
        """Use the most recent top-k subspace as the reference for later steps."""
        if self._prev is not None:
            self._reference = self._certified_top(self._prev)
            self._reference_step = self._prev_step

    def _similarity(self, a: tuple, b: tuple) -> float:
        """Cluster-aware top-k subspace similarity of two certified sets."""
        ka = rotation.cluster_extent(a[0], self.k, self.cluster_rtol, a[2])
        kb = rotation.cluster_extent(b[0], self.k, self.cluster_rtol, b[2])
        return rotation.subspace_similarity(a[1][:, :ka], b[1][:, :kb])

    def _certified_index(self, res: EigResult) -> Tensor:
        """Top-end Ritz pairs to trust: the k tracked ones and converged neighbours.

        Unconverged neighbours are left out: they are mixtures, and a cluster
        subspace built from them would show rotation that is not there.
        """
        resid = res.ritz_residuals[: res.top_count]
        ok = resid <= self.tol * res.norm_estimate
        ok[: self.k] = True
        return ok.nonzero().flatten()

    def _certified_top(self, res: EigResult) -> tuple[Tensor, Tensor, Tensor]:
        """Values, vectors and residuals of :meth:`_certified_index`'s pairs
        (formed once per result)."""
        cached = getattr(res, "_certified", None)
        if cached is None:
            idx = _as_run(self._certified_index(res))  # a run: views, no copies
            cached = (
                res.ritz_values[idx],
                res.ritz_vectors[:, idx],
                res.ritz_residuals[idx],
            )
            res._certified = cached
        return cached

    # ------------------------------------------------------------ warm start

    def _predict(self, anchors: list[tuple[int, Tensor]], latest: Tensor) -> Tensor:
        """Start vectors for the next evaluation, extrapolated from the last two
        *anchors* (results refined well inside the tolerance).

        Eigenvectors drift smoothly between GD steps, so the linear prediction
        ``U_a + (t - a) / (a - b) (U_a - U_b R)`` (``R`` the orthogonal factor
        that best aligns ``U_b`` to ``U_a``, so sign flips and rotations inside a
        cluster do not count as motion) lies much closer than ``U_a`` itself.
        Only accurate anchors are used: extrapolating from rough vectors
        amplifies their error. Without two recent anchors, or after a rotation
        larger than ``extrapolate_max_angle``, the latest vectors are used."""
        t = self.certified_evaluations + 1
        if len(anchors) < 2:
            return latest
        (b, U_b), (a, U_a) = anchors[-2], anchors[-1]
        if U_a.shape != U_b.shape or t - a > 8 or a - b > 8:
            return latest

        # The motion D = U_a - U_b R and the Gram blocks of [U_a, D], once per
        # pair of anchors (the next steps extrapolate from the same pair)
        cache = self._motion.get(id(anchors))  # one per end
        if cache is None or cache[0] is not U_a or cache[1] is not U_b:
            W, S, Vh = torch.linalg.svd(U_b.T @ U_a)
            if float(S.min()) < math.cos(self.extrapolate_max_angle):
                self._motion[id(anchors)] = (U_a, U_b, None)
                return latest
            D = torch.addmm(U_a, U_b, W @ Vh, alpha=-1.0)
            G = torch.cat([U_a, D], dim=1)
            G = G.T @ G
            self._motion[id(anchors)] = cache = (U_a, U_b, (D, G))
        if cache[2] is None:
            return latest
        D, G = cache[2]
        c = (t - a) / (a - b)
        p = U_a.shape[1]

        # V = U_a + c D, orthonormalized through its Gram matrix (from G's blocks)
        VtV = G[:p, :p] + c * (G[:p, p:] + G[p:, :p]) + c * c * G[p:, p:]
        L, info = torch.linalg.cholesky_ex(VtV)
        if int(info) != 0 or float(L.diagonal().min()) < 1e-3:
            return latest
        V = torch.add(U_a, D, alpha=c)
        return torch.linalg.solve_triangular(L, V.T, upper=False).T

    def _guard_columns(self, n_guard: int, have: Tensor) -> Tensor:
        """Guard columns: the previous neighbours beyond k, the gradient's
        direction outside the tracked subspace, then random ones."""
        parts = [nb for nb in (self._nb_top, self._nb_bottom) if nb is not None]
        direction = self._gradient_direction()
        if direction is not None:
            parts.append(direction[:, None])
        parts.append(
            torch.randn(
                have.shape[0], n_guard, generator=self.generator, dtype=_F64
            ).to(have.device)
        )
        G = torch.cat(parts, dim=1)[:, :n_guard]
        return G

    def _warm_block(self, refresh: bool) -> tuple[Tensor, int]:
        """Start block: the advanced top vectors (whole clusters at the k-th
        value), the bottom ones, and on a refresh the guard columns."""
        cols = [self._start]
        if self.k_bottom and self._start_bottom is not None:
            cols.append(self._start_bottom)
        V = torch.cat(cols, dim=1)
        n_guard = self.guard * (1 + (self.k_bottom > 0)) if refresh else 0
        n_guard = min(n_guard, self.operator.n - V.shape[1])
        if n_guard > 0:
            V = torch.cat([V, self._guard_columns(n_guard, V)], dim=1)
        return V, n_guard

    def _hints(self, theta_k: float | None) -> tuple[float | None, float | None]:
        """Gap hints for the solver: the last measurements of ``lambda_{k+1}`` (and
        of the next value above the bottom end), moved along their trend toward
        the tracked values since they were measured and widened by how far
        ``theta_k`` has moved."""
        now = self.certified_evaluations
        out: list[float | None] = []
        for hint, sign in ((self._hint, 1.0), (self._hint_bottom, -1.0)):
            if hint is None or theta_k is None:
                out.append(None)
                continue
            value, at_theta, when, rate = hint
            drift = abs(theta_k - at_theta) if sign > 0 else 0.0
            trend = max(sign * rate, 0.0) * (now - when)
            out.append(value + sign * (trend + drift))
        return out[0], out[1]

    def _update_hints(self, top: EigResult, bottom: EigResult | None) -> None:
        """Measure the gap beyond the tracked values where this solve saw it (the
        first neighbour beyond the tracked set with an acceptable residual), keep
        the trend of those measurements, and keep the neighbour vectors as the
        next refresh's guard columns."""
        when = self.certified_evaluations
        k0 = self._k_taken
        # (in a small basis one end's neighbours can be the other end's tracked
        # vectors: those are no neighbours)
        floor = float(bottom.eigenvalues[-1]) if bottom is not None else -math.inf
        ceil = float(top.eigenvalues[-1])
        if top.top_count > k0 and float(top.ritz_values[k0]) > floor:
            theta, r = float(top.ritz_values[k0]), float(top.ritz_residuals[k0])
            at = float(top.ritz_values[k0 - 1])
            if r <= at - theta:
                self._hint = self._measured(self._hint, theta + r, at, when)
            self._nb_top = top.ritz_vectors[:, k0 : k0 + self.guard]
        kb = self.k_bottom
        if (
            bottom is not None
            and bottom.ritz_values.numel() > kb
            and float(bottom.ritz_values[kb]) < ceil
        ):
            theta, r = float(bottom.ritz_values[kb]), float(bottom.ritz_residuals[kb])
            at = float(bottom.ritz_values[kb - 1])
            if r <= theta - at:
                self._hint_bottom = self._measured(
                    self._hint_bottom, theta - r, at, when
                )
            self._nb_bottom = bottom.ritz_vectors[:, kb : kb + self.guard]

    @staticmethod
    def _measured(old, value: float, at: float, when: int):
        """A new gap measurement, with the rate of change since the last one."""
        rate = 0.0
        if old is not None and when > old[2]:
            rate = (value - old[0]) / (when - old[2])
        return (value, at, when, rate)

    # ---------------------------------------------------------- gradients

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.operator.params]).to(
            _F64
        )

    def _user_grad(self) -> Tensor | None:
        """The gradient already in ``.grad`` (the user's backward), if complete."""
        grads = [p.grad for p in self.operator.params]
        if any(g is None for g in grads):
            return None
        return torch.cat([g.detach().reshape(-1) for g in grads]).to(_F64)

    def _write_grad(self, grad: Tensor) -> None:
        """Accumulate ``grad`` into ``.grad`` as ``loss.backward()`` would."""
        with torch.no_grad():
            offset = 0
            for p in self.operator.params:
                g = grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)

    def _preconditioner(self) -> Tensor | None:
        """``d = P^-1/2`` ``[n]`` from Adam's state, or None (no Adam, no state)."""
        opt = self.optimizer
        if not (
            self.precondition and isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
        ):
            return None
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        parts = []
        for p in self.operator.params:
            st = opt.state.get(p, {})
            g = group_of.get(id(p))
            if g is None or "exp_avg_sq" not in st or "step" not in st:
                return None
            t = float(st["step"])
            b1, b2 = g["betas"]
            v_hat = st["exp_avg_sq"].detach().to(_F64) / (1 - b2**t)
            P = (1 - b1**t) * (v_hat.sqrt() + g["eps"])
            parts.append(P.reshape(-1).rsqrt())
        return torch.cat(parts)

    def _secant(
        self, point: Tensor, grad: Tensor, d: Tensor | None, rec: TrackRecord
    ) -> None:
        """Uncertified sharpness estimate from the previous evaluation's point and
        gradient: ``y = g_t - g_{t-1} = H s + O(|s|^2)`` (in the preconditioned
        coordinates ``x / d``, where ``H`` becomes ``D H D``, when ``d`` is given)."""
        if self._last_point is None:
            return
        p0, g0 = self._last_point
        s, y = point - p0, grad - g0
        if d is not None:
            s, y = s / d, y * d
        ss = float(s @ s)
        if not ss > 0:
            return
        u = self._prev.eigenvectors[:, 0] if self._prev is not None else None
        us = float(u @ s) if u is not None else 0.0
        if u is not None and us * us >= 0.01 * ss:
            rec.sharpness_estimate = float(u @ y) / us
            rec.estimate_method = "secant-eigvec"
        else:
            rec.sharpness_estimate = float(s @ y) / ss
            rec.estimate_method = "secant-step"

    # ----------------------------------------------------------------- step

    def step(
        self,
        step: int | None = None,
        lr: float | None = None,
        *,
        backward: bool = False,
    ) -> TrackRecord:
        """Eigenpairs at the model's current parameters, warm-started.

        Call it whenever the parameters should be measured (typically once per
        training step, before ``optimizer.step()``).

        Args:
            step: the training step, copied into the record.
            lr: the learning rate of the coming update (default: the
                optimizer's, when one was given).
            backward: also accumulate the gradient of the tracker's loss into
                ``.grad`` exactly as ``loss.backward()`` would (the fused step: the
                same forward and first backward serve the HVPs). Zero the
                gradients first, as before any backward.

        Never raises for a non-finite loss: the record says so.
        """
        backward = as_bool(backward, "backward")
        if backward:
            self._check_fused_mode()
        if lr is not None:
            try:
                ok = math.isfinite(float(lr)) and float(lr) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"lr must be a positive number or None; got {lr!r}")
            lr = float(lr)
        t0 = time.perf_counter()
        note = None
        try:
            self.operator.check_parameters()
        except ParametersChangedError:
            self._rebind()
            note = "the model's trainable parameters changed: cold start"
        op = self.operator
        # The loss (a closure's state, say) may have changed since the last call
        # even where the parameters did not: rebuild the kept graph
        op.release()
        hv0 = op.hvp_count
        threshold, rule, wants_precond = stability_threshold(self.optimizer, lr)
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0].get("lr")
            lr = None if lr is None else float(lr)
        certify = self._prev is None or self.evaluations % self.certify_every == 0
        rec = TrackRecord(
            step=step,
            lr=lr,
            loss=None,
            sharpness=None,
            eigenvalues=[],
            residuals=[],
            converged=[],
            certified=certify,
            threshold=threshold,
            threshold_rule=rule,
            message=note,
        )
        try:
            # 1. Loss and gradient: the kept graph's first backward when certifying
            #    (free), a plain backward otherwise (or the user's .grad)
            grad = None if (certify or backward) else self._user_grad()
            if grad is None:
                loss, g = op.loss_and_grad(keep=certify)
                rec.loss = float(loss)
                grad = g.to(_F64)
            if rec.loss is not None and not math.isfinite(rec.loss):
                raise NonFiniteError(f"the loss is {rec.loss}")
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteError("the gradient is not finite")
            if backward:
                self._write_grad(grad)
            d = self._preconditioner() if wants_precond else None
            rec.preconditioned = d is not None
            g_eff = grad if d is None else d * grad
            self._grad_now = g_eff  # a guard column's source, formed when used
            if self.certify_every > 1:
                point = self._flat_params()
                self._secant(point, grad, d, rec)
                self._last_point = (point, grad)
            if not certify:
                rec.status = "estimate"
                return self._close(rec, t0, hv0)

            # 2. The certified solve
            matmat = op.matmat if d is None else _Preconditioned(op, d)
            top, bottom = self._solve(matmat, rec)
        except NonFiniteError as err:
            rec.status, rec.message = "nonfinite", str(err)
            return self._close(rec, t0, hv0)

        # 3. The record: values, bounds, the bottom end
        rec.eigenvalues = top.eigenvalues.tolist()
        rec.residuals = top.residuals.tolist()
        rec.bounds = top.bounds.tolist()
        rec.certificates = list(top.certificate)
        rec.gaps = top.gaps.tolist()
        rec.converged = top.converged.tolist()
        rec.sharpness = rec.eigenvalues[0]
        rec.iterations, rec.restarts = top.iterations, top.restarts
        rec.solver_status = top.status
        ok = top.all_converged
        if bottom is not None:
            rec.bottom_eigenvalues = bottom.eigenvalues.tolist()
            rec.bottom_residuals = bottom.residuals.tolist()
            rec.bottom_bounds = bottom.bounds.tolist()
            rec.bottom_converged = bottom.converged.tolist()
            rec.lambda_min = rec.bottom_eigenvalues[0]
            rec.lambda_min_residual = rec.bottom_residuals[0]
            rec.lambda_min_converged = rec.bottom_converged[0]
            ok = ok and bottom.all_converged
        rec.status = "ok" if ok else "unconverged"

        # 4. What EoS research reads: gradient projections, lr * lambda / 2, and
        #    the threshold crossing since the last certified evaluation
        gn = float(g_eff.norm())
        rec.grad_norm = gn
        if gn > 0:
            rec.grad_projection = (top.eigenvectors.T @ g_eff / gn).tolist()
        if lr:
            rec.lr_lambda_over_2 = [lr * v / 2 for v in rec.eigenvalues]
        above = None if threshold is None else rec.sharpness >= threshold
        if above is not None and self._last_above is not None:
            rec.crossed = (
                ("up" if above else "down") if above != self._last_above else None
            )
        self._last_above = above

        # 5. Rotation against the previous evaluation and the reference
        certified = self._certified_top(top)
        if self._prev is not None:
            p_vals, p_vecs, p_res = self._certified_top(self._prev)
            c_vals, c_vecs, c_res = certified
            cmp = rotation.compare(
                p_vals, p_vecs, c_vals, c_vecs, self.k, self.cluster_rtol, p_res, c_res
            )
            if top.norm_estimate == 0.0 and self._prev.norm_estimate == 0.0:
                # H = 0 twice: every direction is an eigenvector, nothing rotates
                cmp.update(
                    rotation_top1=1.0,
                    top1_cosine=1.0,
                    subspace_similarity=1.0,
                    max_principal_angle=0.0,
                    crossings=[],
                )
            rec.rotation_top1 = cmp["rotation_top1"]
            rec.top1_cosine = cmp["top1_cosine"]
            rec.crossings = cmp["crossings"]
            rec.subspace_similarity = cmp["subspace_similarity"]
            rec.max_principal_angle = cmp["max_principal_angle"]
            rec.matching = cmp["matching"]
        if self._reference is None:
            self._reference, self._reference_step = certified, step
        rec.reference_similarity = self._similarity(self._reference, certified)
        rec.reference_step = self._reference_step

        # 6. State for the next step: the advanced start block and the gap hints
        self._prev, self._prev_bottom, self._prev_step = top, bottom, step
        if rec.guard_refresh:
            self._last_refresh = self.certified_evaluations
        self._update_hints(top, bottom)
        self.certified_evaluations += 1
        fine = self.refine * self.tol * top.norm_estimate
        for res, U, anchors in (
            (top, top.ritz_vectors[:, : self._k_taken], self._anchors_top),
            (
                bottom,
                None if bottom is None else bottom.eigenvectors,
                self._anchors_bottom,
            ),
        ):
            if res is None:
                continue
            # A one-block result spans its start block: no news on the motion
            if res.iterations > 1 and bool((res.bounds <= fine).all()):
                anchors.append((self.certified_evaluations, U))
                del anchors[:-2]
            if res is top:
                self._start = self._predict(anchors, U)
            else:
                self._start_bottom = self._predict(anchors, U)
        return self._close(rec, t0, hv0)

    def _check_fused_mode(self) -> None:
        """``backward=True`` gives the gradient of the tracker's own forward: in
        ``mode="eval"`` that differs from a train-mode ``loss.backward()`` when
        the model has layers that behave differently in training."""
        if self.operator.mode != "eval":
            return
        mode_dependent = (
            nn.modules.batchnorm._BatchNorm,
            nn.modules.dropout._DropoutNd,
        )
        odd = sorted(
            {
                type(m).__name__
                for m in self.model.modules()
                if m.training and isinstance(m, mode_dependent)
            }
        )
        if odd:
            raise ValueError(
                "backward=True computes the gradient from the tracker's own forward, "
                "which runs in mode='eval' (running statistics, no dropout), but the "
                f"model is in training mode with {', '.join(odd)}: the gradient would "
                "not be the one loss.backward() gives. Build the tracker with "
                "mode='train' (per-chunk batch statistics, fixed dropout masks; "
                "running statistics are not updated), or run your own backward and "
                "call tracker.step() without backward=True"
            )

    def _gradient_direction(self) -> Tensor | None:
        """GD's next step, the gradient (preconditioned under Adam), outside the
        tracked subspace: a guard column (a direction the iterate is about to
        move along, where a rising eigenvector shows first)."""
        g = self._grad_now
        if g is None:
            return None
        if self._prev is not None:
            U = self._prev.eigenvectors
            g = g - U @ (U.T @ g)
        norm = float(g.norm())
        return g / norm if norm > 0 else None

    def _solve(self, matmat, rec: TrackRecord) -> tuple[EigResult, EigResult | None]:
        """Warm solve within the budget, else (or when lost) a cold one."""
        op = self.operator
        kw = dict(
            tol=self.tol,
            extend_rtol=self.cluster_rtol,
            generator=self.generator,
            device=op.device,
            kato_temple=self.kato_temple,
        )
        cold = self._prev is None or (
            self.cold_every and self.certified_evaluations % self.cold_every == 0
        )
        if not cold:
            since = self.certified_evaluations - self._last_refresh
            refresh = (
                self._hint is None
                or (self.k_bottom > 0 and self._hint_bottom is None)
                or (self.guard_every and since >= self.guard_every)
            )
            # Cold solves and refreshes measure the gap; counted in evaluations
            theta_k = float(self._prev.ritz_values[self._k_taken - 1])
            hints = self._hints(theta_k)
            spent = 0
            for attempt in range(2):
                V0, n_guard = self._warm_block(bool(refresh))
                rec.warm_start = True
                rec.guard_refresh = rec.guard_refresh or n_guard > 0
                b = V0.shape[1]
                budget = max(self.budget - spent, b)
                if solves_densely(op.n, self._k_taken + self.k_bottom, b):
                    budget = max(budget, op.n)  # a small operator: solved exactly
                top, bottom = solve(
                    matmat,
                    op.n,
                    self._k_taken,
                    self.k_bottom,
                    block_size=b,
                    min_iterations=self.min_iterations + 2 * (n_guard > 0),
                    max_hvps=budget,
                    v0=V0,
                    gap_hints=hints,
                    refine=self.refine,
                    # the cold solve that started the tracking checked symmetry
                    symmetry_tol=None,
                    **kw,
                )
                spent += top.hvps
                lost = False
                if not (top.all_converged and (bottom is None or bottom.all_converged)):
                    break
                # cos of the rms principal angle from the small k x k overlap
                cos = torch.linalg.svdvals(V0[:, : self._k_taken].T @ top.eigenvectors)
                rms = float(cos.clamp(0.0, 1.0).arccos().square().mean().sqrt())
                lost = math.cos(rms) < self.lost_overlap
                if lost:
                    break

                # The k-th value fell to where the next one was last seen: the
                # two may have crossed, so look below with the guard columns
                fell = hints[0] is not None and float(top.eigenvalues[-1]) <= hints[0]
                fell = fell or (
                    bottom is not None
                    and hints[1] is not None
                    and float(bottom.eigenvalues[-1]) >= hints[1]
                )
                if refresh or not fell or attempt:
                    return self._trim(top), bottom
                refresh = True
                self._start = top.ritz_vectors[:, : self._k_taken]
                if bottom is not None:
                    self._start_bottom = bottom.eigenvectors
                rec.message = "the k-th value fell to the next one's last value: guards"
            rec.fallback = "lost-subspace" if lost else "budget"
            rec.message = (
                f"warm solve {'lost its start subspace' if lost else 'out of budget'}"
                f" ({top.hvps} HVPs): cold solve"
            )
            logger.info("step %s: %s", rec.step, rec.message)
        top, bottom = solve(
            matmat,
            op.n,
            self.k,
            self.k_bottom,
            block_size=self.block_size,
            **kw,
        )
        rec.guard_refresh = True
        return self._trim(top), bottom

    def _extent(self, top: EigResult) -> int:
        """Tracked top count: k, extended to the end of a cluster at the k-th."""
        idx = self._certified_index(top)
        vals, res = top.ritz_values[idx], top.ritz_residuals[idx]
        k0 = rotation.cluster_extent(vals, self.k, self.cluster_rtol, res)
        # Only a contiguous run of certified pairs can extend the tracked set
        run = int((idx[:k0] == torch.arange(k0, device=idx.device)).sum())
        return max(self.k, min(k0, run))

    def _trim(self, top: EigResult) -> EigResult:
        """Report the k requested pairs of a solve that tracked a whole cluster."""
        if top.eigenvalues.numel() == self.k:
            self._k_taken = self._extent(top)
            return top
        k = self.k
        out = EigResult(
            eigenvalues=top.eigenvalues[:k],
            eigenvectors=top.eigenvectors[:, :k],
            residuals=top.residuals[:k],
            bounds=top.bounds[:k],
            certificate=top.certificate[:k],
            converged=top.converged[:k],
            iterations=top.iterations,
            restarts=top.restarts,
            hvps=top.hvps,
            status=top.status,
            which=top.which,
            tol=top.tol,
            norm_estimate=top.norm_estimate,
            ritz_values=top.ritz_values,
            ritz_vectors=top.ritz_vectors,
            ritz_residuals=top.ritz_residuals,
            ritz_products=top.ritz_products,
            top_count=top.top_count,
            gaps=top.gaps[:k],
        )
        self._k_taken = self._extent(top)
        return out

    def _close(self, rec: TrackRecord, t0: float, hv0: int) -> TrackRecord:
        rec.hvps = self.operator.hvp_count - hv0
        rec.method = self.operator.method
        rec.track_seconds = time.perf_counter() - t0
        self.evaluations += 1
        logger.debug(
            "step %s: sharpness %s, %d HVPs, %.3f s",
            rec.step,
            rec.sharpness,
            rec.hvps,
            rec.track_seconds,
        )
        return rec


def track(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = 2,
    **kwargs: Any,
) -> Tracker:
    """A :class:`Tracker` for ``model``; call ``.step()`` once per training step."""
    return Tracker(model, loss_fn, data, k, **kwargs)
