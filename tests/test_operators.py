"""HessianOperator and hvp() against dense float64 Hessians (torch.func.hessian)."""

import warnings

import pytest
import torch
from _reference import data, dense_hessian, flat_params, mlp, mse_sum, tol
from torch import nn

import curvx
from curvx.operators import HessianOperator, NonFiniteError

EXACT = ["kept-graph", "rev-rev", "fwd-rev"]


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("chunk_size", [None, 7, 40])
def test_hvp_matches_dense_float64(method, chunk_size):
    model = mlp([4, 6, 3], seed=3)
    X, y = data(23, 4, 3, seed=4)  # 23 = 7 + 7 + 7 + 2: an uneven last chunk
    H = dense_hessian(model, mse_sum, X, y)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(H.shape[0], 5, generator=g, dtype=torch.float64)
    HV = curvx.hvp(model, mse_sum, (X, y), V, chunk_size=chunk_size, method=method)
    assert HV.shape == V.shape and HV.dtype == V.dtype
    assert torch.allclose(HV, H @ V, atol=tol(torch.float64, 1e3), rtol=0)


def test_hvp_single_vector_and_iterable_batches():
    model = mlp([3, 5, 2], seed=1)
    X, y = data(19, 3, 2, seed=2)
    H = dense_hessian(model, mse_sum, X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator())
    batches = [(X[:10], y[:10]), (X[10:17], y[10:17]), (X[17:], y[17:])]
    hv = curvx.hvp(model, mse_sum, batches, v)
    assert hv.shape == v.shape
    assert torch.allclose(hv, H @ v, atol=1e-12)
    # a one-shot generator is read once and kept
    gen = ((X[i : i + 4], y[i : i + 4]) for i in range(0, 19, 4))
    op = HessianOperator(model, mse_sum, gen)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)


def test_dropping_the_last_chunk_would_be_wrong():
    """Guards the weighting: a Hessian over 20 of 23 examples differs."""
    model = mlp([4, 6, 3], seed=3)
    X, y = data(23, 4, 3, seed=4)
    H_full = dense_hessian(model, mse_sum, X, y)
    H_part = dense_hessian(model, mse_sum, X[:20], y[:20])
    v = torch.ones(H_full.shape[0], dtype=torch.float64)
    hv = curvx.hvp(model, mse_sum, (X, y), v, chunk_size=10)
    assert torch.allclose(hv, H_full @ v, atol=1e-12)
    assert not torch.allclose(hv, H_part @ v, atol=1e-6)


@pytest.mark.parametrize("method", EXACT)
def test_hvp_float32_close_to_float64_reference(method):
    model64 = mlp([5, 8, 3], seed=7)
    X, y = data(30, 5, 3, seed=8)
    H = dense_hessian(model64, mse_sum, X, y)
    model32 = mlp([5, 8, 3], seed=7, dtype=torch.float32)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator())
    HV = curvx.hvp(model32, mse_sum, (X.float(), y.float()), V, method=method)
    err = (HV - H @ V).norm() / (H @ V).norm()
    assert err < 1e-5


