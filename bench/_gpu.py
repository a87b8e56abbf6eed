"""Pieces the kernel and GPU benchmarks share: models, parameter shapes, timing.

* :func:`resnet18`: torchvision's ResNet-18 (``num_classes=10``, 11,181,642
  parameters) when torchvision imports, else the same network built here.
* :func:`param_shapes`: the trainable parameter shapes of the benchmark models,
  the layouts the block-layout kernels move blocks between.
* :func:`race`: times several callables on one device, interleaved, with a
  synchronization around every call (launch overhead counts, as it does for the
  solver), after warm-up; medians and minima in milliseconds.
* :class:`Row` / :func:`run_standalone`: run a module's rows without pytest or
  pytest-benchmark (the GPU check degrades to this when they are missing).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA not available: GPU benchmark rows need a GPU"


# ----------------------------------------------------------------------- models


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with BatchNorm, a skip."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _ResNet18(nn.Module):
    """torchvision.models.resnet18's architecture (7x7 stem, max-pool, 4 stages)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(
                nn.Sequential(
                    _BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes)
                )
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, seed: int = 0) -> tuple[nn.Module, str]:
    """ResNet-18 for 32x32 inputs and its origin ("torchvision X.Y" or "inline")."""
    torch.manual_seed(seed)
    try:
        import torchvision

        return (
            torchvision.models.resnet18(num_classes=num_classes),
            f"torchvision {torchvision.__version__}",
        )
    except Exception:  # noqa: BLE001 - absent or broken: the same network inline
        return _ResNet18(num_classes), "inline (torchvision not importable)"


def _fc_tanh_shapes() -> list[tuple[int, ...]]:
    """fc-tanh on 28x28 inputs (``curvx train``'s model): 199,210 parameters."""
    sizes = [784, 200, 200, 10]
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes, sizes[1:]):
        shapes += [(b, a), (b,)]
    return shapes


def param_shapes(model: str) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of ``"fc-tanh"`` or ``"resnet18"``."""
    if model == "fc-tanh":
        return _fc_tanh_shapes()
    if model == "resnet18":
        return [tuple(p.shape) for p in _ResNet18(10).parameters()]
    raise ValueError(f"unknown model {model!r}")


def numels(shapes: Iterable[tuple[int, ...]]) -> list[int]:
    return [math.prod(s) for s in shapes]


# ----------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def race(
    fns: dict[str, Callable[[], Any]],
    device: torch.device | str,
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 50,
    budget_s: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Times each callable, interleaved round by round, synchronized around every
    call; stops after ``min_repeats`` rounds once ``budget_s`` is spent (or at
    ``max_repeats``). Returns ``{name: {"median_ms", "min_ms", "repeats"}}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max_repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return {
        name: {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "repeats": len(ts),
        }
        for name, ts in times.items()
    }


# ------------------------------------------------------------ standalone runs


@dataclass
class Row:
    """One benchmark row: ``bench_row(group, tool, fn, **info)``'s arguments.

    ``needs_cuda`` rows are skipped (with :data:`NO_CUDA`) on machines without a
    GPU; ``key`` is the pytest id.
    """

    key: str
    group: str
    tool: str
    fn: Callable[[], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    needs_cuda: bool = False


def run_standalone(rows: Iterable[Row], argv: list[str]) -> int:
    """Runs ``rows`` without pytest: ``argv`` is ``[OUT.json] [--match TEXT]``
    (only rows whose key contains TEXT). Writes one JSON object per row (the
    benchmark row convention's group / tool / extra_info) to OUT.json (or stdout);
    returns the number of rows that failed."""
    args = list(argv)
    match = ""
    if "--match" in args:
        i = args.index("--match")
        match = args[i + 1]
        del args[i : i + 2]
    out_path = args[0] if args else None
    results, failed = [], 0
    for row in rows:
        if match not in row.key:
            continue
        entry: dict[str, Any] = {"name": row.key, "group": row.group}
        info = {"tool": row.tool, **row.info}
        if row.needs_cuda and not CUDA:
            info["status"] = f"skipped: {NO_CUDA}"
        else:
            try:
                info.update(row.fn() or {})
                info.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                failed += 1
                first = (str(exc).strip().splitlines() or [""])[0]
                info["status"] = f"failed: {type(exc).__name__}: {first}"[:300]
                traceback.print_exc()
        entry["extra_info"] = info
        results.append(entry)
        print(json.dumps(entry, default=str), flush=True)
    text = json.dumps({"benchmarks": results}, indent=1, default=str)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return failed
