"""Offline datasets for the training harness: Fashion-MNIST, digits and CIFAR-10.

Nothing here downloads anything. Each loader reads files that are already on disk
(or, for ``digits``, data shipped inside scikit-learn) and fails with a
:class:`DatasetError` that names every place it looked and how to get the data.

Subsets are deterministic: the *first* ``n_train`` examples of the training split and
the *first* ``n_test`` examples of the test split, in file order (no shuffling), so a
run's examples are fully described by the dataset name and the two counts.

Preprocessing, in this order:

1. scale the raw pixels to [0, 1] (uint8 / 255; digits: values 0..16 / 16);
2. standardize with the mean and standard deviation of the *training subset*, per
   channel for images (one channel for grayscale), and apply the same statistics to
   the test subset;
3. keep image shape ``[N, C, H, W]`` for convolutional models, otherwise flatten to
   ``[N, C * H * W]``.

Inputs are returned as floating tensors of the requested dtype and device, labels as
``int64`` ``[N]`` and one-hot targets (for the MSE loss) as ``[N, n_classes]`` in the
input dtype.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DatasetError",
    "DataBundle",
    "Split",
    "FASHION_MNIST_SYSTEM_DIR",
    "find_fashion_mnist",
    "load_cifar10_raw",
    "load_dataset",
    "load_digits_raw",
    "load_fashion_mnist_raw",
    "read_idx",
]

DATASETS = ("fashion-mnist", "digits", "cifar10")

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Number of digits examples held out as the test split (the last ones in file order).
DIGITS_N_TEST = 297

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(RuntimeError):
    """A dataset is missing, malformed or too small for the request."""


# --------------------------------------------------------------------------- IDX


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_idx(
    path: str | os.PathLike,
    *,
    expected_ndim: int | None = None,
    max_items: int | None = None,
) -> np.ndarray:
    """Reads an IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

    The header is a 4-byte magic number ``0x00 0x00 <type> <ndim>`` followed by
    ``ndim`` big-endian uint32 dimension sizes, then the data in row-major order.

    Args:
        path: The ``.gz`` or uncompressed IDX file.
        expected_ndim: If given, the number of dimensions the magic number must
            announce (3 for images, i.e. magic 2051; 1 for labels, magic 2049).
        max_items: If given, read only the first ``max_items`` entries along the
            first dimension (the rest of the file is not decompressed).

    Returns:
        An array of shape ``[n, d1, ..., d_{ndim-1}]`` in native byte order, with
        ``n = min(d0, max_items)``.

    Raises:
        DatasetError: On a bad magic number, an unknown type byte, an unexpected
            number of dimensions, or a truncated file.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        magic = f.read(4)
        if len(magic) != 4:
            raise DatasetError(f"{path}: file too short for an IDX header")
        zero0, zero1, type_code, ndim = magic
        magic_int = struct.unpack(">I", magic)[0]
        if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
            raise DatasetError(
                f"{path}: not an IDX file (magic number {magic_int:#010x}; "
                "expected 0x0000TTDD with a known type byte TT and DD >= 1 "
                "dimensions, e.g. 0x00000803 = 2051 for images)"
            )
        if expected_ndim is not None and ndim != expected_ndim:
            want = (0x08 << 8) | expected_ndim
            raise DatasetError(
                f"{path}: IDX magic number {magic_int} announces {ndim} dimensions; "
                f"expected {expected_ndim} (magic {want} for unsigned bytes)"
            )
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) != 4 * ndim:
            raise DatasetError(f"{path}: truncated IDX header")
        dims = list(struct.unpack(f">{ndim}I", dims_raw))
        if max_items is not None:
            dims[0] = min(dims[0], max_items)
        dtype = _IDX_DTYPES[type_code]
        count = int(np.prod(dims, dtype=np.int64))
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise DatasetError(
                f"{path}: truncated IDX data ({len(raw)} bytes, expected "
                f"{count * dtype.itemsize} for shape {dims})"
            )
    return np.frombuffer(raw, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------- Fashion-MNIST


def _fashion_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        root = Path(data_dir)
        dirs += [
            root,
            root / "fashion-mnist",
            root / "FashionMNIST" / "raw",
        ]
    else:  # an explicit folder is never silently replaced by the system copy
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Locates the four Fashion-MNIST IDX files.

    Looks in ``data_dir``, ``data_dir/fashion-mnist`` and ``data_dir/FashionMNIST/raw``
    (torchvision's layout) when ``data_dir`` is given, else in
    :data:`FASHION_MNIST_SYSTEM_DIR`; the first folder holding all four files
    (``.gz`` or uncompressed) wins.

    Args:
        data_dir: Optional user folder (then the only place searched).

    Returns:
        A dict with keys ``train_images``, ``train_labels``, ``test_images``,
        ``test_labels`` mapping to file paths.

    Raises:
        DatasetError: If no folder holds all four files; the message lists the
            folders searched and how to obtain the data.
    """
    searched = _fashion_candidates(data_dir)
    for directory in searched:
        found = {
            k: _find_file(directory, stem) for k, stem in FASHION_MNIST_FILES.items()
        }
        if all(found.values()):
            return found  # type: ignore[return-value]
    names = ", ".join(stem + "[.gz]" for stem in FASHION_MNIST_FILES.values())
    looked = "\n  ".join(str(d) for d in searched)
    raise DatasetError(
        "Fashion-MNIST not found. Looked for "
        f"{names} in:\n  {looked}\n"
        "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs "
        f"to {FASHION_MNIST_SYSTEM_DIR}), or put the four IDX files in a folder and "
        "pass --data-dir FOLDER, or use --dataset digits (ships with scikit-learn). "
        "Nothing is downloaded automatically."
    )


def load_fashion_mnist_raw(
    data_dir: str | os.PathLike | None, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Reads the first ``n_train`` / ``n_test`` Fashion-MNIST examples.

    Args:
        data_dir: Optional folder searched before the system folder.
        n_train: Number of training examples to read (first in file order).
        n_test: Number of test examples to read (first in file order).

    Returns:
        ``(x_train, y_train, x_test, y_test, info)``: images ``[n, 1, 28, 28]``
        float64 in [0, 1], labels ``[n]`` int64, and an ``info`` dict with the
        files used and the split sizes available.
    """
    files = find_fashion_mnist(data_dir)
    out = []
    sizes = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = read_idx(files[f"{split}_images"], expected_ndim=3, max_items=n)
        labels = read_idx(files[f"{split}_labels"], expected_ndim=1, max_items=n)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"Fashion-MNIST {split}: {images.shape[0]} images but "
                f"{labels.shape[0]} labels"
            )
        sizes[split] = _idx_length(files[f"{split}_labels"])
        out += [
            images.astype(np.float64)[:, None] / 255.0,
            labels.astype(np.int64),
        ]
    info = {
        "path": str(files["train_images"].parent),
        "files": {k: str(v) for k, v in files.items()},
        "available": sizes,
    }
    return out[0], out[1], out[2], out[3], info


def _idx_length(path: Path) -> int:
    with _open_maybe_gzip(path) as f:
        header = f.read(8)
    return struct.unpack(">I", header[4:8])[0]


# ------------------------------------------------------------------------ digits


def load_digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Loads scikit-learn's 8x8 digits (1797 images) with a fixed split.

    The split is by position: the first ``1797 - 297 = 1500`` examples form the
    training split and the last :data:`DIGITS_N_TEST` = 297 the test split.

    Returns:
        ``(x_train, y_train, x_test, y_test, info)`` with images ``[n, 1, 8, 8]``
        float64 in [0, 1] (raw values 0..16 divided by 16) and labels ``[n]`` int64.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float64)[:, None] / 16.0
    labels = bunch.target.astype(np.int64)
    n_tr = images.shape[0] - DIGITS_N_TEST
    info = {
        "path": "sklearn.datasets.load_digits",
        "split": f"first {n_tr} examples = train, last {DIGITS_N_TEST} = test",
        "available": {"train": n_tr, "test": DIGITS_N_TEST},
    }
    return images[:n_tr], labels[:n_tr], images[n_tr:], labels[n_tr:], info


