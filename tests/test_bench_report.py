"""bench/report.py on a small synthetic pytest-benchmark JSON (no peers, no torch).

Checks what the benchmark's readers rely on: one table per group with the columns
taken from ``extra_info``, a failed row kept with its status, the floors gathered
into one table, and the environment header (versions, a peer's install failure,
curvx's extension status, threads).
"""

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "bench" / "report.py"


def _bench(name, group, info, median=1.5):
    return {
        "group": group,
        "name": name,
        "fullname": f"bench/test_x.py::{name}",
        "params": None,
        "stats": {"min": median, "max": median, "mean": median, "median": median},
        "extra_info": info,
    }


def _data():
    env = {
        "date_utc": "2026-12-04 12:00:00 UTC",
        "cpu_model": "Test CPU 9000",
        "cores": 2,
        "cores_usable": 2,
        "python": "3.11.7",
        "versions": {
            "torch": "2.14.1",
            "numpy": "2.4.6",
            "scipy": "1.17.1",
            "pyhessian": "0.1",
            "hessian-eigenthings": "not installed",
        },
        "install": {
            "packages": {
                "pyhessian": {"ok": True, "version": "0.1"},
                "hessian-eigenthings": {
                    "ok": False,
                    "error": "ERROR: No matching distribution found",
                },
            }
        },
        "curvx": {"curvx": "0.1.0", "implementation": "compiled extension (CPU)"},
        "threads": {"torch_num_threads": 2, "OMP_NUM_THREADS": "2"},
        "settings": {"quick": True, "steps": 3},
    }
    long_text = "calls of the LinearOperator's matvec (one vector each), counted"
    benches = [
        _bench(
            "test_window[a]",
            "1a tracking window",
            {
                "tool": "scipy eigsh (cold)",
                "ratio_median": 44.0253,
                "hvps_median": 21.0,
                "hvp_counting": long_text,
                "status": "ok",
            },
        ),
        _bench(
            "test_window[b]",
            "1a tracking window",
            {
                "tool": "hessian-eigenthings lanczos",
                "status": "failed: ModuleNotFoundError: No module named "
                "'hessian_eigenthings'",
            },
        ),
        _bench(
            "test_window[c]",
            "1a tracking window",
            {
                "tool": "curvx track (warm)",
                "ratio_median": 3.25,
                "hvps_median": 8.0,
                "wrong_converged": 0,
                "floors": [
                    ["median HVPs per step / eigsh tuned's", 0.38, 0.5, True],
                    ["wrong converged flags", 0, 0, True],
                ],
                "status": "ok",
            },
        ),
        _bench(
            "test_block[k8]",
            "3 block HVP",
            {
                "tool": "curvx.hvp",
                "k": 8,
                "ratio_block_singles": 0.91,
                "floors": [["block of 8 / 8 singles (time)", 0.91, 0.8, False]],
            },
        ),
    ]
    return {
        "machine_info": {"bench": env, "python_version": "3.11.7"},
        "commit_info": {"id": "0123456789abcdef", "dirty": True},
        "benchmarks": benches,
        "datetime": "2026-12-04T12:00:00",
        "version": "5.3.1",
    }


def _run(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_data()))
    out = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(REPORT), str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def _table_after(text, heading):
    lines = text.splitlines()
    i = lines.index(heading)
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_group_tables_take_columns_from_extra_info(tmp_path):
    text = _run(tmp_path)
    rows = _table_after(text, "## 1a tracking window")
    header = rows[0]
    assert header[0] == "tool"
    assert header[-2:] == ["status", "row_s"]
    # union of the keys, first seen first; floors and long text are not columns
    assert header[1:-2] == ["ratio_median", "hvps_median", "wrong_converged"]
    body = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    assert body["scipy eigsh (cold)"]["ratio_median"] == "44.03"
    assert body["scipy eigsh (cold)"]["wrong_converged"] == "-"
    assert body["curvx track (warm)"]["row_s"] == "1.5"
    # the long text goes under the table, naming the tool
    assert "- hvp_counting (scipy eigsh (cold)): calls of the LinearOperator" in text
    # groups are sorted and each has its own table
    assert text.index("## 1a tracking window") < text.index("## 3 block HVP")
    block = _table_after(text, "## 3 block HVP")
    assert block[0] == ["tool", "k", "ratio_block_singles", "status", "row_s"]


def test_failed_row_is_kept_with_its_status(tmp_path):
    rows = _table_after(_run(tmp_path), "## 1a tracking window")
    header = rows[0]
    body = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    failed = body["hessian-eigenthings lanczos"]
    assert failed["status"].startswith("failed: ModuleNotFoundError: No module")
    assert failed["ratio_median"] == "-"
    assert len(rows) == 2 + 3


def test_floors_table(tmp_path):
    rows = _table_after(_run(tmp_path), "## Floors")
    assert rows[0] == ["table", "tool", "floor", "measured", "limit", "verdict"]
    verdicts = {(r[1], r[2]): r[5] for r in rows[2:]}
    assert verdicts[("curvx track (warm)", "median HVPs per step / eigsh tuned's")] == (
        "met"
    )
    assert verdicts[("curvx.hvp", "block of 8 / 8 singles (time)")] == "NOT met"
    assert len(rows) == 2 + 3


def test_environment_header(tmp_path):
    text = _run(tmp_path)
    env = {r[0]: r[1] for r in _table_after(text, "## Environment")[2:]}
    assert env["date"] == "2026-12-04 12:00:00 UTC"
    assert env["CPU"] == "Test CPU 9000"
    assert env["cores"] == "2 (2 usable)"
    assert env["torch"] == "2.14.1"
    assert env["scipy"] == "1.17.1"
    assert env["pyhessian"] == "0.1 (installed by run.sh)"
    assert env["hessian-eigenthings"] == (
        "install failed: ERROR: No matching distribution found"
    )
    assert env["install failures (run.sh)"] == (
        "hessian-eigenthings: ERROR: No matching distribution found"
    )
    assert env["curvx extension (python -m curvx.info)"] == "compiled extension (CPU)"
    assert env["threads"] == "torch 2 threads; OMP_NUM_THREADS=2"
    assert env["commit"] == "0123456789ab (uncommitted changes)"
    assert text.index("## Environment") < text.index("## Floors")


def test_partial_results_of_an_interrupted_run(tmp_path):
    data = _data()
    lines = [json.dumps({"machine_info": data["machine_info"]})]
    lines += [json.dumps(b) for b in data["benchmarks"][:2]]
    lines.append('{"group": "1a tracking window", "name": "cut')  # killed mid-line
    src = tmp_path / "r.partial.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(REPORT), str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "**Partial results**" in text
    rows = _table_after(text, "## 1a tracking window")
    assert [r[0] for r in rows[2:]] == [
        "scipy eigsh (cold)",
        "hessian-eigenthings lanczos",
    ]
    env = {r[0]: r[1] for r in _table_after(text, "## Environment")[2:]}
    assert env["CPU"] == "Test CPU 9000"
