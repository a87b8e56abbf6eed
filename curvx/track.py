"""Per-step tracking of the Hessian's extreme eigenpairs during training.

A :class:`Tracker` owns the warm-start state (the last Ritz vectors), a private
``torch.Generator`` and one :class:`~curvx.operators.HessianOperator`. Each
:meth:`Tracker.step` recomputes the eigenpairs at the model's current parameters,
starting from the previous ones, and returns a :class:`TrackRecord`.

Example:
    >>> import torch, curvx
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 2))
    >>> X, y = torch.randn(64, 4), torch.randn(64, 2)
    >>> loss_fn = torch.nn.functional.mse_loss
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> tracker = curvx.track(model, loss_fn, (X, y), k=2)
    >>> for t in range(3):
    ...     opt.zero_grad()
    ...     loss_fn(model(X), y).backward()
    ...     rec = tracker.step(step=t, lr=0.1)
    ...     opt.step()
    >>> rec.status
    'ok'
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
from curvx._validate import as_int
from curvx.lanczos import EigResult, default_tol, solve
from curvx.operators import HessianOperator, NonFiniteError, ParametersChangedError

__all__ = ["Tracker", "TrackRecord", "track"]

logger = logging.getLogger(__name__)


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


@dataclass
class TrackRecord:
    """One tracked evaluation.

    Attributes:
        step, lr: as passed to :meth:`Tracker.step`.
        loss: the mean loss the tracker evaluated (the operator's own forward).
        sharpness: the largest algebraic eigenvalue (``eigenvalues[0]``).
        eigenvalues: top-k Ritz values, descending.
        residuals: their ``||H u - theta u||``.
        converged: per value, ``residual <= tol * ||H||_est``.
        lambda_min, lambda_min_residual, lambda_min_converged: the most negative
            eigenvalue, when tracked.
        rotation_top1: ``|cos|`` between this and the previous top eigenvector
            (cluster-aware; None on the first evaluation).
        subspace_similarity: cos of the rms principal angle between consecutive
            top-k subspaces (None on the first evaluation).
        max_principal_angle: largest principal angle (radians) between them.
        reference_similarity: subspace similarity to the reference step (the
            first evaluation, or the one pinned with :meth:`Tracker.pin_reference`).
        matching: ``[i_prev, j_new, overlap]``: top-k vectors matched by overlap
            (inside a cluster, the overlap of the cluster subspaces).
        hvps: Hessian-vector products (vectors) spent on this evaluation.
        iterations, restarts: block Lanczos steps and thick restarts.
        track_seconds: wall time of this evaluation.
        status: ``"ok"``, ``"unconverged"`` (some pair missed the tolerance) or
            ``"nonfinite"`` (NaN/inf loss or products: no eigenvalues; see
            ``message``). Other errors (a bug in the model, say) are raised.
        solver_status: the solver's own status.
        method: the HVP path used.
        warm_start: whether the solve started from the previous vectors.
        threshold: ``2 / lr`` when ``lr`` was given.
        message: detail for non-ok statuses.
    """

    step: int | None
    lr: float | None
    loss: float | None
    sharpness: float | None
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    lambda_min: float | None = None
    lambda_min_residual: float | None = None
    lambda_min_converged: bool | None = None
    rotation_top1: float | None = None
    subspace_similarity: float | None = None
    max_principal_angle: float | None = None
    reference_similarity: float | None = None
    matching: list[list[float]] = field(default_factory=list)
    hvps: int = 0
    iterations: int = 0
    restarts: int = 0
    track_seconds: float = 0.0
    status: str = "ok"
    solver_status: str | None = None
    method: str | None = None
    warm_start: bool = False
    threshold: float | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        return _clean(asdict(self))


class Tracker:
    """Warm-started tracking of the top-k (and optionally the most negative)
    Hessian eigenpairs.

    Args:
        model, loss_fn, data, chunk_size, method, mode: see
            :class:`curvx.operators.HessianOperator` (``mode`` is the
            BatchNorm/dropout policy).
        k: top eigenpairs to track.
        lambda_min: also track the most negative (smallest algebraic) eigenpair.
        tol: relative residual tolerance (default from the parameters' dtype).
        seed: seed of the tracker's private generator (random guard vectors).
        guard: extra block columns beyond the tracked pairs, so that a cluster
            or an eigenvalue crossing at the k-th value is caught.
        max_hvps: HVP budget per evaluation (vectors).
        cluster_rtol: relative gap under which eigenvalues form one cluster (no
            rotation reported inside it).
        min_iterations: block steps a warm-started solve makes before it may
            stop (cold solves fill their basis once first).
        cold_every: every this many evaluations the solve starts cold (0:
            never), a safety net for the warm start below.

    Note:
        A warm start begins from the previous Ritz vectors (the tracked ones and
        their neighbours) plus random guard columns, and stops after
        ``min_iterations`` block steps once every tracked pair is certified. A
        direction that was not among those neighbours and overtakes the k-th
        eigenvalue within one step can be missed until the Krylov space or the
        next cold solve finds it; the residuals stay honest, but the pair
        reported is then not the k-th largest. Continuous training moves
        eigenvalues through the neighbours first, so this needs a jump.

    The model's mode flags, buffers, ``.grad`` and the global RNG are left as
    they were by every call.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        k: int = 2,
        *,
        lambda_min: bool = False,
        chunk_size: int | None = None,
        tol: float | None = None,
        seed: int = 0,
        method: str = "auto",
        mode: str = "eval",
        guard: int = 1,
        max_hvps: int | None = None,
        cluster_rtol: float = 1e-3,
        min_iterations: int = 3,
        cold_every: int = 50,
    ) -> None:
        k = as_int(k, "k")
        guard = as_int(guard, "guard", 0)
        self.operator = HessianOperator(
            model,
            loss_fn,
            data,
            chunk_size=chunk_size,
            method=method,
            mode=mode,
            dropout_seed=seed,
        )
        self.model = model
        self.k = k
        self.lambda_min = bool(lambda_min)
        self._tol = None if tol is None else float(tol)
        self._check_size()
        min_iterations = as_int(min_iterations, "min_iterations")
        cold_every = as_int(cold_every, "cold_every", 0)
        self.min_iterations = min_iterations
        self.cold_every = cold_every
        self.guard = guard
        self.max_hvps = max_hvps
        self.cluster_rtol = cluster_rtol
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.evaluations = 0
        self._prev: EigResult | None = None
        self._prev_bottom: EigResult | None = None
        self._reference: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def policy(self) -> dict[str, Any]:
        """BatchNorm/dropout policy, HVP path and solver settings (run metadata)."""
        return {
            **self.operator.policy,
            "k": self.k,
            "lambda_min": self.lambda_min,
            "tol": self.tol,
            "block_size": self.block_size,
            "cluster_rtol": self.cluster_rtol,
            "seed": self.seed,
            "min_iterations": self.min_iterations,
            "cold_every": self.cold_every,
        }

    @property
    def tol(self) -> float:
        """Relative residual tolerance (default from the parameters' dtype)."""
        return default_tol(self.operator.dtype) if self._tol is None else self._tol

    @property
    def block_size(self) -> int:
        """Block columns of a cold solve: the tracked pairs and the guards."""
        return min(self.operator.n, self.k + int(self.lambda_min) + self.guard)

    def _check_size(self) -> None:
        if self.k + int(self.lambda_min) > self.operator.n:
            raise ValueError(
                f"k={self.k}{' + 1 (lambda_min)' if self.lambda_min else ''} is "
                "larger than the number of trainable parameters n = "
                f"{self.operator.n}"
            )

    def _rebind(self) -> None:
        """Follow a model whose trainable parameters were replaced, (un)frozen or
        converted: new variables, so the warm start and the reference go."""
        self.operator.rebind()
        self._check_size()
        self.reset()
        self._reference = None

    def pin_reference(self) -> None:
        """Use the most recent top-k subspace as the reference for later steps."""
        if self._prev is not None:
            self._reference = self._certified_top(self._prev)

    def _similarity(self, a: tuple, b: tuple) -> float:
        """Cluster-aware top-k subspace similarity of two certified sets."""
        ka = rotation.cluster_extent(a[0], self.k, self.cluster_rtol, a[2])
        kb = rotation.cluster_extent(b[0], self.k, self.cluster_rtol, b[2])
        return rotation.subspace_similarity(a[1][:, :ka], b[1][:, :kb])

    def reset(self) -> None:
        """Forget the warm-start state (the next step is a cold solve)."""
        self._prev = self._prev_bottom = None

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
        """Values, vectors and residuals of :meth:`_certified_index`'s pairs."""
        idx = self._certified_index(res)
        return res.ritz_values[idx], res.ritz_vectors[:, idx], res.ritz_residuals[idx]

    def _warm_block(self) -> Tensor | None:
        """Previous top vectors (whole clusters at the k-th value), neighbours, and
        the bottom pair."""
        if self._prev is None:
            return None

        # Whole clusters at the k-th value (certified vectors), then the other
        # neighbours beyond k whether certified or not: an eigenvalue about to
        # cross the k-th comes from there, and must be in the start block
        p = self._prev
        idx = self._certified_index(p)
        k0 = rotation.cluster_extent(
            p.ritz_values[idx], self.k, self.cluster_rtol, p.ritz_residuals[idx]
        )
        taken = idx[:k0].tolist()
        rest = [i for i in range(self.k, p.top_count) if i not in taken]
        n_bottom = int(self.lambda_min and self._prev_bottom is not None)
        extra = max(0, self.block_size - n_bottom - k0)
        parts = [p.ritz_vectors[:, taken + rest[:extra]]]
        if n_bottom:
            parts.append(self._prev_bottom.eigenvectors)
        return torch.cat(parts, dim=1)

    def step(self, step: int | None = None, lr: float | None = None) -> TrackRecord:
        """Eigenpairs at the model's current parameters, warm-started.

        Call it whenever the parameters should be measured (typically once per
        training step). Never raises for a non-finite loss: the record says so.
        """
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
        threshold = 2.0 / lr if lr else None
        rec = TrackRecord(
            step=step,
            lr=lr,
            loss=None,
            sharpness=None,
            eigenvalues=[],
            residuals=[],
            converged=[],
            threshold=threshold,
            message=note,
        )
        try:
            loss, _ = op.loss_and_grad()
            rec.loss = float(loss)
            if not math.isfinite(rec.loss):
                raise NonFiniteError(f"the loss is {rec.loss}")
            cold = self.cold_every and self.evaluations % self.cold_every == 0
            v0 = None if cold else self._warm_block()
            rec.warm_start = v0 is not None
            b = self.block_size
            if v0 is not None:
                b = min(op.n, max(b, v0.shape[1] + self.guard))
            top, bottom = solve(
                op.matmat,
                op.n,
                self.k,
                int(self.lambda_min),
                block_size=b,
                min_iterations=None if v0 is None else self.min_iterations,
                extend_rtol=self.cluster_rtol,
                tol=self.tol,
                max_hvps=self.max_hvps,
                v0=v0,
                generator=self.generator,
                device=op.device,
            )
        except NonFiniteError as err:
            rec.status, rec.message = "nonfinite", str(err)
            return self._close(rec, t0, hv0)
        rec.eigenvalues = top.eigenvalues.tolist()
        rec.residuals = top.residuals.tolist()
        rec.converged = top.converged.tolist()
        rec.sharpness = rec.eigenvalues[0]
        rec.iterations, rec.restarts = top.iterations, top.restarts
        rec.solver_status = top.status
        ok = top.all_converged
        if bottom is not None:
            rec.lambda_min = float(bottom.eigenvalues[0])
            rec.lambda_min_residual = float(bottom.residuals[0])
            rec.lambda_min_converged = bool(bottom.converged[0])
            ok = ok and rec.lambda_min_converged
        rec.status = "ok" if ok else "unconverged"

        # Rotation against the previous evaluation and the reference
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
                    rotation_top1=1.0, subspace_similarity=1.0, max_principal_angle=0.0
                )
            rec.rotation_top1 = cmp["rotation_top1"]
            rec.subspace_similarity = cmp["subspace_similarity"]
            rec.max_principal_angle = cmp["max_principal_angle"]
            rec.matching = cmp["matching"]
        if self._reference is None:
            self._reference = certified
        rec.reference_similarity = self._similarity(self._reference, certified)
        self._prev, self._prev_bottom = top, bottom
        return self._close(rec, t0, hv0)

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
