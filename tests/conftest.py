"""Shared test helpers: tolerances in multiples of eps and the CUDA skip marker."""

import pytest
import torch

# The test models are tiny: one thread is faster for them, and it keeps the suite
# from stalling in OpenMP spin-waits when other processes share the two cores.
torch.set_num_threads(1)


def tol(dtype: torch.dtype, mult: float = 1.0) -> float:
    """``mult`` times the machine epsilon of ``dtype``."""
    return mult * torch.finfo(dtype).eps


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA not available: CUDA kernel tests need a GPU",
)
