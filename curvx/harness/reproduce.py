"""``curvx reproduce``: the edge-of-stability findings in one command.

Runs the experiments of Wang & Roberts (2024) and Cohen et al. (2021, 2022) on real
data with the public curvx API, keeps every run folder, and writes a Markdown
report with PNG figures (:mod:`curvx.harness.report`):

1. ``eos``: fc-tanh, MSE, full-batch GD at three learning rates whose thresholds
   2/lr lie above the initial sharpness lambda_0: progressive sharpening up to 2/lr,
   then the edge of stability.
2. ``rotation``: the same runs, read for the rotation of the top eigenvectors at
   the instabilities (no runs of its own).
3. ``depth``: deep linear networks (depth 1 to 4, MSE) at learning rates around and
   past 2/lambda_0: no rotation at depth 1, rotation beyond.
4. ``sweep``: a x2 grid of learning rates from well below 2/lambda_0 up to
   divergence, MSE and cross entropy, several seeds; test accuracy, final sharpness
   and accumulated rotation against lr.
5. ``optim``: heavy-ball momentum and Adam at the edge of stability, against their
   thresholds 2(1+beta)/lr and (2+2 beta1)/((1-beta1) lr).
6. ``uv``: the two-parameter catapult of science.md, its trajectory on the loss
   surface with the top eigenvector along it.

Learning rates are set from lambda_0, the sharpness at initialization, measured by
a certified :func:`curvx.eigsh` on the very model a run starts from (the probe,
kept in ``probes.json``), so a different model or data set gets the same design.

Layout of the output folder::

    OUT/plan.json                 size, settings, command, probes used
    OUT/probes.json               lambda_0 per (experiment, model, loss, seed)
    OUT/<experiment>/<run>/       curvx train run folders (config, metrics, ...)
    OUT/uv/trajectory.jsonl       the uv model's steps
    OUT/report.md, OUT/figures/   the report

Every run is resumable at run granularity: a folder whose ``summary.json`` says
``completed`` or ``diverged`` and whose settings match is skipped; an unfinished one
is run again from its start (runs do not checkpoint their parameters); a finished
one with other settings is an error unless ``redo`` is set.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from curvx.harness import metrics as _metrics
from curvx.harness.train import ConfigError, TrainConfig, run_training

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENTS",
    "SIZES",
    "ReproduceError",
    "Size",
    "reproduce",
    "run_uv",
]

EXPERIMENTS = ("eos", "rotation", "depth", "sweep", "optim", "uv")

#: Settings a finished run must share with the plan to be reused (the rest, such as
#: progress bars, do not change the numbers).
_IGNORED_SETTINGS = ("out", "progress", "plots", "overwrite")


class ReproduceError(RuntimeError):
    """A run folder holds a finished run with other settings, or bad options."""


@dataclasses.dataclass(frozen=True)
class Size:
    """How big each experiment is. :data:`SIZES` holds ``quick`` and ``full``.

    Learning rates are given relative to lambda_0 (the probed initial sharpness):
    ``eos_ratios`` are ``threshold / lambda_0`` (lr = 2 / (ratio * lambda_0)),
    ``depth_factors`` and the sweep's powers of two multiply ``2 / lambda_0``.
    """

    name: str
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "fc-tanh"
    width: int | None = None
    n_train: int = 5000
    n_test: int = 10000
    k: int = 2
    eval_every: int = 50
    # 1-2. edge of stability and rotation
    eos_ratios: tuple[float, ...] = (1.05, 1.15, 1.3)
    eos_steps: int = 800
    # 3. depth (deep linear networks, MSE)
    depths: tuple[int, ...] = (1, 2, 3, 4)
    depth_factors: tuple[float, ...] = (1.25, 2.0)
    depth_steps: int = 60
    depth_n_train: int = 2000
    depth_width: int | None = 100
    depth_dtype: str = "float64"
    # 4. learning-rate sweep
    sweep_losses: tuple[str, ...] = ("mse", "ce")
    sweep_min_power: int = -2
    sweep_max_power: int = 6
    sweep_seeds: tuple[int, ...] = (0, 1, 2)
    sweep_steps: int = 1000
    sweep_n_train: int = 2000
    sweep_target: tuple[tuple[str, float], ...] = (("mse", 0.15), ("ce", 0.1))
    sweep_track_every: int = 5
    sweep_diverge_factor: float = 100.0
    # 5. optimizers
    momentum_beta: float = 0.9
    momentum_ratio: float = 1.2
    momentum_steps: int = 600
    adam_lr: float = 2e-3
    adam_steps: int = 600
    # 6. uv toy model
    uv_steps: int = 120

    def target(self, loss: str) -> float | None:
        return dict(self.sweep_target).get(loss)


SIZES = {
    "full": Size(name="full"),
    "quick": Size(
        name="quick",
        width=16,
        n_train=200,
        n_test=200,
        eval_every=10,
        eos_steps=40,
        depths=(1, 2),
        depth_factors=(1.5,),
        depth_steps=15,
        depth_n_train=200,
        depth_width=16,
        sweep_min_power=-1,
        sweep_max_power=1,
        sweep_seeds=(0, 1),
        sweep_steps=20,
        sweep_n_train=200,
        momentum_steps=20,
        adam_steps=20,
        uv_steps=40,
    ),
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Probes:
    """lambda_0 per model/loss/seed, measured once and kept in ``probes.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, dict] = {}
        if path.is_file():
            try:
                self.values = _metrics.read_json(path)
            except (OSError, ValueError) as exc:
                raise ReproduceError(f"{path} is not readable JSON ({exc})") from None
            if not isinstance(self.values, dict):
                raise ReproduceError(f"{path} is not a curvx probes file")

    def get(self, cfg: TrainConfig) -> float:
        """The certified top eigenvalue of the Hessian at ``cfg``'s initial model."""
        key = _probe_key(cfg)
        hit = self.values.get(key)
        if hit is not None:
            return float(hit["lambda0"])
        lam, info = _probe(cfg)
        self.values[key] = {"lambda0": lam, **info}
        _metrics.write_json(self.path, self.values)
        return lam


