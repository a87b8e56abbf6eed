"""Row 4 of the benchmark issue: every curvx kernel against its ATen composite.

Each op runs as the compiled kernel (``torch.ops.curvx``, tool "curvx kernel") and
as its pure-PyTorch reference in ``curvx._ops`` (tool "ATen reference": the ATen
composite the kernel replaces), on the same device, same inputs, timed interleaved
(:func:`_gpu.race`: warm-up, a synchronization around every call, medians). CPU
rows always; CUDA rows when a GPU exists (skipped visibly otherwise). The kernel's
row carries ``speedup`` (reference median / kernel median) and a floor of 1.2x: a
kernel below it is removed or kept with the measured reason (see the kernels'
comments). Each case also checks that both agree (``max_abs_diff``).

Sizes: ``n`` = 199,210 (fc-tanh on 28x28, the ``curvx train`` model) on both
devices and 11,181,642 (ResNet-18, 10 classes) on the GPU; bases of up to 64
columns held as a column slice of a wider buffer (as the solver passes
``Q[:, :cols]``), blocks of up to 16 vectors; the block-layout ops on the real
parameter shapes of those models.

Runs without pytest too: ``python bench/test_bench_kernels.py OUT.json [--match
cuda]``.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from _gpu import CUDA, NO_CUDA, Row, numels, param_shapes, race, run_standalone
from curvx import _ops

try:
    from _tools import NotApplicable
except Exception:  # noqa: BLE001 - standalone runs without the peers' stack

    class NotApplicable(Exception):
        """The row cannot run here (the row says why)."""


KERNEL, REFERENCE = "curvx kernel", "ATen reference"
TOOLS = (KERNEL, REFERENCE)
FLOOR = 1.2
GROUP = "4 kernels ({device}): curvx kernel vs ATen reference"
N_SMALL = 199_210  # fc-tanh on 28x28 inputs
N_LARGE = 11_181_642  # ResNet-18, 10 classes
BUDGET_S = float(os.environ.get("BENCH_KERNEL_BUDGET_S", "0.6"))
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One op at one size on one device (two rows: kernel and reference)."""

    op: str
    device: str
    dtype: str
    config: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        cfg = "-".join(f"{k}{v}" for k, v in self.config)
        return f"{self.device}-{self.op}-{self.dtype}-{cfg}"

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.config)


def _cases() -> list[Case]:
    out: list[Case] = []
    for device, ns in (("cpu", [N_SMALL]), ("cuda", [N_SMALL, N_LARGE])):
        for n in ns:
            for dtype, m, b in [("f64", 64, 8), ("f32", 64, 8), ("bf16", 64, 8)] + [
                ("f64", 32, 16)
            ]:
                out.append(
                    Case("orthogonalize", device, dtype, (("n", n), ("m", m), ("b", b)))
                )
            for dtype, b in [("f64", 8), ("f32", 8), ("f64", 16)]:
                out.append(Case("lanczos_step", device, dtype, (("n", n), ("b", b))))
        for r, b, p in [(10, 8, 8), (0, 16, 4)]:
            out.append(
                Case("assemble_tridiag", device, "f64", (("r", r), ("b", b), ("p", p)))
            )
        models = [("fc-tanh", 8), ("fc-tanh", 16)]
        if device == "cuda":
            models += [("resnet18", 5), ("resnet18", 8), ("resnet18", 16)]
        for model, k in models:
            cfg = (("model", model), ("k", k))
            out.append(Case("pack_block", device, "f32", cfg))
            out.append(Case("unpack_block", device, "f32", cfg))
            if k == 8:
                out.append(Case("pack_block_add_", device, "f32", cfg))
                out.append(Case("pack_block_add_", device, "f32->f64", cfg))
                out.append(Case("unpack_block", device, "f64->f32", cfg))
    return out


CASES = _cases()


def _randn(*shape, device, dtype, seed) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def _basis(n: int, m: int, dtype, device) -> torch.Tensor:
    """A [n, m] column slice of an [n, m + 8] buffer, columns near orthonormal
    (random Gaussian columns scaled by 1/sqrt(n): the kernels' work does not
    depend on exact orthonormality)."""
    buf = _randn(n, m + 8, device=device, dtype=torch.float32, seed=1) / n**0.5
    return buf.to(dtype)[:, :m]


