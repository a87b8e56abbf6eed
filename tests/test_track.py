"""The tracker: warm-started solves that match cold dense ones, and leave no trace."""

import json
import math

import pytest
import torch
from _reference import data, dense_hessian, mlp, mse_sum
from torch import nn

import curvx

FIELDS = {
    "step",
    "lr",
    "loss",
    "sharpness",
    "eigenvalues",
    "residuals",
    "converged",
    "lambda_min",
    "rotation_top1",
    "subspace_similarity",
    "max_principal_angle",
    "hvps",
    "track_seconds",
    "status",
    "method",
    "warm_start",
    "iterations",
}


def _gd(model, X, y, lr, steps, tracker, check):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    records = []
    for t in range(steps):
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        rec = tracker.step(step=t, lr=lr)
        check(t, rec)
        records.append(rec)
        opt.step()
    return records


def test_every_tracked_step_matches_a_cold_dense_solve():
    model = mlp([5, 12, 3], seed=21)
    X, y = data(40, 5, 3, seed=22)
    tracker = curvx.track(model, mse_sum, (X, y), k=3, lambda_min=True, chunk_size=15)

    def check(t, rec):
        ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))
        scale = float(ev.abs().max())
        assert rec.status == "ok" and all(rec.converged)
        assert rec.warm_start == (t > 0)
        assert torch.allclose(
            torch.tensor(rec.eigenvalues, dtype=torch.float64),
            ev.flip(0)[:3],
            atol=1e-7 * scale,
        )
        assert math.isclose(rec.lambda_min, float(ev[0]), abs_tol=1e-7 * scale)
        assert rec.sharpness == rec.eigenvalues[0]
        assert rec.hvps > 0 and rec.track_seconds > 0

    recs = _gd(model, X, y, lr=0.4, steps=8, tracker=tracker, check=check)
    assert recs[0].rotation_top1 is None and recs[1].rotation_top1 is not None
    for r in recs[1:]:
        assert 0.0 <= r.rotation_top1 <= 1.0 + 1e-12
        assert 0.0 <= r.subspace_similarity <= 1.0 + 1e-12
    d = recs[-1].as_dict()
    assert FIELDS <= set(d)
    json.dumps(d, allow_nan=False)


def test_warm_start_spends_fewer_products_than_cold():
    model = mlp([5, 12, 3], seed=21)
    X, y = data(40, 5, 3, seed=22)
    tracker = curvx.track(model, mse_sum, (X, y), k=2)
    first = tracker.step().hvps
    later = [tracker.step().hvps for _ in range(3)]  # same parameters
    assert max(later) < first


def _bn_dropout_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, 16),
        nn.BatchNorm1d(16),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(16, 2),
    ).double()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tracking_does_not_disturb_training(mode):
    model = _bn_dropout_model()
    X, y = data(30, 4, 2)
    model.train()
    model(X)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, mode=mode, chunk_size=10)
    for _ in range(3):
        torch.manual_seed(0)
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        before = (
            [m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [p.grad.clone() for p in model.parameters()],
            torch.get_rng_state(),
        )
        rec = tracker.step()
        assert rec.status == "ok"
        assert before[0] == [m.training for m in model.modules()]
        for k, v in model.state_dict().items():
            assert torch.equal(before[1][k], v), k
        for g, p in zip(before[2], model.parameters()):
            assert torch.equal(g, p.grad)
        assert torch.equal(before[3], torch.get_rng_state())
        opt.step()
    assert tracker.policy["mode"] == mode


def test_tracking_is_reproducible_with_its_private_seed():
    model = mlp([5, 8, 3], seed=1)
    X, y = data(20, 5, 3)
    a = curvx.track(model, mse_sum, (X, y), k=2, seed=7)
    b = curvx.track(model, mse_sum, (X, y), k=2, seed=7)
    torch.manual_seed(123)
    ra = a.step()
    torch.manual_seed(456)  # the global RNG plays no part
    rb = b.step()
    assert ra.eigenvalues == rb.eigenvalues and ra.hvps == rb.hvps


def test_nan_loss_is_reported_not_raised():
    model = mlp([3, 6, 2], seed=0)
    X, y = data(12, 3, 2)
    tracker = curvx.track(model, mse_sum, (X, y), k=1)
    assert tracker.step(step=0).status == "ok"
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    rec = tracker.step(step=1, lr=0.1)
    assert rec.status == "nonfinite" and rec.sharpness is None
    d = rec.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["loss"] is None and "loss" in d["message"]
    with torch.no_grad():
        model[0].weight[0, 0] = 0.1
    assert tracker.step(step=2).status == "ok"


def test_lambda_min_on_indefinite_hessian():
    model = mlp([4, 10, 1], seed=5)
    X, y = data(25, 4, 1, seed=6)
    ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))
    assert ev[0] < 0 < ev[-1]
    rec = curvx.track(model, mse_sum, (X, y), k=1, lambda_min=True).step()
    assert math.isclose(rec.lambda_min, float(ev[0]), rel_tol=1e-7)
    assert math.isclose(rec.sharpness, float(ev[-1]), rel_tol=1e-7)
    assert rec.lambda_min_converged


