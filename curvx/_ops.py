"""The block Lanczos kernels: compiled ops with pure-PyTorch references.

This is the only module that calls ``torch.ops.curvx``. At import it loads the
compiled module ``curvx._C`` (which registers the ops); the public functions
:func:`orthogonalize`, :func:`lanczos_step` and :func:`assemble_tridiag` then run the
compiled kernel for tensors on a device the build has kernels for, and the matching
reference (:func:`orthogonalize_ref`, ...) otherwise. Both paths take and return the
same shapes and dtypes and raise the same errors.

When the extension is missing, fails to load or was built against another torch, the
first call that falls back emits one :class:`curvx.CurvxWarning` saying why; so does
the first CUDA call when the build has no CUDA kernels. Setting
``CURVX_DISABLE_EXTENSION=1`` selects the references on purpose and silently.
:func:`extension_status` (and ``python -m curvx.info``) report which path is in use.

Shapes: ``n`` rows (parameters), block size ``b``, ``m`` or ``r`` earlier basis
columns, ``p`` Lanczos blocks. The n-row matrices (``Q``, ``V``, ``W``) are float32,
float64 or bfloat16 and share one dtype; the small matrices (``A``, ``B``, ``C``,
``T``) are float64. All products accumulate in float64. Matrices whose rows are dense
(a column slice ``Q[:, :cols]`` of a wider basis, say) are read in place.

The block-layout functions move a block of ``k`` vectors between the solver's
``[n, k]`` and the model's per-parameter ``[k, *shape_p]`` tensors (``n`` the sum of
the parameters' sizes), each in one kernel launch over all parameters:
:func:`pack_block` (stack, times a weight, None parts as zeros),
:func:`pack_block_add_` (accumulate a chunk's products into a block with the chunk's
weight) and :func:`unpack_block` (split into contiguous per-parameter views of one
buffer); their references are the ATen composites they replace.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvx._warnings import CurvxWarning

__all__ = [
    "assemble_tridiag",
    "assemble_tridiag_ref",
    "extension_status",
    "lanczos_step",
    "lanczos_step_ref",
    "orthogonalize",
    "orthogonalize_ref",
    "pack_block",
    "pack_block_add_",
    "pack_block_add_ref",
    "pack_block_ref",
    "unpack_block",
    "unpack_block_ref",
]

logger = logging.getLogger(__name__)

DISABLE_ENV = "CURVX_DISABLE_EXTENSION"
REBUILD_HINT = (
    "rebuild it against the running torch with "
    "`pip install --no-build-isolation -e .` in the curvx source folder"
)
_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
#: dtypes of the n-row matrices and blocks the kernels take.
N_ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Argument checks, shared by the references and the fake kernels. They mirror
# csrc/checks.h: same order, same wording, same error classes.
# --------------------------------------------------------------------------------------


def _sizes(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_dim(op: str, name: str, t: Tensor, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(
            f"curvx.{op}: {name} must be a {dim}-D tensor, got a {t.dim()}-D tensor "
            f"of sizes {_sizes(t)}"
        )


def _check_size(op: str, name: str, t: Tensor, d: int, expected: int, what: str):
    if t.shape[d] != expected:
        raise ValueError(
            f"curvx.{op}: {name}.size({d}) must equal {what} = {expected}, got {name} "
            f"of sizes {_sizes(t)}"
        )


def _check_n_row_dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in N_ROW_DTYPES:
        raise TypeError(
            f"curvx.{op}: {name} must be torch.float32, torch.float64 or "
            f"torch.bfloat16, got {t.dtype}"
        )


def _check_same_dtype(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor):
    if t.dtype != ref.dtype:
        raise TypeError(
            f"curvx.{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), "
            f"got {t.dtype}"
        )


def _check_float64(op: str, name: str, t: Tensor) -> None:
    if t.dtype != torch.float64:
        raise TypeError(f"curvx.{op}: {name} must be torch.float64, got {t.dtype}")


def _check_same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor):
    if t.device != ref.device:
        raise RuntimeError(
            f"curvx.{op}: {name} must be on the same device as {ref_name} "
            f"({ref.device}), got {t.device}"
        )


def _check_orthogonalize(Q: Tensor, V: Tensor, passes: int) -> None:
    op = "orthogonalize"
    _check_dim(op, "Q", Q, 2)
    _check_dim(op, "V", V, 2)
    _check_n_row_dtype(op, "V", V)
    _check_same_dtype(op, "Q", Q, "V", V)
    _check_same_device(op, "Q", Q, "V", V)
    _check_size(op, "Q", Q, 0, V.shape[0], "V.size(0)")
    if passes < 1:
        raise ValueError(f"curvx.{op}: passes must be >= 1, got {passes}")


def _check_lanczos_step(W: Tensor, Q_cur: Tensor, Q_prev: Tensor, B_prev: Tensor):
    op = "lanczos_step"
    _check_dim(op, "W", W, 2)
    _check_dim(op, "Q_cur", Q_cur, 2)
    _check_dim(op, "Q_prev", Q_prev, 2)
    _check_dim(op, "B_prev", B_prev, 2)
    _check_n_row_dtype(op, "W", W)
    _check_same_dtype(op, "Q_cur", Q_cur, "W", W)
    _check_same_dtype(op, "Q_prev", Q_prev, "W", W)
    _check_float64(op, "B_prev", B_prev)
    _check_same_device(op, "Q_cur", Q_cur, "W", W)
    _check_same_device(op, "Q_prev", Q_prev, "W", W)
    _check_same_device(op, "B_prev", B_prev, "W", W)
    _check_size(op, "Q_cur", Q_cur, 0, W.shape[0], "W.size(0)")
    _check_size(op, "Q_cur", Q_cur, 1, W.shape[1], "W.size(1)")
    _check_size(op, "Q_prev", Q_prev, 0, W.shape[0], "W.size(0)")
    _check_size(op, "B_prev", B_prev, 0, W.shape[1], "W.size(1)")
    _check_size(op, "B_prev", B_prev, 1, Q_prev.shape[1], "Q_prev.size(1)")


def _check_assemble_tridiag(
    head: Tensor, coupling: Tensor, alphas: Tensor, betas: Tensor
) -> None:
    op = "assemble_tridiag"
    _check_dim(op, "head", head, 2)
    _check_dim(op, "coupling", coupling, 2)
    _check_dim(op, "alphas", alphas, 3)
    _check_dim(op, "betas", betas, 3)
    for name, t in (("head", head), ("coupling", coupling)):
        _check_float64(op, name, t)
    for name, t in (("alphas", alphas), ("betas", betas)):
        _check_float64(op, name, t)
    for name, t in (("coupling", coupling), ("alphas", alphas), ("betas", betas)):
        _check_same_device(op, name, t, "head", head)
    p, b = alphas.shape[0], alphas.shape[1]
    _check_size(op, "head", head, 1, head.shape[0], "head.size(0)")
    _check_size(op, "alphas", alphas, 2, b, "alphas.size(1)")
    _check_size(op, "coupling", coupling, 0, b, "alphas.size(1)")
    _check_size(op, "coupling", coupling, 1, head.shape[0], "head.size(0)")
    _check_size(op, "betas", betas, 0, max(p - 1, 0), "max(alphas.size(0) - 1, 0)")
    _check_size(op, "betas", betas, 1, b, "alphas.size(1)")
    _check_size(op, "betas", betas, 2, b, "alphas.size(1)")


def _check_numels(op: str, numels: Sequence[int]) -> None:
    for i, m in enumerate(numels):
        if m < 0:
            raise ValueError(f"curvx.{op}: numels[{i}] must be >= 0, got {m}")


def _check_dtype_arg(op: str, dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in N_ROW_DTYPES:
        raise TypeError(
            f"curvx.{op}: dtype must be torch.float32, torch.float64 or "
            f"torch.bfloat16, got {dtype}"
        )


def _check_lengths(op: str, parts: Sequence[Tensor | None], numels: Sequence[int]):
    if len(parts) != len(numels):
        raise ValueError(
            f"curvx.{op}: parts and numels must have the same length, got "
            f"{len(parts)} and {len(numels)}"
        )


def _check_parts(
    op: str,
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    k: int,
    weight: float,
    block: Tensor | None,
) -> int:
    """Checks the parts given; returns the index of the first one (-1: none)."""
    if not math.isfinite(weight):
        raise ValueError(f"curvx.{op}: weight must be finite, got {weight}")
    first = -1
    for i, t in enumerate(parts):
        if t is None:
            continue
        name = f"parts[{i}]"
        _check_n_row_dtype(op, name, t)
        if first < 0:
            first = i
        else:
            _check_same_dtype(op, name, t, f"parts[{first}]", parts[first])
        if block is not None:
            _check_same_device(op, name, t, "block", block)
        elif first != i:
            _check_same_device(op, name, t, f"parts[{first}]", parts[first])
        if t.dim() < 1 or t.shape[0] != k or t.numel() != k * numels[i]:
            raise ValueError(
                f"curvx.{op}: {name} must have sizes [k, *shape] with k = {k} and "
                f"k * numels[{i}] = {k * numels[i]} entries, got sizes {_sizes(t)}"
            )
    return first


def _check_pack_block(
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    k: int,
    weight: float,
    dtype: torch.dtype | None,
) -> int:
    op = "pack_block"
    _check_lengths(op, parts, numels)
    _check_numels(op, numels)
    if k < 0:
        raise ValueError(f"curvx.{op}: k must be >= 0, got {k}")
    _check_dtype_arg(op, dtype)
    return _check_parts(op, parts, numels, k, weight, None)


def _check_pack_block_add(
    block: Tensor, parts: Sequence[Tensor | None], numels: Sequence[int], weight: float
) -> None:
    op = "pack_block_add_"
    _check_lengths(op, parts, numels)
    _check_numels(op, numels)
    _check_dim(op, "block", block, 2)
    _check_n_row_dtype(op, "block", block)
    _check_size(op, "block", block, 0, sum(numels), "sum(numels)")
    rows, k = block.shape
    dense = k <= 1 or block.stride(1) == 1
    apart = rows <= 1 or block.stride(0) >= k
    if not (dense and apart):
        raise ValueError(
            f"curvx.{op}: block must have rows of adjacent entries that do not overlap "
            f"(stride(1) == 1 and stride(0) >= size(1)), got strides "
            f"{list(block.stride())} for sizes {_sizes(block)}"
        )
    _check_parts(op, parts, numels, k, weight, block)


def _check_unpack_block(V: Tensor, numels: Sequence[int], dtype) -> None:
    op = "unpack_block"
    _check_numels(op, numels)
    _check_dim(op, "V", V, 2)
    _check_n_row_dtype(op, "V", V)
    _check_size(op, "V", V, 0, sum(numels), "sum(numels)")
    _check_dtype_arg(op, dtype)


# --------------------------------------------------------------------------------------
# Pure-PyTorch references
# --------------------------------------------------------------------------------------


def orthogonalize_ref(Q: Tensor, V: Tensor, passes: int = 2) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt of ``V`` against ``range(Q)``, repeated ``passes`` times.

    Each pass computes ``c = Q^T W`` and ``W = W - Q c`` in float64 (with ``W = V`` at
    the start); two passes (CGS2) make ``W`` orthogonal to ``Q`` to working precision
    even when ``V`` lies nearly in ``range(Q)``.

    Args:
        Q: ``[n, m]`` basis with orthonormal columns (``m`` may be 0).
        V: ``[n, b]`` block to orthogonalize, same dtype and device as ``Q``.
        passes: number of Gram-Schmidt passes, at least 1.

    Returns:
        ``(W, C)``: ``W`` ``[n, b]`` in ``V``'s dtype and ``C`` ``[m, b]`` float64,
        the sum of the passes' coefficients, so that ``V = Q C + W``.
    """
    _check_orthogonalize(Q, V, passes)
    Q64 = Q.to(torch.float64)
    W = V.to(torch.float64)
    C = torch.zeros(Q.shape[1], V.shape[1], dtype=torch.float64, device=V.device)
    for _ in range(passes):
        c = Q64.T @ W  # [m, b]
        W = W - Q64 @ c
        C = C + c
    return W.to(V.dtype), C


