"""Row 2 of the benchmark issue: a cold top-5 solve, every tool from a random start.

One snapshot of the fc-tanh / Fashion-MNIST GD run past the crossing of 2/lr
(``BENCH_TOP5_STEP``); each tool asked for the top 5 eigenvalues at 1e-3; scored
against the float64 ARPACK reference at that snapshot.
"""

from __future__ import annotations

import re

import pytest

from _protocol import need
from _runs import cold_solve
from _tools import CurvxEigsh, cold_tools

GROUP_2 = "2 cold top-5: fc-tanh FMNIST"


def _slug(tool) -> str:
    return re.sub(r"[^a-z0-9]+", "-", tool.name.lower()).strip("-")


@pytest.mark.parametrize("tool", cold_tools(), ids=_slug)
def test_cold_top5(bench_row, fmnist, settings, tool):
    is_curvx = isinstance(tool, CurvxEigsh)

    def fn():
        row = cold_solve(need(fmnist), tool, settings.top5_step, 5)
        if is_curvx:
            row["floors"] = [
                [
                    "wrong converged flags",
                    row["wrong_converged"],
                    0,
                    row["wrong_converged"] == 0,
                ]
            ]
        return row

    bench_row(GROUP_2, tool.name, fn, k=5)
