"""Shared pieces of the benchmark protocol: settings, problems, references, counting.

Everything a benchmark row needs apart from the tool under test lives here, so that
every tool sees the same model, the same data, the same parameters and the same
high-precision reference:

* :class:`Settings` reads the ``BENCH_*`` environment variables (``BENCH_QUICK=1``
  shrinks everything to a smoke run of a few minutes).
* :func:`fmnist_problem` / :func:`digits_problem` run full-batch gradient descent
  with the harness pieces of ``curvx train`` (fc-tanh, MSE, the first examples of
  the training split) and keep parameter snapshots at the steps the benchmarks
  replay, together with the time of every plain GD step (the baseline of every
  ratio, measured in the same process).
* :class:`ExactHessian` applies the float64 Hessian by plain double backward
  (``torch.autograd.grad`` on a kept first-backward graph): it shares no code with
  curvx's solver or operator, and is the reference operator.
* :meth:`Problem.reference` runs ARPACK (``scipy.sparse.linalg.eigsh``) on that
  float64 operator with ``tol=1e-10`` and checks each pair's residual explicitly;
  on the small model the reference is ``eigvalsh`` of the dense float64 Hessian.
* :func:`score` compares a tool's answer with the reference: relative eigenvalue
  error and whether a "converged" claim was wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvx.harness.data import load_dataset
from curvx.harness.losses import mse_loss
from curvx.harness.models import build_model

#: The accuracy target every tool is asked for (relative eigenvalue error).
TARGET_RTOL = 1e-3
#: ARPACK tolerance of the float64 reference, and the largest relative residual
#: ``||H u - lambda u|| / |lambda|`` a reference pair may keep.
REFERENCE_TOL = 1e-10
REFERENCE_MAX_RESIDUAL = 1e-7


def _env_int(name: str, full: int, quick: int, is_quick: bool) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else (quick if is_quick else full)


def _env_float(name: str, full: float, quick: float, is_quick: bool) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else (quick if is_quick else full)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of the benchmark runs, from ``BENCH_*`` environment variables.

    Attributes:
        quick: ``BENCH_QUICK=1``: a smoke run (smaller data, fewer steps).
        n_train: Fashion-MNIST examples (the first ones), ``BENCH_N_TRAIN``.
        lr: GD step size (the ``curvx train`` default 0.05; 2/lr = 40).
        run_steps: length of the curvx tracking runs, ``BENCH_RUN_STEPS``.
        window_start: first step of the replayed window, ``BENCH_WINDOW_START``.
        steps: steps in the replayed window, ``BENCH_STEPS``.
        sample_every: accuracy sample spacing in the tracking runs,
            ``BENCH_SAMPLE_EVERY``.
        top5_step: snapshot of the cold top-5 solves, ``BENCH_TOP5_STEP``.
        tool_budget_s: a tool's cumulative solve time after which the window
            replay stops early for that tool (the row says how many steps ran),
            ``BENCH_TOOL_BUDGET_S``; the two tools of the HVP floor (curvx's
            tracker and eigsh tuned) get four times as much.
        run_budget_s: wall time after which a curvx tracking run stops early
            (the row says how many steps ran), ``BENCH_RUN_BUDGET_S``.
        block_repeats: timing repeats per block-HVP measurement.
        digits_steps, digits_window_start: the small exact model's window.
    """

    quick: bool
    n_train: int
    lr: float
    run_steps: int
    window_start: int
    steps: int
    sample_every: int
    top5_step: int
    tool_budget_s: float
    run_budget_s: float
    block_repeats: int
    digits_steps: int
    digits_window_start: int

    @classmethod
    def from_env(cls) -> Settings:
        q = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        return cls(
            quick=q,
            n_train=_env_int("BENCH_N_TRAIN", 5000, 1000, q),
            lr=0.05,
            run_steps=_env_int("BENCH_RUN_STEPS", 300, 12, q),
            window_start=_env_int("BENCH_WINDOW_START", 120, 8, q),
            steps=_env_int("BENCH_STEPS", 20, 3, q),
            sample_every=_env_int("BENCH_SAMPLE_EVERY", 25, 6, q),
            top5_step=_env_int("BENCH_TOP5_STEP", 140, 10, q),
            tool_budget_s=_env_float("BENCH_TOOL_BUDGET_S", 45.0, 20.0, q),
            run_budget_s=_env_float("BENCH_RUN_BUDGET_S", 300.0, 40.0, q),
            block_repeats=_env_int("BENCH_BLOCK_REPEATS", 3, 1, q),
            digits_steps=_env_int("BENCH_DIGITS_STEPS", 20, 3, q),
            digits_window_start=_env_int("BENCH_DIGITS_WINDOW_START", 45, 48, q),
        )

    def window(self) -> list[int]:
        return list(range(self.window_start, self.window_start + self.steps))

    def digits_window(self) -> list[int]:
        start = self.digits_window_start
        return list(range(start, start + self.digits_steps))

    def samples(self) -> list[int]:
        return list(range(0, self.run_steps + 1, max(1, self.sample_every)))