def _probe_key(cfg: TrainConfig) -> str:
    data_dir = None if cfg.data_dir is None else str(Path(cfg.data_dir).resolve())
    parts = [
        cfg.dataset,
        data_dir or "default",
        f"n{cfg.n_train}",
        cfg.model,
        f"d{cfg.depth}",
        f"w{cfg.width}",
        f"b{cfg.bias}",
        cfg.loss,
        cfg.dtype,
        f"s{cfg.seed}",
    ]
    return "/".join(str(p) for p in parts)


def _probe(cfg: TrainConfig) -> tuple[float, dict]:
    """Builds the run's initial model and data as :func:`run_training` does and
    measures its sharpness with a certified one-off solve."""
    import curvx
    from curvx.harness.losses import get_loss
    from curvx.harness.train import build_run, make_chunks, resolve_device

    device = resolve_device(cfg.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    data, model = build_run(cfg, device, dtype, n_test=0)
    chunks = make_chunks(data.train, cfg.loss, cfg.chunk_size)
    t0 = time.perf_counter()
    res = curvx.eigsh(
        model,
        get_loss(cfg.loss),
        [(x, t) for x, t, _ in chunks],
        k=1,
        which="LA",
        tol=1e-5 if cfg.dtype == "float32" else 1e-8,
        seed=cfg.seed,
    )
    if not bool(res.converged.all()):
        raise ReproduceError(
            f"the initial sharpness of {_probe_key(cfg)} did not converge "
            f"(residual {float(res.residuals[0]):.3g}); cannot set learning rates"
        )
    info = {
        "residual": float(res.residuals[0]),
        "hvps": int(res.hvps),
        "seconds": time.perf_counter() - t0,
        "measured_at": _now(),
    }
    return float(res.eigenvalues[0]), info


def _settings(cfg: TrainConfig) -> dict:
    d = json.loads(json.dumps(_metrics.json_safe(dataclasses.asdict(cfg))))
    for key in _IGNORED_SETTINGS:
        d.pop(key, None)
    return d


def _run_state(cfg: TrainConfig) -> str:
    """``"missing"``, ``"unfinished"``, ``"complete"`` or ``"other-settings"``."""
    out = Path(cfg.out)
    summary_path, config_path = out / "summary.json", out / "config.json"
    if not config_path.is_file() and not (out / "metrics.jsonl").is_file():
        return "missing"
    if not (summary_path.is_file() and config_path.is_file()):
        return "unfinished"
    try:
        summary = _metrics.read_json(summary_path)
        config = _metrics.read_json(config_path)
    except (OSError, ValueError):
        return "unfinished"
    if not isinstance(summary, dict) or not isinstance(config, dict):
        return "unfinished"
    if summary.get("status") not in ("completed", "diverged"):
        return "unfinished"
    if _last_step(out / "metrics.jsonl") != summary.get("last_step"):
        return "unfinished"  # metrics cut short or replaced after the summary
    have = dict(config.get("settings", {}))
    for key in _IGNORED_SETTINGS:
        have.pop(key, None)
    return "complete" if have == _settings(cfg) else "other-settings"


def _last_step(path: Path) -> int | None:
    """The step of the last complete record of ``metrics.jsonl``, or None."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _differences(cfg: TrainConfig) -> str:
    config = _metrics.read_json(Path(cfg.out) / "config.json")
    have, want = config.get("settings", {}), _settings(cfg)
    diff = [
        f"{k}: {have.get(k)!r} there, {want.get(k)!r} now"
        for k in sorted(want)
        if have.get(k) != want.get(k)
    ]
    return "; ".join(diff)


class _Runner:
    """Runs (or reuses) run folders and keeps ``plan.json`` up to date: each run
    is listed under its experiment before it starts, so a report of an
    interrupted reproduction covers every run that finished."""

    def __init__(
        self, out: Path, plan: dict, redo: bool, progress: bool, log: Callable
    ):
        self.out = out
        self.plan = plan
        self.redo = redo
        self.progress = progress
        self.log = log
        self.done: list[dict] = []

    def save(self) -> None:
        _metrics.write_json(self.out / "plan.json", self.plan)

    def note(self, experiment: str, **info) -> None:
        """Records facts of ``experiment`` (lambda_0, say) in the plan."""
        self.plan["experiments"].setdefault(experiment, {"runs": []}).update(info)
        self.save()

    def run(self, experiment: str, name: str, cfg: TrainConfig, **meta) -> dict:
        """Runs ``cfg`` in ``OUT/experiment/name`` unless it is already complete.

        ``meta`` (lr, seed, ...) is listed with the run in the plan.

        Returns:
            The run's summary.
        """
        cfg = dataclasses.replace(
            cfg, out=str(self.out / experiment / name), progress=self.progress
        )
        state = _run_state(cfg)
        if state == "other-settings" and not self.redo:
            raise ReproduceError(
                f"{cfg.out} holds a finished run with other settings "
                f"({_differences(cfg)}); pass --redo to run it again, or choose "
                "another --out"
            )
        entry = self.plan["experiments"].setdefault(experiment, {"runs": []})
        entry["runs"] = [r for r in entry["runs"] if r["name"] != name]
        entry["runs"].append({"name": name, **meta})
        self.save()
        if state == "complete" and not self.redo:
            self.log(f"{experiment}/{name}: complete, reused")
            summary = _metrics.read_json(Path(cfg.out) / "summary.json")
            self.done.append({"run": f"{experiment}/{name}", "reused": True})
            return summary
        if state == "unfinished":
            self.log(f"{experiment}/{name}: unfinished, running again from step 0")
        cfg = dataclasses.replace(cfg, overwrite=True)
        command = ["curvx", "train", *_train_argv(cfg)]
        summary = run_training(cfg, command=command)
        self.log(
            f"{experiment}/{name}: {summary['status']} at step "
            f"{summary['last_step']} in {summary['wall_seconds']:.1f} s"
        )
        self.done.append({"run": f"{experiment}/{name}", "reused": False})
        return summary


def _train_argv(cfg: TrainConfig) -> list[str]:
    """A ``curvx train`` command line that reproduces ``cfg`` (for the record)."""
    argv = []
    defaults = TrainConfig(lr=1.0, steps=0, out="")
    flags = {
        "lr": "--lr",
        "steps": "--steps",
        "out": "--out",
        "dataset": "--dataset",
        "data_dir": "--data-dir",
        "n_train": "--n-train",
        "n_test": "--n-test",
        "model": "--model",
        "depth": "--depth",
        "width": "--width",
        "loss": "--loss",
        "optimizer": "--optimizer",
        "momentum": "--momentum",
        "beta1": "--beta1",
        "k": "--k",
        "track_every": "--track-every",
        "eval_every": "--eval-every",
        "tol": "--tol",
        "seed": "--seed",
        "dtype": "--dtype",
        "target_loss": "--target-loss",
        "diverge_factor": "--diverge-factor",
    }
    for field, flag in flags.items():
        val = getattr(cfg, field)
        if field in ("lr", "steps", "out") or val != getattr(defaults, field):
            if val is not None:
                argv += [flag, repr(val) if isinstance(val, float) else str(val)]
    for key, val in (cfg.track_options or {}).items():
        argv += ["--track-option", f"{key}={json.dumps(val)}"]
    return argv


def _base(size: Size, **kw) -> TrainConfig:
    base = {
        "lr": 1.0,
        "steps": 0,
        "out": "",
        "dataset": size.dataset,
        "data_dir": size.data_dir,
        "n_train": size.n_train,
        "n_test": size.n_test,
        "model": size.model,
        "width": size.width,
        "k": size.k,
        "eval_every": size.eval_every,
        "plots": True,
    }
    base.update(kw)
    return TrainConfig(**base)


def _lr_name(lr: float) -> str:
    return f"lr{lr:.4g}"


def run_eos(size: Size, runner: _Runner, probes: _Probes) -> None:
    """Experiment 1 (and the runs of 2): MSE GD at three thresholds above lambda_0."""
    base = _base(size, loss="mse", steps=size.eos_steps)
    lam0 = probes.get(base)
    runner.note("eos", lambda0=lam0)
    for ratio in size.eos_ratios:
        lr = 2.0 / (ratio * lam0)
        name = f"{_lr_name(lr)}-thr{ratio:g}x"
        runner.run("eos", name, dataclasses.replace(base, lr=lr), lr=lr, ratio=ratio)


def run_depth(size: Size, runner: _Runner, probes: _Probes) -> None:
    """Experiment 3: deep linear networks of each depth, lr = factor * 2/lambda_0.

    Runs in ``depth_dtype`` (float64 by default) with residual certificates
    (``kato_temple=False``) so that the eigenvectors, and so the rotation, are
    accurate to the solver's tolerance: depth 1 must show none.
    """
    for depth in size.depths:
        base = _base(
            size,
            model="deep-linear",
            depth=depth,
            width=size.depth_width,
            n_train=size.depth_n_train,
            loss="mse",
            steps=size.depth_steps,
            dtype=size.depth_dtype,
            tol=1e-6 if size.depth_dtype == "float64" else 1e-4,
            track_options={"kato_temple": False},
            diverge_factor=1e6,
        )
        lam0 = probes.get(base)
        for factor in size.depth_factors:
            lr = factor * 2.0 / lam0
            name = f"depth{depth}-{factor:g}x"
            cfg = dataclasses.replace(base, lr=lr)
            meta = {"depth": depth, "factor": factor, "lr": lr, "lambda0": lam0}
            runner.run("depth", name, cfg, **meta)


def run_sweep(size: Size, runner: _Runner, probes: _Probes) -> None:
    """Experiment 4: lr = 2^p * 2/lambda_0 from ``sweep_min_power`` up, until
    every seed diverges (or ``sweep_max_power``), for each loss."""
    lambda0: dict[str, float] = {}
    for loss in size.sweep_losses:
        base = _base(
            size,
            loss=loss,
            n_train=size.sweep_n_train,
            steps=size.sweep_steps,
            k=1,
            track_every=size.sweep_track_every,
            eval_every=0,
            target_loss=size.target(loss),
            diverge_factor=size.sweep_diverge_factor,
        )
        lam0 = probes.get(dataclasses.replace(base, seed=size.sweep_seeds[0]))
        lambda0[loss] = lam0
        runner.note("sweep", lambda0=dict(lambda0))
        for power in range(size.sweep_min_power, size.sweep_max_power + 1):
            lr = 2.0**power * 2.0 / lam0
            statuses = []
            for seed in size.sweep_seeds:
                name = f"{loss}-p{power:+d}-s{seed}"
                cfg = dataclasses.replace(base, lr=lr, seed=seed)
                meta = {"loss": loss, "power": power, "lr": lr, "seed": seed}
                statuses.append(runner.run("sweep", name, cfg, **meta)["status"])
            if all(s == "diverged" for s in statuses):
                break


def run_optim(size: Size, runner: _Runner, probes: _Probes) -> None:
    """Experiment 5: heavy-ball momentum and Adam at their edges of stability
    (top-1 only: the plateau needs the sharpness alone)."""
    base = _base(size, loss="mse", k=1)
    lam0 = probes.get(base)
    runner.note("optim", lambda0=lam0)
    beta = size.momentum_beta
    lr_m = 2.0 * (1.0 + beta) / (size.momentum_ratio * lam0)
    cfg = dataclasses.replace(
        base, optimizer="momentum", momentum=beta, lr=lr_m, steps=size.momentum_steps
    )
    runner.run("optim", f"momentum-b{beta:g}", cfg, optimizer="momentum", lr=lr_m)
    cfg = dataclasses.replace(
        base, optimizer="adam", beta1=0.9, lr=size.adam_lr, steps=size.adam_steps
    )
    name = f"adam-{_lr_name(size.adam_lr)}"
    runner.run("optim", name, cfg, optimizer="adam", lr=size.adam_lr)


# The uv model of science.md: L(a, b) = 1/2 (a b - y)^2 from (3, 0.4), eta = 0.3.
UV_START = (3.0, 0.4)
UV_TARGET = 1.0
UV_LR = 0.3


class _UV(torch.nn.Module):
    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1] -> [N]
        return (self.a * self.b).expand(x.shape[0])


def _uv_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - target).square().mean()


def run_uv(out_dir: Path, steps: int, redo: bool = False) -> dict:
    """Experiment 6: GD on the uv model with the tracker, one record per step.

    Writes ``trajectory.jsonl`` (``step, a, b, loss, sharpness, eigvec [2],
    rotation_top1``) and ``summary.json`` into ``out_dir``.
    """
    import curvx

    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    if summary_path.is_file() and not redo:
        summary = _metrics.read_json(summary_path)
        if summary.get("steps") == steps and summary.get("status") == "completed":
            return summary
    model = _UV(*UV_START)
    x = torch.zeros(1, 1, dtype=torch.float64)
    y = torch.full((1,), UV_TARGET, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=UV_LR)
    tracker = curvx.track(model, _uv_loss, (x, y), k=1, optimizer=opt)
    path = out_dir / "trajectory.jsonl"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with _metrics.MetricsWriter(path) as writer:
        for step in range(steps + 1):
            a, b = float(model.a.detach()), float(model.b.detach())
            opt.zero_grad()
            rec = tracker.step(step=step, backward=True)
            vec = tracker.eigenvectors[:, 0].tolist()
            writer.write(
                {
                    "step": step,
                    "a": a,
                    "b": b,
                    "loss": rec.loss,
                    "sharpness": rec.sharpness,
                    "residual": rec.residuals[0],
                    "converged": rec.converged[0],
                    "eigvec": vec,
                    "rotation_top1": rec.rotation_top1,
                    "threshold": rec.threshold,
                }
            )
            if step < steps:
                opt.step()
    summary = {
        "status": "completed",
        "steps": steps,
        "start": list(UV_START),
        "lr": UV_LR,
        "target": UV_TARGET,
        "wall_seconds": time.perf_counter() - t0,
        "finished_at": _now(),
    }
    _metrics.write_json(summary_path, summary)
    return summary


def _read_plan(out: Path) -> dict:
    path = out / "plan.json"
    if not path.is_file():
        return {}
    try:
        plan = _metrics.read_json(path)
    except (OSError, ValueError) as exc:
        raise ReproduceError(
            f"{path} is not readable JSON ({exc}); move it away to start afresh"
        ) from None
    if not isinstance(plan, dict):
        raise ReproduceError(f"{path} is not a curvx reproduce plan; move it away")
    return plan


def _check_data(size: Size, wanted: list[str]) -> None:
    """Fails early when the data set lacks the examples an experiment needs."""
    from curvx.harness.data import load_dataset

    need = {
        "eos": size.n_train,
        "optim": size.n_train,
        "depth": size.depth_n_train,
        "sweep": size.sweep_n_train,
    }
    n = max((need[e] for e in wanted if e in need), default=0)
    if n:
        try:
            load_dataset(size.dataset, n_train=n, n_test=0, data_dir=size.data_dir)
        except Exception as exc:  # noqa: BLE001 - reported with the experiment sizes
            sizes = ", ".join(f"{e} {need[e]}" for e in wanted if e in need)
            raise ReproduceError(
                f"{size.dataset}: {exc} (training examples per experiment: {sizes}; "
                "--n-train sets them all)"
            ) from exc


_RUNNERS = {
    "eos": run_eos,
    "depth": run_depth,
    "sweep": run_sweep,
    "optim": run_optim,
}


def reproduce(
    out: str | Path,
    *,
    size: Size | str = "full",
    only: Iterable[str] | None = None,
    redo: bool = False,
    progress: bool = True,
    report_dir: str | Path | None = None,
    command: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Runs the experiments and writes the report.

    Args:
        out: Output folder (run folders, probes, plan, report).
        size: ``"quick"``, ``"full"`` or a :class:`Size`.
        only: Experiments to run (default all of :data:`EXPERIMENTS`); the report
            covers every experiment whose runs are in ``out``.
        redo: Run finished runs again (otherwise they are reused).
        progress: Progress bars per run.
        report_dir: Where ``report.md`` and ``figures/`` go (default ``out``).
        command: The command line to record.
        log: Called with one line per finished or reused run (default: logger).

    Returns:
        The path of ``report.md``.

    Raises:
        ReproduceError: Unknown experiments, or a run folder with other settings.
        ConfigError, curvx.harness.data.DatasetError: From the runs.
    """
    from curvx.harness.report import check_destination, write_report

    if isinstance(size, str):
        if size not in SIZES:
            raise ReproduceError(f"size must be one of {tuple(SIZES)}, got {size!r}")
        size = SIZES[size]
    wanted = list(dict.fromkeys(EXPERIMENTS if only is None else only))
    unknown = [e for e in wanted if e not in EXPERIMENTS]
    if unknown:
        raise ReproduceError(
            f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}"
        )
    if "rotation" in wanted and "eos" not in wanted:
        wanted.append("eos")  # rotation is read from the edge-of-stability runs
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReproduceError(f"--out {out} exists and is not a folder")
    try:
        check_destination(out if report_dir is None else report_dir)
    except ValueError as exc:
        raise ReproduceError(str(exc)) from None
    log = log or logger.info
    plan = _read_plan(out)
    size_dict = json.loads(json.dumps(dataclasses.asdict(size)))
    if plan.get("size") and plan["size"] != size_dict and not redo:
        old = plan["size"]
        diff = [
            f"{k}: {old.get(k)!r} there, {size_dict[k]!r} now"
            for k in size_dict
            if old.get(k) != size_dict[k]
        ]
        raise ReproduceError(
            f"{out} holds a {old.get('name')!r} reproduction with other settings "
            f"({'; '.join(diff)}); choose another --out, or pass --redo to run "
            "again every experiment you select"
        )
    _check_data(size, wanted)
    out.mkdir(parents=True, exist_ok=True)
    command_line = shlex.join(command or sys.argv)
    plan.update(
        {
            "size": size_dict,
            "command": command_line,
            "started_at": plan.get("started_at") or _now(),
        }
    )
    plan.setdefault("experiments", {})
    plan.setdefault("invocations", []).append(
        {"command": command_line, "at": _now(), "only": wanted}
    )
    probes = _Probes(out / "probes.json")
    runner = _Runner(out, plan, redo, progress, log)
    runner.save()
    wall0 = time.perf_counter()
    for name in EXPERIMENTS:
        if name not in wanted or name == "rotation":
            continue
        t0 = time.perf_counter()
        plan["experiments"][name] = {"runs": []}  # listed again as they run
        if name == "uv":
            info = run_uv(out / "uv", size.uv_steps, redo=redo)
            log(f"uv: {info['status']} ({size.uv_steps} steps)")
            runner.note("uv", steps=size.uv_steps)
        else:
            try:
                _RUNNERS[name](size, runner, probes)
            except ConfigError as exc:
                raise ReproduceError(f"{name}: {exc}") from exc
        runner.note(name, seconds_this_invocation=time.perf_counter() - t0)
    plan["seconds_last_invocation"] = time.perf_counter() - wall0
    plan["runs_last_invocation"] = runner.done
    plan["finished_at"] = _now()
    runner.save()
    return write_report(out, report_dir=report_dir)
