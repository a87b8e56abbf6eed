"""What curvx runs on: ``python -m curvx.info``.

Prints the curvx and torch versions, whether CUDA is available, whether the compiled
extension was built, loaded and has CUDA kernels, the facts of its build, and which
implementation of the Lanczos kernels is in use. :func:`info` returns the same facts
as a dict.
"""

from __future__ import annotations

import json
from typing import Any

import torch

import curvx
from curvx import _ops


def _implementation(status: dict[str, Any]) -> str:
    if not status["loaded"]:
        return f"pure-PyTorch references ({status['reason']})"
    if status["cuda_kernels"]:
        return "compiled extension (CPU and CUDA kernels)"
    return "compiled extension (CPU kernels; CUDA tensors use the PyTorch references)"


def info() -> dict[str, Any]:
    """The facts ``python -m curvx.info`` prints, as a dict."""
    status = _ops.extension_status()
    return {
        "curvx": getattr(curvx, "__version__", "unknown"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ],
        "extension": status,
        "implementation": _implementation(status),
    }


def main() -> None:
    facts = info()
    ext = facts["extension"]
    rows = [
        ("curvx", facts["curvx"]),
        ("torch", f"{facts['torch']} (CUDA {facts['torch_cuda']})"),
        ("CUDA available", facts["cuda_available"]),
        ("CUDA devices", ", ".join(facts["cuda_devices"]) or "none"),
        ("extension compiled", ext["compiled"]),
        ("extension loaded", ext["loaded"]),
        ("extension CUDA kernels", ext["cuda_kernels"]),
        ("implementation in use", facts["implementation"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("build info:")
    print(json.dumps(ext["build"], indent=2) if ext["build"] else "  (none)")


if __name__ == "__main__":
    main()
