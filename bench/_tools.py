"""The tools under test, each behind one small adapter.

Every adapter has ``setup(problem)`` (imports and builds its objects; not timed),
``solve(k)`` (eigenpairs at the model's current parameters, timed, returning an
:class:`~_protocol.Answer`) and keeps whatever warm-start state the tool offers
from one ``solve`` to the next. Each is called the way its documentation and
installed source show, asked for the same accuracy (:data:`TARGET_RTOL`, in the
tool's own meaning of ``tol``), and its Hessian-vector products are counted as
listed in :data:`HVP_COUNTING`.

A tool that cannot run on a problem raises :class:`NotApplicable` from ``setup``;
the row then says ``n/a: <why>`` instead of disappearing.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from curvx.harness.losses import mse_loss

from _protocol import TARGET_RTOL, Answer, ExactHessian, Problem, flat_params

#: How each tool's Hessian-vector products are counted (README, table column).
HVP_COUNTING = {
    "curvx": "curvx's own count (TrackRecord.hvps / EigResult.hvps): vectors "
    "through HessianOperator.matmat",
    "scipy": "calls of the LinearOperator's matvec (one vector each)",
    "pyhessian": "calls of pyhessian.hessian.hessian_vector_product (one vector "
    "each), wrapped in the module for the call",
    "eigenthings": "calls of the operator's matvec (one vector each), wrapped on "
    "the instance",
    "curvlinops": "vectors through the scipy LinearOperator from to_scipy(), wrapped",
    "lobpcg": "n products to assemble the dense Hessian each step (the HVPs); the "
    "solver's dense matmul columns are in solver_matvecs",
}


class NotApplicable(Exception):
    """The tool cannot run on this problem (the row says why)."""


# ----------------------------------------------------------------- counting


class CountedLinearOperator:
    """A scipy ``LinearOperator`` over a torch matvec, counting the vectors.

    ``matvec`` is called with float64 numpy vectors; ``fn`` takes and returns
    float64 torch tensors ``[n]``.
    """

    def __init__(self, fn, n: int):
        from scipy.sparse.linalg import LinearOperator

        self.count = 0
        self.fn = fn

        def mv(x: np.ndarray) -> np.ndarray:
            self.count += 1
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel())
            return self.fn(v).numpy()

        self.op = LinearOperator((n, n), matvec=mv, dtype=np.float64)


class _CountMatmul(TorchFunctionMode):
    """Counts the columns multiplied by one dense matrix ``A`` inside the mode."""

    _FUNCS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm)

    def __init__(self, A: Tensor):
        super().__init__()
        self.A = A
        self.columns = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS and args and args[0] is self.A:
            other = args[1]
            self.columns += other.shape[-1] if other.dim() > 1 else 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _one_thread():
    """One torch thread and one BLAS thread (scipy's) for the block."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _top_vector(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors[:, int(np.argmax(values))])


# --------------------------------------------------------------------- base


class Tool:
    """Adapter base: ``name`` is the row label, ``counting`` a key of
    :data:`HVP_COUNTING`, ``claims`` whether the tool reports convergence."""

    name = "?"
    counting = "?"
    claims = True

    def setup(self, problem: Problem) -> None:
        self._own = set(self.__dict__)
        self.problem = problem

    def solve(self, k: int) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        """Drop what ``setup`` and ``solve`` made (kept graphs) after the row."""
        own = self.__dict__.get("_own", set(self.__dict__))
        for key in [key for key in self.__dict__ if key not in own]:
            del self.__dict__[key]


# -------------------------------------------------------------------- curvx


class CurvxTrack(Tool):
    """``curvx.track(model, loss, (X, Y), k, tol=1e-3)``; ``.step()`` per step."""

    counting = "curvx"

    def __init__(self, name: str = "curvx track (warm)"):
        self.name = name

    def setup(self, problem: Problem) -> None:
        import curvx

        super().setup(problem)
        self.curvx = curvx
        self.tracker = None

    def solve(self, k: int) -> Answer:
        p = self.problem
        if self.tracker is None:
            self.tracker = self.curvx.track(
                p.model, mse_loss, (p.X, p.Y), k=k, tol=TARGET_RTOL
            )
        t0 = time.perf_counter()
        rec = self.tracker.step(lr=p.lr)
        seconds = time.perf_counter() - t0
        return Answer(
            values=list(rec.eigenvalues),
            claimed=list(rec.converged),
            hvps=rec.hvps,
            seconds=seconds,
            extra={"warm": rec.warm_start, "method": rec.method},
        )


class CurvxEigsh(Tool):
    """``curvx.eigsh(model, loss, (X, Y), k, tol=1e-3)`` from a random start."""

    counting = "curvx"
    name = "curvx eigsh (cold)"

    def setup(self, problem: Problem) -> None:
        import curvx

        super().setup(problem)
        self.curvx = curvx
        self.seed = 0

    def solve(self, k: int) -> Answer:
        p = self.problem
        self.seed += 1
        t0 = time.perf_counter()
        res = self.curvx.eigsh(
            p.model, mse_loss, (p.X, p.Y), k=k, tol=TARGET_RTOL, seed=self.seed
        )
        seconds = time.perf_counter() - t0
        return Answer(
            values=res.eigenvalues.tolist(),
            claimed=res.converged.tolist(),
            hvps=int(res.hvps),
            seconds=seconds,
            extra={"solver_status": res.status},
        )


# -------------------------------------------------------------- scipy eigsh


class ScipyEigsh(Tool):
    """ARPACK (``scipy.sparse.linalg.eigsh``, which="LA", tol=1e-3) on a
    LinearOperator whose matvec is curvx's kept-graph ``HessianOperator.matvec``
    (float64 in and out, float32 products).

    Variants: ``cold`` (a fresh random v0 each solve, default ncv), ``warm``
    (v0 = the previous top eigenvector, default ncv), ``tuned`` (warm, ncv=6,
    one torch thread and one BLAS thread).
    """

    counting = "scipy"

    def __init__(self, variant: str):
        if variant not in ("cold", "warm", "tuned"):
            raise ValueError(variant)
        self.variant = variant
        self.name = {
            "cold": "scipy eigsh (cold)",
            "warm": "scipy eigsh (warm v0)",
            "tuned": "scipy eigsh (tuned: ncv=6, 1 thread, warm v0)",
        }[variant]

    def setup(self, problem: Problem) -> None:
        import curvx

        super().setup(problem)
        self.op = curvx.HessianOperator(
            problem.model, mse_loss, (problem.X, problem.Y), method="kept-graph"
        )
        self.lin = CountedLinearOperator(self.op.matvec, self.op.n)
        self.rng = np.random.default_rng(0)
        self.v0: np.ndarray | None = None

    def solve(self, k: int) -> Answer:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        n = self.op.n
        v0 = self.v0
        if v0 is None or self.variant == "cold":
            v0 = self.rng.standard_normal(n)
        ncv = 6 if self.variant == "tuned" else None
        ctx = _one_thread() if self.variant == "tuned" else contextlib.nullcontext()
        c0 = self.lin.count
        t0 = time.perf_counter()
        with ctx:
            try:
                w, U = eigsh(
                    self.lin.op, k=k, which="LA", tol=TARGET_RTOL, v0=v0, ncv=ncv
                )
                claimed = [True] * len(w)
            except ArpackNoConvergence as exc:
                w, U = exc.eigenvalues, exc.eigenvectors
                claimed = [False] * len(w)
        seconds = time.perf_counter() - t0
        if len(w):
            self.v0 = _top_vector(w, U)
        return Answer(
            values=[float(x) for x in w],
            claimed=claimed,
            hvps=self.lin.count - c0,
            seconds=seconds,
        )


# ---------------------------------------------------------------- PyHessian


class PyHessianTool(Tool):
    """``pyhessian.hessian(model, criterion, data=(X, Y), cuda=False)
    .eigenvalues(top_n=k, tol=1e-3)``: deflated power iteration, largest
    magnitude; tol is its relative change of the eigenvalue between iterations.
    It returns no convergence flag. Its vectors come from the global RNG (seeded
    per solve here); the model is left in eval mode and ``.grad`` holds a graph,
    both undone after each call."""

    name = "PyHessian (power iteration)"
    counting = "pyhessian"
    claims = False

    def setup(self, problem: Problem) -> None:
        # pyhessian/__init__ rebinds the name "hessian" to the class: take the module
        ph = importlib.import_module("pyhessian.hessian")
        super().setup(problem)
        self.ph = ph
        self.seed = 0

    def solve(self, k: int) -> Answer:
        ph, model = self.ph, self.problem.model
        count = [0]
        original = ph.hessian_vector_product

        def counted(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        was_training = model.training
        for p in model.parameters():
            p.grad = None
        self.seed += 1
        ph.hessian_vector_product = counted
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                t0 = time.perf_counter()
                H = ph.hessian(
                    model, mse_loss, data=(self.problem.X, self.problem.Y), cuda=False
                )
                values, _ = H.eigenvalues(maxIter=100, tol=TARGET_RTOL, top_n=k)
                seconds = time.perf_counter() - t0
        finally:
            ph.hessian_vector_product = original
            for p in model.parameters():
                p.grad = None
            model.train(was_training)
        return Answer(
            values=[float(v) for v in values],
            claimed=[None] * len(values),
            hvps=count[0],
            seconds=seconds,
        )


# ------------------------------------------------------- hessian-eigenthings


class EigenthingsTool(Tool):
    """hessian-eigenthings 1.x: ``HessianOperator(model, [(X, Y)],
    supervised_loss(mse_loss))`` with

    * ``lanczos``: ``lanczos(op, k=k, tol=1e-3, which="LA")`` with its default
      ``max_iter = 2k`` (no restarts);
    * ``lanczos-doubling``: the same with ``max_iter`` doubled (2k, 4k, ... up to
      128) until its own ``converged`` flags are all set, every try counted;
    * ``power``: ``deflated_power_iteration(op, k=k, tol=1e-3, max_iter=100)``.

    (The 0.x entry point ``compute_hessian_eigenthings`` is gone in 1.x.) Each
    product recomputes the loss and first gradient (no graph kept between
    products).
    """

    counting = "eigenthings"
    MAX_ITER_CAP = 128

    def __init__(self, mode: str):
        if mode not in ("lanczos", "lanczos-doubling", "power"):
            raise ValueError(mode)
        self.mode = mode
        self.name = {
            "lanczos": "hessian-eigenthings lanczos (default max_iter=2k)",
            "lanczos-doubling": "hessian-eigenthings lanczos (max_iter doubled "
            "until converged)",
            "power": "hessian-eigenthings power iteration (deflated)",
        }[mode]

    def setup(self, problem: Problem) -> None:
        import hessian_eigenthings as he

        super().setup(problem)
        self.he = he
        op = he.HessianOperator(
            problem.model, [(problem.X, problem.Y)], he.supervised_loss(mse_loss)
        )
        self.count = 0
        inner = op.matvec

        def counted(v):
            self.count += 1
            return inner(v)

        op.matvec = counted
        self.op = op
        self.seed = 0

    def solve(self, k: int) -> Answer:
        he = self.he
        self.seed += 1
        c0 = self.count
        tries = 0
        t0 = time.perf_counter()
        if self.mode == "power":
            res = he.deflated_power_iteration(
                self.op, k=k, max_iter=100, tol=TARGET_RTOL, seed=self.seed
            )
        else:
            max_iter = min(2 * k, self.op.size - 1)
            while True:
                tries += 1
                res = he.lanczos(
                    self.op,
                    k=k,
                    max_iter=max_iter,
                    tol=TARGET_RTOL,
                    which="LA",
                    seed=self.seed,
                )
                if (
                    self.mode == "lanczos"
                    or bool(res.converged.all())
                    or max_iter >= min(self.MAX_ITER_CAP, self.op.size - 1)
                ):
                    break
                max_iter = min(2 * max_iter, self.MAX_ITER_CAP, self.op.size - 1)
        seconds = time.perf_counter() - t0
        extra: dict[str, Any] = {"iterations": int(res.iterations)}
        if self.mode == "lanczos-doubling":
            extra["tries"] = tries
        return Answer(
            values=res.eigenvalues.tolist(),
            claimed=[bool(c) for c in res.converged.tolist()],
            hvps=self.count - c0,
            seconds=seconds,
            extra=extra,
        )


# ----------------------------------------------------------------- curvlinops


class _HalfSumMSE(torch.nn.Module):
    """The harness loss as a module with the ``reduction`` attribute curvlinops
    reads: 1/2 sum over outputs, mean over examples."""

    reduction = "mean"

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return mse_loss(output, target)


class CurvlinopsEigsh(Tool):
    """curvlinops' ``HessianLinearOperator(model, loss, params, [(X, Y)])``,
    exported with ``.to_scipy()`` (float32 products, float64 in and out), and
    ARPACK ``eigsh(which="LA", tol=1e-3)``; warm: v0 = the previous top
    eigenvector. The operator is built once (its determinism check costs two
    gradients and two products, not counted per step)."""

    counting = "curvlinops"

    def __init__(self, warm: bool):
        self.warm = warm
        self.name = "curvlinops + scipy eigsh (" + ("warm v0)" if warm else "cold)")

    def setup(self, problem: Problem) -> None:
        from curvlinops import HessianLinearOperator

        super().setup(problem)
        params = [p for p in problem.model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        H = HessianLinearOperator(
            problem.model, _HalfSumMSE(), params, [(problem.X, problem.Y)]
        )
        scipy_op = H.to_scipy()
        self.setup_seconds = time.perf_counter() - t0
        n = scipy_op.shape[0]
        self.lin = CountedLinearOperator(
            lambda v: torch.from_numpy(np.asarray(scipy_op.matvec(v.numpy()))), n
        )
        self.n = n
        self.rng = np.random.default_rng(0)
        self.v0: np.ndarray | None = None

    def solve(self, k: int) -> Answer:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        v0 = self.v0 if (self.warm and self.v0 is not None) else None
        if v0 is None:
            v0 = self.rng.standard_normal(self.n)
        c0 = self.lin.count
        t0 = time.perf_counter()
        try:
            w, U = eigsh(self.lin.op, k=k, which="LA", tol=TARGET_RTOL, v0=v0)
            claimed = [True] * len(w)
        except ArpackNoConvergence as exc:
            w, U = exc.eigenvalues, exc.eigenvectors
            claimed = [False] * len(w)
        seconds = time.perf_counter() - t0
        if len(w):
            self.v0 = _top_vector(w, U)
        return Answer(
            values=[float(x) for x in w],
            claimed=claimed,
            hvps=self.lin.count - c0,
            seconds=seconds,
            extra={"setup_s": self.setup_seconds},
        )


# -------------------------------------------------------------------- lobpcg


#: Largest n for which the dense float32 Hessian is assembled (4 GiB).
LOBPCG_MAX_N = 32768


class LobpcgDense(Tool):
    """``torch.lobpcg`` on the dense float32 Hessian, assembled each step by n
    batched double-backward products; ``largest=True``, ``tol=1e-3`` (its
    residual relative to ``||A||``); warm: X = the previous Ritz vectors. Its
    convergence claim is the worker's ``converged_count`` at the last tracker
    call."""

    counting = "lobpcg"

    def __init__(self, warm: bool):
        self.warm = warm
        self.name = "torch.lobpcg on the dense Hessian (" + (
            "warm X)" if warm else "cold)"
        )

    def setup(self, problem: Problem) -> None:
        super().setup(problem)
        if problem.n > LOBPCG_MAX_N:
            gib = problem.n**2 * 4 / 2**30
            raise NotApplicable(
                f"the dense Hessian of n={problem.n} needs {gib:,.0f} GiB in float32"
            )
        self.X0: Tensor | None = None
        self.gen = torch.Generator().manual_seed(0)

    def solve(self, k: int) -> Answer:
        p = self.problem
        t0 = time.perf_counter()
        H = _dense_float32(p)
        n = H.shape[0]
        X0 = self.X0 if (self.warm and self.X0 is not None) else None
        if X0 is None:
            X0 = torch.randn(n, k, generator=self.gen)
        state: dict[str, int] = {"converged": 0, "iterations": 0}

        def tracker(worker) -> None:
            state["converged"] = int(worker.ivars["converged_count"])
            state["iterations"] = int(worker.ivars["istep"])

        with _CountMatmul(H) as counter:
            E, V = torch.lobpcg(
                H, k=k, X=X0, largest=True, tol=TARGET_RTOL, tracker=tracker
            )
        seconds = time.perf_counter() - t0
        self.X0 = V.detach().clone()
        return Answer(
            values=E.tolist(),
            claimed=[i < state["converged"] for i in range(k)],
            hvps=n,
            seconds=seconds,
            extra={
                "solver_matvecs": counter.columns,
                "iterations": state["iterations"],
            },
        )


def _dense_float32(problem: Problem) -> Tensor:
    """The float32 Hessian at the model's parameters, by batched double backward."""
    p = problem
    return ExactHessian(p.model, flat_params(p.model), p.X, p.Y, torch.float32).dense()


def window_tools() -> list[Tool]:
    """The tools of the tracking window (row 1), in table order; eigsh tuned
    comes before curvx so that curvx's HVP floor can be read against it."""
    return [
        ScipyEigsh("cold"),
        ScipyEigsh("warm"),
        ScipyEigsh("tuned"),
        CurvxTrack(),
        PyHessianTool(),
        EigenthingsTool("lanczos"),
        EigenthingsTool("lanczos-doubling"),
        EigenthingsTool("power"),
        CurvlinopsEigsh(warm=True),
        LobpcgDense(warm=False),
        LobpcgDense(warm=True),
    ]


def cold_tools() -> list[Tool]:
    """The tools of the cold top-5 solve (row 2)."""
    return [
        CurvxEigsh(),
        ScipyEigsh("cold"),
        PyHessianTool(),
        EigenthingsTool("lanczos"),
        EigenthingsTool("lanczos-doubling"),
        EigenthingsTool("power"),
        CurvlinopsEigsh(warm=False),
        LobpcgDense(warm=False),
    ]


__all__ = [
    "HVP_COUNTING",
    "NotApplicable",
    "Tool",
    "cold_tools",
    "flat_params",
    "window_tools",
]
