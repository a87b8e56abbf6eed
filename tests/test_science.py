"""The exact checks of science.md: quadratic, least squares, uv, scalar chain."""

import pytest
import torch
from _reference import UV, Quadratic, data, mlp, mse_sum, quadratic_loss, uv_loss

import curvx


def _run(model, loss_fn, X, y, lr, steps, k=1, **kw):
    tracker = curvx.track(model, loss_fn, (X, y), k=k, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    recs, losses = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        if not torch.isfinite(loss):
            break
        loss.backward()
        losses.append(float(loss.detach()))
        recs.append(tracker.step(step=t, lr=lr))
        opt.step()
    return recs, losses


@pytest.mark.parametrize("eta_times_lmax", [1.9, 2.1])
def test_quadratic(eta_times_lmax):
    eigs = torch.tensor([4.0, 2.5, 1.0, -0.5, 0.2] * 8, dtype=torch.float64)
    eigs[0] = 5.0
    A = torch.diag(eigs)
    w0 = torch.ones(40, dtype=torch.float64)
    model = Quadratic(A, w0)
    X = torch.zeros(3, 1, dtype=torch.float64)
    A_pos = torch.diag(eigs.clamp(min=0))  # GD on the PSD part only, to test eta
    model_pos = Quadratic(A_pos, w0)
    lr = eta_times_lmax / 5.0
    recs, _ = _run(model, quadratic_loss(A), X, X, lr, steps=6, k=2)
    for r in recs:
        assert r.sharpness == pytest.approx(5.0, abs=1e-9)
        assert r.status == "ok"
    for r in recs[1:]:
        assert r.rotation_top1 == pytest.approx(1.0, abs=1e-10)
    _, losses = _run(model_pos, quadratic_loss(A_pos), X, X, lr, steps=60)
    diverged = losses[-1] > losses[0]
    assert diverged == (lr > 2 / 5.0)


@pytest.mark.parametrize("K", [3, 10])
@pytest.mark.parametrize("lr_factor", [0.5, 1.8, 2.2])
def test_depth1_least_squares_never_rotates(K, lr_factor):
    X, y = data(60, 6, K, seed=K)
    model = mlp([6, K], seed=0)
    Xb = torch.cat([X, torch.ones(60, 1, dtype=torch.float64)], 1)
    lmax = float(torch.linalg.eigvalsh(Xb.T @ Xb / 60)[-1])
    lr = lr_factor * 2 / lmax
    # Rotation is measured between eigenvectors, so its precision is theirs:
    # residual certificates (kato_temple=False) make the vectors accurate to tol
    recs, losses = _run(model, mse_sum, X, y, lr, steps=12, k=2, kato_temple=False)
    assert len(recs) >= 8
    for r in recs:
        assert r.sharpness == pytest.approx(lmax, rel=1e-8)
    for r in recs[1:]:
        # exactly no rotation, to solver precision, even while GD diverges
        assert r.rotation_top1 == pytest.approx(1.0, abs=1e-9)
        assert r.subspace_similarity == pytest.approx(1.0, abs=1e-9)
    if lr_factor > 1:
        assert losses[-1] > losses[0]
    # With the default Kato-Temple certificates the values are as exact and the
    # vectors accurate to about residual / gap: still no rotation at that level
    model = mlp([6, K], seed=0)
    recs, _ = _run(model, mse_sum, X, y, lr, steps=12, k=2)
    for r in recs[1:]:
        assert r.sharpness == pytest.approx(lmax, rel=1e-8)
        assert r.subspace_similarity == pytest.approx(1.0, abs=1e-6)


def test_uv_catapult():
    model = UV(3.0, 0.4)
    X = torch.zeros(1, 1, dtype=torch.float64)
    y = torch.ones(1, dtype=torch.float64)
    eta = 0.3
    tracker = curvx.track(model, uv_loss, (X, y), k=1)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    cosines, sharp, losses = [], [], []
    for t in range(300):
        a, b = model.a.item(), model.b.item()
        opt.zero_grad()
        loss = uv_loss(model(X), y)
        loss.backward()
        losses.append(float(loss.detach()))
        rec = tracker.step(step=t, lr=eta)
        sharp.append(rec.sharpness)
        if rec.rotation_top1 is not None:
            cosines.append(rec.rotation_top1)
        opt.step()
        # the imbalance identity, exactly: a'^2 - b'^2 = (a^2 - b^2)(1 - eta^2 z'^2)
        z1 = a * b - 1.0
        lhs = model.a.item() ** 2 - model.b.item() ** 2
        assert lhs == pytest.approx((a * a - b * b) * (1 - eta**2 * z1**2), rel=1e-12)
    assert sharp[0] == pytest.approx(9.216, abs=1e-3)  # 9.2164, rounded in science.md
    assert sharp[0] > 2 / eta
    assert max(losses[1:8]) > losses[0]  # the catapult
    assert min(cosines) == pytest.approx(0.54, abs=0.02)
    assert sharp[-1] == pytest.approx(3.273, abs=2e-3)
    assert sharp[-1] < 2 / eta
    assert cosines[-1] == pytest.approx(1.0, abs=1e-9)


def _chain(us):
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in us]
            )

        def forward(self, X):
            p = self.u[0]
            for i in range(1, len(self.u)):  # indexing, not slicing: functional_call
                p = p * self.u[i]
            return p.expand(X.shape[0])

    return Chain()


def test_deep_scalar_chain_top_eigenvector():
    X = torch.zeros(1, 1, dtype=torch.float64)
    y = torch.full((1,), 2.0, dtype=torch.float64)
    vecs = []
    for us in ([1.0, 1.0, 2.0], [2.0, 0.5, 2.0]):  # two minima, p = 2
        model = _chain(us)
        res = curvx.eigsh(model, uv_loss, (X, y), k=1)
        g = torch.tensor([2.0 / u for u in us], dtype=torch.float64)
        g = g / g.norm()
        v = res.eigenvectors[:, 0]
        assert abs(float(v @ g)) == pytest.approx(1.0, abs=1e-12)
        vecs.append(v)
    # the direction moves when the layers' relative sizes change
    assert abs(float(vecs[0] @ vecs[1])) < 0.99
