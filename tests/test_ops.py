"""The curvx ops: compiled kernels vs the PyTorch references and plain float64 math.

Tests of the compiled kernels fail when the extension is not loaded (CI builds it),
unless CURVX_DISABLE_EXTENSION=1 is set, in which case they are skipped with that
reason. CUDA variants are skipped visibly on machines without a GPU.
"""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import requires_cuda, tol

from curvx import _ops
from curvx._warnings import CurvxWarning

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
# "sliced": a column slice of a wider matrix (rows dense, read in place by the kernels)
LAYOUTS = ["contiguous", "strided", "transposed", "sliced"]
DISABLED = os.environ.get(_ops.DISABLE_ENV) == "1"
F64 = torch.float64


@pytest.fixture
def ops():
    """torch.ops.curvx, asserting that the compiled extension is in use."""
    if DISABLED:
        pytest.skip(f"{_ops.DISABLE_ENV}=1: the compiled kernels are disabled")
    status = _ops.extension_status()
    assert status["loaded"], (
        f"the compiled extension is not loaded ({status['reason']}); build it with "
        "`pip install --no-build-isolation -e .` or set CURVX_DISABLE_EXTENSION=1"
    )
    return torch.ops.curvx


def _need_kernels(device: str) -> None:
    if device == "cuda":
        status = _ops.extension_status()
        assert status["cuda_kernels"], f"extension built without CUDA kernels: {status}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    """[n, m] float64 with orthonormal columns (m <= n)."""
    if m == 0:
        return torch.zeros(n, 0, dtype=F64)
    return torch.linalg.qr(_randn(n, m, seed=seed))[0]


def _as(x: torch.Tensor, dtype, device, layout: str = "contiguous") -> torch.Tensor:
    """``x`` converted; contiguous, strided (every other element), column-major or
    a column slice of a wider tensor."""
    x = x.to(device=device, dtype=dtype)
    if layout == "sliced":
        buf = x.new_zeros(*x.shape[:-1], x.shape[-1] + 3)
        buf[..., 1 : 1 + x.shape[-1]] = x
        return buf[..., 1 : 1 + x.shape[-1]]
    if layout == "strided":
        buf = x.new_zeros(*x.shape, 2)
        buf[..., 0] = x
        return buf[..., 0]
    if layout == "transposed":
        return x.mT.contiguous().mT
    return x.contiguous()


def _max_abs(x: torch.Tensor) -> float:
    return x.double().abs().max().item() if x.numel() else 0.0


def _assert_close(actual, expected, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device}"
    err = _max_abs(actual.double() - expected.double())
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.3e}"


# --------------------------------------------------------------------------------------
# orthogonalize
# --------------------------------------------------------------------------------------

ORTHO_SHAPES = [
    (300, 7, 3),
    (300, 0, 2),
    (257, 12, 1),
    (64, 5, 8),
    (5000, 9, 4),
    (0, 3, 2),
]


def _ortho_inputs(n, m, b, dtype, device, layout="contiguous", seed=0):
    Q = _orthonormal(n, m, seed) if n >= m else _randn(n, m, seed=seed)
    V = _randn(n, b, seed=seed + 1)
    return _as(Q, dtype, device, layout), _as(V, dtype, device, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ORTHO_SHAPES)
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_orthogonalize_matches_reference(ops, device, dtype, shape, passes):
    _need_kernels(device)
    Q, V = _ortho_inputs(*shape, dtype, device, seed=sum(shape) + passes)
    W, C = ops.orthogonalize(Q, V, passes)
    W_ref, C_ref = _ops.orthogonalize_ref(Q, V, passes)
    _assert_close(W, W_ref, tol(dtype, 2) * max(1.0, _max_abs(W_ref)), "W")
    _assert_close(C, C_ref, tol(F64, 1e3) * max(1.0, _max_abs(C_ref)), "C")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_orthogonalize_non_contiguous(ops, device, layout):
    _need_kernels(device)
    Q, V = _ortho_inputs(200, 6, 3, torch.float32, device, layout, seed=11)
    assert layout == "contiguous" or not (Q.is_contiguous() or V.is_contiguous())
    W, C = ops.orthogonalize(Q, V)
    W_ref, C_ref = _ops.orthogonalize_ref(Q.contiguous(), V.contiguous())
    _assert_close(W, W_ref, tol(torch.float32, 2) * _max_abs(W_ref), "W")
    _assert_close(C, C_ref, tol(F64, 1e3), "C")
    assert W.is_contiguous() and C.is_contiguous()


def _row_layouts(n, cols, seed, dtype, device):
    """[n, cols] matrices the kernels read in place: a column slice of a wider basis
    (as the solver passes Q[:, :cols]), rows repeated by a zero row stride, and one
    column with a large row stride."""
    x = _randn(n, cols, seed=seed).to(device=device, dtype=dtype)
    wide = torch.zeros(n, cols + 5, dtype=dtype, device=device)
    wide[:, :cols] = x
    cases = {"slice": wide[:, :cols], "repeated": x[:1].expand(n, cols)}
    if cols == 1:
        cases["column"] = wide[:, :1]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_dense_rows_read_in_place(ops, device, dtype, n):
    """Both recurrence ops on operands with dense rows but row strides != columns."""
    _need_kernels(device)
    for m, b in [(5, 3), (1, 1), (4, 1)]:
        Qs = _row_layouts(n, m, 31 + m, dtype, device)
        Vs = _row_layouts(n, b, 41 + b, dtype, device)
        for (qname, Q), (vname, V) in zip(Qs.items(), Vs.items()):
            what = f"Q {qname}, V {vname}, m={m}, b={b}"
            W, C = ops.orthogonalize(Q, V, 2)
            W_ref, C_ref = _ops.orthogonalize_ref(Q.contiguous(), V.contiguous(), 2)
            scale = max(1.0, _max_abs(W_ref), _max_abs(V))
            _assert_close(W, W_ref, tol(dtype, 4) * scale, "W, " + what)
            _assert_close(C, C_ref, tol(F64, 1e3) * max(1.0, _max_abs(C_ref)), what)
            B_prev = _randn(b, m, seed=m + b).to(device)
            W_new, A = ops.lanczos_step(V, V, Q, B_prev)
            W_ref, A_ref = _ops.lanczos_step_ref(
                V.contiguous(), V.contiguous(), Q.contiguous(), B_prev
            )
            atol = tol(dtype, 4) * max(1.0, _max_abs(W_ref)) * (1 + m)
            _assert_close(W_new, W_ref, atol, "W_new, " + what)
            _assert_close(A, A_ref, tol(F64, 1e3) * max(1.0, _max_abs(A_ref)), what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_float64_math(device, dtype):
    """Public function (either path): V = Q C + W and W orthogonal to range(Q)."""
    Q, V = _ortho_inputs(400, 10, 4, dtype, device, seed=3)
    W, C = _ops.orthogonalize(Q, V)
    Q64, V64, W64 = Q.double(), V.double(), W.double()
    scale = _max_abs(V64)
    _assert_close(Q64 @ C + W64, V64, tol(dtype, 4) * scale, "V - (Q C + W)")
    assert _max_abs(Q64.T @ W64) <= tol(dtype, 8) * torch.linalg.norm(W64).item()
    # One pass is exactly the projection V - Q (Q^T V), in float64.
    W1, C1 = _ops.orthogonalize(Q, V, 1)
    _assert_close(C1, Q64.T @ V64, tol(F64, 1e3) * scale, "C, one pass")
    _assert_close(W1, (V64 - Q64 @ (Q64.T @ V64)).to(dtype), tol(dtype, 2) * scale, "W")


# How close V is to range(Q): as close as CGS2 allows in the dtype (eps^2/delta < eps).
NEAR_RANGE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_ill_conditioned(device, dtype):
    """V nearly in range(Q): two passes reach eps-level orthogonality, one does not."""
    n, m, b, delta = 500, 20, 4, NEAR_RANGE[dtype]
    Q64 = _orthonormal(n, m, seed=21)
    V64 = Q64 @ _randn(m, b, seed=22) + delta * _randn(n, b, seed=23)
    Q, V = _as(Q64, dtype, device), _as(V64, dtype, device)

    def loss_of_orthogonality(passes):
        W, _ = _ops.orthogonalize(Q, V, passes)
        W64 = W.double()
        return _max_abs(Q.double().T @ W64) / torch.linalg.norm(W64).item()

    assert loss_of_orthogonality(2) <= tol(dtype, 2)
    if dtype != torch.bfloat16:
        assert loss_of_orthogonality(1) > tol(dtype, 100)


# --------------------------------------------------------------------------------------
# lanczos_step
# --------------------------------------------------------------------------------------

STEP_SHAPES = [
    (300, 3, 3),
    (300, 4, 0),
    (257, 1, 1),
    (5000, 4, 6),
    (64, 8, 2),
    (0, 2, 2),
]


def _step_inputs(n, b, r, dtype, device, layout="contiguous", seed=0):
    Q_cur = _orthonormal(n, b, seed) if n >= b else _randn(n, b, seed=seed)
    Q_prev = _orthonormal(n, r, seed + 1) if n >= r else _randn(n, r, seed=seed + 1)
    W = _randn(n, b, seed=seed + 2)
    B_prev = _randn(b, r, seed=seed + 3)
    return (
        _as(W, dtype, device, layout),
        _as(Q_cur, dtype, device, layout),
        _as(Q_prev, dtype, device, layout),
        _as(B_prev, F64, device, layout),
    )


def _step_float64(W, Q_cur, Q_prev, B_prev):
    """The recurrence written out with einsum in float64."""
    W, Q_cur, Q_prev = W.double(), Q_cur.double(), Q_prev.double()
    M = torch.einsum("ni,nj->ij", Q_cur, W)
    A = 0.5 * (M + M.T)
    W_new = W - torch.einsum("ni,ij->nj", Q_cur, A)
    W_new = W_new - torch.einsum("nl,jl->nj", Q_prev, B_prev)
    return W_new, A


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_lanczos_step_matches_reference(ops, device, dtype, shape):
    _need_kernels(device)
    args = _step_inputs(*shape, dtype, device, seed=sum(shape))
    W_new, A = ops.lanczos_step(*args)
    W_ref, A_ref = _ops.lanczos_step_ref(*args)
    atol = tol(dtype, 2) * _max_abs(W_ref) + tol(F64, 1e3) * _max_abs(args[0])
    _assert_close(W_new, W_ref, atol, "W_new")
    _assert_close(A, A_ref, tol(F64, 1e3) * max(1.0, _max_abs(A_ref)), "A")
    assert torch.equal(A, A.T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lanczos_step_non_contiguous(ops, device, layout):
    _need_kernels(device)
    args = _step_inputs(150, 3, 5, torch.float64, device, layout, seed=5)
    assert layout == "contiguous" or not any(t.is_contiguous() for t in args)
    W_new, A = ops.lanczos_step(*args)
    W_ref, A_ref = _ops.lanczos_step_ref(*(t.contiguous() for t in args))
    _assert_close(W_new, W_ref, tol(F64, 1e3) * _max_abs(W_ref), "W_new")
    _assert_close(A, A_ref, tol(F64, 1e3), "A")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanczos_step_float64_math(device, dtype):
    """Public function (either path) against the recurrence written with einsum."""
    args = _step_inputs(600, 4, 8, dtype, device, seed=7)
    W_new, A = _ops.lanczos_step(*args)
    W_exp, A_exp = _step_float64(*args)
    _assert_close(A, A_exp, tol(F64, 1e3), "A")
    atol = tol(dtype, 2) * _max_abs(W_exp) + tol(F64, 1e3) * _max_abs(args[0])
    _assert_close(W_new, W_exp.to(dtype), atol, "W_new")


# --------------------------------------------------------------------------------------
# assemble_tridiag
# --------------------------------------------------------------------------------------

TRIDIAG_SHAPES = [
    (0, 3, 1),
    (0, 3, 4),
    (5, 3, 0),
    (5, 3, 1),
    (5, 3, 3),
    (4, 1, 6),
    (0, 2, 0),
]


def _tridiag_inputs(r, b, p, device, layout="contiguous", seed=0):
    head = _randn(r, r, seed=seed)
    coupling = _randn(b, r, seed=seed + 1)
    alphas = _randn(p, b, b, seed=seed + 2)
    betas = _randn(max(p - 1, 0), b, b, seed=seed + 3)
    return tuple(_as(t, F64, device, layout) for t in (head, coupling, alphas, betas))


def _tridiag_float64(head, coupling, alphas, betas):
    """block_diag of head and alphas, then the couplings placed by index."""
    r, p, b = head.shape[0], alphas.shape[0], alphas.shape[1]
    T = torch.block_diag(head, *alphas) if p else head.clone()
    if p:
        T[r : r + b, :r] += coupling
        T[:r, r : r + b] += coupling.T
    for j in range(p - 1):
        rows = slice(r + (j + 1) * b, r + (j + 2) * b)
        cols = slice(r + j * b, r + (j + 1) * b)
        T[rows, cols] += betas[j]
        T[cols, rows] += betas[j].T
    return T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", TRIDIAG_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_assemble_tridiag_matches_reference(ops, device, shape, layout):
    _need_kernels(device)
    args = _tridiag_inputs(*shape, device, layout, seed=sum(shape))
    T = ops.assemble_tridiag(*args)
    assert torch.equal(T, _ops.assemble_tridiag_ref(*args))
    assert torch.equal(T.cpu(), _tridiag_float64(*(t.cpu() for t in args)))


def test_assemble_tridiag_symmetric_layout():
    """Public function: symmetric blocks give a symmetric T with the right zeros."""
    r, b, p = 3, 2, 4
    head, coupling, alphas, betas = _tridiag_inputs(r, b, p, "cpu", seed=9)
    head = head + head.T
    alphas = alphas + alphas.transpose(1, 2)
    T = _ops.assemble_tridiag(head, coupling, alphas, betas)
    assert T.shape == (r + p * b, r + p * b) and T.dtype == F64
    assert torch.equal(T, T.T)
    assert not T[r + b :, :r].any()  # the head couples to the first block only
    assert not T[r + 2 * b :, r : r + b].any()  # block 0 couples to block 1 only


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_cpu_reference(ops, dtype):
    """The recurrence kernels on the GPU against the references run on the CPU."""
    _need_kernels("cuda")
    n, m, b = 20000, 24, 8
    Q, V = _ortho_inputs(n, m, b, dtype, "cpu", "sliced", seed=51)
    W, C = ops.orthogonalize(Q.cuda(), V.cuda(), 2)
    W_ref, C_ref = _ops.orthogonalize_ref(Q, V, 2)
    _assert_close(W.cpu(), W_ref, tol(dtype, 2) * max(1.0, _max_abs(W_ref)), "W")
    _assert_close(C.cpu(), C_ref, tol(F64, 1e4) * max(1.0, _max_abs(C_ref)), "C")
    args = _step_inputs(n, b, b, dtype, "cpu", "sliced", seed=52)
    W_new, A = ops.lanczos_step(*(t.cuda() for t in args))
    W_ref, A_ref = _ops.lanczos_step_ref(*args)
    atol = tol(dtype, 2) * _max_abs(W_ref) + tol(F64, 1e4) * _max_abs(args[0])
    _assert_close(W_new.cpu(), W_ref, atol, "W_new")
    _assert_close(A.cpu(), A_ref, tol(F64, 1e4) * max(1.0, _max_abs(A_ref)), "A")
    tri = _tridiag_inputs(6, 4, 5, "cpu", seed=53)
    T = ops.assemble_tridiag(*(t.cuda() for t in tri))
    assert torch.equal(T.cpu(), _ops.assemble_tridiag_ref(*tri))


# --------------------------------------------------------------------------------------
# Block layout: pack_block, pack_block_add_, unpack_block
# --------------------------------------------------------------------------------------

# Parameter shapes: a small CNN; scalars and empty tensors; parts longer than one tile
# (CPU tiles hold 256 rows, CUDA tiles up to 2048); no parameters at all.
PARAM_SHAPES = {
    "cnn": [(8, 3, 3, 3), (8,), (8,), (16, 8, 3, 3), (16,), (10, 16), (10,)],
    "edge": [(), (0,), (5,), (2, 0, 3), (7, 1), ()],
    "long": [(3000,), (300, 7), (1,)],
    "none": [],
}
BLOCK_K = [1, 3, 16, 70]  # 70: more columns than one CUDA tile holds (64)


def _numels(shapes):
    return [math.prod(shape) for shape in shapes]


def _parts(shapes, k, dtype, device, seed, missing=()):
    """Per-parameter blocks [k, *shape] (None at the indices in ``missing``)."""
    return [
        None
        if i in missing
        else _randn(k, *shape, seed=seed + i).to(device=device, dtype=dtype)
        for i, shape in enumerate(shapes)
    ]


def _cpu(parts):
    return [None if t is None else t.cpu() for t in parts]


def _flat(parts):
    return torch.cat([t.reshape(-1) for t in parts]) if parts else torch.zeros(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", PARAM_SHAPES)
@pytest.mark.parametrize("k", BLOCK_K)
def test_unpack_block_matches_reference(ops, device, dtype, shapes, k):
    """A pure copy: bit for bit the reference's parts, laid out one after another."""
    _need_kernels(device)
    shapes = PARAM_SHAPES[shapes]
    numels = _numels(shapes)
    V = _as(_randn(sum(numels), k, seed=k), dtype, device)
    flat = ops.unpack_block(V, numels)
    assert flat.shape == (k * sum(numels),) and flat.dtype == dtype
    assert flat.device == V.device
    expected = _ops.unpack_block_ref(V.cpu(), shapes)
    assert torch.equal(flat.cpu(), _flat(expected).to(dtype))
    # The public function: contiguous views [k, *shape] of that buffer.
    views = _ops.unpack_block(V, shapes)
    for view, exp, shape in zip(views, expected, shapes):
        assert view.shape == (k, *shape) and view.is_contiguous()
        assert torch.equal(view.cpu(), exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_unpack_block_converts(ops, device, dtype, out_dtype):
    _need_kernels(device)
    shapes = PARAM_SHAPES["cnn"]
    V = _as(_randn(sum(_numels(shapes)), 5, seed=3), dtype, device)
    flat = ops.unpack_block(V, _numels(shapes), out_dtype)
    expected = _ops.unpack_block_ref(V.cpu(), shapes, out_dtype)
    assert flat.dtype == out_dtype
    assert torch.equal(flat.cpu(), _flat(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpack_block_layouts(ops, device, layout):
    _need_kernels(device)
    shapes = PARAM_SHAPES["long"]
    V = _as(_randn(sum(_numels(shapes)), 6, seed=8), torch.float32, device, layout)
    flat = ops.unpack_block(V, _numels(shapes))
    expected = _ops.unpack_block_ref(V.cpu().contiguous(), shapes)
    assert torch.equal(flat.cpu(), _flat(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", PARAM_SHAPES)
@pytest.mark.parametrize("k", BLOCK_K)
def test_pack_block_matches_reference(ops, device, dtype, shapes, k):
    """Weight 1: a copy, bit for bit; None parts are zeros; unpack inverts it."""
    _need_kernels(device)
    shapes = PARAM_SHAPES[shapes]
    numels = _numels(shapes)
    parts = _parts(shapes, k, dtype, device, seed=k, missing={1})
    if all(t is None for t in parts):
        pytest.skip("no part given: the wrapper's case (test_pack_block_all_none)")
    block = ops.pack_block(parts, numels, k)
    assert block.shape == (sum(numels), k) and block.dtype == dtype
    assert block.is_contiguous() and block.device == parts[0].device
    assert torch.equal(block.cpu(), _ops.pack_block_ref(_cpu(parts), numels, k))
    full = _parts(shapes, k, dtype, device, seed=k)
    V = ops.pack_block(full, numels, k)
    assert torch.equal(_flat(_ops.unpack_block(V, shapes)), _flat(full))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, *DTYPES])
@pytest.mark.parametrize("weight", [1.0, -0.37, 3.0])
def test_pack_block_weight_and_dtype(ops, device, dtype, out_dtype, weight):
    _need_kernels(device)
    shapes = PARAM_SHAPES["cnn"]
    numels = _numels(shapes)
    parts = _parts(shapes, 4, dtype, device, seed=5, missing={2})
    block = ops.pack_block(parts, numels, 4, weight, out_dtype)
    # float64 math rounded once to the block's dtype
    exact = _ops.pack_block_ref(_cpu(parts), numels, 4, dtype=F64) * weight
    result = out_dtype or dtype
    assert block.dtype == result
    _assert_close(
        block.cpu(), exact.to(result), tol(result, 1) * _max_abs(exact), "block"
    )
    if weight == 1.0 and out_dtype in (None, dtype):
        assert torch.equal(block.cpu(), _ops.pack_block_ref(_cpu(parts), numels, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_block_part_layouts(ops, device, layout):
    """Parts in any layout (an expanded one too) are read as their values."""
    _need_kernels(device)
    shapes = [(40, 30), (17,), (3, 5, 7)]
    numels = _numels(shapes)
    parts = [_as(t, F64, device, layout) for t in _parts(shapes, 3, F64, "cpu", 2)]
    parts.append(torch.ones(3, 1, device=device, dtype=F64).expand(3, 9))
    numels.append(9)
    block = ops.pack_block(parts, numels, 3)
    expected = _ops.pack_block_ref([t.cpu().contiguous() for t in parts], numels, 3)
    assert torch.equal(block.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("part_dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_pack_block_add_matches_reference(ops, device, dtype, part_dtype, layout):
    """block += weight * stack, in float64 rounded once; a column slice of a wider
    block (as the solver's HQ[:, cols:cols + b]) is written in place."""
    _need_kernels(device)
    shapes = PARAM_SHAPES["long"] + PARAM_SHAPES["cnn"]
    numels = _numels(shapes)
    k, weight = 5, 0.3125
    parts = _parts(shapes, k, part_dtype, device, seed=9, missing={1, 4})
    start = _randn(sum(numels), k, seed=10)
    block = _as(start.clone(), dtype, device, layout)
    base = block.data_ptr()
    ops.pack_block_add_(block, parts, numels, weight)
    assert block.data_ptr() == base  # in place
    exact = start.to(dtype).double() + weight * _ops.pack_block_ref(
        _cpu(parts), numels, k, dtype=F64
    )
    atol = tol(dtype, 1) * _max_abs(exact)
    _assert_close(block.cpu().contiguous(), exact.to(dtype), atol, "block")
    if layout == "sliced":  # the columns around the slice are untouched
        wide = block.as_strided((block.shape[0], k + 3), (block.stride(0), 1), 0)
        assert not wide[:, 0].any() and not wide[:, k + 1 :].any()
    # The reference agrees to rounding (it rounds the weighted parts first).
    ref_block = _as(start, dtype, "cpu")
    _ops.pack_block_add_ref(ref_block, _cpu(parts), numels, weight)
    _assert_close(block.cpu().contiguous(), ref_block, 2 * atol, "reference")


@pytest.mark.parametrize("device", DEVICES)
def test_pack_block_add_empty(ops, device):
    _need_kernels(device)
    for n, k in [(0, 3), (5, 0)]:
        block = torch.ones(n, k, dtype=F64, device=device)
        parts = [torch.ones(k, n, dtype=F64, device=device)]
        ops.pack_block_add_(block, parts, [n], 2.0)
        assert torch.equal(block, torch.ones(n, k, dtype=F64, device=device))
    block = torch.ones(4, 2, dtype=F64, device=device)
    ops.pack_block_add_(block, [None, None], [1, 3], 2.0)  # nothing to add
    assert torch.equal(block, torch.ones(4, 2, dtype=F64, device=device))


def test_pack_block_all_none():
    """No part given: the public function returns zeros of the dtype and device."""
    block = _ops.pack_block([None, None], [2, 3], 4, dtype=torch.float32, device="cpu")
    assert torch.equal(block, torch.zeros(5, 4))
    empty = _ops.pack_block([], [], 3, dtype=F64, device="cpu")
    assert empty.shape == (0, 3) and empty.dtype == F64
    with pytest.raises(ValueError, match="every part is None: pass dtype and device"):
        _ops.pack_block([None], [2], 4)


def test_block_ops_differentiable():
    """Inputs that require grad take the (differentiable) reference path."""
    shapes = [(3, 2), (4,)]
    parts = [t.requires_grad_() for t in _parts(shapes, 2, F64, "cpu", seed=1)]
    block = _ops.pack_block(parts, _numels(shapes), 2, weight=2.0)
    block.sum().backward()
    assert all(torch.equal(t.grad, torch.full_like(t, 2.0)) for t in parts)
    V = _randn(10, 2, seed=2).requires_grad_()
    sum(p.sum() for p in _ops.unpack_block(V, shapes)).backward()
    assert torch.equal(V.grad, torch.ones_like(V))


@pytest.mark.parametrize("device", DEVICES)
def test_block_ops_current_stream(ops, device):
    """The kernels run on the caller's current stream (CUDA) and see its writes."""
    _need_kernels(device)
    shapes = PARAM_SHAPES["long"]
    numels = _numels(shapes)
    V = _randn(sum(numels), 8, seed=4).to(device)
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            V2 = V * 2  # queued on the side stream, read by the kernels below
            flat = ops.unpack_block(V2, numels)
            block = ops.pack_block(_ops._views_of(flat, 8, shapes), numels, 8)
        stream.synchronize()
    else:
        V2 = V * 2
        flat = ops.unpack_block(V2, numels)
        block = ops.pack_block(_ops._views_of(flat, 8, shapes), numels, 8)
    assert torch.equal(block, V * 2)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs: device guard on cuda:1"
)
def test_block_ops_second_device(ops):
    """Tensors on cuda:1 while cuda:0 is current: the device guard picks cuda:1."""
    _need_kernels("cuda")
    shapes = PARAM_SHAPES["cnn"]
    numels = _numels(shapes)
    V = _randn(sum(numels), 4, seed=6).to("cuda:1")
    with torch.cuda.device(0):
        flat = ops.unpack_block(V, numels)
        block = ops.pack_block(_ops._views_of(flat, 4, shapes), numels, 4)
        Q = _orthonormal(sum(numels), 3, seed=7).to("cuda:1")
        W, _ = ops.orthogonalize(Q, V.double(), 2)
    assert flat.device == block.device == W.device == V.device
    assert torch.equal(block, V)
    assert _max_abs(Q.T @ W) <= tol(F64, 100)


# --------------------------------------------------------------------------------------
# HessianOperator's layout methods (the kept-graph / rev-rev products use them)
# --------------------------------------------------------------------------------------


def _operator(dtype, device="cpu"):
    from curvx.operators import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2)
    )
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.5)))
    model = model.to(device=device, dtype=dtype)
    X = torch.randn(4, 2, 4, 4, dtype=dtype, device=device)
    y = torch.randn(4, 2, dtype=dtype, device=device)
    return HessianOperator(model, lambda out, t: ((out - t) ** 2).mean(), (X, y))


def _composite_flatten(op, tensors, k):
    """HessianOperator.flatten_batched as it was: a torch.cat of transposes."""
    return torch.cat(
        [
            torch.zeros(m, k, dtype=op.dtype, device=op.device)
            if t is None
            else t.reshape(k, -1).T
            for t, m in zip(tensors, op.numels)
        ]
    )


def _composite_unflatten(op, V):
    k = V.shape[1]
    return [p.T.reshape(k, *s) for p, s in zip(V.split(op.numels), op.shapes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_operator_layout_matches_composite(device, dtype):
    """flatten_batched / unflatten_batched give the old composite's values bit for
    bit (float16, which the kernels lack, keeps the composite)."""
    op = _operator(dtype, device)
    k = 3
    V = torch.randn(op.n, k, generator=_gen(1), dtype=F64).to(
        device=device, dtype=dtype
    )
    blocks = op.unflatten_batched(V)
    for got, exp in zip(blocks, _composite_unflatten(op, V)):
        assert got.shape == exp.shape and torch.equal(got, exp)
    parts = list(blocks)
    parts[1] = None
    assert torch.equal(op.flatten_batched(parts, k), _composite_flatten(op, parts, k))
    out = V.clone()
    result = op.flatten_batched(parts, k, out=out, weight=0.5)
    assert result is out
    expected = V + 0.5 * _composite_flatten(op, parts, k)
    assert torch.allclose(out, expected, rtol=0, atol=tol(dtype, 4) * _max_abs(V))
    # The products through the kept graph are unchanged
    HV = op.matmat(V)
    H = torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=dtype, device=device)])
    assert torch.allclose(HV.double(), H.double().T @ V.double(), atol=tol(dtype, 1e3))


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(ops, device, dtype):
    _need_kernels(device)
    Q, V = _ortho_inputs(50, 4, 3, dtype, device, seed=1)
    torch.library.opcheck(ops.orthogonalize.default, (Q, V, 2))
    Q0, V0 = _ortho_inputs(50, 0, 3, dtype, device, seed=1)
    torch.library.opcheck(ops.orthogonalize.default, (Q0, V0, 1))
    for r in (2, 0):
        args = _step_inputs(50, 3, r, dtype, device)
        torch.library.opcheck(ops.lanczos_step.default, args)
    for shape in [(4, 3, 2), (0, 2, 3), (4, 2, 0)]:
        args = _tridiag_inputs(*shape, device)
        torch.library.opcheck(ops.assemble_tridiag.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_block_ops(ops, device, dtype):
    _need_kernels(device)
    shapes = PARAM_SHAPES["cnn"] + [()]
    numels, k = _numels(shapes), 3
    n = sum(numels)
    parts = _parts(shapes, k, dtype, device, seed=1, missing={2})
    torch.library.opcheck(ops.pack_block.default, (parts, numels, k, 1.0, None))
    torch.library.opcheck(ops.pack_block.default, (parts, numels, k, 0.5, F64))
    for layout in ("contiguous", "sliced"):
        block = _as(_randn(n, k, seed=2), dtype, device, layout)
        torch.library.opcheck(ops.pack_block_add_.default, (block, parts, numels, 0.25))
    V = _as(_randn(n, k, seed=3), dtype, device, "sliced")
    torch.library.opcheck(ops.unpack_block.default, (V, numels, None))
    torch.library.opcheck(ops.unpack_block.default, (V, numels, torch.float32))


# --------------------------------------------------------------------------------------
# Bad input: both paths raise the same error, naming the argument
# --------------------------------------------------------------------------------------


def _impls(name):
    return [
        pytest.param((name, "compiled"), id="compiled"),
        pytest.param((name, "reference"), id="reference"),
    ]


@pytest.fixture
def impl(request):
    name, kind = request.param
    if kind == "reference":
        return getattr(_ops, f"{name}_ref")
    return getattr(request.getfixturevalue("ops"), name)


def _t(*shape, dtype=F64, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


ORTHO_BAD = [
    ((_t(10), _t(10, 2)), ValueError, "Q must be a 2-D tensor, got a 1-D tensor"),
    ((_t(10, 3), _t(10, 2, 1)), ValueError, "V must be a 2-D tensor, got a 3-D"),
    (
        (_t(10, 3, dtype=torch.float16), _t(10, 2, dtype=torch.float16)),
        TypeError,
        "V must be torch.float32, torch.float64 or torch.bfloat16, got torch.float16",
    ),
    (
        (_t(10, 3, dtype=torch.float32), _t(10, 2)),
        TypeError,
        r"Q must have the same dtype as V \(torch.float64\), got torch.float32",
    ),
    ((_t(10, 3), _t(11, 2)), ValueError, r"Q.size\(0\) must equal V.size\(0\) = 11"),
    ((_t(10, 3), _t(10, 2), 0), ValueError, "passes must be >= 1, got 0"),
    (
        (_t(10, 3), _t(10, 2, device="meta")),
        RuntimeError,
        r"Q must be on the same device as V \(meta\), got cpu",
    ),
]


@pytest.mark.parametrize("impl", _impls("orthogonalize"), indirect=True)
@pytest.mark.parametrize("args, error, match", ORTHO_BAD)
def test_orthogonalize_bad_input(impl, args, error, match):
    with pytest.raises(error, match="curvx.orthogonalize: " + match):
        impl(*args)


STEP_BAD = [
    ((_t(10, 2), _t(10, 2), _t(10, 3), _t(2)), ValueError, "B_prev must be a 2-D"),
    (
        (_t(10, 2), _t(10, 2, dtype=torch.float32), _t(10, 3), _t(2, 3)),
        TypeError,
        "Q_cur must have the same dtype as W",
    ),
    (
        (_t(10, 2), _t(10, 2), _t(10, 3), _t(2, 3, dtype=torch.float32)),
        TypeError,
        "B_prev must be torch.float64, got torch.float32",
    ),
    ((_t(10, 2), _t(10, 3), _t(10, 3), _t(2, 3)), ValueError, r"Q_cur.size\(1\)"),
    ((_t(10, 2), _t(10, 2), _t(9, 3), _t(2, 3)), ValueError, r"Q_prev.size\(0\)"),
    (
        (_t(10, 2), _t(10, 2), _t(10, 3), _t(2, 4)),
        ValueError,
        r"B_prev.size\(1\) must equal Q_prev.size\(1\) = 3, "
        r"got B_prev of sizes \[2, 4\]",
    ),
    (
        (_t(10, 2), _t(10, 2), _t(10, 3), _t(2, 3, device="meta")),
        RuntimeError,
        "B_prev must be on the same device as W",
    ),
]


@pytest.mark.parametrize("impl", _impls("lanczos_step"), indirect=True)
@pytest.mark.parametrize("args, error, match", STEP_BAD)
def test_lanczos_step_bad_input(impl, args, error, match):
    with pytest.raises(error, match="curvx.lanczos_step: " + match):
        impl(*args)


TRIDIAG_BAD = [
    ((_t(3, 3), _t(2, 3), _t(2, 2), _t(1, 2, 2)), ValueError, "alphas must be a 3-D"),
    ((_t(3, 4), _t(2, 3), _t(2, 2, 2), _t(1, 2, 2)), ValueError, r"head.size\(1\)"),
    ((_t(3, 3), _t(2, 4), _t(2, 2, 2), _t(1, 2, 2)), ValueError, r"coupling.size\(1\)"),
    (
        (_t(3, 3), _t(2, 3), _t(2, 2, 2), _t(2, 2, 2)),
        ValueError,
        r"betas.size\(0\) must equal max\(alphas.size\(0\) - 1, 0\) = 1",
    ),
    (
        (_t(3, 3), _t(2, 3, dtype=torch.float32), _t(2, 2, 2), _t(1, 2, 2)),
        TypeError,
        "coupling must be torch.float64, got torch.float32",
    ),
]


@pytest.mark.parametrize("impl", _impls("assemble_tridiag"), indirect=True)
@pytest.mark.parametrize("args, error, match", TRIDIAG_BAD)
def test_assemble_tridiag_bad_input(impl, args, error, match):
    with pytest.raises(error, match="curvx.assemble_tridiag: " + match):
        impl(*args)


def _pack_block_ref(parts, numels, k, weight=1.0, dtype=None):
    return _ops.pack_block_ref(parts, numels, k, weight=weight, dtype=dtype)


def _unpack_block_ref(V, numels, dtype=None):
    return _ops.unpack_block_ref(V, [(m,) for m in numels], dtype)


_BLOCK_REFS = {
    "pack_block": _pack_block_ref,
    "pack_block_add_": _ops.pack_block_add_ref,
    "unpack_block": _unpack_block_ref,
}


@pytest.fixture
def block_impl(request):
    """The compiled op or its reference, called with the op's arguments."""
    name, kind = request.param
    if kind == "reference":
        return _BLOCK_REFS[name]
    return getattr(request.getfixturevalue("ops"), name)


F16 = torch.float16
PACK_BAD = [
    (([_t(2, 3)], [3, 4], 2), ValueError, "parts and numels must have the same length"),
    (([_t(2, 3)], [-3], 2), ValueError, r"numels\[0\] must be >= 0, got -3"),
    (([_t(2, 3)], [3], -1), ValueError, "k must be >= 0, got -1"),
    (
        ([_t(2, 3)], [3], 2, 1.0, F16),
        TypeError,
        "dtype must be torch.float32, torch.float64 or torch.bfloat16, got "
        "torch.float16",
    ),
    (([_t(2, 3)], [3], 2, math.inf), ValueError, "weight must be finite, got inf"),
    (
        ([None, _t(2, 3, dtype=F16)], [1, 3], 2),
        TypeError,
        r"parts\[1\] must be torch.float32, torch.float64 or torch.bfloat16, got "
        "torch.float16",
    ),
    (
        ([_t(2, 3), _t(2, 1, dtype=torch.float32)], [3, 1], 2),
        TypeError,
        r"parts\[1\] must have the same dtype as parts\[0\] \(torch.float64\), got "
        "torch.float32",
    ),
    (
        ([None, _t(2, 3), _t(2, 1, device="meta")], [2, 3, 1], 2),
        RuntimeError,
        r"parts\[2\] must be on the same device as parts\[1\] \(cpu\), got meta",
    ),
    (
        ([_t(3, 3)], [3], 2),
        ValueError,
        r"parts\[0\] must have sizes \[k, \*shape\] with k = 2 and k \* numels\[0\] = "
        r"6 entries, got sizes \[3, 3\]",
    ),
    (([_t(2, 4)], [3], 2), ValueError, r"parts\[0\] must have sizes .* \[2, 4\]"),
    (([_t(())], [1], 1), ValueError, r"parts\[0\] must have sizes .* got sizes \[\]"),
]


@pytest.mark.parametrize("block_impl", _impls("pack_block"), indirect=True)
@pytest.mark.parametrize("args, error, match", PACK_BAD)
def test_pack_block_bad_input(block_impl, args, error, match):
    with pytest.raises(error, match="curvx.pack_block: " + match):
        block_impl(*args)


PACK_ADD_BAD = [
    ((_t(5), [_t(2, 5)], [5]), ValueError, "block must be a 2-D tensor, got a 1-D"),
    (
        (_t(5, 2, dtype=F16), [_t(2, 5)], [5]),
        TypeError,
        "block must be torch.float32, torch.float64 or torch.bfloat16, got "
        "torch.float16",
    ),
    (
        (_t(6, 2), [_t(2, 5)], [5]),
        ValueError,
        r"block.size\(0\) must equal sum\(numels\) = 5, got block of sizes \[6, 2\]",
    ),
    (
        (_t(2, 5).T, [_t(2, 5)], [5]),
        ValueError,
        r"block must have rows of adjacent entries that do not overlap \(stride\(1\) "
        r"== 1 and stride\(0\) >= size\(1\)\), got strides \[1, 5\] for sizes "
        r"\[5, 2\]",
    ),
    (
        (_t(1, 2).expand(5, 2), [_t(2, 5)], [5]),
        ValueError,
        r"block must have rows .* got strides \[0, 1\] for sizes \[5, 2\]",
    ),
    ((_t(5, 2), [_t(2, 5)], [5], math.nan), ValueError, "weight must be finite"),
    (
        (_t(5, 2), [_t(2, 5, device="meta")], [5]),
        RuntimeError,
        r"parts\[0\] must be on the same device as block \(cpu\), got meta",
    ),
    (
        (_t(5, 2), [_t(3, 5)], [5]),
        ValueError,
        r"parts\[0\] must have sizes \[k, \*shape\] with k = 2 and k \* numels\[0\] = "
        r"10 entries, got sizes \[3, 5\]",
    ),
    (
        (_t(5, 2), [_t(2, 5)], [5, 0]),
        ValueError,
        "parts and numels must have the same length, got 1 and 2",
    ),
]


@pytest.mark.parametrize("block_impl", _impls("pack_block_add_"), indirect=True)
@pytest.mark.parametrize("args, error, match", PACK_ADD_BAD)
def test_pack_block_add_bad_input(block_impl, args, error, match):
    with pytest.raises(error, match="curvx.pack_block_add_: " + match):
        block_impl(*args)


UNPACK_BAD = [
    ((_t(5), [5]), ValueError, "V must be a 2-D tensor, got a 1-D tensor"),
    (
        (_t(5, 2, dtype=torch.int64), [5]),
        TypeError,
        "V must be torch.float32, torch.float64 or torch.bfloat16, got torch.int64",
    ),
    (
        (_t(5, 2), [2, 2]),
        ValueError,
        r"V.size\(0\) must equal sum\(numels\) = 4, got V of sizes \[5, 2\]",
    ),
    ((_t(5, 2), [6, -1]), ValueError, r"numels\[1\] must be >= 0, got -1"),
    ((_t(5, 2), [5], F16), TypeError, "dtype must be torch.float32"),
]


@pytest.mark.parametrize("block_impl", _impls("unpack_block"), indirect=True)
@pytest.mark.parametrize("args, error, match", UNPACK_BAD)
def test_unpack_block_bad_input(block_impl, args, error, match):
    with pytest.raises(error, match="curvx.unpack_block: " + match):
        block_impl(*args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", _impls("orthogonalize"), indirect=True)
def test_device_mismatch_cuda(impl):
    with pytest.raises(RuntimeError, match="Q must be on the same device as V"):
        impl(_t(10, 3), _t(10, 2, device="cuda"))


# --------------------------------------------------------------------------------------
# Fallback, status and info
# --------------------------------------------------------------------------------------


def _call_all_public(device="cpu"):
    Q, V = _ortho_inputs(80, 3, 2, torch.float32, device, seed=2)
    W, C = _ops.orthogonalize(Q, V)
    _assert_close(W, _ops.orthogonalize_ref(Q, V)[0], tol(torch.float32, 2) * 4, "W")
    args = _step_inputs(80, 2, 2, torch.float32, device, seed=3)
    _ops.lanczos_step(*args)
    _ops.assemble_tridiag(*_tridiag_inputs(2, 2, 3, device))


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.delenv(_ops.DISABLE_ENV, raising=False)
    ext = _ops._load_extension("curvx._C_absent_for_test")
    assert not ext.loaded and not ext.compiled and "was not found" in ext.reason
    monkeypatch.setattr(_ops, "_EXT", ext)
    monkeypatch.setattr(_ops, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _call_all_public()
    ours = [w for w in caught if issubclass(w.category, CurvxWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "was not found" in message
    assert "pip install --no-build-isolation -e ." in message
    assert ours[0].filename == __file__  # points at the caller of the public op
    assert _ops.extension_status()["reason"] == ext.reason


def test_stale_build_falls_back(ops, tmp_path, monkeypatch):
    monkeypatch.delenv(_ops.DISABLE_ENV, raising=False)
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch": "0.0.1", "cuda_kernels": False}))
    ext = _ops._load_extension(build_info_path=info)
    assert ext.compiled and not ext.loaded
    assert "built for torch 0.0.1" in ext.reason


def test_extension_missing_ops_falls_back(ops, monkeypatch):
    """A build from older sources (an op this Python expects is absent) is stale."""
    monkeypatch.delenv(_ops.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_ops, "_OP_NAMES", (*_ops._OP_NAMES, "absent_op_for_test"))
    ext = _ops._load_extension()
    assert ext.compiled and not ext.loaded
    assert "built from older sources: it lacks the ops absent_op_for_test" in (
        ext.reason
    )


def test_broken_extension_falls_back(tmp_path, monkeypatch):
    """A module that is found but fails to import (e.g. an ABI mismatch)."""
    monkeypatch.delenv(_ops.DISABLE_ENV, raising=False)
    (tmp_path / "curvx_broken_ext.py").write_text(
        "raise ImportError('undefined symbol: _ZN3c10_for_test')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ext = _ops._load_extension("curvx_broken_ext", tmp_path / "absent.json")
    assert ext.compiled and not ext.loaded and not ext.cuda_kernels
    assert "importing curvx_broken_ext failed: ImportError: undefined symbol" in (
        ext.reason
    )


def test_extension_in_use(ops):
    status = _ops.extension_status()
    assert status["compiled"] and status["loaded"] and status["reason"] is None
    assert status["build"]["torch"] == torch.__version__
    assert status["torch"] == torch.__version__
    assert _ops._use_kernels(torch.device("cpu"))


@requires_cuda
@pytest.mark.cuda
def test_cuda_without_cuda_kernels_warns_once(ops, monkeypatch):
    ext = _ops._EXT
    fake = _ops._Extension(True, True, False, None, ext.build)
    monkeypatch.setattr(_ops, "_EXT", fake)
    monkeypatch.setattr(_ops, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _call_all_public("cuda")
        _call_all_public("cuda")
    ours = [w for w in caught if issubclass(w.category, CurvxWarning)]
    assert len(ours) == 1 and "without CUDA kernels" in str(ours[0].message)


def _run_python(code_or_args, env_extra):
    env = {**os.environ, **env_extra}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


DISABLED_SCRIPT = """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from curvx import _ops
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=torch.float64))[0]
    V = torch.randn(60, 2, generator=g, dtype=torch.float64)
    W, C = _ops.orthogonalize(Q, V)
    W2, A = _ops.lanczos_step(V, W, Q, torch.zeros(2, 4, dtype=torch.float64))
    T = _ops.assemble_tridiag(A[:0, :0], A[:, :0], A[None], A[None][:0])
ours = [str(w.message) for w in caught if "curvx" in str(w.category)]
print(json.dumps({
    "status": _ops.extension_status(),
    "warnings": ours,
    "ortho": (Q.T @ W).abs().max().item(),
    "recon": (Q @ C + W - V).abs().max().item(),
    "tridiag": (T - A).abs().max().item(),
}))
"""


def test_disabled_extension_uses_references():
    """CURVX_DISABLE_EXTENSION=1: references in use, and (by design) no warning."""
    proc = _run_python(DISABLED_SCRIPT, {_ops.DISABLE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["status"]["loaded"]
    assert "CURVX_DISABLE_EXTENSION" in out["status"]["reason"]
    assert out["warnings"] == []
    assert out["ortho"] < tol(F64, 100) and out["recon"] < tol(F64, 100)
    assert out["tridiag"] == 0.0


@pytest.mark.parametrize("disabled", [False, True])
def test_info_module_runs(disabled):
    env = {_ops.DISABLE_ENV: "1" if disabled else "0"}
    proc = _run_python(["-m", "curvx.info"], env)
    assert proc.returncode == 0, proc.stderr
    assert "extension loaded" in proc.stdout
    assert "implementation in use" in proc.stdout
    if disabled:
        assert "pure-PyTorch references" in proc.stdout
    elif not DISABLED:
        assert "compiled extension" in proc.stdout, proc.stdout


def test_info_function():
    from curvx.info import info

    facts = info()
    assert facts["torch"] == torch.__version__
    assert set(facts["extension"]) == {
        "compiled",
        "loaded",
        "cuda_kernels",
        "reason",
        "build",
        "torch",
    }
    assert isinstance(facts["implementation"], str)