# ----------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to what the CIFAR-10 python batches contain."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR-10 batch file"
            )
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(
            f"{path}: expected a dict with keys b'data' and b'labels' (the CIFAR-10 "
            "python version)"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} "
            f"{list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: {data.shape[0]} images but {labels.shape[0]} labels"
        )
    return data, labels


def _find_cifar_dir(data_dir: str | os.PathLike | None) -> Path:
    searched: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir)
        searched = [root, root / "cifar-10-batches-py"]
        for directory in searched:
            if (directory / CIFAR10_TEST_BATCH).is_file() and (
                directory / CIFAR10_TRAIN_BATCHES[0]
            ).is_file():
                return directory
    looked = "\n  ".join(str(d) for d in searched) if searched else "(no --data-dir)"
    raise DatasetError(
        "CIFAR-10 not found. Looked for data_batch_1..data_batch_5 and test_batch "
        f"(the python-pickle version) in:\n  {looked}\n"
        "To get it: obtain cifar-10-python.tar.gz from its authors' page on a machine "
        "with internet, extract it, and pass --data-dir FOLDER (the folder holding "
        "cifar-10-batches-py or the batch files themselves). No system package ships "
        "CIFAR-10 and nothing is downloaded automatically; --dataset fashion-mnist or "
        "--dataset digits work offline."
    )


