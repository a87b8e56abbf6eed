"""Argument checks shared by the public entry points."""

from __future__ import annotations

import math
import operator
from typing import Any


def as_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int (numpy and other ``__index__`` integers too).

    Raises:
        ValueError: ``value`` is not an integer (bools and floats included), or
            is below ``minimum``; the message names ``name`` and the value.
    """
    ok = not isinstance(value, bool)
    if ok:
        try:
            value = operator.index(value)
        except TypeError:
            ok = False
    if not ok or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool; only True/False (and numpy bools) are accepted."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"{name} must be True or False; got {value!r}")


def as_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the given range.

    Raises:
        ValueError: not a real number, not finite, or out of range; the message
            names ``name`` and the value.
    """
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if ok:
        x = float(value)
        if low is not None and (x < low or (low_open and x == low)):
            ok = False
        if high is not None and (x > high or (high_open and x == high)):
            ok = False
    if not ok:
        lo = "" if low is None else ("> " if low_open else ">= ") + f"{low:g}"
        hi = "" if high is None else ("< " if high_open else "<= ") + f"{high:g}"
        rng = " and ".join(r for r in (lo, hi) if r)
        raise ValueError(
            f"{name} must be a finite number{' ' + rng if rng else ''}; got {value!r}"
        )
    return float(value)
