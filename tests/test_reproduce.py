"""`curvx reproduce --quick` end to end on real Fashion-MNIST, its report's tables,
resuming, and the analysis functions the report's numbers come from."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from curvx.harness import analysis as an
from curvx.harness.cli import main
from curvx.harness.data import DatasetError, find_fashion_mnist
from curvx.harness.metrics import read_json, read_metrics
from curvx.harness.report import code_fingerprint, parse_tables, write_report
from curvx.harness.reproduce import SIZES, ReproduceError, reproduce


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    try:
        find_fashion_mnist()
    except DatasetError as exc:  # CI installs it (scripts/setup.sh): never skip
        pytest.fail(f"the quick reproduction needs Fashion-MNIST: {exc}")
    out = tmp_path_factory.mktemp("reproduce")
    lines = []
    path = reproduce(out, size="quick", progress=False, log=lines.append)
    return out, path, lines


def _tables(path):
    text = path.read_text()
    return text, parse_tables(text)


def _num(cell):
    return float(cell.split()[0])


def test_quick_writes_every_section_with_figures(quick):
    out, path, lines = quick
    text, tables = _tables(path)
    for n, title in enumerate(
        ["Edge of stability", "rotation", "Depth", "sweep", "Momentum", "uv model"], 1
    ):
        assert f"## {n}. " in text and title in text
    assert "Not run" not in text
    for name in ("eos", "rotation", "depth", "sweep", "optimizers", "uv"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}.png" in text
    # costs, eos, rotation, depth, sweep mse, sweep ce, optim, uv
    assert len(tables) == 8
    assert all(len(t) >= 1 for t in tables)
    assert all(not line.endswith("reused") for line in lines)


def test_eos_table_matches_the_runs(quick):
    out, path, _ = quick
    _, tables = _tables(path)
    eos = tables[1]
    plan = read_json(out / "plan.json")
    runs = plan["experiments"]["eos"]["runs"]
    assert len(eos) == len(runs) == 3
    for row, meta in zip(eos, runs, strict=True):
        folder = out / "eos" / meta["name"]
        records = read_metrics(folder / "metrics.jsonl")
        config = read_json(folder / "config.json")
        thr = config["optimizer"]["threshold"]
        assert _num(row["2/lr"]) == pytest.approx(2 / meta["lr"], rel=1e-3)
        assert thr == pytest.approx(2 / meta["lr"])
        pr = an.plateau_ratio(records, thr)
        if pr["median"] is None:
            assert row["plateau ratio median"] == "n/a"
        else:
            assert _num(row["plateau ratio median"]) == pytest.approx(
                pr["median"], rel=1e-3
            )
        summary = read_json(folder / "summary.json")
        assert _num(row["final train loss"]) == pytest.approx(
            summary["train_loss"]["final"], rel=1e-3
        )
        # the run folder says how to repeat it
        assert config["command"].startswith("curvx train --lr ")


def test_depth_one_does_not_rotate_and_depth_two_does(quick):
    out, path, _ = quick
    _, tables = _tables(path)
    depth = tables[3]
    by_depth = {int(r["depth"]): r for r in depth}
    assert set(by_depth) == {1, 2}
    tol = _num(by_depth[1]["solver tol"])
    # rotation below solver precision at depth 1, measured on every step
    d1 = read_metrics(out / "depth" / "depth1-1.5x" / "metrics.jsonl")
    _, angles = an.series(d1, "max_principal_angle")
    assert len(angles) >= 5
    assert max(angles) < tol
    assert by_depth[1]["max angle ≤ tol"] == "yes"
    _, cos = an.series(d1, "rotation_top1")
    assert min(cos) > 1 - tol
    # the learning rate was past 2/lambda_0 and GD diverged, rotation-free
    assert _num(by_depth[1]["lr / (2/λ0)"]) > 1
    assert by_depth[1]["status"].startswith("diverged")
    # depth 2 at the same relative learning rate rotates far beyond it
    assert _num(by_depth[2]["max angle (rad)"]) > 1e3 * tol


def test_sweep_tables_cover_the_grid(quick):
    out, path, _ = quick
    _, tables = _tables(path)
    size = SIZES["quick"]
    powers = range(size.sweep_min_power, size.sweep_max_power + 1)
    for table, loss in zip(tables[4:6], size.sweep_losses, strict=True):
        assert [r["lr / (2/λ0)"] for r in table] == [f"2^{p}" for p in powers]
        for row in table:
            assert int(row["seeds"]) == len(size.sweep_seeds)
            n_div = int(row["diverged"].split("/")[0])
            if n_div < len(size.sweep_seeds):
                acc = _num(row["test acc"])
                assert 0.0 <= acc <= 1.0
            else:
                assert row["test acc"] == "diverged"
        folder = out / "sweep" / f"{loss}-p+0-s0"
        assert read_json(folder / "config.json")["settings"]["loss"] == loss


def test_uv_table_matches_science(quick):
    _, path, _ = quick
    _, tables = _tables(path)
    uv = {r["quantity"]: r for r in tables[7]}
    for key in ("initial sharpness", "final sharpness"):
        assert _num(uv[key]["measured"]) == pytest.approx(
            _num(uv[key]["expected"]), abs=2e-3
        )
    assert _num(uv["min top-1 |cos| between steps"]["measured"]) == pytest.approx(
        0.54, abs=0.02
    )


def test_rerun_reuses_finished_runs_and_reruns_an_unfinished_one(quick, tmp_path):
    src, _, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    victim = out / "sweep" / "mse-p+1-s1"
    (victim / "summary.json").unlink()  # killed before its end
    lines = []
    reproduce(out, size="quick", progress=False, only=["sweep"], log=lines.append)
    reran = [line for line in lines if not line.endswith("reused")]
    assert reran == [
        "sweep/mse-p+1-s1: unfinished, running again from step 0",
        reran[1],
    ]
    assert reran[1].startswith("sweep/mse-p+1-s1: completed at step")
    assert (victim / "summary.json").is_file()
    plan = read_json(out / "plan.json")
    assert [r["run"] for r in plan["runs_last_invocation"] if not r["reused"]] == [
        "sweep/mse-p+1-s1"
    ]


def test_finished_run_with_other_settings_is_refused(quick, tmp_path):
    src, _, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    size = dataclasses.replace(SIZES["quick"], eos_steps=41)
    with pytest.raises(ReproduceError, match=r"steps: 40 there, 41 now.*--redo"):
        reproduce(out, size=size, progress=False, only=["eos"])
    with pytest.raises(ReproduceError, match="'quick' reproduction"):
        reproduce(out, size="full", progress=False, only=["uv"])


def test_report_regenerates_elsewhere(quick, tmp_path):
    out, path, _ = quick
    dest = write_report(out, report_dir=tmp_path / "docs")
    body = dest.read_text().split("\n---\nWritten by")
    assert body[0] == path.read_text().split("\n---\nWritten by")[0]
    assert f"report code {code_fingerprint()}" in body[1]
    assert (tmp_path / "docs" / "figures" / "sweep.png").is_file()


def test_bad_options_are_named(tmp_path, capsys):
    with pytest.raises(ReproduceError, match="unknown experiment.*'nope'"):
        reproduce(tmp_path, size="quick", only=["nope"])
    with pytest.raises(ReproduceError, match="size must be one of"):
        reproduce(tmp_path, size="huge")
    assert (
        main(["reproduce", "--quick", "--only", "eos,nope", "--out", str(tmp_path)])
        == 2
    )
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none")]) == 2
    assert "plan.json not found" in capsys.readouterr().err


# ------------------------------------------------------------------ analysis


def _recs(sharp, loss=None):
    loss = loss or [1.0] * len(sharp)
    return [
        {"step": i, "sharpness": s, "train_loss": lo}
        for i, (s, lo) in enumerate(zip(sharp, loss, strict=True))
    ]


def test_first_crossing_is_from_below():
    assert an.first_crossing(_recs([1, 2, 3, 2.5, 3.2]), 3.0) == 2
    assert an.first_crossing(_recs([4, 3.5, 3.1]), 3.0) == 0  # starts above, stays
    # starts above (a transient), drops below, comes back up at step 4
    assert an.first_crossing(_recs([5, 2, 2.5, 2.9, 3.0, 3.1]), 3.0) == 4
    assert an.first_crossing(_recs([1, 2, 2.9]), 3.0) is None
    assert an.first_crossing(_recs([None, float("nan")]), 3.0) is None


def test_plateau_ratio_statistics():
    sharp = [1.0, 2.0, 3.0, 3.3, 2.7, 3.0, 3.6]
    pr = an.plateau_ratio(_recs(sharp), 3.0)
    ratios = [1.0, 1.1, 0.9, 1.0, 1.2]
    assert pr["first_crossing"] == 2 and pr["n"] == 5
    assert pr["median"] == pytest.approx(1.0)
    assert pr["min"] == pytest.approx(0.9) and pr["max"] == pytest.approx(1.2)
    assert pr["p10"] == pytest.approx(an.quantile(ratios, 0.1))
    assert an.quantile([0.0, 10.0], 0.25) == pytest.approx(2.5)
    assert an.plateau_ratio(_recs([1.0]), 3.0)["median"] is None


def test_instability_events_need_a_rise_above_the_threshold():
    sharp = [3.5, 3.5, 3.5, 2.0, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5]
    loss = [1.0, 2.0, 1.5, 1.8, 1.0, 1.2, 0.9, 0.8, 0.7, 0.75, 0.6]
    # the loss rises after steps 0, 2, 4 and 8, each with S above 3 at that step;
    # rises within 3 steps of each other form one event
    events = an.instability_events(_recs(sharp, loss), 3.0, merge=3)
    assert events == [(0, 4), (8, 8)]
    assert an.instability_events(_recs(sharp, loss), 3.0, merge=1) == [
        (0, 0),
        (2, 2),
        (4, 4),
        (8, 8),
    ]
    assert an.instability_events(_recs(sharp, loss), 10.0) == []


def test_accumulated_rotation_and_phases():
    recs = _recs([1.0, 1.0, 3.5, 3.5])
    for r, c, a in zip(recs, [None, 1.0, 0.5, 0.8], [None, 0.0, 1.0, 0.2], strict=True):
        r.update(rotation_top1=c, max_principal_angle=a, subspace_similarity=c)
    recs[-1]["track_reference_similarity"] = math.cos(0.3)
    acc = an.accumulated_rotation(recs)
    assert acc["top1"] == pytest.approx(math.acos(0.5) + math.acos(0.8))
    assert acc["subspace"] == pytest.approx(1.2) and acc["n"] == 3
    assert acc["net"] == pytest.approx(0.3)
    rot = an.rotation_during(recs, 3.0, [(2, 2)])
    assert rot["stable"]["n"] == 1 and rot["stable"]["rotation_top1_min"] == 1.0
    assert rot["events"]["n"] == 2
    assert rot["events"]["rotation_top1_min"] == pytest.approx(0.5)


def test_tables_round_trip_escaped_pipes():
    text = "intro\n\n| a \\|x\\| | b |\n|---|---|\n| 1 | \\|y\\| |\n\nend\n"
    assert parse_tables(text) == [[{"a |x|": "1", "b": "|y|"}]]
    assert json.dumps(parse_tables("no tables")) == "[]"


DOCS = Path(__file__).resolve().parents[1] / "docs" / "reproduce"


def test_committed_full_report_is_current():
    """docs/reproduce holds the full-size report of a real run, made by the
    current code (regenerate: `curvx reproduce`, then `curvx report
    runs/reproduce --report-dir docs/reproduce`)."""
    text = (DOCS / "report.md").read_text()
    assert "Size `full`" in text
    assert f"report code {code_fingerprint()}" in text, (
        "docs/reproduce/report.md was made by other code: regenerate it"
    )
    assert "Not run" not in text
    images = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert len(images) == 6
    for img in images:
        assert (DOCS / img).read_bytes()[:4] == b"\x89PNG"
    tables = parse_tables(text)
    assert len(tables) == 8
    eos = tables[1]
    assert len(eos) >= 3


def test_report_dir_keeps_files_it_did_not_write(quick, tmp_path):
    out, _, _ = quick
    dest = tmp_path / "proj"
    (dest / "figures").mkdir(parents=True)
    (dest / "figures" / "keep.txt").write_text("mine")
    write_report(out, report_dir=dest)
    assert (dest / "figures" / "keep.txt").read_text() == "mine"
    (dest / "report.md").write_text("# my notes\n")
    with pytest.raises(ValueError, match="not a curvx reproduce report"):
        write_report(out, report_dir=dest)
    assert (dest / "report.md").read_text() == "# my notes\n"
    with pytest.raises(ReproduceError, match="not a curvx reproduce report"):
        reproduce(out, size="quick", only=["uv"], report_dir=dest)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReproduceError, match="exists and is not a folder"):
        reproduce(tmp_path / "afile", size="quick", only=["uv"])


def test_other_setting_on_the_same_out_is_refused_before_any_run(quick, tmp_path):
    src, _, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = (out / "plan.json").read_text()
    size = dataclasses.replace(SIZES["quick"], model="fc-relu")
    with pytest.raises(ReproduceError, match=r"model: 'fc-tanh' there, 'fc-relu' now"):
        reproduce(out, size=size, progress=False)
    assert (out / "plan.json").read_text() == before
    assert sorted(p.name for p in (out / "eos").iterdir()) == sorted(
        p.name for p in (src / "eos").iterdir()
    )


def test_truncated_metrics_make_a_run_unfinished(quick, tmp_path):
    src, _, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    name = read_json(out / "plan.json")["experiments"]["eos"]["runs"][0]["name"]
    metrics = out / "eos" / name / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(True)[:10]))
    lines = []
    reproduce(out, size="quick", progress=False, only=["eos"], log=lines.append)
    assert lines[0] == f"eos/{name}: unfinished, running again from step 0"
    assert len(read_metrics(metrics)) == SIZES["quick"].eos_steps + 1


def test_partial_reproduction_reports_the_runs_that_finished(quick, tmp_path):
    src, _, _ = quick
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    plan = read_json(out / "plan.json")
    runs = plan["experiments"]["sweep"]["runs"]
    # as if interrupted during the last sweep run: listed, not finished
    shutil.rmtree(out / "sweep" / runs[-1]["name"])
    text = write_report(out).read_text()
    _, tables = _tables(out / "report.md")
    assert "Not run" not in text
    assert sum(int(r["seeds"]) for t in tables[4:6] for r in t) == len(runs) - 1
    (out / "plan.json").write_text("garbage{")
    with pytest.raises(ValueError, match="not readable JSON"):
        write_report(out)
    with pytest.raises(ReproduceError, match="not readable JSON"):
        reproduce(out, size="quick", only=["uv"])


def test_only_ignores_empty_entries(tmp_path, capsys):
    code = main(
        ["reproduce", "--quick", "--only", "uv,", "--quiet", "--out", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    plan = read_json(tmp_path / "plan.json")
    assert plan["invocations"][-1]["only"] == ["uv"]
