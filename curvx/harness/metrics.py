"""Run-folder files: crash-safe ``metrics.jsonl`` and the JSON summaries.

``metrics.jsonl`` holds one JSON object per training step. Each line is written with a
single ``write`` call, flushed and ``fsync``-ed before training continues, so a run
killed at any moment (even SIGKILL) leaves every completed step on disk; at worst the
final line is incomplete, and :func:`read_metrics` skips it with a warning.

All JSON is strict (RFC 8259): non-finite floats (``nan``, ``inf``) are written as
``null``; the per-step ``status`` field says when that happened (``"diverged"``).

Per-step record keys (always present; ``null`` when not computed at that step):

- ``step``, ``lr``, ``status`` (``"ok"`` or ``"diverged"``), ``train_loss``,
  ``train_acc`` (full training subset at the current parameters theta_t; ``null``
  when not finite, which makes the step ``"diverged"`` and ends the run; with the
  fused tracking step, ``train_acc`` is measured on evaluation steps only);
- ``test_loss``, ``test_acc``: on evaluation steps only, else ``null``;
- from the tracker, on tracked steps only, else ``null``: ``sharpness``,
  ``eigenvalues`` (descending), ``residuals``, ``bounds`` (certified bounds on
  ``|theta - lambda|``), ``certificates`` (``"residual"`` / ``"kato-temple"`` /
  ``"none"``), ``converged``, ``lambda_min``, ``crossed`` (``"up"`` / ``"down"``
  when the sharpness crossed the optimizer's threshold), ``rotation_top1``,
  ``subspace_similarity``, ``max_principal_angle``, ``hvps``, ``iterations``,
  ``track_seconds``, ``track_status``, ``track_method``; other fields of the
  tracker's record are kept with a ``track_`` prefix (e.g. ``track_loss``, the
  loss the tracker evaluated, equal to ``train_loss``);
- ``grad_norm``: Euclidean norm of the full-batch gradient at theta_t;
- ``step_seconds``: wall time of the full-batch loss and gradient at theta_t (the GD
  step's cost, without tracking or test evaluation); on a fused tracked step, the
  fused step's time (gradient and tracking together);
- ``elapsed_seconds``: wall time since the training loop started (after data
  loading and model construction).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "RECORD_KEYS",
    "TRACK_KEYS",
    "MetricsWriter",
    "json_safe",
    "read_json",
    "read_metrics",
    "summarize",
    "write_json",
]

#: Keys copied from a tracker record (``rec.as_dict()``) into a step record.
TRACK_KEYS = (
    "sharpness",
    "eigenvalues",
    "residuals",
    "bounds",
    "certificates",
    "converged",
    "lambda_min",
    "crossed",
    "rotation_top1",
    "subspace_similarity",
    "max_principal_angle",
    "hvps",
    "iterations",
    "track_seconds",
    "track_status",
    "track_method",
)

#: Keys every step record has.
RECORD_KEYS = (
    "step",
    "lr",
    "status",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "grad_norm",
    *TRACK_KEYS,
    "step_seconds",
    "elapsed_seconds",
)


def json_safe(obj: Any) -> Any:
    """Converts ``obj`` to strict-JSON-ready values (non-finite floats -> ``None``).

    Tensors and numpy scalars/arrays become Python numbers / lists.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


class MetricsWriter:
    """Appends one JSON line per step and makes it durable before returning.

    Args:
        path: The ``metrics.jsonl`` file (created if missing, appended to otherwise).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Writes ``record`` as one line, then flushes and fsyncs."""
        line = json.dumps(json_safe(record), allow_nan=False, separators=(",", ":"))
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Closes the file (idempotent)."""
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Reads ``metrics.jsonl``, skipping (with a warning) lines that do not parse.

    Only a final line cut short by a killed process should ever fail to parse.

    Args:
        path: The ``metrics.jsonl`` file.

    Returns:
        The step records in file order.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping unparsable line", path, lineno)
    return records


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented strict JSON, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _values(records: Iterable[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if math.isfinite(v):
                out.append((r["step"], float(v)))
    return out


def _stats(records: list[dict], key: str) -> dict:
    vals = _values(records, key)
    if not vals:
        return {"final": None, "final_step": None, "min": None, "max": None}
    steps, xs = zip(*vals, strict=True)
    return {
        "final": xs[-1],
        "final_step": steps[-1],
        "min": min(xs),
        "max": max(xs),
        "argmin_step": steps[xs.index(min(xs))],
        "argmax_step": steps[xs.index(max(xs))],
    }


def _median(records: list[dict], key: str) -> float | None:
    vals = [v for _, v in _values(records, key)]
    return statistics.median(vals) if vals else None


def summarize(
    records: list[dict],
    *,
    threshold: float | None,
    status: str,
    wall_seconds: float,
    extra: dict | None = None,
) -> dict:
    """Builds ``summary.json`` content from the step records.

    Args:
        records: Step records (as written to ``metrics.jsonl``).
        threshold: Stability threshold for the optimizer (2/lr for GD), or ``None``.
        status: Run status: ``"completed"``, ``"diverged"``, ``"interrupted"`` or
            ``"error"``.
        wall_seconds: Total wall time of the run.
        extra: More entries to merge in (e.g. the divergence step or an error).

    Returns:
        A JSON-ready dict: per-quantity final/min/max, medians of cost figures,
        final sharpness against the threshold, counts and status.
    """
    tracked = [r for r in records if r.get("sharpness") is not None]
    conv = [all(r["converged"]) for r in tracked if r.get("converged") is not None]
    sharp = _stats(records, "sharpness")
    final_sharp = sharp["final"]
    summary = {
        "status": status,
        "n_records": len(records),
        "last_step": records[-1]["step"] if records else None,
        "wall_seconds": wall_seconds,
        "threshold": threshold,
        "final_sharpness": final_sharp,
        "final_sharpness_over_threshold": (
            final_sharp / threshold if final_sharp is not None and threshold else None
        ),
        "n_tracked": len(tracked),
        "fraction_tracked_converged": (sum(conv) / len(conv)) if conv else None,
        "median_hvps": _median(records, "hvps"),
        "median_track_seconds": _median(records, "track_seconds"),
        "median_step_seconds": _median(records, "step_seconds"),
        "total_track_seconds": sum(v for _, v in _values(records, "track_seconds")),
        "total_hvps": int(sum(v for _, v in _values(records, "hvps"))),
    }
    for key in (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "sharpness",
        "lambda_min",
        "rotation_top1",
        "subspace_similarity",
    ):
        summary[key] = _stats(records, key)
    if extra:
        summary.update(extra)
    return summary
