"""The environment a benchmark ran in, for the report's header.

Collected once per pytest session (``pytest_benchmark_update_machine_info``) and
stored in the benchmark JSON under ``machine_info["bench"]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from importlib import metadata
from typing import Any

#: Distributions whose versions the header lists (the peers and the stack).
PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "pytest-benchmark",
    "pyhessian",
    "hessian-eigenthings",
    "curvlinops-for-pytorch",
    "threadpoolctl",
)

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BENCH_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def install_log() -> dict[str, Any] | None:
    """What ``bench/run.sh`` recorded about installing the peers, if anything."""
    path = os.environ.get("BENCH_INSTALL_LOG")
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def curvx_facts() -> dict[str, Any]:
    try:
        from curvx.info import info

        facts = info()
        ext = facts["extension"]
        return {
            "curvx": facts["curvx"],
            "implementation": facts["implementation"],
            "extension_compiled": ext.get("compiled"),
            "extension_loaded": ext.get("loaded"),
        }
    except Exception as exc:  # noqa: BLE001 - the header says so
        return {"error": f"{type(exc).__name__}: {exc}"}


def threads() -> dict[str, Any]:
    out: dict[str, Any] = {name: os.environ.get(name) for name in THREAD_VARS}
    try:
        import torch

        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    except Exception as exc:  # noqa: BLE001
        out["torch"] = repr(exc)
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = [
            f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} "
            f"threads, {os.path.basename(p.get('filepath', ''))})"
            for p in threadpool_info()
        ]
    except Exception as exc:  # noqa: BLE001
        out["blas"] = repr(exc)
    return out


def environment() -> dict[str, Any]:
    """Date, CPU, cores, versions, peers' install results, curvx, threads."""
    from _protocol import Settings

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        ),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "install": install_log(),
        "curvx": curvx_facts(),
        "threads": threads(),
        "settings": dataclasses.asdict(Settings.from_env()),
    }
