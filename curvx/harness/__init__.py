"""Training harness: full-batch training runs with per-step Hessian tracking.

The harness is the ``curvx train`` / ``curvx plot`` command line
(:mod:`curvx.harness.cli`) and the pieces behind it:

- :mod:`~curvx.harness.data`: offline Fashion-MNIST / digits / CIFAR-10 loaders;
- :mod:`~curvx.harness.models`: fc-tanh, fc-relu, deep-linear and cnn models;
- :mod:`~curvx.harness.losses`: MSE (1/2 sum over outputs, mean over examples) and CE;
- :mod:`~curvx.harness.train`: the training loop and run folder;
- :mod:`~curvx.harness.metrics`: crash-safe ``metrics.jsonl`` and ``summary.json``;
- :mod:`~curvx.harness.plots`: PNG plots of a run folder.

Programmatic use::

    from curvx.harness import TrainConfig, run_training

    summary = run_training(TrainConfig(lr=0.05, steps=100, out="runs/demo"))

Submodules are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "run_training", "plot_run", "load_dataset", "build_model"]

_LAZY = {
    "TrainConfig": "curvx.harness.train",
    "run_training": "curvx.harness.train",
    "plot_run": "curvx.harness.plots",
    "load_dataset": "curvx.harness.data",
    "build_model": "curvx.harness.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
