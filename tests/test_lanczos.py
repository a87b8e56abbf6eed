"""Block Lanczos and eigsh() against dense float64 eigendecompositions."""

import math

import pytest
import torch
from _reference import Quadratic, data, dense_hessian, mlp, mse_sum, quadratic_loss
from conftest import requires_cuda

import curvx
from curvx.lanczos import LanczosState, lanczos, solve


def _sym(eigs, seed=0):
    """Dense symmetric matrix with the given spectrum and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


def _check_pairs(A, res, tol):
    """Residuals recomputed from A; bounds hold against the dense spectrum; the
    converged mask and the certificates agree with the bounds."""
    U, theta = res.eigenvectors, res.eigenvalues
    true_res = torch.linalg.vector_norm(A @ U - U * theta, dim=0)
    assert torch.allclose(true_res, res.residuals, atol=1e-10 * res.norm_estimate)
    assert (res.bounds <= res.residuals).all()
    assert torch.equal(res.converged, res.bounds <= tol * res.norm_estimate + 1e-13)
    kinds = {"residual", "kato-temple"}
    assert [c in kinds for c in res.certificate] == res.converged.tolist()
    ev = torch.linalg.eigvalsh(A)
    err = (theta[:, None] - ev[None, :]).abs().min(dim=1).values
    assert (err <= res.bounds + 1e-12 * res.norm_estimate).all()
    I = torch.eye(U.shape[1], dtype=torch.float64)
    assert torch.allclose(U.T @ U, I, atol=1e-10)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_extreme_eigenvalues_of_indefinite_matrix(which, k):
    # |lambda_min| = 10 > lambda_max = 4: LA must still return the largest algebraic
    eigs = torch.cat([torch.linspace(-10, 4, 200, dtype=torch.float64)])
    A = _sym(eigs, seed=1)
    res = lanczos(A, k=k, which=which, tol=1e-10, generator=_gen())
    ev = torch.linalg.eigvalsh(A)
    if which == "LA":
        want = ev.flip(0)[:k]
    elif which == "SA":
        want = ev[:k]
    else:
        want = torch.cat([ev.flip(0)[: (k + 1) // 2], ev[: k // 2].flip(0)])
    assert res.all_converged and res.status == "converged"
    assert torch.allclose(res.eigenvalues, want, atol=1e-8)
    _check_pairs(A, res, 1e-10)


def test_repeated_top_eigenvalue_is_found_with_its_multiplicity():
    eigs = torch.linspace(-1, 1, 150, dtype=torch.float64)
    eigs[-4:] = 2.0  # multiplicity 4
    A = _sym(eigs, seed=2)
    res = lanczos(A, k=4, which="LA", tol=1e-10, generator=_gen())
    assert torch.allclose(res.eigenvalues, torch.full((4,), 2.0, dtype=torch.float64))
    _check_pairs(A, res, 1e-10)


def test_thick_restart_converges_with_a_small_basis():
    eigs = torch.linspace(0, 1, 400, dtype=torch.float64) ** 3
    A = _sym(eigs, seed=3)
    res = lanczos(
        A, k=3, which="LA", tol=1e-9, max_basis=16, block_size=2, generator=_gen()
    )
    assert res.restarts > 0 and res.all_converged
    assert torch.allclose(res.eigenvalues, eigs.flip(0)[:3], atol=1e-8)
    _check_pairs(A, res, 1e-9)


def test_budget_exhausted_flags_unconverged_pairs_honestly():
    eigs = torch.linspace(0, 1, 400, dtype=torch.float64) ** 3
    A = _sym(eigs, seed=3)
    res = lanczos(
        A, k=3, which="LA", tol=1e-12, max_hvps=12, block_size=3, generator=_gen()
    )
    assert res.status == "max_hvps" and res.hvps <= 12
    assert not res.all_converged
    _check_pairs(A, res, 1e-12)
    assert [c != "none" for c in res.certificate] == res.converged.tolist()


def test_callback_sees_states_and_can_stop():
    A = _sym(torch.linspace(-1, 1, 100, dtype=torch.float64), seed=4)
    seen = []

    def cb(state):
        assert isinstance(state, LanczosState)
        seen.append(state.hvps)
        return state.iteration >= 3

    res = lanczos(A, k=1, callback=cb, generator=_gen())
    assert res.status in ("stopped", "converged") and len(seen) == 3
    assert seen == sorted(seen)


def test_warm_start_from_exact_vectors_is_cheap():
    eigs = torch.linspace(-1, 1, 300, dtype=torch.float64)
    A = _sym(eigs, seed=5)
    cold = lanczos(A, k=2, tol=1e-10, generator=_gen())
    warm = lanczos(A, k=2, tol=1e-10, v0=cold.eigenvectors, generator=_gen())
    assert warm.all_converged and warm.hvps < cold.hvps
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, atol=1e-10)


def test_warm_start_from_a_wrong_vector_still_finds_a_separated_top():
    # v0 is an exact eigenvector, but of the second eigenvalue (a crossing the
    # warm start did not see coming): the random guard column must find the top
    eigs = torch.linspace(-1, 0.5, 300, dtype=torch.float64)
    eigs[-1] = 2.0
    A = _sym(eigs, seed=6)
    _, V = torch.linalg.eigh(A)
    res = lanczos(A, k=1, tol=1e-10, v0=V[:, -2], generator=_gen())
    assert math.isclose(float(res.eigenvalues[0]), 2.0, abs_tol=1e-9)


def test_small_operators_are_solved_densely():
    A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    res = lanczos(A, k=1)
    assert res.status == "converged"
    assert math.isclose(float(res.eigenvalues[0]), float(torch.linalg.eigvalsh(A)[-1]))
    res = lanczos(A, k=2, which="SA")
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(A))


def test_zero_operator():
    res = lanczos(lambda V: torch.zeros_like(V), k=2, n=100, generator=_gen())
    assert res.all_converged
    assert torch.equal(res.eigenvalues, torch.zeros(2, dtype=torch.float64))


def test_bad_arguments():
    A = _sym(torch.linspace(-1, 1, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="only n = 10"):
        lanczos(A, k=11)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        lanczos(A, k=0)
    with pytest.raises(ValueError, match="which"):
        lanczos(A, k=1, which="LM")
    with pytest.raises(ValueError, match=r"v0 must have shape \[n\]"):
        lanczos(A, k=1, v0=torch.ones(9))
    with pytest.raises(ValueError, match="pass n="):
        lanczos(lambda V: V, k=1)
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(3, 4), k=1)
    with pytest.raises(ValueError, match="matmat returned"):
        solve(lambda V: V[:, :1], 50, 1)


# --------------------------------------------------------------- on models


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigsh_on_mlp_matches_dense(dtype):
    model = mlp([6, 10, 4], seed=11, dtype=dtype)
    X, y = data(41, 6, 4, seed=12, dtype=dtype)
    H = dense_hessian(mlp([6, 10, 4], seed=11), mse_sum, X.double(), y.double())
    ev = torch.linalg.eigvalsh(H)
    for which, want in [("LA", ev.flip(0)[:3]), ("SA", ev[:3])]:
        res = curvx.eigsh(model, mse_sum, (X, y), k=3, which=which, chunk_size=9)
        assert res.all_converged
        scale = float(ev.abs().max())
        atol = 1e-9 * scale if dtype == torch.float64 else 1e-4 * scale
        assert torch.allclose(res.eigenvalues, want, atol=atol)
        assert res.eigenvectors.shape == (H.shape[0], 3)
        # certificates against the float64 dense Hessian
        R = H @ res.eigenvectors - res.eigenvectors * res.eigenvalues
        assert (R.norm(dim=0) <= res.residuals + 1e-5 * scale).all()


def test_eigsh_indefinite_hessian_largest_algebraic():
    A = torch.diag(torch.tensor([1.0, -7.0, 0.5, -3.0, 2.0] * 12, dtype=torch.float64))
    model = Quadratic(A, torch.zeros(60, dtype=torch.float64))
    X = torch.zeros(4, 1, dtype=torch.float64)
    res = curvx.eigsh(model, quadratic_loss(A), (X, X), k=2, which="LA")
    assert torch.allclose(
        res.eigenvalues, torch.tensor([2.0, 2.0], dtype=torch.float64)
    )
    res = curvx.eigsh(model, quadratic_loss(A), (X, X), k=1, which="SA")
    assert math.isclose(float(res.eigenvalues[0]), -7.0, abs_tol=1e-10)


def test_eigsh_repeated_eigenvalues_multi_output_linear():
    # MSE summed over K outputs of a linear map: every eigenvalue repeats K times
    K = 3
    model = mlp([5, K], seed=0, bias=False)
    X, y = data(50, 5, K, seed=3)
    H = dense_hessian(model, mse_sum, X, y)
    ev = torch.linalg.eigvalsh(H).flip(0)
    assert torch.allclose(ev[:K], ev[0].expand(K), atol=1e-12)
    res = curvx.eigsh(model, mse_sum, (X, y), k=K + 1, block_size=K + 2)
    assert torch.allclose(res.eigenvalues, ev[: K + 1], atol=1e-9)


def test_eigsh_bad_input():
    model = mlp([3, 2])
    X, y = data(5, 3, 2)
    with pytest.raises(ValueError, match=r"k=9 is larger.*n = 8"):
        curvx.eigsh(model, mse_sum, (X, y), k=9)
    with pytest.raises(ValueError, match="which"):
        curvx.eigsh(model, mse_sum, (X, y), k=1, which="XX")


def test_bad_solver_settings():
    A = _sym(torch.linspace(-1, 1, 60, dtype=torch.float64))
    for kw, msg in [
        ({"max_hvps": 0}, "max_hvps"),
        ({"max_hvps": -5}, "max_hvps"),
        ({"block_size": 0}, "block_size"),
        ({"min_iterations": 0}, "min_iterations"),
        ({"max_hvps": 1, "block_size": 2}, "one block step costs block_size = 2"),
        ({"block_size": 2.0}, "block_size must be an int"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lanczos(A, k=1, **kw)


def test_budget_below_a_dense_solve_is_refused():
    A = _sym(torch.linspace(-1, 1, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="solved densely with n products"):
        lanczos(A, k=1, max_hvps=5)
    assert lanczos(A, k=1, max_hvps=12).hvps == 12


def test_eigsh_seed_draws_the_dropout_masks_in_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 2),
    ).double()
    X, y = data(30, 4, 2)

    def top(seed):
        res = curvx.eigsh(model, mse_sum, (X, y), k=1, mode="train", seed=seed)
        return float(res.eigenvalues[0])

    assert top(0) == top(0)
    assert top(0) != pytest.approx(top(5), rel=1e-6)


def test_v0_that_is_a_close_second_eigenvector_is_not_accepted():
    # top two 1.0 and 0.95: one-off solves fill their basis before stopping
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat(
        [torch.tensor([1.0, 0.95]), torch.rand(198, generator=g) * 0.9]
    ).double()
    A = _sym(eigs, seed=7)
    _, V = torch.linalg.eigh(A)
    for seed in range(5):
        res = lanczos(A, k=1, tol=1e-10, v0=V[:, -2], generator=_gen(seed))
        assert math.isclose(float(res.eigenvalues[0]), 1.0, abs_tol=1e-9)


def test_non_symmetric_operator_is_refused():
    A = _sym(torch.linspace(-1, 1, 120, dtype=torch.float64))
    S = torch.randn(120, 120, dtype=torch.float64, generator=_gen(3))
    A = A + 0.1 * (S - S.T)  # products with an antisymmetric part, as when a
    # double backward silently drops terms
    with pytest.raises(curvx.NotSymmetricError, match="not symmetric"):
        lanczos(A, k=1)
    with pytest.raises(curvx.NotSymmetricError):
        lanczos(A[:10, :10].clone(), k=1)  # the dense path too


def test_symmetry_check_can_be_skipped_by_a_caller_that_made_it():
    A = _sym(torch.linspace(-1, 1, 120, dtype=torch.float64))
    S = torch.randn(120, 120, dtype=torch.float64, generator=_gen(3))
    A = A + 0.1 * (S - S.T)
    res = lanczos(A, k=1, symmetry_tol=None, max_hvps=60, generator=_gen())
    assert res.hvps <= 60  # no NotSymmetricError: the caller owns the check


@pytest.mark.parametrize("orthonormal", [True, False])
def test_start_block_uses_an_orthonormal_v0_as_is(orthonormal):
    from curvx.lanczos import _start_block

    n = 500
    X = torch.randn(n, 3, dtype=torch.float64, generator=_gen(4))
    if orthonormal:
        X, _ = torch.linalg.qr(X)
    Q = _start_block(X, n, 3, _gen(), torch.device("cpu"))
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-13)
    # the same span either way; an orthonormal start comes back unchanged
    assert torch.allclose(Q @ (Q.T @ X), X, atol=1e-12)
    assert (Q.data_ptr() == X.data_ptr()) == orthonormal


def test_both_ends_results_are_columns_of_one_formed_block():
    # top and bottom vectors come out as slices (no gathers) and still match
    # their values and residuals
    eigs = torch.linspace(-3, 2, 400, dtype=torch.float64)
    A = _sym(eigs, seed=7)
    top, bottom = solve(lambda V: A @ V, 400, 2, 2, tol=1e-10, generator=_gen())
    for r in (top, bottom):
        U = r.eigenvectors
        R = A @ U - U * r.eigenvalues
        assert torch.allclose(R.norm(dim=0), r.residuals, atol=1e-12)
        assert torch.allclose(r.ritz_vectors[:, : U.shape[1]], U)
    assert torch.allclose(top.eigenvalues, eigs.flip(0)[:2], atol=1e-9)
    assert torch.allclose(bottom.eigenvalues, eigs[:2], atol=1e-9)


_DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.mark.parametrize("device", _DEVICES)
def test_convergence_checked_every_few_blocks(device, monkeypatch):
    # check_every > 1 skips Rayleigh-Ritz and the test (the host syncs) between
    # checks; the answer is as certified as with a test after every block
    import sys

    lz = sys.modules["curvx.lanczos"]  # (curvx.lanczos is also the function)

    eigs = torch.cat(
        [torch.linspace(-4, 1, 597, dtype=torch.float64), torch.tensor([2.0, 2.5, 3])]
    )
    A = _sym(eigs, seed=8).to(device)
    calls = []
    certify = lz._certify
    monkeypatch.setattr(
        lz, "_certify", lambda *a, **kw: calls.append(1) or certify(*a, **kw)
    )
    got = {}
    for every in (1, 4):
        calls.clear()
        top, bottom = solve(
            lambda V: A @ V,
            600,
            2,
            1,
            tol=1e-9,
            min_iterations=2,
            max_basis=60,
            check_every=every,
            generator=_gen(),
            device=device,
        )
        assert top.all_converged and bottom.all_converged
        assert torch.allclose(top.eigenvalues.cpu(), eigs.flip(0)[:2], atol=1e-8)
        assert math.isclose(float(bottom.eigenvalues[0]), -4.0, abs_tol=1e-8)
        got[every] = (len(calls), top.iterations)
    assert got[4][0] < got[1][0]


def test_check_every_must_be_positive():
    A = _sym(torch.linspace(-1, 1, 200, dtype=torch.float64))
    with pytest.raises(ValueError, match="check_every"):
        lanczos(A, k=1, check_every=0)


@pytest.mark.parametrize("device", _DEVICES)
def test_lazy_blocks_recover_from_a_breakdown(device):
    # three distinct eigenvalues: the Krylov space is exhausted after a few
    # blocks, so a lazily factored block is rank deficient; the solve must go
    # back and replace the lost directions, as the synced path does
    eigs = torch.tensor([1.0] * 300 + [2.0] * 299 + [5.0], dtype=torch.float64)
    A = _sym(eigs, seed=9).to(device)
    for every in (1, 3):
        top, bottom = solve(
            lambda V: A @ V,
            600,
            2,
            1,
            tol=1e-10,
            min_iterations=1,
            check_every=every,
            generator=_gen(),
            device=device,
        )
        assert top.all_converged and bottom.all_converged
        assert torch.allclose(
            top.eigenvalues.cpu(), torch.tensor([5.0, 2.0], dtype=torch.float64)
        )
        assert math.isclose(float(bottom.eigenvalues[0]), 1.0, abs_tol=1e-9)


@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_low_rank_hessian_exhausts_the_krylov_space_cleanly(every):
    # a linear model on 3 examples: H has rank 3 in n = 201 dimensions, so the
    # Krylov space runs out within the first blocks, before any convergence test
    # (min_iterations fills the basis first): the blocks after it must be new
    # random directions, not rounding noise blown up to unit length
    torch.manual_seed(0)
    X = torch.randn(3, 200, dtype=torch.float64)
    y = torch.randn(3, 1, dtype=torch.float64)
    model = torch.nn.Linear(200, 1).double()

    def loss(out, target):
        return 0.5 * ((out - target) ** 2).sum(1).mean()

    H = dense_hessian(model, loss, X, y)
    want = torch.linalg.eigvalsh(H).flip(0)[:2]
    res = curvx.eigsh(model, loss, (X, y), k=2, check_every=every)
    assert res.all_converged
    assert torch.allclose(res.eigenvalues, want, rtol=1e-8)
    U = res.eigenvectors
    assert torch.allclose(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_symmetry_tol_is_checked():
    A = _sym(torch.linspace(-1, 1, 100, dtype=torch.float64))
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(ValueError, match="symmetry_tol"):
            lanczos(A, k=1, symmetry_tol=bad)
