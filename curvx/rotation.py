"""How eigenvectors move between two evaluations: pure functions, no state.

Bases are ``[n, p]`` with orthonormal columns (float64 recommended). Eigenvalue
lists are ordered the way their columns are (top end: descending).

Definitions (see the seed paper, Wang & Roberts 2024, and science.md):

* principal angles ``theta_i`` between ``span(U)`` and ``span(W)``: the arccosines
  of the singular values of ``U^T W``; computed from sines for small angles so
  that an unchanged subspace gives angles at rounding level, not ``1e-8``;
* subspace similarity: ``cos(sqrt(mean_i theta_i^2))``, 1 for the same subspace,
  0 when every angle is 90 degrees;
* a cluster: consecutive eigenvalues closer than ``rtol * max|lambda|`` plus their
  residual bounds. A cluster is one subspace: vectors inside it are arbitrary, so
  rotation is measured between cluster subspaces, never between its members.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "principal_angles",
    "subspace_similarity",
    "clusters",
    "cluster_extent",
    "top1_cosine",
    "match",
    "compare",
]


def _check_basis(name: str, U: Tensor) -> Tensor:
    if not isinstance(U, Tensor) or U.dim() != 2:
        raise ValueError(
            f"{name} must be a [n, p] tensor; got {getattr(U, 'shape', U)}"
        )
    return U.to(torch.float64)


def _check_overlap(M: Tensor | None, P: Tensor, W: Tensor) -> None:
    if M is not None and (
        not isinstance(M, Tensor) or tuple(M.shape) != (P.shape[1], W.shape[1])
    ):
        raise ValueError(
            f"M must be prev_vectors^T vectors of shape {[P.shape[1], W.shape[1]]}; "
            f"got {list(getattr(M, 'shape', [])) or type(M).__name__}"
        )


def principal_angles(U: Tensor, W: Tensor, M: Tensor | None = None) -> Tensor:
    """Principal angles between ``span(U)`` and ``span(W)``, ascending, in radians.

    Args:
        U: ``[n, p]`` orthonormal columns.
        W: ``[n, q]`` orthonormal columns.
        M: ``[p, q]`` ``U^T W`` when the caller has it (one pass over both
            bases saved).

    Returns:
        ``[min(p, q)]`` float64 angles in ``[0, pi/2]``.
    """
    U, W = _check_basis("U", U), _check_basis("W", W)
    if U.shape[0] != W.shape[0]:
        raise ValueError(
            f"U and W must have the same number of rows; got {U.shape[0]} and "
            f"{W.shape[0]}"
        )
    if M is not None and tuple(M.shape) != (U.shape[1], W.shape[1]):
        raise ValueError(
            f"M must be U^T W of shape {[U.shape[1], W.shape[1]]}; got {list(M.shape)}"
        )
    if U.shape[1] < W.shape[1]:
        U, W = W, U
        M = None if M is None else M.T
    q = W.shape[1]
    if q == 0:
        return torch.zeros(0, dtype=torch.float64)

    # Cosines: singular values of U^T W (descending)
    if M is None:
        M = U.T @ W
    M = M.to(torch.float64)
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)
    small = cos**2 >= 0.5
    if not bool(small.any()):
        return torch.arccos(cos).sort().values.cpu()

    # Sines: singular values of R = W - U M, the part of W outside span(U)
    # (paired ascending), through the q x q Gram matrix R^T R: its rounding
    # moves sin_i^2 by ~eps * sin_max^2, so when the sines span more than three
    # decades the small ones come from the SVD of R itself
    R = W - U @ M
    sin2 = torch.linalg.eigvalsh(R.T @ R).clamp(min=0.0)
    sin = sin2.sqrt()
    if float(sin[0]) < 1e-3 * float(sin[-1]):
        sin = torch.linalg.svdvals(R).flip(0)
    sin = sin.clamp(0.0, 1.0)

    # Small angles from sines, large ones from cosines
    angles = torch.where(small, torch.arcsin(sin), torch.arccos(cos))
    return angles.sort().values.cpu()


def subspace_similarity(U: Tensor, W: Tensor) -> float:
    """``cos`` of the root-mean-square principal angle between two subspaces."""
    angles = principal_angles(U, W)
    if angles.numel() == 0:
        return float("nan")
    return math.cos(math.sqrt(float((angles**2).mean())))


def clusters(
    values: Sequence[float] | Tensor,
    rtol: float = 1e-3,
    residuals: Sequence[float] | Tensor | None = None,
) -> list[list[int]]:
    """Group consecutive near-equal eigenvalues.

    Two neighbours ``i, i+1`` (in the given order) belong together when
    ``|v_i - v_{i+1}| <= rtol * max_j |v_j| + r_i + r_{i+1}`` (``r``: residual
    bounds, zero when not given).

    Returns:
        Index groups covering ``range(len(values))`` in order.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if v.numel() == 0:
        return []
    r = (
        torch.zeros_like(v)
        if residuals is None
        else torch.as_tensor(residuals, dtype=torch.float64).flatten().cpu()
    )
    scale = float(v.abs().max())
    groups = [[0]]
    for i in range(1, v.numel()):
        gap = abs(float(v[i] - v[i - 1]))
        if gap <= rtol * scale + float(r[i] + r[i - 1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def cluster_extent(
    values: Sequence[float] | Tensor,
    count: int,
    rtol: float = 1e-3,
    residuals: Sequence[float] | Tensor | None = None,
) -> int:
    """How many leading entries to take so that no cluster is cut at ``count``."""
    groups = clusters(values, rtol, residuals)
    taken = 0
    for g in groups:
        if taken >= count:
            break
        taken += len(g)
    return min(max(taken, 0), len(torch.as_tensor(values).flatten()))


def top1_cosine(
    prev_values: Tensor,
    prev_vectors: Tensor,
    values: Tensor,
    vectors: Tensor,
    rtol: float = 1e-3,
    prev_residuals: Tensor | None = None,
    residuals: Tensor | None = None,
    M: Tensor | None = None,
) -> float:
    """``|cos|`` between consecutive top eigenvectors, cluster-aware.

    For simple top eigenvalues this is ``|<v1(t-1), v1(t)>|``. When the top
    eigenvalue is in a cluster at either step, it is the cosine of the smallest
    principal angle between the two top-cluster subspaces (1 when they share a
    direction), so no rotation is reported inside a cluster. ``M``: the overlap
    matrix ``prev_vectors^T vectors`` when the caller has it.
    """
    p = cluster_extent(prev_values, 1, rtol, prev_residuals)
    c = cluster_extent(values, 1, rtol, residuals)
    P, W = _check_basis("prev_vectors", prev_vectors), _check_basis("vectors", vectors)
    _check_overlap(M, P, W)
    block = P[:, :p].T @ W[:, :c] if M is None else M[:p, :c].to(torch.float64)
    return min(1.0, float(torch.linalg.svdvals(block)[0]))


def match(
    prev_vectors: Tensor,
    vectors: Tensor,
    prev_groups: list[list[int]] | None = None,
    groups: list[list[int]] | None = None,
    count: int | None = None,
    M: Tensor | None = None,
) -> list[tuple[int, int, float]]:
    """Match eigenvectors across two steps by overlap, not by index.

    The overlap of ``u_i`` and ``w_j`` is ``|<u_i, w_j>|``, or, when either lies
    in a cluster (``prev_groups`` / ``groups``: index groups from
    :func:`clusters`), the cosine of the smallest principal angle between the
    two cluster subspaces: vectors inside a cluster are arbitrary, so only the
    cluster is compared. Greedy: the largest overlap first.

    Args:
        prev_vectors, vectors: ``[n, r0]``, ``[n, r1]``.
        prev_groups, groups: cluster index groups (default: singletons).
        count: match only the first ``count`` vectors of each side.
        M: the overlap matrix ``prev_vectors^T vectors`` when the caller has it.

    Returns:
        ``(i_prev, j_new, overlap)`` triples, one per matched pair, sorted by
        ``i_prev``.
    """
    P, W = _check_basis("prev_vectors", prev_vectors), _check_basis("vectors", vectors)
    r0 = P.shape[1] if count is None else min(count, P.shape[1])
    r1 = W.shape[1] if count is None else min(count, W.shape[1])
    g0 = {i: g for g in (prev_groups or [[i] for i in range(P.shape[1])]) for i in g}
    g1 = {j: g for g in (groups or [[j] for j in range(W.shape[1])]) for j in g}
    # Overlaps from one product: |M_ij|, or for clusters the largest singular
    # value of the cluster block (the cosine of the smallest principal angle)
    _check_overlap(M, P, W)
    M = (P.T @ W if M is None else M.to(torch.float64)).cpu()
    O = torch.empty(r0, r1, dtype=torch.float64)
    for i in range(r0):
        for j in range(r1):
            a, b = g0.get(i, [i]), g1.get(j, [j])
            if len(a) == 1 and len(b) == 1:
                O[i, j] = min(1.0, abs(float(M[i, j])))
            else:
                O[i, j] = min(1.0, float(torch.linalg.svdvals(M[a][:, b])[0]))
    pairs = []
    while len(pairs) < min(r0, r1):
        flat = int(torch.argmax(O))
        i, j = divmod(flat, O.shape[1])
        pairs.append((i, j, float(O[i, j])))
        O[i, :] = -1.0
        O[:, j] = -1.0
    return sorted(pairs)


def _head(x: Tensor | None, n: int) -> Tensor | None:
    return None if x is None else x[:n]


def compare(
    prev_values: Tensor,
    prev_vectors: Tensor,
    values: Tensor,
    vectors: Tensor,
    k: int,
    rtol: float = 1e-3,
    prev_residuals: Tensor | None = None,
    residuals: Tensor | None = None,
) -> dict[str, object]:
    """Rotation of the top-k eigenvectors from one evaluation to the next.

    Args:
        prev_values, values: ``[r0]``, ``[r1]`` top-end Ritz values, descending
            (may hold more than ``k``: neighbours let clusters at the k-th value be
            seen whole).
        prev_vectors, vectors: ``[n, r0]``, ``[n, r1]`` matching vectors.
        k: the tracked count.

    Returns:
        ``rotation_top1`` (the overlap of the previous top vector with its match
        among the new ones, cluster-aware: an eigenvalue crossing, where the
        vectors keep their directions and swap places, shows no rotation),
        ``top1_cosine`` (``|cos|`` between the two top vectors as they are
        ordered, cluster-aware: the crossing counts there), ``crossings``
        (``[i_prev, j_new]`` matched pairs whose places changed, outside
        clusters), ``subspace_similarity``
        (cos of rms principal angle between the top-k subspaces, each extended to
        the end of a cluster cut at k), ``max_principal_angle`` (radians),
        ``matching`` (``[i_prev, j_new, overlap]`` for the top-k vectors, the
        overlap cluster-aware as in :func:`match`).
    """
    k0 = cluster_extent(prev_values, k, rtol, prev_residuals)
    k1 = cluster_extent(values, k, rtol, residuals)
    P, W = _check_basis("prev_vectors", prev_vectors), _check_basis("vectors", vectors)

    # One overlap matrix [r0, r1] serves the angles, the matching and the top-1
    M = P.T @ W
    angles = principal_angles(P[:, :k0], W[:, :k1], M[:k0, :k1])
    new_groups = clusters(values[:k1], rtol, _head(residuals, k1))
    pairs = match(
        P[:, :k0],
        W[:, :k1],
        clusters(prev_values[:k0], rtol, _head(prev_residuals, k0)),
        new_groups,
        count=k,
        M=M[:k0, :k1],
    )

    # The previous top vector followed to its match: a crossing (the top two
    # eigenvalues swap, their vectors stay) is not a rotation
    group_of = {j: set(g) for g in new_groups for j in g}
    top_pair = next((p for p in pairs if p[0] == 0), None)
    crossed = [[i, j] for i, j, _ in pairs if i != j and i not in group_of.get(j, {j})]
    raw = top1_cosine(prev_values, P, values, W, rtol, prev_residuals, residuals, M=M)
    similarity = math.cos(math.sqrt(float((angles**2).mean())))
    largest = float(angles.max())
    old_groups = clusters(prev_values[:k0], rtol, _head(prev_residuals, k0))
    if len(old_groups) == 1 and len(new_groups) == 1:
        # The top-k lies inside one cluster at both steps: the two sets are
        # parts of one eigenspace, possibly of different parts (a multiplicity
        # larger than what was captured), so they are compared as one direction
        # each, like the top-1 cosine of a cluster
        similarity, largest = math.cos(float(angles[0])), float(angles[0])
    return {
        "rotation_top1": top_pair[2] if top_pair is not None else raw,
        "top1_cosine": raw,
        "subspace_similarity": similarity,
        "max_principal_angle": largest,
        "matching": [[i, j, c] for i, j, c in pairs],
        "crossings": crossed,
    }