def _setup(case: Case) -> tuple[Callable, Callable, Callable[[], float]]:
    """(kernel call, reference call, max |kernel - reference| of one call each)."""
    dev, cfg = case.device, case.cfg
    ops = torch.ops.curvx
    if case.op in ("orthogonalize", "lanczos_step"):
        dtype = DTYPES[case.dtype]
        n, b = cfg["n"], cfg["b"]
        V = _randn(n, b, device=dev, dtype=torch.float32, seed=2).to(dtype)
        if case.op == "orthogonalize":
            Q = _basis(n, cfg["m"], dtype, dev)
            args = (Q, V, 2)
            kernel, ref = ops.orthogonalize, _ops.orthogonalize_ref
        else:
            Q_cur, Q_prev = _basis(n, 2 * b, dtype, dev).split(b, dim=1)
            B_prev = _randn(b, b, device=dev, dtype=torch.float64, seed=3)
            args = (V, Q_cur, Q_prev, B_prev)
            kernel, ref = ops.lanczos_step, _ops.lanczos_step_ref

        def diff():
            a, b_ = kernel(*args)[0], ref(*args)[0]
            return float((a.double() - b_.double()).abs().max())

        return (lambda: kernel(*args)), (lambda: ref(*args)), diff
    if case.op == "assemble_tridiag":
        r, b, p = cfg["r"], cfg["b"], cfg["p"]
        f64 = dict(device=dev, dtype=torch.float64)
        args = (
            _randn(r, r, seed=4, **f64),
            _randn(b, r, seed=5, **f64),
            _randn(p, b, b, seed=6, **f64),
            _randn(max(p - 1, 0), b, b, seed=7, **f64),
        )

        def diff():
            a, b_ = ops.assemble_tridiag(*args), _ops.assemble_tridiag_ref(*args)
            return float((a - b_).abs().max())

        return (
            lambda: ops.assemble_tridiag(*args),
            lambda: _ops.assemble_tridiag_ref(*args),
            diff,
        )
    # Block layout on a model's parameter shapes
    shapes = param_shapes(cfg["model"])
    sizes, k = numels(shapes), cfg["k"]
    n = sum(sizes)
    src, _, dst = case.dtype.partition("->")
    src_dtype, dst_dtype = DTYPES[src], DTYPES[dst or src]
    if case.op == "unpack_block":
        V = _randn(n, k, device=dev, dtype=torch.float32, seed=8).to(src_dtype)
        out_dtype = dst_dtype if dst else None

        def diff():
            a = _ops._views_of(ops.unpack_block(V, sizes, out_dtype), k, shapes)
            b_ = _ops.unpack_block_ref(V, shapes, out_dtype)
            return max(float((x - y).abs().max()) for x, y in zip(a, b_) if x.numel())

        return (
            lambda: _ops._views_of(ops.unpack_block(V, sizes, out_dtype), k, shapes),
            lambda: _ops.unpack_block_ref(V, shapes, out_dtype),
            diff,
        )
    parts = [
        _randn(k, *s, device=dev, dtype=torch.float32, seed=10 + i).to(src_dtype)
        for i, s in enumerate(shapes)
    ]
    if case.op == "pack_block":

        def diff():
            a = ops.pack_block(parts, sizes, k, 1.0, None)
            return float((a - _ops.pack_block_ref(parts, sizes, k)).abs().max())

        return (
            lambda: ops.pack_block(parts, sizes, k, 1.0, None),
            lambda: _ops.pack_block_ref(parts, sizes, k),
            diff,
        )
    # pack_block_add_: a chunk's products added into the block with its weight
    block_k = torch.zeros(n, k, device=dev, dtype=dst_dtype)
    block_r = torch.zeros(n, k, device=dev, dtype=dst_dtype)
    weight = 0.25

    def diff():
        ops.pack_block_add_(block_k, parts, sizes, weight)
        _ops.pack_block_add_ref(block_r, parts, sizes, weight)
        return float((block_k - block_r).abs().max())

    return (
        lambda: ops.pack_block_add_(block_k, parts, sizes, weight),
        lambda: _ops.pack_block_add_ref(block_r, parts, sizes, weight),
        diff,
    )


_MEASURED: dict[str, dict[str, Any]] = {}


def _measure(case: Case) -> dict[str, Any]:
    """Both tools' timings for ``case`` (measured once, interleaved; cached)."""
    if case.key in _MEASURED:
        return _MEASURED[case.key]
    status = _ops.extension_status()
    if not status["loaded"]:
        raise NotApplicable(f"the compiled extension is not loaded: {status['reason']}")
    if case.device == "cuda" and not status["cuda_kernels"]:
        raise NotApplicable("the extension was built without CUDA kernels")
    kernel, ref, diff = _setup(case)
    agreement = diff()
    timings = race({KERNEL: kernel, REFERENCE: ref}, case.device, budget_s=BUDGET_S)
    del kernel, ref, diff
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    _MEASURED[case.key] = {"max_abs_diff": agreement, **timings}
    return _MEASURED[case.key]


def _row(case: Case, tool: str) -> dict[str, Any]:
    m = _measure(case)
    row = {"op": case.op, "dtype": case.dtype, **case.cfg, **m[tool]}
    row["max_abs_diff"] = m["max_abs_diff"]
    if tool == KERNEL:
        speedup = m[REFERENCE]["median_ms"] / m[KERNEL]["median_ms"]
        row["speedup"] = speedup
        row["floors"] = [
            [f"{case.key}: kernel speedup over ATen", speedup, FLOOR, speedup >= FLOOR]
        ]
    return row


def rows() -> list[Row]:
    return [
        Row(
            key=f"{case.key}-{tool.split()[0].lower()}",
            group=GROUP.format(device=case.device),
            tool=tool,
            fn=lambda case=case, tool=tool: _row(case, tool),
            info={"op": case.op, "device": case.device, "dtype": case.dtype},
            needs_cuda=case.device == "cuda",
        )
        for case in CASES
        for tool in TOOLS
    ]


ROWS = rows()

try:
    import pytest
except ImportError:  # the standalone run needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize(
        "row",
        [
            pytest.param(
                row,
                id=row.key,
                marks=[
                    pytest.mark.cuda,
                    pytest.mark.skipif(not CUDA, reason=NO_CUDA),
                ]
                if row.needs_cuda
                else [],
            )
            for row in ROWS
        ],
    )
    def test_kernel_vs_aten(bench_row, row):
        bench_row(row.group, row.tool, row.fn, **row.info)


if __name__ == "__main__":
    sys.exit(1 if run_standalone(ROWS, sys.argv[1:]) else 0)
