"""Tests of the training harness pieces: data loaders, models, losses, chunking."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from curvx.harness import data as hdata
from curvx.harness.data import DatasetError, load_dataset, read_idx
from curvx.harness.losses import accuracy, ce_loss, mse_loss
from curvx.harness.models import MODELS, build_model
from curvx.harness.train import (
    ConfigError,
    TrainConfig,
    full_batch_loss_and_grad,
    make_chunks,
    stability_threshold,
)

# ----------------------------------------------------------------------------- IDX


def write_idx(path, array: np.ndarray, *, gz: bool = True, magic: bytes | None = None):
    """Writes ``array`` (uint8) in IDX format; ``magic`` overrides the header."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fashion_dir(root, n_train=12, n_test=5, side=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(root / (stem + ".gz"), arr)
    return {k: v.astype(np.uint8) for k, v in arrays.items()}


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 5, 4)).astype(np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, images, gz=gz)
    out = read_idx(path, expected_ndim=3)
    assert out.shape == (7, 5, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(read_idx(path, max_items=3), images[:3])


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    write_idx(path, np.zeros((2, 3, 3)), magic=b"\x01\x02\x08\x03")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_wrong_ndim_and_truncation(tmp_path):
    labels = tmp_path / "labels.gz"
    write_idx(labels, np.arange(4))
    with pytest.raises(DatasetError, match="announces 1 dimensions; expected 3"):
        read_idx(labels, expected_ndim=3)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(short)


def test_fashion_mnist_from_data_dir(tmp_path):
    arrays = make_fashion_dir(tmp_path / "fm")
    bundle = load_dataset(
        "fashion-mnist", n_train=10, n_test=4, data_dir=tmp_path / "fm"
    )
    assert bundle.info["path"] == str(tmp_path / "fm")
    assert bundle.train.x.shape == (10, 784) and bundle.test.x.shape == (4, 784)
    assert bundle.train.x.dtype == torch.float32
    assert bundle.train.y.dtype == torch.int64
    np.testing.assert_array_equal(
        bundle.train.y.numpy(), arrays["train-labels-idx1-ubyte"][:10]
    )
    assert bundle.train.onehot.shape == (10, 10)
    assert torch.equal(bundle.train.onehot.argmax(1), bundle.train.y)
    # Standardized with the training subset's statistics.
    x_raw = arrays["train-images-idx3-ubyte"][:10].astype(np.float64) / 255
    expect = (x_raw - x_raw.mean()) / x_raw.std()
    np.testing.assert_allclose(
        bundle.train.x.double().numpy(), expect.reshape(10, -1), atol=1e-5
    )
    # Image shape kept for cnn; too many examples asked -> clear error.
    img = load_dataset(
        "fashion-mnist", n_train=3, n_test=0, data_dir=tmp_path / "fm", flatten=False
    )
    assert img.train.x.shape == (3, 1, 28, 28) and len(img.test) == 0
    with pytest.raises(DatasetError, match="more than the 12 training examples"):
        load_dataset("fashion-mnist", n_train=13, data_dir=tmp_path / "fm")


def test_fashion_mnist_missing_names_paths_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr(hdata, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system")
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "mine")
    msg = str(err.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "no-system") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "--dataset digits" in msg
    assert "train-images-idx3-ubyte" in msg


def test_explicit_data_dir_is_never_replaced_by_the_system_copy(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


def test_digits_split_and_clipping():
    bundle = load_dataset("digits", n_test=None)
    assert len(bundle.train) == 1500 and len(bundle.test) == 297
    assert bundle.train.x.shape == (1500, 64)
    assert abs(bundle.train.x.double().mean().item()) < 1e-6
    small = load_dataset("digits", n_train=30, n_test=7, dtype=torch.float64)
    assert small.train.x.dtype == torch.float64 and small.test.x.shape == (7, 64)
    torch.testing.assert_close(small.train.y, bundle.train.y[:30])
    with pytest.raises(DatasetError, match="1500"):
        load_dataset("digits", n_train=1501)


# ------------------------------------------------------------------------- CIFAR-10


def write_cifar_batch(path, n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_loader(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    b1 = write_cifar_batch(folder / "data_batch_1", 6, 0, protocol)
    b2 = write_cifar_batch(folder / "data_batch_2", 5, 1, protocol)
    bt = write_cifar_batch(folder / "test_batch", 4, 2, protocol)
    x_tr, y_tr, x_te, y_te, info = hdata.load_cifar10_raw(tmp_path, 8, 3)
    assert x_tr.shape == (8, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(y_tr, b1[b"labels"] + b2[b"labels"][:2])
    np.testing.assert_array_equal(y_te, bt[b"labels"][:3])
    # Row layout: 1024 red, 1024 green, 1024 blue values.
    np.testing.assert_allclose(x_tr[6, 1, 0, :], b2[b"data"][0, 1024:1056] / 255)
    bundle = load_dataset("cifar10", n_train=11, n_test=4, data_dir=folder)
    assert bundle.train.x.shape == (11, 3072)
    std = bundle.train.x.double().reshape(11, 3, -1).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(std.std(1, unbiased=False), torch.ones(3).double())
    img = load_dataset("cifar10", n_train=2, data_dir=tmp_path, flatten=False)
    assert img.train.x.shape == (2, 3, 32, 32) and img.image_shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="more than the 11 training examples"):
        load_dataset("cifar10", n_train=12, data_dir=tmp_path)


def test_cifar10_missing_and_unsafe(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--data-dir" in msg
    with pytest.raises(DatasetError, match="no --data-dir"):
        load_dataset("cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    write_cifar_batch(tmp_path / "test_batch", 2, 0)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------- models


SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_model_output_shapes(name, shape):
    model = build_model(name, shape, 10, width=8, seed=0)
    x = torch.randn(5, *shape)
    if name != "cnn":
        x = x.reshape(5, -1)
    assert model(x).shape == (5, 10)


def test_model_seed_depth_bias():
    before = torch.get_rng_state()
    a = build_model("fc-tanh", (1, 8, 8), 10, seed=3)
    b = build_model("fc-tanh", (1, 8, 8), 10, seed=3)
    c = build_model("fc-tanh", (1, 8, 8), 10, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert sum(isinstance(m, torch.nn.Linear) for m in a) == 3  # 2 hidden + output
    lin = build_model("deep-linear", (1, 8, 8), 10, depth=1)
    assert len(lin) == 1 and lin[0].bias is None
    deep = build_model("deep-linear", (1, 8, 8), 10, depth=4, width=6)
    assert len(deep) == 4 and all(m.bias is None for m in deep)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        build_model("deep-linear", (1, 8, 8), 10, depth=0)
    f64 = build_model("cnn", (1, 8, 8), 10, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in f64.parameters())


# --------------------------------------------------------------------------- losses


def test_mse_is_half_sum_over_outputs_mean_over_examples():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,), generator=gen)
    target = torch.nn.functional.one_hot(labels, 10).double()
    manual = 0.0
    for n in range(6):
        manual += 0.5 * sum((out[n, k] - target[n, k]).item() ** 2 for k in range(10))
    manual /= 6
    assert mse_loss(out, target).item() == pytest.approx(manual, rel=1e-12)
    # 10 / 2 times torch's elementwise-mean MSE.
    torch.testing.assert_close(
        mse_loss(out, target), 5 * torch.nn.functional.mse_loss(out, target)
    )
    with pytest.raises(ValueError, match="same shape"):
        mse_loss(out, labels)
    torch.testing.assert_close(
        ce_loss(out, labels), torch.nn.functional.cross_entropy(out, labels)
    )
    assert accuracy(target, labels) == 1.0


# --------------------------------------------------------------- full-batch gradient


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_chunked_gradient_matches_unchunked(loss):
    bundle = load_dataset("digits", n_train=50, n_test=0, dtype=torch.float64)
    model = build_model(
        "fc-tanh", bundle.image_shape, 10, width=16, dtype=torch.float64
    )
    loss_fn = mse_loss if loss == "mse" else ce_loss

    def grads(chunk_size):
        chunks = make_chunks(bundle.train, loss, chunk_size)
        value, acc = full_batch_loss_and_grad(model, loss_fn, chunks)
        return value, acc, [p.grad.clone() for p in model.parameters()], chunks

    ref_value, ref_acc, ref, _ = grads(None)
    value, acc, got, chunks = grads(7)  # 50 = 7 * 7 + 1: uneven last chunk
    assert [c[0].shape[0] for c in chunks] == [7] * 7 + [1]
    assert value == pytest.approx(ref_value, rel=1e-12) and acc == ref_acc
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # And both equal autograd of the plain full-batch loss.
    model.zero_grad()
    t = bundle.train.targets(loss)
    loss_fn(model(bundle.train.x), t).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_thresholds_and_config_validation(tmp_path):
    gd = TrainConfig(lr=0.1, steps=1, out=str(tmp_path))
    assert stability_threshold(gd)[0] == pytest.approx(20.0)
    mom = TrainConfig(lr=0.1, steps=1, out=str(tmp_path), optimizer="momentum")
    assert stability_threshold(mom)[0] == pytest.approx(2 * 1.9 / 0.1)
    adam = TrainConfig(lr=0.1, steps=1, out=str(tmp_path), optimizer="adam")
    value, _, note = stability_threshold(adam)
    assert value == pytest.approx(380.0) and "preconditioned" in note
    for bad in (dict(lr=-1.0), dict(lr=float("nan")), dict(k=0), dict(steps=-1)):
        kwargs = dict(lr=0.1, steps=1, out=str(tmp_path))
        kwargs.update(bad)
        with pytest.raises(ConfigError):
            TrainConfig(**kwargs).validate()
