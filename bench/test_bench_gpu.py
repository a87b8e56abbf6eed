"""Row 5 of the benchmark issue: curvx on a GPU, on an 11M-parameter ResNet-18.

ResNet-18 (``torchvision.models.resnet18(num_classes=10)``, 11,181,642 parameters;
the same network built in ``_gpu.py`` when torchvision is absent) on one random
CIFAR-10-shaped batch ``[N, 3, 32, 32]`` with random labels and the mean
cross-entropy, full-batch SGD:

* 5a tracking: ``curvx.track(..., k=5, mode="train")`` at every step (the tracker's
  loss is the training loss: BatchNorm on the batch's statistics), fused
  (``tracker.step(backward=True)`` fills ``.grad``; the same forward and first
  backward serve the products) and unfused (the user's own backward, then
  ``tracker.step``). ratio = median (step + tracking) / median plain step, both
  measured in this process; the first tracked step (cold solve) is reported apart.
  Floor: fused ratio <= 3.0.
* 5b block HVP: 8 vectors in one block against 8 single-vector products, through
  ``curvx.hvp`` (each call pays its forward and first backward) and through one
  ``HessianOperator`` with its first-backward graph kept. Floor: <= 0.3x.
* 5c a cold top-5 ``curvx.eigsh`` with the convergence test after every block
  and after every 4th (``check_every``): seconds, HVPs and ms per HVP, to choose
  the GPU default (host syncs saved against blocks run past convergence).

Skipped visibly without CUDA. ``BENCH_GPU_BATCH`` (256), ``BENCH_GPU_STEPS`` (8
tracked steps after ``BENCH_GPU_WARM`` = 2) and ``BENCH_GPU_ROW_BUDGET_S`` (40: a
tracking row stops timing steps past it) size it. Runs without pytest too:
``python bench/test_bench_gpu.py OUT.json [--match TEXT]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import curvx
from _gpu import CUDA, NO_CUDA, Row, race, resnet18, run_standalone, sync
from curvx.operators import HessianOperator

GROUP_5A = "5a GPU tracking: ResNet-18, CIFAR-10-shaped batch, top-5 every step"
GROUP_5B = "5b GPU block HVP: ResNet-18, 8 vectors at once vs 8 single HVPs"
GROUP_5C = "5c GPU cold top-5: convergence test every block vs every 4 (host syncs)"
DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")  # "cpu": a smoke run of the code
BATCH = int(os.environ.get("BENCH_GPU_BATCH", "256"))
STEPS = int(os.environ.get("BENCH_GPU_STEPS", "8"))
WARM = int(os.environ.get("BENCH_GPU_WARM", "2"))
#: a tracking row stops timing steps after this many seconds (``steps_timed`` says)
ROW_BUDGET_S = float(os.environ.get("BENCH_GPU_ROW_BUDGET_S", "40"))
K, LR = 5, 0.05
RATIO_FLOOR = 3.0
BLOCK_FLOOR = 0.3
BLOCK_K = 8


def _problem() -> tuple[nn.Module, str, torch.Tensor, torch.Tensor]:
    model, origin = resnet18(10, seed=0)
    model = model.to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    X = torch.randn(BATCH, 3, 32, 32, generator=g, device=DEVICE)
    y = torch.randint(0, 10, (BATCH,), generator=g, device=DEVICE)
    return model, origin, X, y


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, target)


def _plain_steps(model, opt, X, y, count: int) -> list[float]:
    """Seconds of ``count`` plain SGD steps (zero grads, forward, backward, step)."""
    times = []
    for _ in range(count):
        sync(DEVICE)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(model(X), y).backward()
        opt.step()
        sync(DEVICE)
        times.append(time.perf_counter() - t0)
    return times


def _memory() -> dict[str, Any]:
    if DEVICE != "cuda":
        return {"device": DEVICE}
    return {
        "gpu": torch.cuda.get_device_name(),
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def tracking_row(mode: str) -> dict[str, Any]:
    """One GD run with top-5 tracking at every step; the per-step ratio."""
    model, origin, X, y = _problem()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain = _plain_steps(model, opt, X, y, 3)  # warm-up (cuDNN autotuning)
    plain = _plain_steps(model, opt, X, y, STEPS)
    tracker = curvx.track(model, _loss, (X, y), k=K, mode="train", seed=0)
    tracked, records = [], []
    start = time.perf_counter()
    for t in range(WARM + STEPS):
        if t > WARM and time.perf_counter() - start > ROW_BUDGET_S:
            break
        sync(DEVICE)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if mode == "fused":
            rec = tracker.step(step=t, lr=LR, backward=True)
        else:
            _loss(model(X), y).backward()
            rec = tracker.step(step=t, lr=LR)
        opt.step()
        sync(DEVICE)
        tracked.append(time.perf_counter() - t0)
        records.append(rec)
    plain += _plain_steps(model, opt, X, y, STEPS)  # before and after, same process
    kept = records[WARM:]
    plain_s, tracked_s = _median(plain), _median(tracked[WARM:])
    ratio = tracked_s / plain_s
    last = records[-1]
    row = {
        "model": origin,
        "n_params": n,
        "batch": BATCH,
        "k": K,
        "mode": mode,
        "steps_timed": f"{len(kept)}/{STEPS}",
        "plain_step_ms": 1e3 * plain_s,
        "tracked_step_ms": 1e3 * tracked_s,
        "first_tracked_step_ms": 1e3 * tracked[0],
        "ratio": ratio,
        "hvps_median": _median(getattr(r, "hvps", None) for r in kept),
        "iterations_median": _median(getattr(r, "iterations", None) for r in kept),
        "all_converged_steps": sum(
            bool(getattr(r, "converged", None)) and all(r.converged) for r in kept
        ),
        "statuses": sorted({str(getattr(r, "status", None)) for r in records}),
        "method": getattr(last, "method", None),
        "sharpness_last": getattr(last, "sharpness", None),
        **_memory(),
    }
    if mode == "fused":
        met = ratio <= RATIO_FLOOR
        row["floors"] = [
            ["GPU ResNet-18 top-5 (step + tracking) / step", ratio, RATIO_FLOOR, met]
        ]
    return row


def block_hvp_row(api: str) -> dict[str, Any]:
    """A block of 8 vectors against 8 single-vector products."""
    model, origin, X, y = _problem()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    V = torch.randn(n, BLOCK_K, generator=g, device=DEVICE)
    method = None
    if api == "curvx.hvp":

        def block():
            return curvx.hvp(model, _loss, (X, y), V)

        def singles():
            return [curvx.hvp(model, _loss, (X, y), V[:, j]) for j in range(BLOCK_K)]

    else:
        op = HessianOperator(model, _loss, (X, y), method="kept-graph")

        def block():
            return op.matmat(V)

        def singles():
            return [op.matvec(V[:, j]) for j in range(BLOCK_K)]

    # Both give the same products
    HV = block()
    cols = torch.stack(singles(), dim=1)
    rel = float((HV - cols).norm() / cols.norm())
    if api != "curvx.hvp":
        method = op.method
    t = race(
        {"block": block, "singles": singles},
        DEVICE,
        warmup=1,
        min_repeats=3,
        max_repeats=5,
        budget_s=10.0,
    )
    ratio = t["block"]["median_ms"] / t["singles"]["median_ms"]
    return {
        "model": origin,
        "n_params": n,
        "batch": BATCH,
        "k": BLOCK_K,
        "block_ms": t["block"]["median_ms"],
        "singles_ms": t["singles"]["median_ms"],
        "ratio_block_singles": ratio,
        "block_vs_singles_rel_diff": rel,
        "method": method,
        "floors": [
            [
                f"GPU ResNet-18 block of 8 / 8 singles ({api})",
                ratio,
                BLOCK_FLOOR,
                ratio <= BLOCK_FLOOR,
            ]
        ],
    }


def check_every_row(every: int) -> dict[str, Any]:
    """A cold top-5 solve with the convergence test every ``every`` blocks: the
    host syncs saved against the blocks run past convergence."""
    model, origin, X, y = _problem()
    sync(DEVICE)
    t0 = time.perf_counter()
    res = curvx.eigsh(
        model,
        _loss,
        (X, y),
        k=K,
        tol=1e-3,
        mode="train",
        max_hvps=600,
        check_every=every,
    )
    sync(DEVICE)
    seconds = time.perf_counter() - t0
    return {
        "model": origin,
        "batch": BATCH,
        "check_every": every,
        "seconds": seconds,
        "hvps": res.hvps,
        "ms_per_hvp": 1e3 * seconds / max(res.hvps, 1),
        "all_converged": res.all_converged,
        "sharpness": float(res.eigenvalues[0]),
    }


def rows() -> list[Row]:
    out = [
        Row(
            key=f"tracking-{mode}",
            group=GROUP_5A,
            tool=f"curvx.track {mode}",
            fn=lambda mode=mode: tracking_row(mode),
            info={"mode": mode},
            needs_cuda=True,
        )
        for mode in ("fused", "unfused")
    ]
    out += [
        Row(
            key=f"block-hvp-{api.split('.')[-1].split()[0].lower()}",
            group=GROUP_5B,
            tool=api,
            fn=lambda api=api: block_hvp_row(api),
            info={"k": BLOCK_K},
            needs_cuda=True,
        )
        for api in ("curvx.hvp", "HessianOperator kept-graph")
    ]
    out += [
        Row(
            key=f"check-every-{every}",
            group=GROUP_5C,
            tool=f"curvx.eigsh check_every={every}",
            fn=lambda every=every: check_every_row(every),
            info={"check_every": every},
            needs_cuda=True,
        )
        for every in (1, 4)
    ]
    return out


ROWS = rows()

try:
    import pytest
except ImportError:  # the standalone run needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.cuda
    @pytest.mark.skipif(not CUDA, reason=NO_CUDA)
    @pytest.mark.parametrize("row", [pytest.param(r, id=r.key) for r in ROWS])
    def test_gpu(bench_row, row):
        bench_row(row.group, row.tool, row.fn, **row.info)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(1 if run_standalone(ROWS, sys.argv[1:]) else 0)