# ------------------------------------------------------------------ parameters


def flat_params(model: nn.Module) -> Tensor:
    """The model's trainable parameters flattened (a detached copy), ``[n]``."""
    return torch.cat(
        [p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]
    ).clone()


@torch.no_grad()
def load_params(model: nn.Module, theta: Tensor) -> None:
    """Write ``theta`` ``[n]`` into the model's parameters in place (so version
    counters move and every tool sees new parameters)."""
    offset = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        k = p.numel()
        p.copy_(theta[offset : offset + k].view_as(p))
        offset += k


def gd_step(model: nn.Module, opt: torch.optim.Optimizer, X: Tensor, Y: Tensor):
    """One plain full-batch GD step: zero the gradients, loss, backward, update."""
    opt.zero_grad(set_to_none=True)
    mse_loss(model(X), Y).backward()
    opt.step()


# ------------------------------------------------------------------- reference


class ExactHessian:
    """The Hessian of the mean MSE loss at fixed parameters, by double backward.

    A copy of the model in ``dtype`` (float64 for references), one first
    backward with ``create_graph=True`` kept, and ``torch.autograd.grad`` of the
    flat gradient for each product: nothing of curvx is used, so it can referee
    curvx as well as its peers.

    Args:
        model: the model (only its structure is used; it is not touched).
        theta: parameters ``[n]`` at which to take the Hessian.
        X, Y: the data, converted to ``dtype`` here.
        dtype: the precision of the copy and of every product.
    """

    def __init__(
        self,
        model: nn.Module,
        theta: Tensor,
        X: Tensor,
        Y: Tensor,
        dtype: torch.dtype = torch.float64,
    ):
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(dtype)
        load_params(self.model, theta.to(dtype))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n = sum(p.numel() for p in self.params)
        with torch.enable_grad():
            loss = mse_loss(self.model(X.to(dtype)), Y.to(dtype))
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.g = torch.cat([g.reshape(-1) for g in grads])
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` ``[n]``."""
        self.products += 1
        hv = torch.autograd.grad(
            self.g, self.params, grad_outputs=v.to(self.dtype), retain_graph=True
        )
        return torch.cat([h.reshape(-1) for h in hv])

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` ``[n, k]``, one column at a time."""
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def dense(self) -> Tensor:
        """The whole matrix ``[n, n]``, symmetrized (small models only).

        One product per column: on CPU this is faster than batched products
        (``is_grads_batched``) for the small model here.
        """
        e = torch.zeros(self.n, dtype=self.dtype)
        cols = []
        for j in range(self.n):
            e[j] = 1.0
            cols.append(self.matvec(e))
            e[j] = 0.0
        H = torch.stack(cols, dim=1)
        return (H + H.T) / 2


def arpack_top(
    matvec: Callable[[np.ndarray], np.ndarray],
    n: int,
    k: int,
    tol: float,
    *,
    v0: np.ndarray | None = None,
    ncv: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (largest algebraic) eigenpairs by ARPACK, values descending."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    if v0 is None:
        v0 = np.random.default_rng(seed).standard_normal(n)
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    w, U = eigsh(op, k=k, which="LA", tol=tol, v0=v0, ncv=ncv)
    order = np.argsort(w)[::-1]
    return w[order], U[:, order]


# --------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
    """A model, its data and a GD trajectory, with snapshots and references.

    Attributes:
        name: a label for tables.
        model: the float32 model, in train mode; benchmarks load snapshots into it.
        X, Y: inputs ``[N, d]`` and one-hot targets ``[N, 10]`` (float32).
        lr: the GD step size of the trajectory.
        snapshots: parameters ``[n]`` at the kept steps of the trajectory.
        plain_step_seconds: wall time of every plain GD step of the trajectory.
        dense: whether references come from the dense Hessian (small models).
        info: facts for the tables (sizes, data subset).
    """

    name: str
    model: nn.Module
    X: Tensor
    Y: Tensor
    lr: float
    snapshots: dict[int, Tensor]
    plain_step_seconds: list[float]
    dense: bool
    info: dict[str, Any]
    _refs: dict[Any, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def plain_step_median(self) -> float:
        return statistics.median(self.plain_step_seconds)

    def load(self, step: int) -> None:
        load_params(self.model, self.snapshots[step])

    def fresh_model(self, step: int | None = None) -> nn.Module:
        """A deep copy of the model (at snapshot ``step`` when given)."""
        m = copy.deepcopy(self.model)
        if step is not None:
            load_params(m, self.snapshots[step])
        return m

    def reference(self, k: int, step: int | None = None, theta: Tensor | None = None):
        """High-precision top-k eigenvalues (descending, float64 numpy) at a
        snapshot ``step`` or at parameters ``theta``; cached.

        Returns a dict with ``values``, ``vectors`` (ARPACK only), ``seconds``,
        ``max_rel_residual`` and ``how``.
        """
        if theta is None:
            theta = self.snapshots[step]
        key = (k, step) if step is not None else (k, _digest(theta))
        hit = self._refs.get(key)
        if hit is None and step is None:
            # Parameters equal to a snapshot reuse its reference
            for s, snap in self.snapshots.items():
                if torch.equal(snap, theta) and (k, s) in self._refs:
                    hit = self._refs[(k, s)]
                    break
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        H = ExactHessian(self.model, theta, self.X, self.Y)
        if self.dense:
            w, U = torch.linalg.eigh(H.dense())
            values = w.flip(0)[:k].numpy()
            vectors = U.flip(1)[:, :k].numpy()
            how = "eigh of the dense float64 Hessian"
        else:

            def mv(x: np.ndarray) -> np.ndarray:
                v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
                return H.matvec(v.reshape(-1)).numpy()

            ncv = max(2 * k + 1, 20)
            values, vectors = arpack_top(mv, H.n, k, REFERENCE_TOL, ncv=ncv)
            how = f"ARPACK eigsh on float64 HVPs, tol={REFERENCE_TOL:g}, ncv={ncv}"
        U = torch.from_numpy(np.ascontiguousarray(vectors))
        R = H.matmat(U) - U * torch.from_numpy(values)
        rel = (R.norm(dim=0) / torch.from_numpy(np.abs(values))).max().item()
        if not rel <= REFERENCE_MAX_RESIDUAL:
            raise RuntimeError(
                f"reference not certified: relative residual {rel:.3g} > "
                f"{REFERENCE_MAX_RESIDUAL:g} ({how})"
            )
        hit = {
            "values": values,
            "vectors": vectors,
            "seconds": time.perf_counter() - t0,
            "max_rel_residual": rel,
            "how": how,
        }
        self._refs[key] = hit
        return hit


def _digest(theta: Tensor) -> tuple:
    t = theta.double()
    return (t.numel(), float(t.sum()), float(t.square().sum()), float(t[::97].sum()))


class PlainStep:
    """Times plain GD steps on a private copy of the model, interleaved with a
    benchmark's own steps, so that the denominator of a ratio is measured at the
    same time (and machine load) as its numerator."""

    def __init__(self, problem: Problem):
        self.model = copy.deepcopy(problem.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=problem.lr)
        self.X, self.Y = problem.X, problem.Y
        self.seconds: list[float] = []

    def time(self, theta: Tensor) -> float:
        """One plain GD step from parameters ``theta`` (loaded outside the timing)."""
        load_params(self.model, theta)
        t0 = time.perf_counter()
        gd_step(self.model, self.opt, self.X, self.Y)
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        return dt

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_trajectory(
    model: nn.Module, X: Tensor, Y: Tensor, lr: float, steps: int, keep: Iterable[int]
) -> tuple[dict[int, Tensor], list[float]]:
    """Plain GD for ``steps`` updates; snapshots at ``keep`` and every step's time.

    Snapshots are taken before the update of their step (the parameters the
    tracker measures at step t). The timed region is the GD step only.
    """
    keep = set(keep)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    snaps: dict[int, Tensor] = {}
    times: list[float] = []
    for t in range(steps + 1):
        if t in keep:
            snaps[t] = flat_params(model)
        if t == steps:
            break
        t0 = time.perf_counter()
        gd_step(model, opt, X, Y)
        times.append(time.perf_counter() - t0)
    return snaps, times


def fmnist_problem(settings: Settings) -> Problem:
    """fc-tanh (2 x 200 tanh) on the first ``n_train`` Fashion-MNIST examples, MSE,
    lr 0.05, seed 0: the ``curvx train`` defaults."""
    data = load_dataset("fashion-mnist", n_train=settings.n_train, n_test=0)
    model = build_model("fc-tanh", data.image_shape, data.n_classes, seed=0)
    X, Y = data.train.x, data.train.onehot
    keep = set(settings.window()) | set(settings.samples()) | {settings.top5_step}
    last = max(max(keep), settings.run_steps)
    snaps, times = run_trajectory(model, X, Y, settings.lr, last, keep)
    return Problem(
        name=f"fc-tanh FMNIST-{len(X)}",
        model=model,
        X=X,
        Y=Y,
        lr=settings.lr,
        snapshots=snaps,
        plain_step_seconds=times,
        dense=False,
        info={"n_params": sum(p.numel() for p in model.parameters()), "N": len(X)},
    )


#: The small exact model: fc-tanh 64-16-16-10 on scikit-learn's digits (1500
#: training examples), n = 1482; with lr 0.2 its sharpness crosses 2/lr = 10
#: around step 50 and peaks near 10.4 at step 90.
DIGITS_WIDTH = 16
DIGITS_LR = 0.2


def digits_problem(settings: Settings) -> Problem:
    """The small model whose dense Hessian is exact (see :data:`DIGITS_WIDTH`)."""
    data = load_dataset("digits", n_test=0)
    model = build_model(
        "fc-tanh", data.image_shape, data.n_classes, width=DIGITS_WIDTH, seed=0
    )
    X, Y = data.train.x, data.train.onehot
    keep = settings.digits_window()
    snaps, times = run_trajectory(model, X, Y, DIGITS_LR, max(keep), keep)
    return Problem(
        name=f"fc-tanh {DIGITS_WIDTH}x2 digits-{len(X)}",
        model=model,
        X=X,
        Y=Y,
        lr=DIGITS_LR,
        snapshots=snaps,
        plain_step_seconds=times,
        dense=True,
        info={"n_params": sum(p.numel() for p in model.parameters()), "N": len(X)},
    )


class Broken:
    """Stands in for a problem whose construction failed; rows record ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


