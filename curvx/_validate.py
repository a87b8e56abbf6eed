"""Argument checks shared by the public entry points."""

from __future__ import annotations

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
