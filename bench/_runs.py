"""The measurements behind each table; each returns one row's figures.

* :func:`replay_window` (tables 1a, 1c): one tool over consecutive snapshots of
  the GD trajectory, warm state carried from step to step, each answer scored
  against the reference at its step.
* :func:`curvx_run` (table 1b): a whole GD run with curvx tracking at every step,
  fused (``tracker.step(..., backward=True)`` fills ``.grad``) or unfused (the
  user's own backward, then ``tracker.step``), timed step by step against plain
  GD steps timed alongside.
* :func:`cold_solve` (table 2): one solve from a random start at one snapshot.
* :func:`block_hvp` (table 3): a block of k vectors against k single products.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from curvx.harness.losses import mse_loss

from _protocol import (
    TARGET_RTOL,
    Answer,
    PlainStep,
    Problem,
    Settings,
    flat_params,
    score,
    summarize,
)
from _tools import HVP_COUNTING, Tool


def _ratio(plain: float, seconds: float) -> float:
    """(plain GD step + solve) / plain GD step."""
    return (plain + seconds) / plain


def replay_window(
    problem: Problem, tool: Tool, steps: list[int], k: int, budget_s: float
) -> dict[str, Any]:
    """Replay ``steps`` (consecutive snapshots) through ``tool``; row figures.

    Before each solve a plain GD step from the same snapshot is timed on a copy
    of the model; their median is the row's plain GD step. The tool's setup is
    not timed. The replay stops early once the tool's solves have taken
    ``budget_s`` seconds in all (``steps`` then shows ``done/asked``).
    """
    tool.setup(problem)
    plain_steps = PlainStep(problem)
    per: list[dict[str, Any]] = []
    spent = 0.0
    extra_keys: dict[str, list] = {}
    try:
        for t in steps:
            problem.load(t)
            plain_steps.time(problem.snapshots[t])
            ans = tool.solve(k)
            ref = problem.reference(k, step=t)
            s = score(ans, ref["values"], k)
            s.update(seconds=ans.seconds, hvps=ans.hvps, step=t)
            per.append(s)
            for key, val in ans.extra.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    extra_keys.setdefault(key, []).append(val)
            spent += ans.seconds
            if spent > budget_s:
                break
    finally:
        tool.close()
    errs = [p["max_rel_err"] for p in per]
    hv = summarize([p["hvps"] for p in per])
    plain = plain_steps.median
    row: dict[str, Any] = {
        "steps": f"{len(per)}/{len(steps)}",
        "first_step": steps[0],
        "ratio_median": statistics.median(_ratio(plain, p["seconds"]) for p in per),
        "hvps_median": hv["median"],
        "hvps_mean": hv["mean"],
        "solve_s_median": statistics.median(p["seconds"] for p in per),
        "max_rel_err": max(errs),
        "median_rel_err": statistics.median(errs),
        "wrong_converged": sum(p["wrong_converged"] for p in per),
        "unconverged": sum(p["unconverged"] for p in per),
        "claims": "yes" if tool.claims else "none",
        "plain_step_s": plain,
        "hvp_counting": HVP_COUNTING[tool.counting],
        "hvps_by_step": {str(p["step"]): p["hvps"] for p in per},
    }
    for key, vals in extra_keys.items():
        row[f"{key}_median"] = statistics.median(vals)
    return row


def curvx_run(
    problem: Problem, settings: Settings, k: int, fused: bool, budget_s: float
) -> dict[str, Any]:
    """A GD run from step 0 with curvx tracking every step; row figures.

    Timed per step: fused, ``zero_grad; tracker.step(step=t, lr=lr,
    backward=True); opt.step()``; unfused, ``zero_grad; loss.backward();
    tracker.step(step=t, lr=lr); opt.step()``. Before each, a plain GD step from
    the same parameters is timed on a copy of the model; the ratio divides by the
    median of those. Parameters at the sample steps are
    copied outside the timed region and scored afterwards against the reference
    (reused when they equal the plain run's snapshot bit for bit). Stops early
    once ``budget_s`` seconds have passed (``steps`` then shows ``done/asked``).
    """
    import curvx

    model = problem.fresh_model(0)
    X, Y, lr = problem.X, problem.Y, problem.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = curvx.track(model, mse_loss, (X, Y), k=k, tol=TARGET_RTOL)
    plain_steps = PlainStep(problem)
    samples = set(settings.samples())
    kept: dict[int, tuple[torch.Tensor, list[float], list[bool]]] = {}
    step_s: list[float] = []
    hvps: list[int] = []
    unconverged = 0
    statuses: dict[str, int] = {}
    t_start = time.perf_counter()
    for t in range(settings.run_steps):
        theta = flat_params(model)
        plain_steps.time(theta)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if fused:
            rec = tracker.step(step=t, lr=lr, backward=True)
        else:
            mse_loss(model(X), Y).backward()
            rec = tracker.step(step=t, lr=lr)
        opt.step()
        step_s.append(time.perf_counter() - t0)
        hvps.append(rec.hvps)
        unconverged += sum(not c for c in rec.converged)
        statuses[rec.status] = statuses.get(rec.status, 0) + 1
        if t in samples:
            kept[t] = (theta, list(rec.eigenvalues), list(rec.converged))
        if time.perf_counter() - t_start > budget_s:
            break
    plain = plain_steps.median
    errs, wrong, same = [], 0, 0
    for t, (theta, values, claimed) in sorted(kept.items()):
        same += int(t in problem.snapshots and torch.equal(theta, problem.snapshots[t]))
        ref = problem.reference(k, theta=theta)
        s = score(Answer(values, claimed, 0, 0.0), ref["values"], k)
        errs.append(s["max_rel_err"])
        wrong += s["wrong_converged"]
    ratios = [s / plain for s in step_s]
    hv = summarize(hvps)
    return {
        "steps": f"{len(step_s)}/{settings.run_steps}",
        "ratio_median": statistics.median(ratios),
        "ratio_mean": statistics.fmean(ratios),
        "hvps_median": hv["median"],
        "hvps_mean": hv["mean"],
        "hvps_max": hv["max"],
        "max_rel_err": max(errs) if errs else None,
        "sampled_steps": len(errs),
        "wrong_converged": wrong,
        "unconverged": unconverged,
        "record_status": ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        "same_params_as_plain_gd": f"{same}/{len(kept)}",
        "step_s_median": statistics.median(step_s),
        "plain_step_s": plain,
        "hvp_counting": HVP_COUNTING["curvx"],
    }


def cold_solve(problem: Problem, tool: Tool, step: int, k: int) -> dict[str, Any]:
    """One solve from a random start at snapshot ``step``; row figures."""
    tool.setup(problem)
    try:
        problem.load(step)
        ans = tool.solve(k)
    finally:
        tool.close()
    ref = problem.reference(k, step=step)
    s = score(ans, ref["values"], k)
    plain = problem.plain_step_median
    row = {
        "step": step,
        "seconds": ans.seconds,
        "hvps": ans.hvps,
        "grad_equiv_s": ans.seconds / plain,
        "max_rel_err": s["max_rel_err"],
        "wrong_converged": s["wrong_converged"],
        "unconverged": s["unconverged"],
        "claims": "yes" if tool.claims else "none",
        "values": [float(v) for v in sorted(ans.values, reverse=True)],
        "reference": [float(v) for v in ref["values"]],
        "hvp_counting": HVP_COUNTING[tool.counting],
    }
    for key, val in ans.extra.items():
        row[key] = val
    return row


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_hvp(
    problem: Problem, api: str, k: int, repeats: int, step: int
) -> dict[str, Any]:
    """Time of one block product of k vectors against k single products.

    ``api``:

    * ``"curvx.hvp"``: ``curvx.hvp(model, loss, data, V)`` with ``V`` ``[n, k]``
      against k calls with one vector ``[n]`` each; every call builds its own
      operator and pays its own forward and backward, as a user calling it does
      (method ``auto``: includes its choice of the HVP path each call).
    * ``"curvx.hvp(method=...)"``: the same with the method fixed.
    * ``"HessianOperator kept-graph"``: one operator whose first-backward graph
      is kept (built before timing): ``op.matmat(V)`` against k ``op.matvec``.

    A warm-up call of each kind precedes the timed repeats; the figure is the
    median over ``repeats`` (singles: the median of the sum of k calls).
    """
    import curvx

    problem.load(step)
    model, X, Y = problem.model, problem.X, problem.Y
    gen = torch.Generator().manual_seed(k)
    V = torch.randn(problem.n, k, generator=gen)
    if api.startswith("curvx.hvp"):
        method = "auto"
        if "method=" in api:
            method = api.split("method=")[1].rstrip(")")

        def block():
            return curvx.hvp(model, mse_loss, (X, Y), V, method=method)

        def single(j):
            return curvx.hvp(model, mse_loss, (X, Y), V[:, j], method=method)

    elif api == "HessianOperator kept-graph":
        op = curvx.HessianOperator(model, mse_loss, (X, Y), method="kept-graph")

        def block():
            return op.matmat(V)

        def single(j):
            return op.matvec(V[:, j])

    else:
        raise ValueError(f"unknown api {api!r}")

    HV = block()  # warm-up, and the agreement check below
    single(0)
    t_block = _median_time(block, repeats)
    t_single = _median_time(lambda: [single(j) for j in range(k)], repeats)
    cols = torch.stack([single(j) for j in range(min(k, 2))], dim=1)
    scale = cols.norm().clamp_min(1e-30)
    agree = float((HV[:, : cols.shape[1]] - cols).norm() / scale)
    plain = problem.plain_step_median
    return {
        "k": k,
        "block_s": t_block,
        "singles_s": t_single,
        "ratio_block_singles": t_block / t_single,
        "block_s_per_vector": t_block / k,
        "single_s_per_vector": t_single / k,
        "block_grad_equiv_per_vector": t_block / k / plain,
        "block_vs_single_rel_diff": agree if math.isfinite(agree) else None,
        "repeats": repeats,
    }
