"""Full-batch training with per-step Hessian tracking.

:func:`run_training` trains a model by full-batch gradient descent (or heavy-ball
momentum, or full-batch Adam) and, every ``track_every`` steps, asks
:func:`curvx.track` for the top eigenpairs of the training-loss Hessian at the
current parameters. Everything goes into a run folder (see :mod:`.metrics` for the
record format):

- ``config.json``: every setting and the facts needed to interpret the numbers
  (dataset subset rule, loss reduction, tracker policy, versions, device, dtype);
- ``metrics.jsonl``: one line per step, durable as soon as the step ends;
- ``summary.json``: final / min / max values, costs, status;
- ``loss.png``, ``sharpness.png``, ``rotation.png`` (unless plots are off).

Order of work at step ``t`` (parameters theta_t, for ``t = 0 .. steps``):

1. full-batch loss and gradient at theta_t, over fixed chunks that cover every
   training example once, chunk losses weighted by ``n_c / N`` (the same chunks and
   loss the tracker is given, so the Hessian is that of the loss being minimized).
   On tracked steps (``t % track_every == 0`` and the final step) the fused step
   ``tracker.step(step=t, lr=lr, backward=True)`` computes them and the eigenpairs
   in one pass (``--unfused``: a plain backward, then ``tracker.step`` in 3.);
2. if the loss or gradient is not finite: write the record with status
   ``"diverged"`` and stop (the run ends normally, status ``"diverged"``);
3. unfused only: ``tracker.step(step=t, lr=lr)`` at theta_t on tracked steps;
4. test evaluation when ``t % eval_every == 0`` and at the final step;
5. write the step record;
6. ``optimizer.step()`` (theta_t -> theta_{t+1}), except after the final record.

So ``steps`` optimizer updates produce ``steps + 1`` records, the last one at the
final parameters. With ``target_loss`` the first step whose loss is at or below it
is the final record (tracked and evaluated, no update after it); with
``diverge_factor`` a loss above that multiple of the step-0 loss ends the run as
diverged, like a non-finite one.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from curvx.harness import metrics as _metrics
from curvx.harness.data import DATASETS, DataBundle, Split, load_dataset
from curvx.harness.losses import LOSS_REDUCTIONS, LOSSES, get_loss
from curvx.harness.models import (
    DEFAULT_DEPTH,
    DEFAULT_WIDTH,
    MODELS,
    build_model,
    model_facts,
    needs_images,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS",
    "RUN_FILES",
    "ConfigError",
    "TrainConfig",
    "build_run",
    "default_out_dir",
    "evaluate",
    "full_batch_loss_and_grad",
    "make_chunks",
    "make_optimizer",
    "resolve_device",
    "run_training",
    "stability_threshold",
]

OPTIMIZERS = ("gd", "momentum", "adam")

#: Files a run writes into its folder (removed first when overwriting).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "sharpness.png",
    "rotation.png",
)


class ConfigError(ValueError):
    """An invalid combination of settings, or a device that is not available."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (all recorded in ``config.json``).

    Attributes:
        lr: Learning rate (step size eta).
        steps: Number of optimizer updates (``steps + 1`` records).
        out: Run folder.
        dataset: One of :data:`curvx.harness.data.DATASETS`.
        data_dir: Folder holding the dataset files (default: the system copy).
        n_train: Training examples (first ones); ``None``: 5000 or all if fewer.
        n_test: Test examples (first ones); ``None``: 10000 or all if fewer.
        model: One of :data:`curvx.harness.models.MODELS`.
        depth: Hidden layers (fc) / linear layers (deep-linear); ``None``: default.
        width: Hidden units / conv channels; ``None``: model default.
        bias: Biases on/off; ``None``: on, except off for deep-linear.
        loss: ``"mse"`` or ``"ce"``.
        optimizer: ``"gd"``, ``"momentum"`` (heavy ball) or ``"adam"``.
        momentum: Heavy-ball coefficient beta.
        beta1: Adam's beta1.
        beta2: Adam's beta2.
        eps: Adam's epsilon.
        k: Number of top eigenpairs to track.
        lambda_min: Also track the most negative eigenvalue.
        track_every: Track every this many steps; 0 turns tracking off.
        eval_every: Evaluate on the test subset every this many steps; 0: only at
            the end.
        chunk_size: Examples per chunk for loss, gradient and HVPs; ``None``: all.
        tol: Tracker eigenvalue accuracy (relative to the sharpness scale; default
            1e-3, the accuracy EoS plots need); ``None``: the tracker's default
            for the model's dtype.
        fused: On tracked steps, let the tracker compute the training gradient
            (``tracker.step(backward=True)``: one forward and backward serve the
            update and the Hessian products). Then ``train_acc`` is computed on
            evaluation steps only (a separate no-grad pass), and ``step_seconds``
            is the fused step's time.
        track_method: Tracker ``method`` argument.
        seed: Seed for model initialization and the tracker.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"float32"`` or ``"float64"``.
        plots: Write PNG plots at the end.
        progress: Show a tqdm progress bar on stderr.
        overwrite: Replace the files of an existing run in ``out``.
        target_loss: Stop once the training loss is at or below this value (that
            step becomes the final record: tracked and evaluated); ``None``: run
            all ``steps``. ``summary["stopped"]`` says ``"target"`` then.
        diverge_factor: Call the run diverged (and stop) once the training loss
            exceeds this multiple of the loss at step 0; ``None``: only a
            non-finite loss or gradient counts as divergence.
        track_options: Further keyword arguments for :func:`curvx.track` (for
            example ``{"kato_temple": False}``); the tracker validates them.
    """

    lr: float
    steps: int
    out: str
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    model: str = "fc-tanh"
    depth: int | None = None
    width: int | None = None
    bias: bool | None = None
    loss: str = "mse"
    optimizer: str = "gd"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    k: int = 2
    lambda_min: bool = False
    track_every: int = 1
    eval_every: int = 10
    chunk_size: int | None = None
    tol: float | None = 1e-3
    fused: bool = True
    track_method: str = "auto"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    plots: bool = True
    progress: bool = True
    overwrite: bool = False
    target_loss: float | None = None
    diverge_factor: float | None = None
    track_options: dict | None = None

    def validate(self) -> None:
        """Checks ranges and choices.

        Raises:
            ConfigError: Naming the setting and the value received.
        """
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}"),
            (self.model in MODELS, f"model must be one of {MODELS}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.dtype in ("float32", "float64"), "dtype must be float32 or float64"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        positive = {"lr": self.lr}
        for name, val in positive.items():
            if not (math.isfinite(val) and val > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {val}")
        nonneg_int = {
            "steps": self.steps,
            "track_every": self.track_every,
            "eval_every": self.eval_every,
        }
        for name, val in nonneg_int.items():
            if val < 0:
                raise ConfigError(f"{name} must be >= 0, got {val}")
        at_least_one = {
            "k": self.k,
            "n_train": self.n_train,
            "chunk_size": self.chunk_size,
            "width": self.width,
        }
        for name, val in at_least_one.items():
            if val is not None and val < 1:
                raise ConfigError(f"{name} must be >= 1, got {val}")
        if self.n_test is not None and self.n_test < 0:
            raise ConfigError(f"n_test must be >= 0, got {self.n_test}")
        if self.depth is not None:
            low = 1 if self.model == "deep-linear" else 0
            if self.depth < low:
                raise ConfigError(
                    f"depth must be >= {low} for {self.model}, got {self.depth}"
                )
        for name in ("momentum", "beta1", "beta2"):
            val = getattr(self, name)
            if not 0 <= val < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {val}")
        if self.tol is not None and not self.tol > 0:
            raise ConfigError(f"tol must be > 0, got {self.tol}")
        if self.target_loss is not None and not (
            math.isfinite(self.target_loss) and self.target_loss >= 0
        ):
            raise ConfigError(
                f"target_loss must be a finite number >= 0 (mse and ce are never "
                f"negative), got {self.target_loss}"
            )
        if self.track_options and self.track_every == 0:
            raise ConfigError(
                f"track_options {sorted(self.track_options)} given but tracking is "
                "off (track_every=0)"
            )
        if self.diverge_factor is not None and not (
            math.isfinite(self.diverge_factor) and self.diverge_factor > 1
        ):
            raise ConfigError(
                f"diverge_factor must be a finite number > 1, got {self.diverge_factor}"
            )
        if self.track_options is not None and not isinstance(self.track_options, dict):
            raise ConfigError(
                "track_options must be a dict of curvx.track keyword arguments, "
                f"got {type(self.track_options).__name__}"
            )
        reserved = {"model", "loss_fn", "data", "k", "lambda_min", "chunk_size"}
        reserved |= {"tol", "seed", "method", "mode", "optimizer"}
        clash = sorted(reserved & set(self.track_options or {}))
        if clash:
            raise ConfigError(
                f"track_options may not set {clash}: they have their own settings"
            )


def default_out_dir(
    dataset: str, model: str, loss: str, lr: float, seed: int, root: str = "runs"
) -> str:
    """``runs/<dataset>-<model>-<loss>-lr<lr>-s<seed>`` (lr in shortest form)."""
    return os.path.join(root, f"{dataset}-{model}-{loss}-lr{lr:g}-s{seed}")


def resolve_device(name: str) -> torch.device:
    """Maps ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"`` to an available device.

    Raises:
        ConfigError: CUDA requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use --device cpu or --device auto"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return device