def test_bad_tracker_arguments():
    model = mlp([3, 2])  # n = 8
    X, y = data(5, 3, 2)
    with pytest.raises(ValueError, match=r"k=8 \+ 1 \(bottom\).*n = 8"):
        curvx.track(model, mse_sum, (X, y), k=8, lambda_min=True)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        curvx.track(model, mse_sum, (X, y), k=0)


def test_no_rotation_fields_inside_a_large_cluster():
    """Depth-1 least squares with 10 outputs: every eigenvalue repeats 10 times."""
    X, y = data(60, 6, 10, seed=10)
    model = mlp([6, 10], seed=0)
    tracker = curvx.track(model, mse_sum, (X, y), k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for t in range(6):
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        rec = tracker.step(step=t)
        opt.step()
        assert rec.reference_similarity == pytest.approx(1.0, abs=1e-9)
        if t:
            assert rec.rotation_top1 == pytest.approx(1.0, abs=1e-9)
            assert rec.subspace_similarity == pytest.approx(1.0, abs=1e-9)
            assert all(c == pytest.approx(1.0, abs=1e-9) for _, _, c in rec.matching)


def test_lr_must_be_positive():
    model = mlp([3, 2])
    tracker = curvx.track(model, mse_sum, data(5, 3, 2), k=1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        tracker.step(lr=-1.0)


class _Diag(nn.Module):
    """``L = 1/2 sum_i a_i w_i^2`` with the curvatures ``a`` passed as the target."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def _diag_loss(out, a):
    return 0.5 * (a * out * out).sum(1).mean()


@pytest.mark.parametrize("seed", range(5))
def test_warm_start_catches_a_crossing_with_the_next_eigenvalue(seed):
    n = 200
    g = torch.Generator().manual_seed(seed)
    rest = torch.rand(n - 2, generator=g, dtype=torch.float64) * 0.9
    X = torch.zeros(1, 1, dtype=torch.float64)
    a = torch.cat([torch.tensor([1.0, 0.95], dtype=torch.float64), rest])[None]
    tracker = curvx.track(_Diag(n), _diag_loss, (X, a), k=1, seed=seed)
    assert tracker.step(0).sharpness == pytest.approx(1.0, abs=1e-9)
    a[0, :2] = torch.tensor([0.95, 1.0], dtype=torch.float64)  # the top two swap
    rec = tracker.step(1)
    assert rec.warm_start and rec.converged == [True]
    assert rec.sharpness == pytest.approx(1.0, abs=1e-9)


def test_buffers_updated_in_forward_are_left_alone_in_eval_mode():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.calls.add_(1.0)  # whatever the mode, like an EMA or a counter
            return self.lin(x)

    model = Counting()
    X, y = data(8, 3, 2)
    for method in ("kept-graph", "rev-rev", "fwd-rev"):
        rec = curvx.track(model, mse_sum, (X, y), k=1, method=method).step()
        assert rec.status == "ok"
        assert float(model.calls) == 0.0


def test_zero_hessian_reports_no_rotation():
    model = nn.Linear(4, 1, bias=False).double()
    X, _ = data(6, 4, 1)

    def linear_loss(out, target):  # linear in the weights: H = 0
        return out.mean()

    tracker = curvx.track(model, linear_loss, (X, X[:, :1]), k=2)
    tracker.step()
    rec = tracker.step()
    assert rec.eigenvalues == [0.0, 0.0] and all(rec.converged)
    assert rec.rotation_top1 == 1.0 and rec.subspace_similarity == 1.0


def test_cold_every_restarts_the_warm_state_periodically():
    model = mlp([3, 6, 2], seed=0)
    X, y = data(12, 3, 2)
    tracker = curvx.track(model, mse_sum, (X, y), k=1, cold_every=2)
    warm = [tracker.step().warm_start for _ in range(5)]
    assert warm == [False, True, False, True, False]
    never = curvx.track(model, mse_sum, (X, y), k=1, cold_every=0)
    assert [never.step().warm_start for _ in range(3)] == [False, True, True]
    with pytest.raises(ValueError, match="cold_every"):
        curvx.track(model, mse_sum, (X, y), k=1, cold_every=-1)


def test_buffer_changes_between_steps_are_seen():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)
    ).double()
    X, y = data(32, 4, 2)
    tracker = curvx.track(model, mse_sum, (X, y), k=1)
    tracker.step()
    model.train()
    for _ in range(5):
        model(X)  # only the running statistics move
    model.eval()
    rec = tracker.step()
    top = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))[-1]
    assert rec.sharpness == pytest.approx(float(top), rel=1e-7)


def test_loss_changes_between_steps_are_seen():
    model = mlp([3, 6, 2], seed=4)
    X, y = data(16, 3, 2)
    scale = {"s": 1.0}

    def loss_fn(out, target):
        return scale["s"] * mse_sum(out, target)

    tracker = curvx.track(model, loss_fn, (X, y), k=1)
    first = tracker.step().sharpness
    scale["s"] = 10.0
    assert tracker.step().sharpness == pytest.approx(10.0 * first, rel=1e-7)


def test_replaced_parameter_gives_a_cold_start_on_the_new_model():
    model = mlp([3, 6, 2], seed=5)
    X, y = data(16, 3, 2)
    tracker = curvx.track(model, mse_sum, (X, y), k=2)
    tracker.step()
    model[0].weight = nn.Parameter(model[0].weight.detach() * 1.5)
    rec = tracker.step()
    assert not rec.warm_start and "changed" in rec.message
    assert rec.rotation_top1 is None  # no rotation across different variables
    ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y)).flip(0)[:2]
    assert torch.allclose(torch.tensor(rec.eigenvalues, dtype=ev.dtype), ev, rtol=1e-7)
    assert tracker.step().warm_start

    # A dtype conversion that no longer matches the data is named, not a crash
    # deep in the model
    model.float()
    with pytest.raises(TypeError, match="float64.*float32"):
        tracker.step()


def test_numpy_integers_are_accepted_for_k():
    np = pytest.importorskip("numpy")
    model = mlp([3, 6, 2], seed=5)
    X, y = data(16, 3, 2)
    assert len(curvx.track(model, mse_sum, (X, y), k=np.int64(2)).step().eigenvalues)
    assert len(curvx.eigsh(model, mse_sum, (X, y), k=np.int32(2)).eigenvalues) == 2


# ------------------------------------------------- issue 3: cheap warm tracking


def _sym_family(n, seed=0):
    """A fixed orthonormal basis: Hessians ``Q diag(lam) Q^T`` share it."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q


class _Quad(nn.Module):
    """``L = 1/2 w^T A w`` with ``A`` passed as the target (mutable between steps)."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def _quad_loss(out, A):
    return 0.5 * (out[0] @ A[0] @ out[0])


def _bounds_hold(rec, ev, bottom=False):
    """Each reported value is within its certified bound of the matching dense
    eigenvalue (descending top, ascending bottom)."""
    vals = rec.bottom_eigenvalues if bottom else rec.eigenvalues
    bnds = rec.bottom_bounds if bottom else rec.bounds
    want = ev[: len(vals)] if bottom else ev.flip(0)[: len(vals)]
    scale = float(ev.abs().max())
    for v, b, w in zip(vals, bnds, want.tolist()):
        assert abs(v - w) <= b + 1e-12 * scale, (v, w, b)


def test_warm_steps_match_dense_and_their_bounds_hold_over_a_run():
    model = mlp([6, 16, 3], seed=31)  # n = 163: the Krylov path
    X, y = data(50, 6, 3, seed=32)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, k_bottom=1, tol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kinds = set()
    for t in range(15):
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        rec = tracker.step(step=t, lr=0.3)
        ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))
        assert rec.status == "ok" and all(rec.converged), rec
        _bounds_hold(rec, ev)
        _bounds_hold(rec, ev, bottom=True)
        assert all(b <= r + 1e-15 for b, r in zip(rec.bounds, rec.residuals))
        kinds.update(rec.certificates)
        opt.step()
    assert kinds <= {"residual", "kato-temple"} and "kato-temple" in kinds


def test_fused_step_gives_the_gradient_of_loss_backward():
    model = mlp([5, 12, 3], seed=3, dtype=torch.float32)
    X, y = data(40, 5, 3, seed=4, dtype=torch.float32)
    model.zero_grad()
    mse_sum(model(X), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    tracker = curvx.track(model, mse_sum, (X, y), k=2, chunk_size=15)
    model.zero_grad(set_to_none=True)
    rec = tracker.step(backward=True)
    assert rec.status == "ok"
    for g, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    # like backward, it accumulates
    rec = tracker.step(backward=True)
    for g, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-5, atol=1e-6)


def test_crossing_is_matched_not_counted_as_rotation():
    """Two eigenvalues swap while the eigenvectors stay: no rotation."""
    n = 120
    Q = _sym_family(n, seed=2)
    lam = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    X = torch.zeros(1, 1, dtype=torch.float64)
    A = (Q @ torch.diag(lam) @ Q.T)[None]
    tracker = curvx.track(_Quad(n), _quad_loss, (X, A), k=3, tol=1e-8)
    top = [3.0, 2.0, 1.5]
    recs = []
    for t in range(8):
        a, b = 3.0 - 0.2 * t, 2.0 + 0.2 * t  # cross between t = 2 and t = 3
        lam[-3:] = torch.tensor([1.5, b, a], dtype=torch.float64)
        A[0] = Q @ torch.diag(lam) @ Q.T
        recs.append(tracker.step(step=t))
        top = sorted([a, b, 1.5], reverse=True)
        assert recs[-1].eigenvalues == pytest.approx(top, abs=1e-7)
    swapped = [r for r in recs[1:] if r.crossings]
    assert swapped and all([0, 1] in r.crossings for r in swapped)
    for r in recs[1:]:
        assert r.rotation_top1 == pytest.approx(1.0, abs=1e-6)
        assert r.subspace_similarity == pytest.approx(1.0, abs=1e-6)
    assert min(r.top1_cosine for r in recs[1:]) < 1e-6  # the raw cosine sees it


def test_cluster_at_the_top_shows_no_false_rotation():
    n = 100
    Q = _sym_family(n, seed=5)
    lam = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lam[-3:] = 2.0  # a three-fold top eigenvalue, k = 2 cuts it
    X = torch.zeros(1, 1, dtype=torch.float64)
    A = (Q @ torch.diag(lam) @ Q.T)[None]
    tracker = curvx.track(_Quad(n), _quad_loss, (X, A), k=2, tol=1e-8)
    for t in range(5):
        lam[:-3] *= 1.01  # the rest moves, the cluster stays
        A[0] = Q @ torch.diag(lam) @ Q.T
        rec = tracker.step(step=t)
        assert rec.eigenvalues == pytest.approx([2.0, 2.0], abs=1e-7)
        if t:
            assert rec.rotation_top1 == pytest.approx(1.0, abs=1e-6)
            assert rec.subspace_similarity == pytest.approx(1.0, abs=1e-6)


def test_bottom_k_on_an_indefinite_hessian_in_the_same_solve():
    model = mlp([4, 12, 2], seed=8)  # n = 86
    X, y = data(30, 4, 2, seed=9)
    ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))
    assert ev[0] < ev[1] < 0 < ev[-1]
    tracker = curvx.track(model, mse_sum, (X, y), k=2, k_bottom=2, tol=1e-8)
    for _ in range(3):
        rec = tracker.step()
        assert rec.bottom_eigenvalues == pytest.approx(ev[:2].tolist(), abs=1e-6)
        assert rec.eigenvalues == pytest.approx(ev.flip(0)[:2].tolist(), abs=1e-6)
        assert rec.lambda_min == rec.bottom_eigenvalues[0]
        assert all(rec.bottom_converged) and all(rec.converged)


def test_budget_fallback_is_a_cold_solve_and_says_so():
    model = mlp([6, 16, 3], seed=11)
    X, y = data(50, 6, 3, seed=12)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, max_hvps=2, tol=1e-9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker.step(step=0)
    opt.zero_grad()
    mse_sum(model(X), y).backward()
    opt.step()
    rec = tracker.step(step=1)
    assert rec.fallback == "budget" and "cold solve" in rec.message
    assert rec.status == "ok" and all(rec.converged)
    ev = torch.linalg.eigvalsh(dense_hessian(model, mse_sum, X, y))
    _bounds_hold(rec, ev)


def test_warm_start_drops_to_one_block_and_kato_temple_certifies():
    """A slowly moving quadratic: after the first steps one block of k products
    certifies each step, by the gap bound rather than the residual."""
    n = 300
    Q = _sym_family(n, seed=13)
    lam = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lam[-2:] = torch.tensor([1.6, 2.0], dtype=torch.float64)
    X = torch.zeros(1, 1, dtype=torch.float64)
    A = (Q @ torch.diag(lam) @ Q.T)[None]
    tracker = curvx.track(_Quad(n), _quad_loss, (X, A), k=2, tol=1e-6)
    hvps = []
    for t in range(30):
        c, s = math.cos(1e-4 * t), math.sin(1e-4 * t)
        R = torch.eye(n, dtype=torch.float64)
        R[-1, -1], R[-1, -2], R[-2, -1], R[-2, -3] = c, -s, s, 0.0
        A[0] = (Q @ R) @ torch.diag(lam) @ (Q @ R).T
        rec = tracker.step(step=t)
        assert all(rec.converged)
        hvps.append(rec.hvps)
    assert sorted(hvps)[len(hvps) // 2] == 2  # median: one block of k = 2


def test_secant_estimate_between_certified_steps():
    n = 80
    Q = _sym_family(n, seed=14)
    lam = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
    lam[-1] = 3.0
    A = (Q @ torch.diag(lam) @ Q.T)[None]
    X = torch.zeros(1, 1, dtype=torch.float64)
    model = _Quad(n)
    with torch.no_grad():
        model.w.copy_(Q[:, -1] + 0.1 * Q[:, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = curvx.track(model, _quad_loss, (X, A), k=1, certify_every=3)
    recs = []
    for t in range(6):
        opt.zero_grad()
        recs.append(tracker.step(step=t, backward=True))
        opt.step()
    assert [r.certified for r in recs] == [True, False, False, True, False, False]
    for r in recs[1:]:
        # exact for a quadratic: y = H s along the top eigenvector
        assert r.estimate_method == "secant-eigvec"
        assert r.sharpness_estimate == pytest.approx(3.0, rel=1e-9)
    for r in recs:
        if not r.certified:
            assert r.status == "estimate" and r.sharpness is None and r.hvps == 0


def test_thresholds_events_and_projections():
    model = mlp([5, 12, 3], seed=15)
    X, y = data(40, 5, 3, seed=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, optimizer=opt)
    rec = tracker.step()
    assert rec.threshold == pytest.approx(2 * 1.9 / 0.2) and rec.lr == 0.2
    assert rec.lr_lambda_over_2 == pytest.approx([0.1 * v for v in rec.eigenvalues])
    g = torch.autograd.grad(mse_sum(model(X), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    U = tracker._prev.eigenvectors
    assert rec.grad_projection == pytest.approx((U.T @ g / g.norm()).tolist())
    nest = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5, nesterov=True)
    assert curvx.track(model, mse_sum, (X, y), optimizer=nest).step().threshold == (
        pytest.approx(3.0 / (2.0 * 0.2))
    )
    # the event flag: sharpness crossing 2/lr between certified evaluations
    gd = curvx.track(model, mse_sum, (X, y), k=1)
    s = gd.step(lr=1.0).sharpness
    below = gd.step(lr=1.9 / s)  # threshold 2/lr above the sharpness
    above = gd.step(lr=2.1 / s)
    assert below.crossed is None and above.crossed == "up"
    assert gd.step(lr=1.9 / s).crossed == "down"


def test_adam_preconditioned_sharpness_against_dense():
    model = mlp([4, 10, 2], seed=17)
    X, y = data(30, 4, 2, seed=18)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, optimizer=opt, tol=1e-9)
    assert not tracker.step().preconditioned  # no Adam state yet: plain H
    for _ in range(3):
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        opt.step()
    rec = tracker.step()
    assert rec.preconditioned and rec.threshold == pytest.approx(38 / 0.01)
    H = dense_hessian(model, mse_sum, X, y)
    b1, b2 = 0.9, 0.999
    P = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        v = st["exp_avg_sq"] / (1 - b2**t)
        P.append(((1 - b1**t) * (v.sqrt() + 1e-8)).reshape(-1))
    d = torch.cat(P).rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * H * d[None, :])
    assert rec.eigenvalues == pytest.approx(ev.flip(0)[:2].tolist(), rel=1e-7)


def test_pinned_reference_is_used_and_reported():
    model = mlp([5, 12, 3], seed=19)
    X, y = data(40, 5, 3, seed=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = curvx.track(model, mse_sum, (X, y), k=2)
    for t in range(4):
        opt.zero_grad()
        mse_sum(model(X), y).backward()
        rec = tracker.step(step=t)
        if t == 1:
            tracker.pin_reference()
        opt.step()
        assert rec.reference_step == (0 if t <= 1 else 1)
    assert 0.0 <= rec.reference_similarity <= 1.0 + 1e-12


def test_bf16_autocast_products_with_a_float64_solver():
    model = mlp([8, 32, 4], seed=1, dtype=torch.float32)
    X, y = data(200, 8, 4, seed=2, dtype=torch.float32)
    H = dense_hessian(mlp([8, 32, 4], seed=1), mse_sum, X.double(), y.double())
    ev = torch.linalg.eigvalsh(H).flip(0)
    tracker = curvx.track(model, mse_sum, (X, y), k=2, autocast=torch.bfloat16)
    assert tracker.tol == 1e-2  # the products' precision sets the default
    assert tracker.policy["precision"]["hvp"].startswith("autocast bfloat16")
    assert tracker.policy["precision"]["basis"] == "float64"
    for _ in range(3):
        rec = tracker.step()
        assert all(rec.converged)
        # certified for the products as computed; bf16 rounding adds ~1e-2 |H|
        for v, b, w in zip(rec.eigenvalues, rec.bounds, ev.tolist()):
            assert abs(v - w) <= b + 1e-2 * float(ev[0])
    with pytest.raises(ValueError, match="autocast must be None"):
        curvx.track(model, mse_sum, (X, y), autocast=torch.float64)


def test_tracker_exposes_the_certified_eigenvectors():
    X, y = data(50, 5, 2, seed=3)
    model = mlp([5, 8, 2], seed=1)
    tracker = curvx.track(model, mse_sum, (X, y), k=2)
    assert tracker.eigenvectors is None
    H = dense_hessian(model, mse_sum, X, y)
    rec = tracker.step(step=0)
    U = tracker.eigenvectors
    assert U.shape == (H.shape[0], 2) and U.dtype == torch.float64
    theta = torch.tensor(rec.eigenvalues, dtype=torch.float64)
    # the vectors of the record's values, to the record's residuals
    R = H @ U - U * theta
    res = torch.tensor(rec.residuals, dtype=torch.float64)
    assert torch.allclose(R.norm(dim=0), res, atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert float(R.norm(dim=0).max()) < 1e-6 * float(theta.abs().max())
