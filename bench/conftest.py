"""Benchmark fixtures and the row convention every ``bench/test_*.py`` follows.

Row convention (one benchmark = one table row):

* ``benchmark.group`` is the table's name ("1a tracking window: ...");
  ``report.py`` prints one Markdown table per group, sorted by name.
* ``benchmark.extra_info`` holds plain JSON values: at least ``"tool"`` and the
  figures of that table; the table's columns are the union of the keys, in the
  order first seen. ``"status"`` is ``"ok"``, ``"n/a: <why>"`` or
  ``"failed: <ExceptionType>: <first line>"``.
* A tool that fails to import or raises still gets its row: use
  :func:`record_failure` (records, never raises), or :func:`bench_row`, which
  catches for you. Never skip or drop such a row.
* Measurements that are not simple repeated timings run once through
  ``benchmark.pedantic(fn, rounds=1, iterations=1)`` with the measured figures
  in ``extra_info``.
* A floor the issue sets goes in ``extra_info["floors"]``: a list of
  ``[name, measured, limit, met]``; ``report.py`` gathers them into a "Floors"
  table.

Environment: the JSON's ``machine_info["bench"]`` gets the facts ``report.py``
prints in its header (versions, peers' install results from
``BENCH_INSTALL_LOG``, curvx's extension status, threads, settings).

Partial results: with ``BENCH_PARTIAL`` set (``run.sh`` does), the environment
and then every finished row are appended to that file as JSON lines, so a run
killed before pytest-benchmark writes its JSON still leaves a report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from _env import environment
from _protocol import (
    Broken,
    Settings,
    clean,
    digits_problem,
    failure_status,
    fmnist_problem,
)
from _tools import NotApplicable

if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["bench"] = environment()


def _append_partial(record: dict[str, Any]) -> None:
    path = os.environ.get("BENCH_PARTIAL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def pytest_sessionstart(session):
    """Partial results (``BENCH_PARTIAL``): the environment first."""
    if os.environ.get("BENCH_PARTIAL"):
        _append_partial({"machine_info": {"bench": environment()}})


def pytest_runtest_teardown(item, nextitem):
    """Partial results: each finished row as one JSON line, so that a run that is
    killed still leaves a report (``report.py`` reads the lines)."""
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(bench, "stats", None)
    if stats is None or not os.environ.get("BENCH_PARTIAL"):
        return
    try:
        record = stats.as_dict(include_data=False)
    except Exception as exc:  # noqa: BLE001 - partial results are best effort
        record = {"name": item.name, "extra_info": {"status": failure_status(exc)}}
    _append_partial(record)


def status_of(exc: BaseException) -> str:
    """The row status for an exception (``n/a`` for :class:`NotApplicable`)."""
    if isinstance(exc, NotApplicable):
        return f"n/a: {exc}"
    return failure_status(exc)


@pytest.fixture
def record_failure(benchmark) -> Callable[..., None]:
    """``record_failure(error, **extra)``: give the row a status and figures.

    ``error`` is an exception (status ``failed: <Type>: <first line>``, or
    ``n/a: ...`` for :class:`NotApplicable`) or a status string. The benchmark is
    run once on a no-op so the row is written. Never raises.
    """

    def record(error: BaseException | str, **extra: Any) -> None:
        status = error if isinstance(error, str) else status_of(error)
        benchmark.extra_info.update(clean(extra))
        benchmark.extra_info["status"] = status
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)

    return record


@pytest.fixture
def bench_row(benchmark, record_failure) -> Callable[..., dict[str, Any] | None]:
    """``bench_row(group, tool, fn, **info)``: one row measured by ``fn()``.

    ``fn`` runs once inside ``benchmark.pedantic``; the dict it returns goes
    into ``extra_info`` (made JSON-plain) with ``status="ok"`` unless it sets
    one. If ``fn`` raises, the row keeps ``group``, ``tool`` and ``info`` and
    gets the failure status. Returns ``fn``'s dict, or None on failure.
    """

    def run(group: str, tool: str, fn: Callable[[], dict], **info: Any):
        benchmark.group = group
        benchmark.extra_info["tool"] = tool
        benchmark.extra_info.update(clean(info))
        box: dict[str, Any] = {}

        def call():
            try:
                box["row"] = fn()
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                box["error"] = exc

        benchmark.pedantic(call, rounds=1, iterations=1)
        if "error" in box:
            benchmark.extra_info["status"] = status_of(box["error"])
            return None
        row = dict(box["row"] or {})
        benchmark.extra_info.update(clean(row))
        benchmark.extra_info.setdefault("status", "ok")
        return row

    return run


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def fmnist(settings):
    """The fc-tanh Fashion-MNIST problem (GD trajectory, snapshots), or Broken."""
    try:
        return fmnist_problem(settings)
    except Exception as exc:  # noqa: BLE001 - every row records it
        return Broken(exc)


@pytest.fixture(scope="session")
def digits(settings):
    """The small exact problem (digits, n = 2410), or Broken."""
    try:
        return digits_problem(settings)
    except Exception as exc:  # noqa: BLE001 - every row records it
        return Broken(exc)


@pytest.fixture(scope="session")
def shared() -> dict[str, Any]:
    """Figures one row leaves for another (eigsh tuned's HVPs for curvx's floor)."""
    return {}