def stability_threshold(cfg: TrainConfig) -> tuple[float, str, str]:
    """The step-size stability threshold for the sharpness and how it is defined.

    Returns:
        ``(value, rule, note)``: ``2/lr`` for GD; ``2(1+beta)/lr`` for heavy-ball
        momentum; ``(2+2*beta1)/((1-beta1)*lr)`` for Adam, which applies to the
        *preconditioned* sharpness, which is what the tracker then reports (it is
        given the optimizer and reads Adam's state).
    """
    lr = cfg.lr
    if cfg.optimizer == "gd":
        return 2.0 / lr, "2/lr", "GD is stable on a quadratic iff sharpness < 2/lr"
    if cfg.optimizer == "momentum":
        b = cfg.momentum
        return (
            2.0 * (1.0 + b) / lr,
            "2(1+beta)/lr",
            "heavy-ball momentum threshold for the plain sharpness",
        )
    b1 = cfg.beta1
    return (
        (2.0 + 2.0 * b1) / ((1.0 - b1) * lr),
        "(2+2*beta1)/((1-beta1)*lr)",
        "Adam's threshold applies to the preconditioned sharpness "
        "lambda_max(P^-1/2 H P^-1/2), P = (1-beta1^t)(sqrt(v_hat)+eps) from Adam's "
        "state, which is what the tracker reports (the plain Hessian before the "
        "first update, when Adam has no state yet)",
    )


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """``gd``: SGD(momentum=0); ``momentum``: SGD(momentum=beta), i.e. heavy ball
    (theta_{t+1} = theta_t - lr g_t + beta (theta_t - theta_{t-1})); ``adam``: Adam.
    No weight decay, no dampening, no Nesterov.
    """
    if cfg.optimizer == "gd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_chunks(split: Split, loss: str, chunk_size: int | None) -> list[Chunk]:
    """Splits a dataset split into consecutive chunks covering every example once.

    Args:
        split: The split.
        loss: Loss name (selects one-hot or label targets).
        chunk_size: Examples per chunk; the last chunk holds the remainder.
            ``None`` (or >= N): one chunk.

    Returns:
        A list of ``(x_c [n_c, ...], target_c, labels_c [n_c])`` views.
    """
    n = len(split)
    if n == 0:
        return []
    size = n if chunk_size is None else min(chunk_size, n)
    targets = split.targets(loss)
    return [
        (split.x[i : i + size], targets[i : i + size], split.y[i : i + size])
        for i in range(0, n, size)
    ]


