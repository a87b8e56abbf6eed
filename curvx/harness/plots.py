"""PNG plots of a run folder (matplotlib's Agg canvas; no pyplot, no display).

:func:`plot_run` reads ``config.json`` and ``metrics.jsonl`` and writes:

- ``loss.png``: train loss every step and test loss on evaluation steps, log y;
- ``sharpness.png``: tracked eigenvalues (sharpness bold) against the stability
  threshold (dashed; 2/lr for GD), and lambda_min when tracked;
- ``rotation.png``: top-1 rotation ``|cos|`` and top-k subspace similarity.

Plots can be regenerated at any time, also from a run still in progress or one that
was killed: ``curvx plot RUN_DIR``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from curvx.harness.metrics import read_json, read_metrics

logger = logging.getLogger(__name__)

__all__ = ["PLOT_FILES", "plot_run"]

PLOT_FILES = ("loss.png", "sharpness.png", "rotation.png")

_THRESHOLD_LABELS = {
    "gd": r"$2/\eta$",
    "momentum": r"$2(1+\beta)/\eta$",
    "adam": r"$(2+2\beta_1)/((1-\beta_1)\eta)$",
}


def _series(records: list[dict], key: str, positive: bool = False):
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            if positive and v <= 0:
                continue
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _title(config: dict) -> str:
    s = config.get("settings", {})
    return (
        f"{s.get('dataset')} {s.get('model')} {s.get('loss')} "
        f"{s.get('optimizer')} lr={s.get('lr')} seed={s.get('seed')}"
    )


def _mark_divergence(ax, records: list[dict]) -> None:
    for r in records:
        if r.get("status") == "diverged":
            ax.axvline(r["step"], color="red", lw=1, ls=":", label="diverged")
            break


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Writes the run's PNG plots into its folder.

    Args:
        run_dir: A run folder holding ``metrics.jsonl`` (and normally
            ``config.json``).

    Returns:
        Paths of the files written.

    Raises:
        FileNotFoundError: If ``run_dir/metrics.jsonl`` does not exist.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: not a curvx run folder?")
    records = read_metrics(metrics_path)
    config_path = run_dir / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    title = _title(config) if config else run_dir.name
    written = []

    # Loss.
    fig, ax = _new_figure()
    xs, ys = _series(records, "train_loss", positive=True)
    ax.plot(xs, ys, lw=1.2, label="train loss")
    xt, yt = _series(records, "test_loss", positive=True)
    if xt:
        ax.plot(xt, yt, "o-", ms=2.5, lw=1, label="test loss")
    if ys or yt:
        ax.set_yscale("log")
    _mark_divergence(ax, records)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    written.append(run_dir / "loss.png")
    fig.savefig(written[-1])

    # Sharpness.
    fig, ax = _new_figure()
    k = max((len(r["eigenvalues"]) for r in records if r.get("eigenvalues")), default=0)
    for i in range(1, k):
        pts = [
            (r["step"], r["eigenvalues"][i])
            for r in records
            if r.get("eigenvalues")
            and len(r["eigenvalues"]) > i
            and r["eigenvalues"][i] is not None
        ]
        if pts:
            steps, vals = zip(*pts, strict=True)
            ax.plot(steps, vals, lw=0.8, alpha=0.6, label=rf"$\lambda_{{{i + 1}}}$")
    xs, ys = _series(records, "sharpness")
    ax.plot(xs, ys, lw=1.5, color="C0", label=r"sharpness $\lambda_1$")
    xs, ys = _series(records, "lambda_min")
    if xs:
        ax.plot(xs, ys, lw=1, color="C3", label=r"$\lambda_{\min}$")
    opt = config.get("optimizer", {})
    thr = opt.get("threshold")
    # (for Adam the tracked sharpness is the preconditioned one its threshold
    # bounds)
    if thr:
        label = _THRESHOLD_LABELS.get(config["settings"]["optimizer"], "threshold")
        ax.axhline(thr, color="k", ls="--", lw=1, label=label)
    finite = sorted(abs(y) for y in ys if y is not None and math.isfinite(y))
    if finite and finite[-1] > 100 * max(finite[len(finite) // 2], 1e-12):
        # a divergence spike would flatten the rest: symmetric log scale
        ax.set_yscale("symlog", linthresh=max(finite[len(finite) // 2], 1e-12))
    _mark_divergence(ax, records)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    written.append(run_dir / "sharpness.png")
    fig.savefig(written[-1])

    # Rotation.
    fig, ax = _new_figure()
    xs, ys = _series(records, "rotation_top1")
    ax.plot(xs, ys, lw=1, label="top-1 |cos| (consecutive tracked steps)")
    xs, ys = _series(records, "subspace_similarity")
    ax.plot(xs, ys, lw=1, label="top-k subspace similarity cos(rms angle)")
    ax.set_ylim(-0.02, 1.05)
    _mark_divergence(ax, records)
    ax.set_xlabel("step")
    ax.set_ylabel("similarity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    written.append(run_dir / "rotation.png")
    fig.savefig(written[-1])

    logger.debug("wrote %s", [str(p) for p in written])
    return written
