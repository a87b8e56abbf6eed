"""Markdown report of a pytest-benchmark JSON file written by ``bench/run.sh``.

Usage::

    python bench/report.py bench/results/<stamp>.json [-o OUT.md]
    python bench/report.py bench/results/<stamp>.partial.jsonl   # a killed run

Writes (by default next to the JSON, with ``.md``):

1. an environment header: date, CPU model, cores, Python / torch / numpy / scipy
   versions, each peer's version or its install failure, whether curvx's compiled
   extension is in use, thread settings, the benchmark settings and the commit;
2. a "Floors" table gathered from every row's ``extra_info["floors"]`` entries
   (``[name, measured, limit, met]``);
3. one table per benchmark group (sorted by name): one row per benchmark, the
   columns being ``tool``, then the union of the other ``extra_info`` keys in the
   order first seen, then ``status`` and ``row_s`` (the wall time pytest-benchmark
   measured for the row). Text values too long for a cell (how HVPs were
   counted, say) are listed under the table instead.

Only the standard library is used, so the report can be rebuilt anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: extra_info keys that never become columns (rendered elsewhere).
SKIP = ("floors",)
#: Text longer than this goes under the table, not in a cell.
MAX_CELL = 60


def fmt(value: Any) -> str:
    """One table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _is_note(value: Any) -> bool:
    return isinstance(value, str) and len(value) > MAX_CELL


def _row_seconds(bench: dict) -> float | None:
    stats = bench.get("stats") or {}
    return stats.get("median")


def group_section(name: str, benches: list[dict]) -> list[str]:
    """The table of one group, with notes for long text values."""
    columns: list[str] = []
    note_keys: list[str] = []
    for b in benches:
        for key, value in (b.get("extra_info") or {}).items():
            if key in ("tool", "status") or key in SKIP:
                continue
            if _is_note(value):
                if key not in note_keys:
                    note_keys.append(key)
                continue
            if key not in columns:
                columns.append(key)
    columns = [c for c in columns if c not in note_keys]
    header = ["tool", *columns, "status", "row_s"]
    rows = []
    for b in benches:
        info = b.get("extra_info") or {}
        tool = info.get("tool", b.get("name", "?"))
        cells = [fmt(tool)]
        cells += [fmt(info.get(c)) for c in columns]
        cells.append(fmt(info.get("status", "ok")))
        cells.append(fmt(_row_seconds(b)))
        rows.append(cells)
    out = [f"## {name}", ""] + table(header, rows)
    notes = []
    for key in note_keys:
        seen: dict[str, list[str]] = {}
        for b in benches:
            info = b.get("extra_info") or {}
            if key in info:
                seen.setdefault(str(info[key]), []).append(
                    str(info.get("tool", b.get("name")))
                )
        for text, tools in seen.items():
            notes.append(f"- {key} ({'; '.join(dict.fromkeys(tools))}): {text}")
    if notes:
        out += ["", *notes]
    return out + [""]


def floors_section(benches: list[dict]) -> list[str]:
    """Every floor entry of every row, in one table."""
    rows = []
    for b in benches:
        info = b.get("extra_info") or {}
        for entry in info.get("floors") or []:
            name, measured, limit, met = (list(entry) + [None] * 4)[:4]
            verdict = "-" if met is None else ("met" if met else "NOT met")
            rows.append(
                [
                    fmt(b.get("group")),
                    fmt(info.get("tool", b.get("name"))),
                    fmt(name),
                    fmt(measured),
                    fmt(limit),
                    verdict,
                ]
            )
    if not rows:
        return []
    header = ["table", "tool", "floor", "measured", "limit", "verdict"]
    return ["## Floors", "", *table(header, rows), ""]


def _peer_line(name: str, version: str, install: dict | None) -> str:
    entry = ((install or {}).get("packages") or {}).get(name)
    if entry is None:
        return version
    if entry.get("ok"):
        return f"{version} (installed by run.sh)"
    why = entry.get("error") or "see the install log"
    return f"install failed: {why}"