def lanczos_step_ref(
    W: Tensor, Q_cur: Tensor, Q_prev: Tensor, B_prev: Tensor
) -> tuple[Tensor, Tensor]:
    """One update of the block Lanczos three-term recurrence.

    With ``W = H Q_cur``, computes ``A = (M + M^T) / 2`` for ``M = Q_cur^T W`` and
    ``W_new = W - Q_cur A - Q_prev B_prev^T``, all in float64.

    Args:
        W: ``[n, b]`` product of the operator with the current block.
        Q_cur: ``[n, b]`` current Lanczos block, same dtype as ``W``.
        Q_prev: ``[n, r]`` previous block (``r`` may be 0), same dtype as ``W``.
        B_prev: ``[b, r]`` float64 coupling of ``Q_cur`` to ``Q_prev``.

    Returns:
        ``(W_new, A)``: ``W_new`` ``[n, b]`` in ``W``'s dtype and ``A`` ``[b, b]``
        float64, symmetric.
    """
    _check_lanczos_step(W, Q_cur, Q_prev, B_prev)
    W64 = W.to(torch.float64)
    Q_cur64 = Q_cur.to(torch.float64)
    Q_prev64 = Q_prev.to(torch.float64)
    M = Q_cur64.T @ W64  # [b, b]
    A = (M + M.T) / 2
    W_new = W64 - Q_cur64 @ A - Q_prev64 @ B_prev.T
    return W_new.to(W.dtype), A


