"""Principal angles, clusters and matching: exact cases."""

import math

import pytest
import torch

from curvx import rotation


def _plane_pair(angles, n=10, seed=0):
    """Two orthonormal bases whose principal angles are ``angles``."""
    g = torch.Generator().manual_seed(seed)
    p = len(angles)
    Q, _ = torch.linalg.qr(torch.randn(n, 2 * p, generator=g, dtype=torch.float64))
    E, F = Q[:, :p], Q[:, p:]
    a = torch.tensor(angles, dtype=torch.float64)
    return E, E * torch.cos(a) + F * torch.sin(a)


@pytest.mark.parametrize(
    "angles", [[0.0, 0.0], [0.3, 1.2], [1e-9, 0.5], [math.pi / 2, 0.1, 1e-12]]
)
def test_principal_angles_exact(angles):
    U, W = _plane_pair(angles)
    got = rotation.principal_angles(U, W)
    assert torch.allclose(
        got, torch.tensor(sorted(angles), dtype=torch.float64), atol=1e-13
    )


def test_similarity_definition():
    U, W = _plane_pair([0.3, 0.4])
    want = math.cos(math.sqrt((0.3**2 + 0.4**2) / 2))
    assert math.isclose(rotation.subspace_similarity(U, W), want, rel_tol=1e-12)
    assert rotation.subspace_similarity(U, U) == 1.0
    U, W = _plane_pair([math.pi / 2, math.pi / 2])
    assert abs(rotation.subspace_similarity(U, W)) < 1e-12


def test_sign_and_order_free():
    U, W = _plane_pair([0.2, 0.7])
    W2 = torch.stack([-W[:, 1], W[:, 0]], dim=1)
    assert torch.allclose(
        rotation.principal_angles(U, W), rotation.principal_angles(U, W2), atol=1e-13
    )


def test_different_dimensions():
    U, W = _plane_pair([0.0, 0.0, 0.0])
    got = rotation.principal_angles(U[:, :1], W)  # a line inside the subspace
    assert got.shape == (1,) and float(got[0]) < 1e-14


def test_clusters_and_extent():
    vals = [5.0, 5.0 + 1e-6, 4.0, 3.0, 3.0]
    assert rotation.clusters(vals, rtol=1e-4) == [[0, 1], [2], [3, 4]]
    assert rotation.cluster_extent(vals, 1) == 2
    assert rotation.cluster_extent(vals, 3) == 3
    assert rotation.cluster_extent(vals, 4) == 5
    # residual bounds widen a cluster
    assert rotation.clusters([1.0, 0.9], rtol=0, residuals=[0.06, 0.05]) == [[0, 1]]


def test_match_by_overlap_detects_swap():
    U, _ = _plane_pair([0.0, 0.0, 0.0])
    swapped = U[:, [1, 0, 2]] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    pairs = rotation.match(U, swapped)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (1, 0), (2, 2)]
    assert all(math.isclose(c, 1.0) for _, _, c in pairs)


def test_compare_crossing_is_not_rotation():
    # two eigenvalues swap order, the vectors stay: top-2 subspace unchanged
    U, _ = _plane_pair([0.0, 0.0])
    prev_vals = torch.tensor([2.0, 1.0], dtype=torch.float64)
    vals = torch.tensor([2.1, 1.9], dtype=torch.float64)
    out = rotation.compare(prev_vals, U, vals, U[:, [1, 0]], k=2)
    assert out["subspace_similarity"] == pytest.approx(1.0, abs=1e-14)
    assert out["max_principal_angle"] < 1e-7
    assert [m[:2] for m in out["matching"]] == [[0, 1], [1, 0]]
    # followed to its match, the previous top vector did not move; the raw
    # top-1 cosine sees the swap, and the crossing is reported
    assert out["rotation_top1"] == pytest.approx(1.0, abs=1e-14)
    assert out["top1_cosine"] < 1e-7
    assert out["crossings"] == [[0, 1], [1, 0]]


def test_compare_inside_a_cluster_reports_no_rotation():
    U, W = _plane_pair([0.0, 0.0, 0.0])
    R, _ = torch.linalg.qr(
        torch.randn(
            3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
    )
    mixed = U @ R  # another basis of the same eigenspace
    vals = torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64)
    out = rotation.compare(vals, U, vals, mixed, k=1)
    assert out["rotation_top1"] == pytest.approx(1.0, abs=1e-12)
    assert out["subspace_similarity"] == pytest.approx(1.0, abs=1e-12)


def test_bad_bases():
    with pytest.raises(ValueError, match="same number of rows"):
        rotation.principal_angles(torch.ones(3, 1), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"\[n, p\]"):
        rotation.principal_angles(torch.ones(3), torch.ones(3, 1))


def test_principal_angles_with_a_given_overlap_matrix():
    U, W = _plane_pair([0.2, 1e-7, 1.1], n=40, seed=3)
    want = rotation.principal_angles(U, W)
    got = rotation.principal_angles(U, W, U.T @ W)
    assert torch.allclose(got, want, atol=1e-14)
    got = rotation.principal_angles(W[:, :2], U, (U.T @ W[:, :2]).T)  # p < q
    assert torch.allclose(got, rotation.principal_angles(W[:, :2], U), atol=1e-14)
    with pytest.raises(ValueError, match="M must be U\\^T W"):
        rotation.principal_angles(U, W, torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("angles", [[1e-4, 2e-4], [1e-8, 0.3], [1e-11, 1e-10]])
def test_small_angles_keep_their_digits(angles):
    # sines spanning a few decades (Gram path) and many (SVD path)
    U, W = _plane_pair(angles, n=60, seed=5)
    got = rotation.principal_angles(U, W)
    want = torch.tensor(sorted(angles), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-15)


def test_overlap_matrix_shape_is_checked_and_overlaps_stay_at_most_one():
    U, W = _plane_pair([0.0, 0.0], n=20, seed=2)
    with pytest.raises(ValueError, match="M must be"):
        rotation.match(U, W, M=torch.zeros(3, 3, dtype=torch.float64))
    vals = torch.tensor([2.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="M must be"):
        rotation.top1_cosine(vals, U, vals, W, M=torch.zeros(1, 1))
    assert all(c <= 1.0 for _, _, c in rotation.match(U, W * (1 + 1e-15)))