def need(problem: Problem | Broken) -> Problem:
    """The problem, or its construction error raised again (for the row)."""
    if isinstance(problem, Broken):
        raise problem.error
    return problem


# ------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Answer:
    """One solve by one tool.

    Attributes:
        values: the eigenvalues it returned (any order; sorted here).
        claimed: per value, the tool's own "converged" claim; None where the tool
            makes none.
        hvps: Hessian-vector products (vectors) it spent.
        seconds: wall time of the solve.
        extra: tool-specific figures (solver matvecs on a dense matrix, ...).
    """

    values: list[float]
    claimed: list[bool | None]
    hvps: int
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def score(answer: Answer, ref_values: np.ndarray, k: int) -> dict[str, Any]:
    """Relative errors of the top-k answer against the reference, and wrong claims.

    Values are sorted descending and compared position by position with the
    reference's top-k; a missing value counts as an infinite error. A "converged"
    claim is wrong when the claimed value is off by more than :data:`TARGET_RTOL`
    relative to the reference value in its position.
    """
    pairs = sorted(
        zip(answer.values, answer.claimed, strict=True),
        key=lambda p: p[0],
        reverse=True,
    )
    errs, wrong, unconverged, no_claim = [], 0, 0, 0
    for i in range(k):
        lam = float(ref_values[i])
        if i >= len(pairs) or not math.isfinite(pairs[i][0]):
            errs.append(math.inf)
            unconverged += 1
            continue
        theta, claim = pairs[i]
        err = abs(theta - lam) / abs(lam)
        errs.append(err)
        if claim is None:
            no_claim += 1
        elif claim:
            wrong += int(err > TARGET_RTOL)
        else:
            unconverged += 1
    return {
        "max_rel_err": max(errs),
        "wrong_converged": wrong,
        "unconverged": unconverged,
        "no_claim": no_claim,
    }


def summarize(values: list[float]) -> dict[str, float | None]:
    """Median, mean and max of a list (None when empty or not finite)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "mean": None, "max": None}
    return {
        "median": float(statistics.median(vals)),
        "mean": float(statistics.fmean(vals)),
        "max": float(max(vals)),
    }


def clean(x: Any) -> Any:
    """Plain JSON values: non-finite floats become strings, numpy scalars floats."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.6g}")
    return x


def failure_status(exc: BaseException) -> str:
    """``failed: <ExceptionType>: <first line>``, the row convention."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"failed: {type(exc).__name__}: {first}"[:300]
