"""Numbers the reproduction report states, computed from a run's step records.

Pure functions of the records of one run (as read by
:func:`curvx.harness.metrics.read_metrics`) and its threshold: no files, no torch.
Every figure the report prints comes from one of these, so a reader can recompute it
from ``metrics.jsonl``.

Definitions:

- *first crossing*: the first tracked step whose sharpness reaches the threshold
  (``sharpness >= threshold``; 2/lr for GD) from below: the previous tracked
  step was under it. A run that starts above counts from step 0 when it never
  drops below; otherwise from its first crossing back up.
- *plateau ratio*: ``sharpness / threshold`` at the tracked steps from the first
  crossing on; reported as its median and its 10th / 90th percentiles.
- *instability event*: a maximal run of steps ``t`` at which the training loss rose
  (``L_{t+1} > L_t``) while the sharpness stood above the threshold, runs closer
  than ``merge`` steps joined. Each event is ``(first, last)`` step.
- *rotation angle* between consecutive tracked steps: ``arccos(rotation_top1)``
  (radians, top-1, matched by overlap) and ``max_principal_angle`` (top-k
  subspace); *accumulated rotation*: their sums over the run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = [
    "accumulated_rotation",
    "first_crossing",
    "finite",
    "instability_events",
    "plateau_ratio",
    "quantile",
    "rotation_during",
    "series",
]


def finite(x) -> bool:
    """Whether ``x`` is a finite real number (not a bool, not None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` where it is a finite number."""
    steps, vals = [], []
    for r in records:
        v = r.get(key)
        if finite(v):
            steps.append(int(r["step"]))
            vals.append(float(v))
    return steps, vals


def quantile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile of ``xs`` (linear interpolation); None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def first_crossing(records: Sequence[dict], threshold: float) -> int | None:
    """The first tracked step at which the sharpness reaches ``threshold`` from
    below (see the module docstring), or None when it never does."""
    steps, vals = series(records, "sharpness")
    if not vals:
        return None
    if all(v >= threshold for v in vals):
        return steps[0]
    for i in range(1, len(vals)):
        if vals[i] >= threshold and vals[i - 1] < threshold:
            return steps[i]
    return None


def plateau_ratio(records: Sequence[dict], threshold: float) -> dict:
    """``sharpness / threshold`` from the first crossing on.

    Returns:
        ``{"first_crossing", "n", "median", "p10", "p90", "min", "max"}``; the
        statistics are None when the sharpness never reached the threshold.
    """
    start = first_crossing(records, threshold)
    ratios = [
        s / threshold
        for step, s in zip(*series(records, "sharpness"), strict=True)
        if start is not None and step >= start
    ]
    return {
        "first_crossing": start,
        "n": len(ratios),
        "median": statistics.median(ratios) if ratios else None,
        "p10": quantile(ratios, 0.1),
        "p90": quantile(ratios, 0.9),
        "min": min(ratios) if ratios else None,
        "max": max(ratios) if ratios else None,
    }


def instability_events(
    records: Sequence[dict], threshold: float, merge: int = 3
) -> list[tuple[int, int]]:
    """Steps where the loss rose while the sharpness was above the threshold.

    Args:
        records: Step records in step order.
        threshold: The stability threshold of the sharpness.
        merge: Runs of such steps closer than this many steps form one event.

    Returns:
        ``[(first_step, last_step), ...]`` in step order.
    """
    loss = {int(r["step"]): r["train_loss"] for r in records if finite(r["train_loss"])}
    sharp = dict(zip(*series(records, "sharpness"), strict=True))
    unstable = []
    last_sharp = None
    for step in sorted(loss):
        last_sharp = sharp.get(step, last_sharp)
        nxt = loss.get(step + 1)
        if nxt is None or last_sharp is None:
            continue
        if nxt > loss[step] and last_sharp >= threshold:
            unstable.append(step)
    events: list[tuple[int, int]] = []
    for step in unstable:
        if events and step - events[-1][1] <= merge:
            events[-1] = (events[-1][0], step)
        else:
            events.append((step, step))
    return events


def _angle(cos: float) -> float:
    return math.acos(min(1.0, max(-1.0, cos)))


def accumulated_rotation(records: Sequence[dict]) -> dict:
    """Total rotation of the top eigenvector and subspace over the run.

    Returns:
        ``{"top1": sum of arccos(rotation_top1), "subspace": sum of
        max_principal_angle, "n": tracked pairs, "net": arccos of the final
        reference_similarity (first tracked step to last)}``, radians; None
        entries where nothing was measured.
    """
    _, cos = series(records, "rotation_top1")
    _, ang = series(records, "max_principal_angle")
    ref = [r.get("track_reference_similarity") for r in records]
    ref = [v for v in ref if finite(v)]
    return {
        "top1": sum(_angle(c) for c in cos) if cos else None,
        "subspace": sum(ang) if ang else None,
        "n": len(cos),
        "net": _angle(ref[-1]) if ref else None,
    }


def rotation_during(
    records: Sequence[dict], threshold: float, events: Sequence[tuple[int, int]]
) -> dict:
    """Top-1 ``|cos|`` and subspace similarity in the stable phase and in events.

    The stable phase is the tracked steps before the first crossing; a step is
    in an event when it lies within ``[first, last + 1]`` of one (the last rise
    ends at the next step's parameters).

    Returns:
        ``{"stable": {...}, "events": {...}}``, each with the median and minimum
        of ``rotation_top1`` and ``subspace_similarity`` and the step count.
    """
    start = first_crossing(records, threshold)

    def in_event(step: int) -> bool:
        return any(a <= step <= b + 1 for a, b in events)

    groups: dict[str, dict[str, list[float]]] = {
        "stable": {"rotation_top1": [], "subspace_similarity": []},
        "events": {"rotation_top1": [], "subspace_similarity": []},
    }
    for r in records:
        step = int(r["step"])
        name = None
        if start is None or step < start:
            name = "stable"
        elif in_event(step):
            name = "events"
        if name is None:
            continue
        for key, vals in groups[name].items():
            if finite(r.get(key)):
                vals.append(float(r[key]))
    out = {}
    for name, keys in groups.items():
        out[name] = {"n": len(keys["rotation_top1"])}
        for key, vals in keys.items():
            out[name][f"{key}_median"] = statistics.median(vals) if vals else None
            out[name][f"{key}_min"] = min(vals) if vals else None
    return out