def assemble_tridiag_ref(
    head: Tensor, coupling: Tensor, alphas: Tensor, betas: Tensor
) -> Tensor:
    """Block tridiagonal Rayleigh-Ritz matrix with a thick-restart head (float64).

    ``T = [[head, coupling^T, 0, ...], [coupling, alphas[0], betas[0]^T, ...],
    [0, betas[0], alphas[1], ...], ...]``.

    Args:
        head: ``[r, r]`` Rayleigh quotient of the kept Ritz vectors (``r`` may be 0).
        coupling: ``[b, r]`` coupling of the first Lanczos block to the head.
        alphas: ``[p, b, b]`` diagonal blocks (``p`` may be 0; then ``T = head``).
        betas: ``[max(p - 1, 0), b, b]``; ``betas[j]`` is the block below ``alphas[j]``.

    Returns:
        ``T`` ``[r + p b, r + p b]`` float64.
    """
    _check_assemble_tridiag(head, coupling, alphas, betas)
    r, p, b = head.shape[0], alphas.shape[0], alphas.shape[1]
    N = r + p * b
    T = torch.zeros(N, N, dtype=torch.float64, device=head.device)
    T[:r, :r] = head
    if p == 0:
        return T
    T[r : r + b, :r] = coupling
    T[:r, r : r + b] = coupling.T
    for j in range(p):
        s = r + j * b  # first row/column of block j
        T[s : s + b, s : s + b] = alphas[j]
        if j + 1 < p:
            T[s + b : s + 2 * b, s : s + b] = betas[j]
            T[s : s + b, s + b : s + 2 * b] = betas[j].T
    return T