def load_cifar10_raw(
    data_dir: str | os.PathLike | None, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Reads CIFAR-10 from its python-pickle batches.

    Training batches ``data_batch_1`` .. ``data_batch_5`` are read in order (only as
    many as needed for ``n_train``; missing later batches shrink the training split
    with a warning), and ``test_batch`` for the test split. Batch files are unpickled
    with an unpickler that only admits numpy arrays.

    Args:
        data_dir: Folder holding the batch files, or their parent holding
            ``cifar-10-batches-py``.
        n_train: Number of training examples (first in batch order).
        n_test: Number of test examples (first in file order).

    Returns:
        ``(x_train, y_train, x_test, y_test, info)`` with images ``[n, 3, 32, 32]``
        float64 in [0, 1] and labels ``[n]`` int64.
    """
    directory = _find_cifar_dir(data_dir)
    xs, ys = [], []
    have = 0
    used = []
    missing = [b for b in CIFAR10_TRAIN_BATCHES if not (directory / b).is_file()]
    for name in CIFAR10_TRAIN_BATCHES:
        if have >= n_train:
            break
        if not (directory / name).is_file():
            break
        x, y = _read_cifar_batch(directory / name)
        xs.append(x)
        ys.append(y)
        used.append(name)
        have += x.shape[0]
    if have < n_train and missing:
        logger.warning(
            "CIFAR-10 folder %s lacks %s; training split has %d examples",
            directory,
            ", ".join(missing),
            have,
        )
    x_tr = np.concatenate(xs)[:n_train]
    y_tr = np.concatenate(ys)[:n_train]
    x_te, y_te = _read_cifar_batch(directory / CIFAR10_TEST_BATCH)
    x_te, y_te = x_te[:n_test], y_te[:n_test]

    def to_images(x: np.ndarray) -> np.ndarray:
        # Each row is 1024 red, then 1024 green, then 1024 blue values (row-major).
        return x.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0

    info = {
        "path": str(directory),
        "files": used + [CIFAR10_TEST_BATCH],
    }
    return to_images(x_tr), y_tr, to_images(x_te), y_te, info


# -------------------------------------------------------------------------- bundle


@dataclasses.dataclass
class Split:
    """One split of a dataset, on the run's device.

    Attributes:
        x: Inputs, ``[N, d]`` (flattened) or ``[N, C, H, W]`` (image models).
        y: Labels, ``[N]`` int64.
        onehot: One-hot targets, ``[N, n_classes]`` in the dtype of ``x``.
    """

    x: torch.Tensor
    y: torch.Tensor
    onehot: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def targets(self, loss: str) -> torch.Tensor:
        """Targets for ``loss``: one-hot ``[N, n_classes]`` for mse, labels ``[N]``."""
        return self.onehot if loss == "mse" else self.y


@dataclasses.dataclass
class DataBundle:
    """A preprocessed train/test pair plus the facts a run records.

    Attributes:
        name: Dataset name, one of :data:`DATASETS`.
        train: The training subset (what the loss and the Hessian are over).
        test: The test subset (may be empty).
        n_classes: Number of classes.
        image_shape: ``(C, H, W)`` of one example before flattening.
        info: JSON-ready description: source path, subset rule, normalization.
    """

    name: str
    train: Split
    test: Split
    n_classes: int
    image_shape: tuple[int, int, int]
    info: dict


def _available_counts(name: str, data_dir) -> dict[str, int | None]:
    if name == "digits":
        return {"train": 1797 - DIGITS_N_TEST, "test": DIGITS_N_TEST}
    if name == "fashion-mnist":
        files = find_fashion_mnist(data_dir)
        return {
            "train": _idx_length(files["train_labels"]),
            "test": _idx_length(files["test_labels"]),
        }
    return {"train": None, "test": None}  # CIFAR-10: known after reading


def load_dataset(
    name: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    data_dir: str | os.PathLike | None = None,
    flatten: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    default_n_train: int = 5000,
    default_n_test: int = 10000,
) -> DataBundle:
    """Loads, subsets and standardizes a dataset for full-batch training.

    Args:
        name: One of ``"fashion-mnist"``, ``"digits"``, ``"cifar10"``.
        n_train: Training examples (the first ones). ``None`` means
            ``default_n_train`` or all available if fewer; an explicit value larger
            than what is available raises :class:`DatasetError`.
        n_test: Test examples (the first ones); ``None`` means ``default_n_test``;
            either way clipped to what is available. 0 gives an empty test split.
        data_dir: Folder holding the data files (default: the system copy).
        flatten: Return inputs as ``[N, C*H*W]`` (fully connected models) instead of
            ``[N, C, H, W]``.
        device: Device of the returned tensors.
        dtype: Floating dtype of inputs and one-hot targets.
        default_n_train: See ``n_train``.
        default_n_test: See ``n_test``.

    Returns:
        The :class:`DataBundle`.

    Raises:
        DatasetError: Data missing or malformed, or ``n_train`` too large.
        ValueError: Unknown dataset name or a negative count.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    for arg, val in (("n_train", n_train), ("n_test", n_test)):
        if val is not None and val < 0:
            raise ValueError(f"{arg} must be >= 0, got {val}")
    if n_train is not None and n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")

    available = _available_counts(name, data_dir)
    want_train = default_n_train if n_train is None else n_train
    if available["train"] is not None:
        if n_train is not None and n_train > available["train"]:
            raise DatasetError(
                f"--n-train {n_train} is more than the {available['train']} training "
                f"examples {name} has; use --n-train {available['train']} or fewer"
            )
        want_train = min(want_train, available["train"])
    want_test = default_n_test if n_test is None else n_test
    if available["test"] is not None:
        want_test = min(want_test, available["test"])

    if name == "fashion-mnist":
        x_tr, y_tr, x_te, y_te, info = load_fashion_mnist_raw(
            data_dir, want_train, want_test
        )
    elif name == "digits":
        x_tr, y_tr, x_te, y_te, info = load_digits_raw()
        x_tr, y_tr = x_tr[:want_train], y_tr[:want_train]
        x_te, y_te = x_te[:want_test], y_te[:want_test]
    else:
        x_tr, y_tr, x_te, y_te, info = load_cifar10_raw(data_dir, want_train, want_test)
        if n_train is not None and x_tr.shape[0] < n_train:
            raise DatasetError(
                f"--n-train {n_train} is more than the {x_tr.shape[0]} training "
                f"examples found in {info['path']}"
            )

    # Standardize per channel with statistics of the training subset: [C].
    mean = x_tr.mean(axis=(0, 2, 3))
    std = x_tr.std(axis=(0, 2, 3))
    std = np.where(std > 0, std, 1.0)
    x_tr = (x_tr - mean[None, :, None, None]) / std[None, :, None, None]
    x_te = (x_te - mean[None, :, None, None]) / std[None, :, None, None]

    image_shape = tuple(int(s) for s in x_tr.shape[1:])
    n_classes = 10

    def to_split(x: np.ndarray, y: np.ndarray) -> Split:
        if flatten:
            x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        xt = torch.as_tensor(x, dtype=dtype, device=device)
        yt = torch.as_tensor(y, dtype=torch.int64, device=device)
        onehot = torch.nn.functional.one_hot(yt, n_classes).to(dtype)
        return Split(xt, yt, onehot)

    info = dict(info)
    info.update(
        {
            "name": name,
            "n_train": int(x_tr.shape[0]),
            "n_test": int(x_te.shape[0]),
            "train_subset": f"first {x_tr.shape[0]} examples of the training split "
            "(indices 0..n_train-1, file order, no shuffling)",
            "test_subset": f"first {x_te.shape[0]} examples of the test split",
            "preprocessing": "pixels scaled to [0, 1], then standardized per channel "
            "with the training subset's mean and std"
            + ("; flattened" if flatten else "; image shape kept"),
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "image_shape": list(image_shape),
            "n_classes": n_classes,
            "train_class_counts": np.bincount(y_tr, minlength=n_classes).tolist(),
        }
    )
    logger.debug("loaded %s: %s", name, info)
    return DataBundle(
        name=name,
        train=to_split(x_tr, y_tr),
        test=to_split(x_te, y_te),
        n_classes=n_classes,
        image_shape=image_shape,  # type: ignore[arg-type]
        info=info,
    )
