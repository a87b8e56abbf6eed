"""Row 3 of the benchmark issue: a block HVP of k vectors against k single HVPs.

At one snapshot of the fc-tanh / Fashion-MNIST run, for k = 1, 2, 4, 8, 16:

* ``curvx.hvp``: one call with ``V`` ``[n, k]`` (the k vectors share one forward
  and backward) against k calls with one vector each (each pays its own forward
  and backward, as a user calling a single-vector HVP does), with the default
  ``method="auto"`` (each call also chooses its HVP path) and with
  ``method="kept-graph"`` fixed (the product cost alone);
* ``HessianOperator kept-graph``, labelled apart: ``op.matmat(V)`` against k
  ``op.matvec`` on one operator whose first-backward graph is kept.

Floor: the block of 8 takes at most 0.8x the time of 8 singles.
"""

from __future__ import annotations

import pytest

from _protocol import need
from _runs import block_hvp

GROUP_3 = "3 block HVP: k vectors at once vs k single HVPs"
APIS = ["curvx.hvp", "curvx.hvp(method=kept-graph)", "HessianOperator kept-graph"]
#: The rows the floor applies to (the issue's one-call-per-vector comparison).
FLOOR_APIS = ("curvx.hvp", "curvx.hvp(method=kept-graph)")
KS = [1, 2, 4, 8, 16]
BLOCK_FLOOR = 0.8


@pytest.mark.parametrize("k", KS, ids=[f"k{k}" for k in KS])
@pytest.mark.parametrize("api", APIS)
def test_block_hvp(bench_row, fmnist, settings, api, k):
    def fn():
        row = block_hvp(
            need(fmnist), api, k, settings.block_repeats, settings.top5_step
        )
        if k == 8 and api in FLOOR_APIS:
            r = row["ratio_block_singles"]
            row["floors"] = [
                ["block of 8 / 8 singles (time)", r, BLOCK_FLOOR, r <= BLOCK_FLOOR]
            ]
        return row

    bench_row(GROUP_3, api, fn, k=k)
