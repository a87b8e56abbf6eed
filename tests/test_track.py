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
    with pytest.raises(ValueError, match=r"k=8 \+ 1 \(lambda_min\).*n = 8"):
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