def _numels(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(shape) for shape in shapes]


def _zeros_for_none(
    parts: Sequence[Tensor | None], first: int, dtype, device
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the block: the first part's, else the arguments'."""
    if first >= 0:
        ref = parts[first]
        return dtype or ref.dtype, ref.device
    if dtype is None or device is None:
        raise ValueError(
            "curvx.pack_block: every part is None: pass dtype and device for the "
            "block of zeros"
        )
    return dtype, torch.device(device)


def pack_block_ref(
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    k: int,
    *,
    weight: float = 1.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stacks per-parameter blocks into one ``[n, k]`` block, times ``weight``.

    The ATen composite (one transpose view per part and a ``torch.cat``) that
    :func:`pack_block`'s kernels replace with one launch.

    Args:
        parts: ``parts[p]`` ``[k, *shape_p]`` holding ``k * numels[p]`` entries, or
            None for zeros; the parts given share one dtype and device.
        numels: ``numels[p]``, the entries of one vector in part ``p``.
        k: number of vectors.
        weight: finite factor applied to every entry.
        dtype: dtype of the block (default: the parts').
        device: device of the block when every part is None (else the parts').

    Returns:
        ``[n, k]`` with ``n = sum(numels)``: rows ``sum(numels[:p])`` onward hold
        ``weight * parts[p].reshape(k, -1).T``.
    """
    first = _check_pack_block(parts, numels, k, weight, dtype)
    dtype, device = _zeros_for_none(parts, first, dtype, device)
    part_dtype = parts[first].dtype if first >= 0 else dtype
    cols = [
        torch.zeros(m, k, dtype=part_dtype, device=device)
        if t is None
        else t.reshape(k, m).T
        for t, m in zip(parts, numels)
    ]
    block = (
        torch.cat(cols, dim=0)
        if cols
        else torch.zeros(0, k, dtype=part_dtype, device=device)
    )
    if weight != 1.0:
        block = block * weight
    return block.to(dtype)


def pack_block_add_ref(
    block: Tensor,
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    weight: float = 1.0,
) -> Tensor:
    """``block += weight * stack(parts)`` in place (the ATen composite); returns it.

    Args:
        block: ``[n, k]`` accumulator with rows of adjacent entries (a column slice of
            a wider matrix is fine), any n-row dtype.
        parts: as for :func:`pack_block_ref`, on ``block``'s device; None adds nothing.
        numels: as for :func:`pack_block_ref`, ``sum(numels) = n``.
        weight: finite factor.
    """
    _check_pack_block_add(block, parts, numels, weight)
    k = block.shape[1]
    row = 0
    for t, m in zip(parts, numels):
        if t is not None:
            block[row : row + m].add_(t.reshape(k, m).T.to(block.dtype), alpha=weight)
        row += m
    return block


def unpack_block_ref(
    V: Tensor, shapes: Sequence[Sequence[int]], dtype: torch.dtype | None = None
) -> list[Tensor]:
    """Splits a block ``[n, k]`` into per-parameter blocks ``[k, *shape_p]``.

    The ATen composite (a split and one transposing copy per part) that
    :func:`unpack_block`'s kernels replace with one launch.

    Args:
        V: ``[n, k]`` block, ``n = sum(prod(shape_p))``.
        shapes: ``shapes[p]``, the shape of parameter ``p``.
        dtype: dtype of the parts (default: ``V``'s).

    Returns:
        ``[k, *shape_p]`` per part, contiguous.
    """
    numels = _numels(shapes)
    _check_unpack_block(V, numels, dtype)
    k = V.shape[1]
    return [
        part.T.to(dtype or V.dtype).reshape(k, *shape).contiguous()
        for part, shape in zip(V.split(numels, dim=0), shapes)
    ]


def _views_of(flat: Tensor, k: int, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """The parts ``[k, *shape_p]`` of unpack_block's flat buffer, as views."""
    views, offset = [], 0
    for shape in shapes:
        size = k * math.prod(shape)
        views.append(flat[offset : offset + size].view(k, *shape))
        offset += size
    return views


# --------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Extension:
    """What loading ``curvx._C`` found (see :func:`extension_status`)."""

    compiled: bool
    loaded: bool
    cuda_kernels: bool
    reason: str | None
    build: dict[str, Any]
    disabled: bool = False


def _read_build_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.debug("could not read %s: %s", path, exc)
        return {}


def _load_extension(
    module: str = "curvx._C", build_info_path: Path = _BUILD_INFO_PATH
) -> _Extension:
    """Imports ``module`` unless disabled, missing or built for another torch."""
    build = _read_build_info(build_info_path)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    compiled = spec is not None
    if os.environ.get(DISABLE_ENV, "") == "1":
        reason = f"disabled by {DISABLE_ENV}=1"
        return _Extension(compiled, False, False, reason, build, disabled=True)
    if not compiled:
        reason = f"the compiled module {module} was not found (it was not built)"
        return _Extension(False, False, False, reason, build)
    built_for = build.get("torch")
    if built_for is None:
        logger.debug(
            "no build info at %s; loading %s unchecked", build_info_path, module
        )
    elif built_for != torch.__version__:
        reason = (
            f"{module} was built for torch {built_for}, "
            f"but torch {torch.__version__} runs"
        )
        return _Extension(True, False, False, reason, build)
    try:
        lib = importlib.import_module(module)
    except Exception as exc:  # any failure to load the shared library means fallback
        reason = f"importing {module} failed: {type(exc).__name__}: {exc}"
        return _Extension(True, False, False, reason, build)
    compiled_for = getattr(lib, "torch_version", None)
    if compiled_for is not None and compiled_for != torch.__version__.split("+")[0]:
        reason = (
            f"{module} was compiled against torch {compiled_for}, "
            f"but torch {torch.__version__} runs"
        )
        return _Extension(True, False, False, reason, build)
    missing = [name for name in _OP_NAMES if not hasattr(torch.ops.curvx, name)]
    if missing:
        reason = (
            f"{module} was built from older sources: it lacks the ops "
            f"{', '.join(missing)}"
        )
        return _Extension(True, False, False, reason, build)
    _register_fakes()
    cuda_kernels = bool(getattr(lib, "cuda_kernels", build.get("cuda_kernels", False)))
    logger.debug("loaded %s (CUDA kernels: %s)", module, cuda_kernels)
    return _Extension(True, True, cuda_kernels, None, build)


#: The ops curvx._C must register (csrc/ops.cpp).
_OP_NAMES = (
    "orthogonalize",
    "lanczos_step",
    "assemble_tridiag",
    "pack_block",
    "pack_block_add_",
    "unpack_block",
)
_fakes_registered = False


def _register_fakes() -> None:
    """Fake (meta) kernels: output shapes and dtypes only, for tracing and compile."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("curvx::orthogonalize")
    def _(Q, V, passes=2):
        _check_orthogonalize(Q, V, passes)
        W = V.new_empty(V.shape)
        C = V.new_empty((Q.shape[1], V.shape[1]), dtype=torch.float64)
        return W, C

    @torch.library.register_fake("curvx::lanczos_step")
    def _(W, Q_cur, Q_prev, B_prev):
        _check_lanczos_step(W, Q_cur, Q_prev, B_prev)
        A = W.new_empty((W.shape[1], W.shape[1]), dtype=torch.float64)
        return W.new_empty(W.shape), A

    @torch.library.register_fake("curvx::assemble_tridiag")
    def _(head, coupling, alphas, betas):
        _check_assemble_tridiag(head, coupling, alphas, betas)
        N = head.shape[0] + alphas.shape[0] * alphas.shape[1]
        return head.new_empty((N, N))

    @torch.library.register_fake("curvx::pack_block")
    def _(parts, numels, k, weight=1.0, dtype=None):
        first = _check_pack_block(parts, numels, k, weight, dtype)
        if first < 0:
            raise ValueError(
                "curvx.pack_block: parts must hold at least one tensor, got only None "
                "(the Python wrapper returns zeros for that case)"
            )
        ref = parts[first]
        return ref.new_empty((sum(numels), k), dtype=dtype or ref.dtype)

    @torch.library.register_fake("curvx::pack_block_add_")
    def _(block, parts, numels, weight=1.0):
        _check_pack_block_add(block, parts, numels, weight)

    @torch.library.register_fake("curvx::unpack_block")
    def _(V, numels, dtype=None):
        _check_unpack_block(V, numels, dtype)
        return V.new_empty((V.shape[0] * V.shape[1],), dtype=dtype or V.dtype)

    _fakes_registered = True


_EXT = _load_extension()
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        # stacklevel 4: _warn_once < _use_kernels < public op < its caller.
        warnings.warn(message, CurvxWarning, stacklevel=4)


def _use_kernels(device: torch.device) -> bool:
    """Whether the compiled kernels serve tensors on ``device``; warns once if not."""
    ext = _EXT
    if not ext.loaded:
        if not ext.disabled:
            _warn_once(
                "load",
                f"curvx is using its slower pure-PyTorch kernels: {ext.reason}; "
                f"{REBUILD_HINT}",
            )
        return False
    if device.type == "cuda" and not ext.cuda_kernels:
        _warn_once(
            "cuda",
            "curvx's extension was built without CUDA kernels, so CUDA tensors use "
            "the pure-PyTorch kernels; with a CUDA toolkit (CUDA_HOME) and "
            f"CURVX_CUDA=1, {REBUILD_HINT}",
        )
        return False
    return device.type in ("cpu", "cuda", "meta")


def extension_status() -> dict[str, Any]:
    """Facts about the compiled extension and whether it is in use.

    Returns:
        ``{"compiled", "loaded", "cuda_kernels", "reason", "build", "torch"}``:
        ``compiled`` is whether ``curvx._C`` was found, ``loaded`` whether its kernels
        are in use, ``reason`` why not (``None`` when loaded), ``build`` the contents of
        ``curvx/_build_info.json`` and ``torch`` the running torch version.
    """
    ext = _EXT
    return {
        "compiled": ext.compiled,
        "loaded": ext.loaded,
        "cuda_kernels": ext.cuda_kernels,
        "reason": ext.reason,
        "build": dict(ext.build),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


#: Narrowest CPU block the compiled orthogonalize / lanczos_step serve. Narrower
#: blocks (a tracker's usual 1-4 columns) go to the ATen composite, which was
#: measured faster there: n = 199,210, two threads, float64 orthogonalize
#: 2.3-2.5x and lanczos_step 1.6-2.2x, float32 1.5-2.3x and 1.5-1.8x for b = 1-3;
#: at b = 8 the kernels win in float32 (1.2x, 2.5x) and match in float64.
CPU_KERNEL_MIN_BLOCK = 8


def _narrow_cpu_block(V: Tensor) -> bool:
    return V.device.type == "cpu" and V.dim() == 2 and V.shape[1] < CPU_KERNEL_MIN_BLOCK


def orthogonalize(Q: Tensor, V: Tensor, passes: int = 2) -> tuple[Tensor, Tensor]:
    """Orthogonalizes ``V`` [n, b] against ``range(Q)``, ``Q`` [n, m].

    Compiled kernel or :func:`orthogonalize_ref` (see there for the algorithm;
    CPU blocks narrower than :data:`CPU_KERNEL_MIN_BLOCK` use the reference).

    Returns:
        ``(W, C)``: ``W`` ``[n, b]`` in ``V``'s dtype, ``C`` ``[m, b]`` float64, with
        ``V = Q C + W``.
    """
    if _use_kernels(V.device) and not _narrow_cpu_block(V):
        return torch.ops.curvx.orthogonalize(Q, V, passes)
    return orthogonalize_ref(Q, V, passes)


def lanczos_step(
    W: Tensor, Q_cur: Tensor, Q_prev: Tensor, B_prev: Tensor
) -> tuple[Tensor, Tensor]:
    """Block three-term recurrence update: ``W - Q_cur A - Q_prev B_prev^T``.

    Compiled kernel or :func:`lanczos_step_ref` (see there for shapes; CPU
    blocks narrower than :data:`CPU_KERNEL_MIN_BLOCK` use the reference).

    Returns:
        ``(W_new, A)``: ``W_new`` ``[n, b]`` in ``W``'s dtype, ``A`` ``[b, b]`` float64.
    """
    if _use_kernels(W.device) and not _narrow_cpu_block(W):
        return torch.ops.curvx.lanczos_step(W, Q_cur, Q_prev, B_prev)
    return lanczos_step_ref(W, Q_cur, Q_prev, B_prev)


def assemble_tridiag(
    head: Tensor, coupling: Tensor, alphas: Tensor, betas: Tensor
) -> Tensor:
    """Block tridiagonal ``T`` ``[r + p b, r + p b]`` float64 with a restart head.

    Compiled kernel or :func:`assemble_tridiag_ref` (see there for shapes).
    """
    if _use_kernels(head.device):
        return torch.ops.curvx.assemble_tridiag(head, coupling, alphas, betas)
    return assemble_tridiag_ref(head, coupling, alphas, betas)


def _differentiable(*tensors: Tensor | None) -> bool:
    """Whether autograd must see the computation (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )


def pack_block(
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    k: int,
    *,
    weight: float = 1.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-parameter blocks ``[k, *shape_p]`` (None: zeros) -> ``weight *`` ``[n, k]``.

    One kernel launch for all parts (compiled) or :func:`pack_block_ref`; see there
    for the arguments. Inputs that require grad take the reference, which autograd
    can differentiate.
    """
    parts = list(parts)
    ref = next((t for t in parts if t is not None), None)
    if ref is not None and _use_kernels(ref.device) and not _differentiable(*parts):
        return torch.ops.curvx.pack_block(parts, list(numels), k, weight, dtype)
    return pack_block_ref(parts, numels, k, weight=weight, dtype=dtype, device=device)


def pack_block_add_(
    block: Tensor,
    parts: Sequence[Tensor | None],
    numels: Sequence[int],
    weight: float = 1.0,
) -> Tensor:
    """``block [n, k] += weight * stack(parts)`` in place; returns ``block``.

    Accumulates a chunk's per-parameter products into the block with the chunk's
    weight in one kernel launch (compiled) or :func:`pack_block_add_ref`.
    """
    parts = list(parts)
    if _use_kernels(block.device) and not _differentiable(block, *parts):
        torch.ops.curvx.pack_block_add_(block, parts, list(numels), weight)
        return block
    return pack_block_add_ref(block, parts, numels, weight)


def unpack_block(
    V: Tensor, shapes: Sequence[Sequence[int]], dtype: torch.dtype | None = None
) -> list[Tensor]:
    """Block ``[n, k]`` -> per-parameter blocks ``[k, *shape_p]``.

    Compiled: one launch writes one contiguous buffer and the parts are views of it
    (each contiguous). Otherwise :func:`unpack_block_ref`.
    """
    if _use_kernels(V.device) and not _differentiable(V):
        flat = torch.ops.curvx.unpack_block(V, _numels(shapes), dtype)
        return _views_of(flat, V.shape[1], shapes)
    return unpack_block_ref(V, shapes, dtype)
