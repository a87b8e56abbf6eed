"""End-to-end tests of ``curvx train`` / ``curvx plot`` on the digits data.

These runs use the real tracker (:func:`curvx.track`); they are small (300 examples,
15 steps) so the whole file stays within a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curvx.harness.cli import main
from curvx.harness.metrics import RECORD_KEYS

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--n-train", "300", "--n-test", "100", "--k", "2"]
PNGS = ("loss.png", "sharpness.png", "rotation.png")


def child_env() -> dict:
    """Environment for a child interpreter that can import this checkout."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_lines(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]  # every line must parse


def check_run_folder(out: Path, steps: int) -> tuple[dict, list[dict], dict]:
    config = json.loads((out / "config.json").read_text())
    records = read_lines(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
    assert [r["step"] for r in records] == list(range(steps + 1))
    for r in records:
        assert set(RECORD_KEYS) <= set(r), set(RECORD_KEYS) - set(r)
    return config, records, summary


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    args = ["train", *SMALL, *"--steps 15 --eval-every 5 --quiet".split()]
    code = main([*args, "--out", str(out)])
    return code, out


def test_train_in_process(small_run):
    code, out = small_run
    assert code == 0
    config, records, summary = check_run_folder(out, 15)

    settings = config["settings"]
    assert settings["dataset"] == "digits" and settings["n_train"] == 300
    assert config["dataset"]["n_train"] == 300
    assert config["dataset"]["train_subset"].startswith("first 300 examples")
    assert "0.5 * sum over the n_classes outputs" in config["loss"]["reduction"]
    assert config["optimizer"]["threshold"] == pytest.approx(2 / 0.05)
    assert config["tracking"]["enabled"] and config["tracking"]["policy"]
    for key in ("curvx", "torch", "extension"):
        assert key in config["versions"]
    assert config["command"].startswith("curvx train")
    assert config["device"]["device"] in ("cpu", "cuda")

    for r in records:
        assert r["status"] == "ok"
        assert r["train_loss"] is not None and r["step_seconds"] > 0
        # Tracked every step: eigenvalues present, descending, for the same loss.
        assert len(r["eigenvalues"]) == 2 and r["eigenvalues"][0] >= r["eigenvalues"][1]
        assert r["sharpness"] == r["eigenvalues"][0]
        assert len(r["residuals"]) == 2 and len(r["converged"]) == 2
        assert r["hvps"] > 0 and r["track_seconds"] > 0
        assert r["track_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert r["lambda_min"] is None
        assert (r["test_loss"] is not None) == (r["step"] % 5 == 0 or r["step"] == 15)
    assert records[0]["rotation_top1"] is None
    assert all(0 <= r["rotation_top1"] <= 1 + 1e-6 for r in records[1:])
    assert all(0 <= r["subspace_similarity"] <= 1 + 1e-6 for r in records[1:])

    assert summary["status"] == "completed" and summary["n_records"] == 16
    assert summary["n_track_failures"] == 0 and summary["n_tracked"] == 16
    assert summary["final_sharpness"] == records[-1]["sharpness"]
    assert summary["median_hvps"] > 0 and summary["wall_seconds"] > 0
    assert summary["train_loss"]["final"] < summary["train_loss"]["max"]


def test_plot_command_regenerates(small_run, capsys):
    _, out = small_run
    for name in PNGS:
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert all((out / name).is_file() for name in PNGS)
    assert main(["plot", str(out / "nope")]) == 2
    assert "not a curvx run folder" in capsys.readouterr().err


def test_existing_run_folder_needs_overwrite(small_run, capsys):
    _, out = small_run
    args = ["train", *SMALL, "--steps", "1", "--quiet", "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_train_subprocess(tmp_path):
    out = tmp_path / "sub"
    # Same job as the in-process run, tracked every 5th step to save time.
    args = "train --dataset digits --n-train 300 --steps 15 --k 2 --track-every 5"
    args = args.split()
    cmd = [sys.executable, "-m", "curvx.harness.cli", *args, "--out", str(out)]
    proc = subprocess.run(
        cmd, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "completed at step 15" in proc.stdout
    config, records, summary = check_run_folder(out, 15)
    assert config["argv"][:2] == ["curvx", "train"]
    assert summary["status"] == "completed" and summary["n_track_failures"] == 0
    tracked = [r["step"] for r in records if r["sharpness"] is not None]
    assert tracked == [0, 5, 10, 15]
    assert records[5]["rotation_top1"] is not None  # vs the previous tracked step


def test_momentum_with_lambda_min(tmp_path):
    out = tmp_path / "lm"
    argv = (
        "train --dataset digits --n-train 100 --n-test 20 --width 16 --k 1 --steps 2 "
        "--lambda-min --optimizer momentum --quiet --no-plots"
    ).split()
    argv += ["--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"]["threshold_rule"] == "2(1+beta)/lr"
    assert config["optimizer"]["threshold"] == pytest.approx(2 * 1.9 / 0.05)
    records = read_lines(out / "metrics.jsonl")
    assert len(records) == 3
    assert all(r["lambda_min"] is not None for r in records)
    assert all(r["lambda_min"] <= r["sharpness"] for r in records)
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_parsable_metrics(tmp_path, sig):
    out = tmp_path / "killed"
    # Tracking off: this test is about durable writes, and a cold tracker start
    # would only add seconds.
    args = ["train", *SMALL, *"--steps 100000 --track-every 0 --quiet".split()]
    cmd = [sys.executable, "-m", "curvx.harness.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count("\n") >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    records = read_lines(metrics)
    assert len(records) >= 5
    assert [r["step"] for r in records] == list(range(len(records)))
    assert json.loads((out / "config.json").read_text())["settings"]["steps"] == 100000
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "summary.json").exists()
    else:  # SIGTERM (a scheduler's stop) closes the run like Ctrl-C
        assert proc.returncode == 128 + signal.SIGTERM
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted"
    # A killed run can still be plotted.
    assert main(["plot", str(out)]) == 0


def test_divergence_stops_cleanly(tmp_path):
    out = tmp_path / "div"
    code = main(
        ["train", *SMALL, "--lr", "1e6", "--steps", "50", "--quiet", "--out", str(out)]
    )
    assert code == 0
    records = read_lines(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    last = records[-1]
    assert last["status"] == "diverged" and summary["diverged_at_step"] == last["step"]
    assert last["step"] < 50 and len(records) == last["step"] + 1
    assert all(r["status"] == "ok" for r in records[:-1])
    assert records[0]["train_loss"] is not None
    assert all((out / name).is_file() for name in PNGS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "--lr: must be a finite number > 0"),
        (["--lr", "abc"], "--lr: expected a number"),
        (["--k", "0"], "--k: must be >= 1"),
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--momentum", "1.5"], "--momentum: must be in [0, 1)"),
        (["--n-train", "5000"], "more than the 1500 training examples digits has"),
        (["--model", "deep-linear", "--depth", "0"], "depth must be >= 1"),
        (["--track-method", "magic"], "tracker settings rejected"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    argv = "train --dataset digits --steps 1 --quiet".split()
    argv += ["--out", str(tmp_path / "bad"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written for a refused run


def test_cifar_missing_is_a_clear_error(tmp_path, capsys):
    argv = "train --dataset cifar10 --steps 1 --quiet".split()
    argv += ["--data-dir", str(tmp_path), "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and str(tmp_path) in err
    assert not (tmp_path / "c").exists()


def test_help_and_missing_command(capsys):
    assert main(["train", "--help"]) == 0
    assert "--track-every" in capsys.readouterr().out
    assert main([]) == 2


def test_cuda_unavailable_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path cannot be reached")
    argv = ["train", *SMALL, *"--device cuda --steps 1 --quiet".split()]
    argv += ["--out", str(tmp_path / "g")]
    assert main(argv) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_fused_and_unfused_runs_train_the_same(tmp_path):
    """The fused step's gradient is the plain one: same trajectory either way."""
    base = ["train", *SMALL, *"--steps 6 --eval-every 3 --quiet --no-plots".split()]
    fused, unfused = tmp_path / "fused", tmp_path / "unfused"
    assert main([*base, "--out", str(fused)]) == 0
    assert main([*base, "--unfused", "--out", str(unfused)]) == 0
    a = read_lines(fused / "metrics.jsonl")
    b = read_lines(unfused / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        assert ra["sharpness"] == pytest.approx(rb["sharpness"], rel=1e-3)
        # fused: training accuracy on evaluation steps only
        assert (ra["train_acc"] is None) == (ra["step"] % 3 != 0 and ra["step"] != 6)
        assert rb["train_acc"] is not None
    config = json.loads((fused / "config.json").read_text())
    assert config["tracking"]["fused"] is True
    assert config["tracking"]["policy"]["precision"]["basis"] == "float64"


def test_adam_run_tracks_the_preconditioned_sharpness(tmp_path):
    out = tmp_path / "adam"
    args = ["train", *SMALL, "--optimizer", "adam", "--lr", "0.01"]
    code = main([*args, *"--steps 4 --quiet --no-plots --out".split(), str(out)])
    assert code == 0
    records = read_lines(out / "metrics.jsonl")
    assert records[0]["track_preconditioned"] is False  # no Adam state yet
    assert all(r["track_preconditioned"] for r in records[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == pytest.approx(38 / 0.01)
    assert summary["final_sharpness_over_threshold"] is not None


def test_untracked_rows_carry_every_key(tmp_path):
    out = tmp_path / "every3"
    args = ["train", *SMALL, *"--steps 4 --track-every 3 --quiet --no-plots".split()]
    assert main([*args, "--out", str(out)]) == 0
    rows = read_lines(out / "metrics.jsonl")
    keys = set(rows[0])
    assert all(set(r) == keys for r in rows)
    assert rows[1]["sharpness"] is None and rows[1]["track_crossings"] is None
    assert rows[3]["sharpness"] is not None


def test_fused_step_refuses_train_mode_batchnorm_under_eval_policy():
    import torch

    import curvx

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )
    X, y = torch.randn(32, 4), torch.randn(32, 2)
    tracker = curvx.track(model, torch.nn.functional.mse_loss, (X, y), k=1)
    with pytest.raises(ValueError, match="mode='eval'.*BatchNorm1d"):
        tracker.step(backward=True)
    model.eval()
    assert tracker.step(backward=True).status == "ok"
    model.train()
    ok = curvx.track(model, torch.nn.functional.mse_loss, (X, y), k=1, mode="train")
    model.zero_grad()
    ok.step(backward=True)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_loss_target_ends_the_run_on_a_tracked_evaluated_step(tmp_path):
    out = tmp_path / "target"
    args = ["train", *SMALL, "--steps", "200", "--lr", "0.05", "--track-every", "7"]
    args += ["--eval-every", "0", "--target-loss", "0.3", "--quiet", "--out", str(out)]
    assert main(args) == 0
    records = read_lines(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    last = records[-1]
    assert summary["status"] == "completed" and summary["stopped"] == "target"
    assert summary["target_reached_at_step"] == last["step"] < 200
    assert last["train_loss"] <= 0.3 < records[-2]["train_loss"]
    # the final record is tracked and evaluated even off the schedules
    assert last["step"] % 7 != 0 or last["sharpness"] is not None
    assert last["sharpness"] is not None and last["test_acc"] is not None
    assert last["train_acc"] is not None


def test_diverge_factor_ends_a_runaway_run(tmp_path):
    out = tmp_path / "runaway"
    args = ["train", *SMALL, "--steps", "60", "--lr", "3", "--track-every", "0"]
    args += ["--diverge-factor", "10", "--quiet", "--out", str(out)]
    assert main(args) == 0
    records = read_lines(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "diverge_factor 10" in summary["diverged_because"]
    assert records[-1]["status"] == "diverged"
    assert records[-1]["train_loss"] > 10 * records[0]["train_loss"]
    assert all(r["train_loss"] <= 10 * records[0]["train_loss"] for r in records[:-1])


def test_track_options_reach_the_tracker_and_bad_ones_are_named(tmp_path, capsys):
    out = tmp_path / "opts"
    args = ["train", *SMALL, "--steps", "2", "--quiet", "--out", str(out)]
    args += ["--track-option", "kato_temple=false", "--track-option", "guard_every=1"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["track_options"] == {
        "kato_temple": False,
        "guard_every": 1,
    }
    assert config["tracking"]["policy"]["kato_temple"] is False
    assert config["tracking"]["policy"]["guard_every"] == 1
    records = read_lines(out / "metrics.jsonl")
    assert all(c == "residual" for c in records[-1]["certificates"])
    bad = ["train", *SMALL, "--steps", "1", "--quiet", "--out", str(tmp_path / "b")]
    assert main([*bad, "--track-option", "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert main([*bad, "--track-option", "k=3"]) == 2
    assert "track_options may not set ['k']" in capsys.readouterr().err
    assert main([*bad, "--track-option", "=3"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
