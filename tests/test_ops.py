"""The curvx ops: compiled kernels vs the PyTorch references and plain float64 math.

Tests of the compiled kernels fail when the extension is not loaded (CI builds it),
unless CURVX_DISABLE_EXTENSION=1 is set, in which case they are skipped with that
reason. CUDA variants are skipped visibly on machines without a GPU.
"""

import json
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
LAYOUTS = ["contiguous", "strided", "transposed"]
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
    """``x`` converted; contiguous, strided (every other element) or column-major."""
    x = x.to(device=device, dtype=dtype)
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