def test_finite_difference_path_is_close():
    model = mlp([3, 4, 2], seed=2)
    X, y = data(12, 3, 2)
    H = dense_hessian(model, mse_sum, X, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    HV = curvx.hvp(model, mse_sum, (X, y), V, method="finite-difference")
    assert torch.allclose(HV, H @ V, atol=1e-5)


class _TanhGrad(torch.autograd.Function):
    """The tanh backward, as an op without a derivative (like a fused kernel)."""

    @staticmethod
    def forward(ctx, grad, out):
        return grad * (1 - out**2)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("derivative for _TanhGrad is not implemented")


class _NoHigherOrder(torch.autograd.Function):
    """tanh without double backward and without forward-mode AD."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _TanhGrad.apply(grad, out)


class _OddTanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4).double()
        self.l2 = nn.Linear(4, 2).double()

    def forward(self, x, plain=False):
        h = self.l1(x)
        h = torch.tanh(h) if plain else _NoHigherOrder.apply(h)
        return self.l2(h)


def test_auto_falls_back_when_higher_order_ad_is_missing():
    torch.manual_seed(0)
    model = _OddTanhNet()
    X, y = data(16, 3, 2)

    class Plain(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, plain=True)

    H = dense_hessian(Plain(model), mse_sum, X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator())
    op = HessianOperator(model, mse_sum, (X, y))
    with pytest.warns(curvx.CurvxWarning, match="falling back"):
        hv = op.matvec(v)
    assert op.method == "finite-difference"
    assert torch.allclose(hv, H @ v, atol=1e-5)
    # an explicit exact method raises instead of approximating silently
    with pytest.raises(RuntimeError):
        HessianOperator(model, mse_sum, (X, y), method="kept-graph").matvec(v)


def test_auto_respects_graph_memory_cap():
    model = mlp([4, 6, 3], seed=3)
    X, y = data(23, 4, 3, seed=4)
    H = dense_hessian(model, mse_sum, X, y)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    op = HessianOperator(model, mse_sum, (X, y), graph_memory=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a memory cap is a choice, not a failure
        hv = op.matvec(v)
    assert op.method == "fwd-rev"
    assert torch.allclose(hv, H @ v, atol=1e-12)
    op = HessianOperator(model, mse_sum, (X, y))
    op.matvec(v)
    assert op.method == "kept-graph" and op.graph_bytes > 0


def _sgd_step(model, X, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    opt.zero_grad()
    mse_sum(model(X), y).backward()
    opt.step()


def _write_through_data(model, X, y):
    for p in model.parameters():  # bypasses version counters
        p.data.add_(0.1)


def _scale_inputs(model, X, y):
    X.mul_(2.0)  # a user's in-place preprocessing between steps


@pytest.mark.parametrize("change", [_sgd_step, _write_through_data, _scale_inputs])
def test_kept_graph_is_rebuilt_after_in_place_changes(change):
    model = mlp([3, 5, 2], seed=1)
    X, y = data(19, 3, 2, seed=2)
    op = HessianOperator(model, mse_sum, (X, y), method="kept-graph")
    v = torch.ones(op.n, dtype=torch.float64)
    op.matvec(v)
    change(model, X, y)
    H = dense_hessian(model, mse_sum, X, y)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)
    loss, _ = op.loss_and_grad()
    assert torch.allclose(loss, mse_sum(model(X), y))


def _bn_model(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Linear(6, 2),
    ).double()


def _state(model):
    return (
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        torch.get_rng_state(),
    )


def _assert_same_state(before, after):
    assert before[0] == after[0]
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k
    for a, b in zip(before[2], after[2]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(before[3], after[3])


@pytest.mark.parametrize("method", EXACT)
def test_batchnorm_eval_policy_matches_eval_hessian_and_keeps_state(method):
    model = _bn_model()
    X, y = data(20, 4, 2)
    model.train()
    model(X)  # move the running stats away from their init
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    before = _state(model)
    H = dense_hessian(model, mse_sum, X, y, train_mode=False)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator())
    hv = curvx.hvp(model, mse_sum, (X, y), v, chunk_size=6, method=method)
    assert torch.allclose(hv, H @ v, atol=1e-10)
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize("method", EXACT)
def test_batchnorm_train_policy_full_batch(method):
    model = _bn_model()
    X, y = data(20, 4, 2)
    model.eval()
    before = _state(model)
    H = dense_hessian(model, mse_sum, X, y, train_mode=True)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator())
    hv = curvx.hvp(model, mse_sum, (X, y), v, mode="train", method=method)
    assert torch.allclose(hv, H @ v, atol=1e-10)
    _assert_same_state(before, _state(model))  # still eval, stats untouched


@pytest.mark.parametrize("method", EXACT)
def test_dropout_train_policy_is_one_fixed_symmetric_operator(method):
    model = _bn_model(dropout=0.5)
    X, y = data(20, 4, 2)
    before = _state(model)
    op = HessianOperator(
        model, mse_sum, (X, y), chunk_size=8, mode="train", method=method
    )
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator())
    H1 = V.T @ op.matmat(V)
    H2 = V.T @ op.matmat(V)
    assert torch.equal(H1, H2)  # the same masks in every product
    assert torch.allclose(H1, H1.T, atol=1e-10)
    _assert_same_state(before, _state(model))


def test_eval_policy_turns_dropout_off():
    model = _bn_model(dropout=0.5)
    X, y = data(20, 4, 2)
    model.eval()
    H = dense_hessian(model, mse_sum, X, y)
    model.train()
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert torch.allclose(curvx.hvp(model, mse_sum, (X, y), v), H @ v, atol=1e-10)
    assert model.training


def test_flat_order_is_named_parameters_order():
    model = mlp([3, 4, 2], seed=0)
    op = HessianOperator(model, mse_sum, data(5, 3, 2))
    assert torch.equal(op.parameter_vector(), flat_params(model))
    assert op.n == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_are_not_variables():
    model = mlp([3, 4, 2], seed=0)
    model[0].weight.requires_grad_(False)
    X, y = data(9, 3, 2)
    op = HessianOperator(model, mse_sum, (X, y))
    assert op.n == 4 + 8 + 2
    H = dense_hessian(model, mse_sum, X, y)
    assert H.shape == (op.n, op.n)
    v = torch.ones(op.n, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)


# ----------------------------------------------------------------- bad input


def test_non_scalar_loss_is_a_clear_error():
    model = mlp([3, 4, 2])
    X, y = data(9, 3, 2)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scalar.*got Tensor\(shape=\[9, 2\]"):
        curvx.hvp(model, lambda o, t: (o - t) ** 2, (X, y), v)


def test_model_without_trainable_parameters():
    model = mlp([3, 2])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, mse_sum, data(4, 3, 2))


def test_wrong_shape_V():
    model = mlp([3, 2])  # n = 8
    op = HessianOperator(model, mse_sum, data(4, 3, 2))
    with pytest.raises(ValueError, match=r"n = 8.*got shape \[7, 2\]"):
        op.matmat(torch.ones(7, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n = 8"):
        curvx.hvp(model, mse_sum, data(4, 3, 2), torch.ones(2, 8, 1))


def test_data_on_another_device():
    model = mlp([3, 2])
    X, y = data(4, 3, 2)
    with pytest.raises(ValueError, match="data batch 0 is on meta.*cpu"):
        HessianOperator(model, mse_sum, (X.to("meta"), y.to("meta")))


def test_malformed_data():
    model = mlp([3, 2])
    X, y = data(4, 3, 2)
    with pytest.raises(ValueError, match="X has 4, y has 3"):
        HessianOperator(model, mse_sum, (X, y[:3]))
    with pytest.raises(TypeError, match=r"\(X, y\) pair"):
        HessianOperator(model, mse_sum, [X])
    with pytest.raises(ValueError, match="empty iterable"):
        HessianOperator(model, mse_sum, [])
    with pytest.raises(ValueError, match="chunk_size"):
        HessianOperator(model, mse_sum, (X, y), chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        HessianOperator(model, mse_sum, (X, y), method="magic")
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(model, mse_sum, (X, y), mode="inference")


def test_nonfinite_product_raises():
    model = mlp([3, 2])
    X, y = data(4, 3, 2)
    X[0, 0] = float("nan")
    op = HessianOperator(model, mse_sum, (X, y))
    with pytest.raises(NonFiniteError):
        op.matvec(torch.ones(op.n, dtype=torch.float64))


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2).double()
        self.unused = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("method", EXACT)
def test_unused_parameters_have_zero_rows(method):
    torch.manual_seed(0)
    model = _Unused()
    X, y = data(10, 3, 2)
    H = dense_hessian(model, mse_sum, X, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    HV = curvx.hvp(model, mse_sum, (X, y), V, method=method)
    assert torch.allclose(HV, H @ V, atol=1e-12)
    assert torch.equal(HV[8:], torch.zeros_like(HV[8:]))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3, bias=False).double()
        self.dec = nn.Linear(3, 4, bias=False).double()
        self.dec.weight = self.enc.weight  # shared: transposed use below

    def forward(self, x):
        return torch.tanh(x @ self.enc.weight.T) @ self.dec.weight


@pytest.mark.parametrize("method", EXACT)
def test_tied_weights_count_once(method):
    torch.manual_seed(0)
    model = _Tied()
    X, y = data(10, 4, 4)
    op = HessianOperator(model, mse_sum, (X, y), method=method)
    assert op.n == 12
    H = dense_hessian(model, mse_sum, X, y)
    V = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator())
    assert torch.allclose(op.matmat(V), H @ V, atol=1e-12)


def test_dtype_mismatch_is_named_not_a_fallback():
    model = mlp([3, 4, 2], dtype=torch.float32)
    X, y = data(6, 3, 2)  # float64
    with pytest.raises(TypeError, match="dtype torch.float64.*torch.float32"):
        HessianOperator(model, mse_sum, (X, y))


def test_user_errors_do_not_start_the_fallback_chain():
    model = mlp([3, 4, 2])
    X, y = data(6, 3, 2)
    op = HessianOperator(model, mse_sum, (X, y[:, :1].expand(6, 3).contiguous()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvx.CurvxWarning)
        with pytest.raises(RuntimeError, match="fail on the first batch"):
            op.matvec(torch.ones(op.n, dtype=torch.float64))


def test_meta_model_is_a_clear_error():
    model = mlp([3, 2]).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        HessianOperator(model, mse_sum, data(4, 3, 2))


def test_tuple_inputs_in_the_pair_form():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2).double()
            self.b = nn.Linear(2, 2).double()

        def forward(self, x1, x2):
            return torch.tanh(self.a(x1)) * self.b(x2)

    torch.manual_seed(0)
    model = Two()
    X1, y = data(11, 3, 2)
    X2 = torch.randn(11, 2, dtype=torch.float64)
    full = HessianOperator(model, mse_sum, [((X1, X2), y)])
    chunked = HessianOperator(model, mse_sum, ((X1, X2), y), chunk_size=4)
    V = torch.randn(full.n, 2, dtype=torch.float64, generator=torch.Generator())
    assert torch.allclose(full.matmat(V), chunked.matmat(V), atol=1e-12)


class _Attention(nn.Module):
    """One attention layer; ``fused`` uses scaled_dot_product_attention, whose CPU
    kernel has neither double backward nor forward-mode AD (torch 2.14)."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(4, 12).double()
        self.out = nn.Linear(4, 2).double()

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if self.fused:
            h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            h = torch.softmax(scores, -1) @ v
        return self.out(h.mean(1))


def test_fused_attention_gets_a_working_product():
    torch.manual_seed(0)
    model, plain = _Attention(True), _Attention(False)
    plain.load_state_dict(model.state_dict())
    X = torch.randn(8, 3, 4, dtype=torch.float64, generator=torch.Generator())
    y = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator())
    H = dense_hessian(plain, mse_sum, X, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    op = HessianOperator(model, mse_sum, (X, y), chunk_size=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        HV = op.matmat(V)
    ours = [w for w in seen if issubclass(w.category, curvx.CurvxWarning)]
    assert len(ours) == (1 if op.method == "finite-difference" else 0)
    assert torch.allclose(HV, H @ V, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvx.CurvxWarning)  # asserted above
        res = curvx.eigsh(model, mse_sum, (X, y), k=2)
    assert torch.allclose(
        res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], atol=1e-6
    )


def test_auto_measures_when_the_choice_matters():
    model = mlp([4, 6, 3], seed=3)
    X, y = data(23, 4, 3, seed=4)
    H = dense_hessian(model, mse_sum, X, y)
    op = HessianOperator(model, mse_sum, (X, y), measure_seconds=0.0)
    v = torch.ones(op.n, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)
    assert set(op.timings) == {"kept-graph", "fwd-rev"}
    assert op.method in ("kept-graph", "fwd-rev")
    assert op.policy["hvp_probe_seconds"] == op.timings
    assert op.hvp_count == 1  # the probes are not counted as the user's products


class _SilentTanh(_NoHigherOrder):
    """tanh whose backward is @once_differentiable: PyTorch then drops the second
    derivative without an error, so double backward is silently incomplete."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)


def test_silently_wrong_double_backward_is_caught_by_symmetry():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(3, 6).double(), nn.Linear(6, 2).double()

    class Net(nn.Module):
        def __init__(self, silent):
            super().__init__()
            self.l1, self.l2, self.silent = l1, l2, silent

        def forward(self, x):
            h = self.l1(x)
            return self.l2(_SilentTanh.apply(h) if self.silent else torch.tanh(h))

    X, y = data(16, 3, 2)
    H = dense_hessian(Net(False), mse_sum, X, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    op = HessianOperator(Net(True), mse_sum, (X, y))
    with pytest.warns(curvx.CurvxWarning, match="not symmetric"):
        HV = op.matmat(V)
    assert op.method == "finite-difference"
    assert torch.allclose(HV, H @ V, atol=1e-6)
    # an explicit exact method cannot be trusted here: the solver refuses it
    with pytest.raises(ValueError, match="not symmetric"):
        curvx.eigsh(Net(True), mse_sum, (X, y), k=1, method="kept-graph")


def test_kept_graph_follows_buffer_changes():
    # Running statistics moved by a train-mode forward (or torch.optim.swa_utils'
    # update_bn) change the eval-mode Hessian without touching a parameter
    model = _bn_model()
    X, y = data(20, 4, 2)
    op = HessianOperator(model, mse_sum, (X, y), method="kept-graph")
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator())
    op.matvec(v)
    model.train()
    for _ in range(3):
        model(X * 3.0)
    model.eval()
    H = dense_hessian(model, mse_sum, X, y)
    assert float((H @ v).norm()) > 1e-3  # a product worth comparing
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-10)


def test_replaced_parameters_are_refused_until_rebind():
    model = mlp([3, 5, 2], seed=3)
    X, y = data(9, 3, 2)
    op = HessianOperator(model, mse_sum, (X, y))
    v = torch.ones(op.n, dtype=torch.float64)
    op.matvec(v)
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2.0)
    with pytest.raises(curvx.ParametersChangedError, match="replaced"):
        op.matvec(v)
    with pytest.raises(curvx.ParametersChangedError):
        op.loss_and_grad()
    op.rebind()
    H = dense_hessian(model, mse_sum, X, y)
    assert torch.allclose(op.matvec(v), H @ v, atol=1e-12)

    # Freezing a layer changes n: rebind follows
    model[2].bias.requires_grad_(False)
    with pytest.raises(curvx.ParametersChangedError):
        op.matvec(v)
    op.rebind()
    assert op.n == v.numel() - 2


def test_data_errors_name_the_wrong_half():
    model = mlp([3, 2])
    X, y = data(4, 3, 2)
    with pytest.raises(TypeError, match="y as a tensor.*got y NoneType"):
        HessianOperator(model, mse_sum, (X, None))
    with pytest.raises(TypeError, match="inputs X must be a tensor.*got dict"):
        HessianOperator(model, mse_sum, ({"x": X}, y))
    with pytest.raises(ValueError, match=r"batch 1 .*leading sizes \[4, 3\]"):
        HessianOperator(model, mse_sum, [(X, y), (X, y[:3])])
    # A target that is not a tensor is fine in the list-of-batches form
    op = HessianOperator(model, lambda out, t: mse_sum(out, t["y"]), [(X, {"y": y})])
    H = dense_hessian(model, mse_sum, X, y)
    assert torch.allclose(op.matvec(torch.ones(op.n, dtype=torch.float64)), H.sum(1))


def test_bad_V_values_blame_V():
    model = mlp([3, 2])
    op = HessianOperator(model, mse_sum, data(4, 3, 2))
    V = torch.ones(op.n, 2, dtype=torch.float64)
    V[1, 1] = float("nan")
    with pytest.raises(ValueError, match="V holds NaN"):
        op.matmat(V)
    with pytest.raises(ValueError, match="V is on the meta device"):
        op.matmat(torch.ones(op.n, 2, device="meta"))


def test_integer_like_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    model = mlp([3, 2])
    X, y = data(10, 3, 2)
    op = HessianOperator(model, mse_sum, (X, y), chunk_size=np.int64(3))
    assert [n_c for _, _, n_c in op.chunks] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1; got 2.5"):
        HessianOperator(model, mse_sum, (X, y), chunk_size=2.5)


def test_layernorm_products_match_double_backward():
    # torch.func.hessian is not symmetric on LayerNorm here (torch 2.14): the
    # reference is the double-backward one, confirmed by finite differences
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)
    ).double()
    X = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    ce = nn.functional.cross_entropy
    H = dense_hessian(model, ce, X, y, autograd=True)
    assert torch.allclose(H, H.T, atol=1e-14)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    for method in EXACT:
        assert torch.allclose(curvx.hvp(model, ce, (X, y), eye, method=method), H)
    fd = curvx.hvp(model, ce, (X, y), eye, method="finite-difference")
    assert torch.allclose(fd, H, atol=1e-7)
    ev = torch.linalg.eigvalsh(H)
    res = curvx.eigsh(model, ce, (X, y), k=2, which="BE", chunk_size=7)
    assert torch.allclose(res.eigenvalues, torch.stack([ev[-1], ev[0]]), atol=1e-10)