def environment_section(data: dict) -> list[str]:
    """The header: where and with what the benchmark ran."""
    machine = data.get("machine_info") or {}
    env = machine.get("bench") or {}
    versions = env.get("versions") or {}
    install = env.get("install")
    cpu = env.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw")
    cores = env.get("cores")
    usable = env.get("cores_usable")
    rows: list[tuple[str, Any]] = [
        ("date", env.get("date_utc") or data.get("datetime")),
        ("CPU", cpu),
        ("cores", f"{cores} ({usable} usable)" if usable else cores),
        ("python", env.get("python") or machine.get("python_version")),
        ("platform", env.get("platform") or machine.get("system")),
    ]
    for name in ("torch", "numpy", "scipy", "pytest-benchmark"):
        if name in versions:
            rows.append((name, versions[name]))
    for name in ("pyhessian", "hessian-eigenthings", "curvlinops-for-pytorch"):
        if name in versions or name in ((install or {}).get("packages") or {}):
            rows.append((name, _peer_line(name, versions.get(name, "?"), install)))
    failed = [
        f"{name}: {entry.get('error') or 'see the install log'}"
        for name, entry in ((install or {}).get("packages") or {}).items()
        if not entry.get("ok")
    ]
    if install is not None:
        rows.append(("install failures (run.sh)", failed or "none"))
    cx = env.get("curvx") or {}
    if cx:
        rows.append(("curvx", cx.get("curvx", cx.get("error"))))
        implementation = cx.get("implementation")
        rows.append(("curvx extension (python -m curvx.info)", implementation))
    threads = env.get("threads") or {}
    if threads:
        parts = [f"torch {threads.get('torch_num_threads')} threads"]
        parts += [
            f"{k}={threads[k]}"
            for k in (
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "BENCH_THREADS",
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
            )
            if threads.get(k)
        ]
        rows.append(("threads", "; ".join(parts)))
        if threads.get("blas"):
            rows.append(("BLAS", threads["blas"]))
    settings = env.get("settings")
    if settings:
        rows.append(("settings", settings))
    commit = data.get("commit_info") or {}
    if commit.get("id"):
        dirty = " (uncommitted changes)" if commit.get("dirty") else ""
        rows.append(("commit", f"{commit['id'][:12]}{dirty}"))
    rows.append(("pytest-benchmark JSON", data.get("version")))
    cells = [[fmt(k), fmt(v)] for k, v in rows if v is not None]
    return ["## Environment", "", *table(["", ""], cells), ""]


def render(data: dict, source: str = "") -> str:
    """The whole report as Markdown text."""
    benches = data.get("benchmarks") or []
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    title = "# curvx benchmark report"
    lines = [title, ""]
    if data.get("partial"):
        lines += [
            "**Partial results**: the run stopped before pytest-benchmark wrote "
            "its JSON; these are the rows that had finished.",
            "",
        ]
    if source:
        lines += [f"From `{source}`; protocol and columns: `bench/README.md`.", ""]
    lines += environment_section(data)
    lines += floors_section(benches)
    for name in sorted(groups):
        lines += group_section(name, groups[name])
    return "\n".join(lines).rstrip() + "\n"


def load(path: Path) -> dict:
    """A pytest-benchmark JSON file, or the partial results of an interrupted run
    (JSON lines: the environment, then one benchmark per line)."""
    text = path.read_text()
    if path.suffix != ".jsonl":
        return json.loads(text)
    data: dict[str, Any] = {"benchmarks": [], "partial": True}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the interruption
        if "machine_info" in record:
            data["machine_info"] = record["machine_info"]
        else:
            data["benchmarks"].append(record)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json", type=Path, help="pytest-benchmark JSON file (or partial .jsonl)"
    )
    parser.add_argument("-o", "--output", type=Path, help="Markdown file to write")
    args = parser.parse_args(argv)
    data = load(args.json)
    out = args.output or args.json.with_suffix(".md")
    out.write_text(render(data, source=str(args.json)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