def full_batch_loss_and_grad(
    model: nn.Module, loss_fn, chunks: list[Chunk]
) -> tuple[float, float]:
    """Full-batch mean loss and its gradient, accumulated chunk by chunk.

    Computes ``L = sum_c (n_c / N) loss_fn(model(x_c), t_c)`` and leaves ``dL/dtheta``
    in each parameter's ``.grad`` (previous gradients are discarded).

    Args:
        model: The model (its current mode is used).
        loss_fn: Mean-reduced loss ``loss_fn(output, target)``.
        chunks: Output of :func:`make_chunks`.

    Returns:
        ``(loss, accuracy)`` over all ``N`` examples, as Python floats.
    """
    n = sum(c[0].shape[0] for c in chunks)
    for p in model.parameters():
        p.grad = None
    total = torch.zeros((), dtype=torch.float64, device=chunks[0][0].device)
    correct = torch.zeros((), dtype=torch.int64, device=chunks[0][0].device)
    for x, t, y in chunks:
        out = model(x)
        loss_c = loss_fn(out, t) * (x.shape[0] / n)
        loss_c.backward()
        total += loss_c.detach().double()
        correct += (out.detach().argmax(dim=1) == y).sum()
    return total.item(), correct.item() / n


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn, chunks: list[Chunk]) -> tuple[float, float]:
    """Mean loss and accuracy over ``chunks`` without gradients, in eval mode.

    Returns:
        ``(loss, accuracy)``; ``(nan, nan)`` for no chunks.
    """
    if not chunks:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    try:
        n = sum(c[0].shape[0] for c in chunks)
        total = 0.0
        correct = 0
        for x, t, y in chunks:
            out = model(x)
            total += loss_fn(out, t).double().item() * (x.shape[0] / n)
            correct += (out.argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    return total, correct / n


def _grad_norm(model: nn.Module) -> float:
    sq = [
        p.grad.double().square().sum() for p in model.parameters() if p.grad is not None
    ]
    return torch.stack(sq).sum().sqrt().item() if sq else 0.0


def _versions() -> dict:
    import numpy

    try:
        import curvx

        curvx_version = getattr(curvx, "__version__", None)
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        curvx_version = f"unavailable: {exc!r}"
    try:
        from curvx import _ops

        extension = _ops.extension_status()
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        extension = {"loaded": False, "error": repr(exc)}
    return {
        "curvx": curvx_version,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "extension": extension,
    }


def _device_facts(device: torch.device) -> dict:
    facts = {
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        facts["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    return facts


def _prepare_out_dir(out: Path, overwrite: bool, *, check_only: bool = False) -> None:
    """Refuses an occupied run folder unless ``overwrite``; then clears our files."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"run folder {out} already holds {', '.join(existing)}; choose another "
            "--out or pass --overwrite"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run folder {out} exists and is not a folder")
    if check_only:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TRACK_RENAMES = {
    "status": "track_status",
    "method": "track_method",
    "loss": "track_loss",
    "message": "track_message",
}
# Dropped: step and lr duplicate the record's own; the tracker's threshold is 2/lr
# whatever the optimizer (the run's threshold is in config.json and summary.json).
_TRACK_DROPPED = ("step", "lr", "threshold")


def _track_fields(d: dict) -> dict:
    """Maps a tracker record's ``as_dict()`` to step-record keys.

    Keys of :data:`curvx.harness.metrics.TRACK_KEYS` keep their names; ``status``,
    ``method``, ``loss`` and ``message`` get a ``track_`` prefix, as does any other
    key not already a step-record key.
    """
    out = {}
    for key, val in d.items():
        if key in _TRACK_DROPPED:
            continue
        if key in _TRACK_RENAMES:
            key = _TRACK_RENAMES[key]
        elif key not in _metrics.TRACK_KEYS and not key.startswith("track_"):
            key = "track_" + key
        out[key] = val
    return out


def _architecture(cfg: TrainConfig) -> tuple[int, int, bool]:
    """``(depth, width, bias)`` of ``cfg``'s model, defaults filled in."""
    depth = DEFAULT_DEPTH[cfg.model] if cfg.depth is None else cfg.depth
    width = DEFAULT_WIDTH[cfg.model] if cfg.width is None else cfg.width
    bias = (cfg.model != "deep-linear") if cfg.bias is None else cfg.bias
    return depth, width, bias


def build_run(
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    n_test: int | None = None,
) -> tuple[DataBundle, nn.Module]:
    """The data and the seeded initial model of the run ``cfg`` describes.

    Args:
        cfg: The settings.
        device, dtype: Where and in what precision (resolved from ``cfg``).
        n_test: Test examples to load; ``None``: ``cfg.n_test``.

    Returns:
        ``(data, model)``, the model in train mode.
    """
    data = load_dataset(
        cfg.dataset,
        n_train=cfg.n_train,
        n_test=cfg.n_test if n_test is None else n_test,
        data_dir=cfg.data_dir,
        flatten=not needs_images(cfg.model),
        device=device,
        dtype=dtype,
    )
    depth, width, bias = _architecture(cfg)
    model = build_model(
        cfg.model,
        data.image_shape,
        data.n_classes,
        depth=depth,
        width=width,
        bias=bias,
        seed=cfg.seed,
        device=device,
        dtype=dtype,
    )
    return data, model


def run_training(cfg: TrainConfig, *, command: list[str] | None = None) -> dict:
    """Runs one training job and writes its run folder.

    Args:
        cfg: The settings.
        command: The command line to record (defaults to ``sys.argv``).

    Returns:
        The summary (also written to ``summary.json``); ``summary["status"]`` is
        ``"completed"`` or ``"diverged"``.

    Raises:
        ConfigError: Invalid settings, unavailable device, occupied run folder.
        curvx.harness.data.DatasetError: Missing or malformed data.
        KeyboardInterrupt: Re-raised after writing the summary (status
            ``"interrupted"``).
    """
    cfg.validate()
    wall0 = time.perf_counter()
    start_time = datetime.datetime.now(datetime.timezone.utc).isoformat()
    device = resolve_device(cfg.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    out = Path(cfg.out)
    _prepare_out_dir(out, cfg.overwrite, check_only=True)  # fail before the work

    data, model = build_run(cfg, device, dtype)
    depth, width, bias = _architecture(cfg)
    loss_fn = get_loss(cfg.loss)
    train_chunks = make_chunks(data.train, cfg.loss, cfg.chunk_size)
    test_chunks = make_chunks(data.test, cfg.loss, cfg.chunk_size)
    optimizer = make_optimizer(cfg, model.parameters())
    threshold, threshold_rule, threshold_note = stability_threshold(cfg)

    tracker = None
    if cfg.track_every > 0:
        import curvx

        try:
            tracker = curvx.track(
                model,
                loss_fn,
                [(x, t) for x, t, _ in train_chunks],
                k=cfg.k,
                lambda_min=cfg.lambda_min,
                chunk_size=None,
                tol=cfg.tol,
                seed=cfg.seed,
                method=cfg.track_method,
                mode="eval",
                optimizer=optimizer,
                **(cfg.track_options or {}),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"tracker settings rejected: {exc}") from exc

    if command is None:
        command = list(sys.argv)
    config = {
        "settings": dataclasses.asdict(cfg),
        "command": shlex.join(command),
        "argv": command,
        "start_time": start_time,
        "cwd": os.getcwd(),
        "versions": _versions(),
        "device": _device_facts(device),
        "dtype": cfg.dtype,
        "dataset": data.info,
        "model": {
            "name": cfg.model,
            "depth": depth,
            "width": width,
            "bias": bias,
            "init": f"PyTorch default init under torch.manual_seed({cfg.seed}) "
            "(global RNG forked), float32 on CPU, then cast/moved",
            **model_facts(model),
        },
        "loss": {"name": cfg.loss, "reduction": LOSS_REDUCTIONS[cfg.loss]},
        "optimizer": {
            "name": cfg.optimizer,
            "torch": repr(optimizer).splitlines()[0].strip(" ("),
            "defaults": optimizer.defaults,
            "threshold": threshold,
            "threshold_rule": threshold_rule,
            "threshold_note": threshold_note,
        },
        "full_batch": {
            "n": len(data.train),
            "chunk_size": cfg.chunk_size,
            "n_chunks": len(train_chunks),
            "chunk_sizes": [c[0].shape[0] for c in train_chunks],
            "rule": "loss = sum over chunks of (n_c / N) * mean chunk loss; every "
            "training example once; the tracker gets the same chunks",
        },
        "tracking": {
            "enabled": tracker is not None,
            "every": cfg.track_every,
            "k": cfg.k,
            "lambda_min": cfg.lambda_min,
            "tol": cfg.tol,
            "fused": cfg.fused,
            "method": cfg.track_method,
            "mode": "eval",
            "seed": cfg.seed,
            "quantity": "eigenpairs of the Hessian of the training loss above "
            + (
                "preconditioned by Adam's state: P^-1/2 H P^-1/2"
                if cfg.optimizer == "adam"
                else "(plain)"
            ),
            "policy": getattr(tracker, "policy", None),
        },
        "step_order": "at theta_t: full-batch loss+grad (on tracked steps, t % every "
        "== 0 or final, from the fused tracker.step(backward=True) unless "
        "--unfused, then tracker.step after it); test eval (t % eval_every == 0 or "
        "final); write record; optimizer.step(). steps updates -> steps+1 records; "
        "with target_loss, the first step at or below it is the final record "
        "(tracked, evaluated); with diverge_factor, a loss above that multiple of "
        "the step-0 loss ends the run as diverged",
        "metrics_keys": list(_metrics.RECORD_KEYS),
        "metrics_notes": "keys are always present; null when not computed at that "
        "step (test_* off eval steps, tracker keys off tracked steps) or when the "
        "value was not finite",
    }
    _prepare_out_dir(out, cfg.overwrite)
    _metrics.write_json(out / "config.json", config)

    # Every row has every key (null when not computed), the tracker's too
    record_keys = list(_metrics.RECORD_KEYS)
    if tracker is not None:
        blank = {f.name: None for f in dataclasses.fields(curvx.TrackRecord)}
        record_keys += [k for k in _track_fields(blank) if k not in record_keys]
    records: list[dict] = []
    status = "error"
    extra: dict = {}
    writer = _metrics.MetricsWriter(out / "metrics.jsonl")
    n_track_failures = 0
    pbar = None
    try:
        from tqdm.auto import tqdm

        pbar = tqdm(
            range(cfg.steps + 1),
            disable=not cfg.progress,
            dynamic_ncols=True,
            desc=f"{cfg.dataset}/{cfg.model}/{cfg.loss} lr={cfg.lr:g}",
            file=sys.stderr,
        )
        model.train()
        loop0 = time.perf_counter()
        loss0 = None
        for t in pbar:
            final = t == cfg.steps
            record = dict.fromkeys(record_keys)
            record.update(step=t, lr=cfg.lr, status="ok")

            tracked = tracker is not None and (t % cfg.track_every == 0 or final)
            rec = None
            _sync(device)
            t0 = time.perf_counter()
            if tracked and cfg.fused:
                # The fused step: the tracker's forward and first backward fill
                # .grad and serve the Hessian products
                for p in model.parameters():
                    p.grad = None
                try:
                    rec = tracker.step(step=t, lr=cfg.lr, backward=True)
                except Exception as exc:  # noqa: BLE001 - run continues, recorded
                    n_track_failures += 1
                    record["track_status"] = f"failed: {type(exc).__name__}: {exc}"
                    logger.warning(
                        "tracking failed at step %d: %r", t, exc, exc_info=True
                    )
            have_grad = rec is not None and rec.loss is not None
            have_grad = have_grad and all(
                p.grad is not None for p in model.parameters() if p.requires_grad
            )
            if have_grad:
                loss, acc = rec.loss, None
            else:
                loss, acc = full_batch_loss_and_grad(model, loss_fn, train_chunks)
            grad_norm = _grad_norm(model)
            _sync(device)
            record.update(
                train_loss=loss,
                train_acc=acc,
                grad_norm=grad_norm,
                step_seconds=time.perf_counter() - t0,
            )
            if rec is not None:
                record.update(_track_fields(rec.as_dict()))
            if loss0 is None:
                loss0 = loss
            runaway = (
                cfg.diverge_factor is not None
                and math.isfinite(loss)
                and loss > cfg.diverge_factor * abs(loss0)
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)) or runaway:
                record["status"] = "diverged"
                record["elapsed_seconds"] = time.perf_counter() - loop0
                writer.write(record)
                records.append(record)
                status = "diverged"
                extra["diverged_at_step"] = t
                if runaway:
                    extra["diverged_because"] = (
                        f"train loss {loss:.6g} > diverge_factor "
                        f"{cfg.diverge_factor:g} x step-0 loss {loss0:.6g}"
                    )
                logger.info(
                    "diverged at step %d (loss %r, grad norm %r)", t, loss, grad_norm
                )
                break

            # The loss target makes this the final record: tracked and evaluated
            at_target = cfg.target_loss is not None and loss <= cfg.target_loss
            last = final or at_target
            evaluating = last or (cfg.eval_every > 0 and t % cfg.eval_every == 0)
            late = last and not tracked  # the loss target ended the run here
            if tracker is not None and ((tracked and not cfg.fused) or late):
                try:
                    rec = tracker.step(step=t, lr=cfg.lr)
                    record.update(_track_fields(rec.as_dict()))
                except Exception as exc:  # noqa: BLE001 - run continues, recorded
                    n_track_failures += 1
                    record["track_status"] = f"failed: {type(exc).__name__}: {exc}"
                    logger.warning(
                        "tracking failed at step %d: %r", t, exc, exc_info=True
                    )
            if evaluating and record["train_acc"] is None:
                record["train_acc"] = evaluate(model, loss_fn, train_chunks)[1]
            if test_chunks and evaluating:
                record["test_loss"], record["test_acc"] = evaluate(
                    model, loss_fn, test_chunks
                )
            record["elapsed_seconds"] = time.perf_counter() - loop0
            writer.write(record)
            records.append(record)

            postfix = {"loss": f"{loss:.4g}"}
            if record["sharpness"] is not None:
                postfix["S"] = f"{record['sharpness']:.4g}"
            postfix[threshold_rule] = f"{threshold:.4g}"
            pbar.set_postfix(postfix, refresh=False)

            if at_target:
                extra["stopped"] = "target"
                extra["target_reached_at_step"] = t
                status = "completed"
                break
            if not final:
                optimizer.step()
        else:
            status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as exc:
        status = "error"
        extra["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if pbar is not None:
            pbar.close()
        writer.close()
        extra["n_track_failures"] = n_track_failures
        extra["out"] = str(out)
        extra["threshold_rule"] = threshold_rule
        if cfg.optimizer == "adam":
            extra["adam_threshold"] = threshold
            extra["threshold_note"] = threshold_note
        if tracker is not None:  # the HVP path resolved during the run
            extra["tracking_policy"] = tracker.policy
        summary = _metrics.summarize(
            records,
            # (for Adam, the tracked sharpness is the preconditioned one)
            threshold=threshold,
            status=status,
            wall_seconds=time.perf_counter() - wall0,
            extra=extra,
        )
        _metrics.write_json(out / "summary.json", summary)
        if cfg.plots:
            try:
                from curvx.harness.plots import plot_run

                plot_run(out)
            except Exception as exc:  # noqa: BLE001 - plots never sink a run
                logger.warning("plotting failed: %r", exc)
    return summary
