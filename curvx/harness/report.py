"""The reproduction report: Markdown tables and PNG figures from run folders.

:func:`write_report` reads an output folder of :func:`curvx.harness.reproduce.
reproduce` (``plan.json``, ``probes.json`` and the run folders) and writes
``report.md`` with ``figures/*.png`` next to it. Every number in the report is
computed here from the runs' ``metrics.jsonl`` / ``summary.json`` (through
:mod:`curvx.harness.analysis`), so ``curvx report OUT`` regenerates it at any
time, also from a partial reproduction (missing sections say so).

Tables are GitHub Markdown pipe tables; :func:`parse_tables` reads them back.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import statistics
from pathlib import Path

from curvx.harness import analysis as an
from curvx.harness.metrics import read_json, read_metrics

logger = logging.getLogger(__name__)

__all__ = ["parse_tables", "write_report"]

_TITLE = "# curvx reproduce: edge of stability, rotation and depth"
#: The figures a report writes into its ``figures/`` folder.
FIGURES = (
    "eos.png",
    "rotation.png",
    "depth.png",
    "sweep.png",
    "optimizers.png",
    "uv.png",
)

#: The uv model's values in science.md (derived there; the report compares).
UV_EXPECTED = {
    "initial sharpness": 9.216,
    "min top-1 |cos| between steps": 0.54,
    "final sharpness": 3.273,
}


# --------------------------------------------------------------------------- io


class _Run:
    """One run folder: config, summary and step records."""

    def __init__(self, path: Path):
        self.path = path
        self.config = read_json(path / "config.json")
        self.summary = read_json(path / "summary.json")
        self.records = read_metrics(path / "metrics.jsonl")
        self.settings = self.config["settings"]
        self.threshold = float(self.config["optimizer"]["threshold"])

    @property
    def lr(self) -> float:
        return float(self.settings["lr"])

    @property
    def status(self) -> str:
        return self.summary["status"]

    def final(self, key: str):
        return self.summary.get(key, {}).get("final")


def _setting(run: _Run) -> str:
    """The model and data of a run, in words."""
    s = run.settings
    model = run.config.get("model", {})
    return (
        f"{s['model']} (depth {model.get('depth')}, width {model.get('width')}) on "
        f"the first {run.config['dataset']['n_train']} training examples of "
        f"{s['dataset']}"
    )


def _load(out: Path, experiment: str, name: str) -> _Run | None:
    path = out / experiment / name
    if not (path / "summary.json").is_file():
        return None
    try:
        return _Run(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("cannot read %s: %r", path, exc)
        return None


# ---------------------------------------------------------------- formatting


def _f(x, digits: int = 4) -> str:
    if not an.finite(x):
        return "n/a"
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
        return f"{x:.2e}"
    if abs(x) >= 10**digits:  # 19000, not 1.9e+04
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _secs(x) -> str:
    return f"{float(x):.1f}" if an.finite(x) else "n/a"


def _minutes(x) -> str:
    return f"{float(x) / 60:.1f}" if an.finite(x) else "n/a"


def _pm(xs: list[float]) -> str:
    xs = [x for x in xs if an.finite(x)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return _f(xs[0])
    return f"{_f(statistics.mean(xs))} ± {_f(statistics.stdev(xs), 2)}"


def _med_min(group: dict, key: str) -> str:
    return f"{_f(group[f'{key}_median'])} ({_f(group[f'{key}_min'])})"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def parse_tables(markdown: str) -> list[list[dict[str, str]]]:
    """The pipe tables of a Markdown text, each as a list of row dicts."""
    tables, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [
                [
                    c.strip().replace("\\|", "|")
                    for c in _CELL_SPLIT.split(row.strip()[1:-1])
                ]
                for row in block
            ]
            header = cells[0]
            tables.append([dict(zip(header, row, strict=True)) for row in cells[2:]])
        block = []
    return tables


# ------------------------------------------------------------------- figures


def _figure(nrows: int = 1, ncols: int = 1, size=(7.5, 4.4), **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, figures: Path, name: str) -> str:
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / name)
    return f"figures/{name}"


def _shade_events(ax, events, label: bool) -> None:
    for i, (a, b) in enumerate(events):
        ax.axvspan(
            a,
            b + 1,
            color="tab:red",
            alpha=0.15,
            lw=0,
            label="instability (loss rises, S > 2/lr)" if label and i == 0 else None,
        )


# ------------------------------------------------------------------ sections


def _eos_runs(out: Path, plan: dict) -> list[_Run]:
    info = plan.get("experiments", {}).get("eos", {})
    runs = [_load(out, "eos", r["name"]) for r in info.get("runs", [])]
    return [r for r in runs if r is not None]


def _section_eos(out: Path, plan: dict, figures: Path) -> str:
    runs = _eos_runs(out, plan)
    head = "## 1. Edge of stability\n\n"
    if not runs:
        return head + "Not run (no finished runs under `eos/`).\n"
    lam0 = plan["experiments"]["eos"].get("lambda0")
    fig, axes = _figure(2, 1, size=(7.5, 6.4), sharex=True)
    ax_loss, ax_s = axes[0, 0], axes[1, 0]
    rows, medians = [], []
    for i, run in enumerate(runs):
        color = f"C{i}"
        label = f"lr = {run.lr:.4g}"
        xs, ys = an.series(run.records, "train_loss")
        ax_loss.plot(xs, ys, color=color, lw=1, label=label)
        xs, ys = an.series(run.records, "sharpness")
        ax_s.plot(xs, ys, color=color, lw=1.2, label=label + " sharpness")
        ax_s.axhline(
            run.threshold,
            color=color,
            ls="--",
            lw=1,
            label=f"2/lr = {run.threshold:.4g}",
        )
        pr = an.plateau_ratio(run.records, run.threshold)
        medians.append(pr["median"])
        rows.append(
            [
                _f(run.lr),
                _f(run.threshold),
                _f(pr["first_crossing"])
                if pr["first_crossing"] is not None
                else "never",
                _f(pr["median"]),
                f"{_f(pr['p10'])} – {_f(pr['p90'])}",
                str(pr["n"]),
                _f(run.final("train_loss")),
                _f(run.final("test_acc")),
                _f(run.summary.get("median_hvps")),
                _secs(run.summary.get("wall_seconds")),
            ]
        )
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("train loss (MSE)")
    ax_loss.legend(fontsize=8)
    ax_s.set_xlabel("step")
    ax_s.set_ylabel(r"sharpness $\lambda_{\max}$")
    ax_s.legend(fontsize=7, ncol=2)
    s0 = runs[0].settings
    fig.suptitle(
        f"{s0['dataset']} (first {s0['n_train']}), {s0['model']}, MSE, full-batch GD",
        fontsize=10,
    )
    img = _save(fig, figures, "eos.png")
    table = _table(
        [
            "lr",
            "2/lr",
            "first crossing (step)",
            "plateau ratio median",
            "p10 – p90",
            "tracked steps from the crossing",
            "final train loss",
            "final test acc",
            "median HVPs/step",
            "run seconds",
        ],
        rows,
    )
    valid = [m for m in medians if an.finite(m)]
    verdict = (
        f"Measured: the median of sharpness / (2/lr) after the first crossing is "
        f"{_f(min(valid))} to {_f(max(valid))} across the {len(valid)} learning rates "
        f"that reached the threshold"
        + (
            f" ({len(runs) - len(valid)} never reached it within the step budget)"
            if len(valid) < len(runs)
            else ""
        )
        + "."
        if valid
        else "Measured: no run reached its threshold within the step budget."
    )
    return (
        head
        + f"{_setting(runs[0])}, MSE, full-batch GD; thresholds 2/lr set above the "
        "initial "
        f"sharpness lambda_0 = {_f(lam0)} (certified probe). Expected (Cohen et al. "
        "2021): the sharpness rises until it reaches 2/lr, then hovers at or just "
        "above it while the loss keeps falling, non-monotonically.\n\n"
        f"![sharpness and loss against the step]({img})\n\n"
        + table
        + "\n\nPlateau ratio: sharpness / (2/lr) at the tracked steps from the first "
        "crossing on (the first step at or above 2/lr after being below it, or "
        "step 0 if it starts above).\n\n" + verdict + "\n"
    )


def _section_rotation(out: Path, plan: dict, figures: Path) -> str:
    runs = _eos_runs(out, plan)
    head = "## 2. Eigenvector rotation at instabilities\n\n"
    if not runs:
        return head + "Not run (it reads the runs of section 1).\n"
    fig, axes = _figure(len(runs), 1, size=(7.5, 2.3 * len(runs) + 0.6), sharex=True)
    rows = []
    for i, run in enumerate(runs):
        ax = axes[i, 0]
        events = an.instability_events(run.records, run.threshold)
        _shade_events(ax, events, label=i == 0)
        xs, ys = an.series(run.records, "rotation_top1")
        ax.plot(xs, ys, lw=0.9, color="C0", label="top-1 |cos| (matched)")
        xs, ys = an.series(run.records, "subspace_similarity")
        ax.plot(
            xs,
            ys,
            lw=0.9,
            color="C1",
            label=f"top-{run.settings['k']} subspace similarity",
        )
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("similarity")
        ax2 = ax.twinx()
        xs, ys = an.series(run.records, "sharpness")
        ax2.plot(xs, [y / run.threshold for y in ys], color="0.4", lw=0.8, ls=":")
        ax2.axhline(1.0, color="0.4", lw=0.6, ls="--")
        ax2.set_ylabel("S / (2/lr)", color="0.4", fontsize=8)
        ax.set_title(f"lr = {run.lr:.4g} (2/lr = {run.threshold:.4g})", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
        rot = an.rotation_during(run.records, run.threshold, events)
        crossings = sum(1 for r in run.records if r.get("track_crossings"))
        swaps = sum(
            1
            for r in run.records
            if an.finite(r.get("track_top1_cosine"))
            and an.finite(r.get("subspace_similarity"))
            and r["track_top1_cosine"] < 0.5
            and r["subspace_similarity"] > 0.9
        )
        rows.append(
            [
                _f(run.lr),
                str(len(events)),
                _med_min(rot["stable"], "rotation_top1"),
                _med_min(rot["events"], "rotation_top1"),
                _f(rot["stable"]["subspace_similarity_median"]),
                _med_min(rot["events"], "subspace_similarity"),
                str(crossings),
                str(swaps),
            ]
        )
    axes[-1, 0].set_xlabel("step")
    img = _save(fig, figures, "rotation.png")
    table = _table(
        [
            "lr",
            "instability events",
            "top-1 |cos| stable: median (min)",
            "top-1 |cos| in events: median (min)",
            "subspace sim. stable: median",
            "subspace sim. in events: median (min)",
            "steps with eigenvalue crossings",
            "swaps (ordered top-1 |cos| < 0.5, subspace > 0.9)",
        ],
        rows,
    )
    return (
        head + "The runs of section 1, between consecutive steps: top-1 |cos| (the "
        "previous top eigenvector against its match by overlap among the new "
        "top-k), and the top-k subspace similarity cos(rms principal angle). "
        "Stable: the steps before the first crossing; events: the steps of an "
        "instability (the loss rose while S > 2/lr) and the step after. Expected "
        "(Wang & Roberts): |cos| near 1 while S < 2/lr, dips at instabilities; "
        "individual vectors may swap while the top-k subspace stays similar.\n\n"
        f"![rotation against the step]({img})\n\n" + table + "\n"
    )


def _section_depth(out: Path, plan: dict, figures: Path) -> str:
    head = "## 3. Depth 1 against depth > 1\n\n"
    info = plan.get("experiments", {}).get("depth", {})
    runs = [(r, _load(out, "depth", r["name"])) for r in info.get("runs", [])]
    runs = [(meta, run) for meta, run in runs if run is not None]
    if not runs:
        return head + "Not run (no finished runs under `depth/`).\n"
    fig, axes = _figure(1, 2, size=(10, 4.2))
    ax_a, ax_s = axes[0, 0], axes[0, 1]
    rows = []
    floor = 1e-17
    depths = sorted({m["depth"] for m, _ in runs})
    styles = ["-", "--", ":", "-."]
    factors = sorted({m["factor"] for m, _ in runs})
    for meta, run in runs:
        color = f"C{depths.index(meta['depth'])}"
        ls = styles[factors.index(meta["factor"]) % len(styles)]
        label = f"depth {meta['depth']}, lr = {meta['factor']:g} x 2/λ0"
        xs, ys = an.series(run.records, "max_principal_angle")
        ax_a.plot(
            xs, [max(y, floor) for y in ys], color=color, ls=ls, lw=1, label=label
        )
        xs, ys = an.series(run.records, "sharpness")
        ax_s.plot(
            xs, [y * run.lr / 2 for y in ys], color=color, ls=ls, lw=1, label=label
        )
        rel = [
            max(r["residuals"]) / max(abs(r["sharpness"]), 1e-300)
            for r in run.records
            if r.get("residuals") and an.finite(r.get("sharpness"))
        ]
        angles = an.series(run.records, "max_principal_angle")[1]
        tol = run.settings.get("tol")
        diverged = run.summary.get("diverged_at_step")
        rows.append(
            [
                str(meta["depth"]),
                _f(meta["lambda0"]),
                f"{meta['factor']:g}",
                _f(run.lr),
                run.status + (f" at step {diverged}" if diverged is not None else ""),
                str(len(angles)),
                _f(max(angles)) if angles else "n/a",
                _f(statistics.median(angles)) if angles else "n/a",
                _f(max(rel)) if rel else "n/a",
                _f(tol),
                ("yes" if max(angles) <= tol else "no") if angles and tol else "n/a",
            ]
        )
    ax_a.set_yscale("log")
    ax_a.set_ylim(floor / 2, 3)
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("largest principal angle between steps (rad)")
    tols = {r.settings.get("tol") for _, r in runs}
    for tol in sorted(t for t in tols if an.finite(t)):
        ax_a.axhline(tol, color="0.4", ls=":", lw=1, label=f"solver tol {tol:g}")
    ax_a.legend(fontsize=7)
    ax_s.axhline(1.0, color="k", ls="--", lw=0.8, label="lr·S/2 = 1 (S = 2/lr)")
    ax_s.set_yscale("log")  # a diverging network's sharpness explodes
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("lr · sharpness / 2")
    ax_s.legend(fontsize=7)
    s0 = runs[0][1].settings
    fig.suptitle(
        f"deep linear networks, MSE, GD, {s0['dataset']} (first {s0['n_train']}), "
        f"width {s0['width']}, {s0['dtype']}",
        fontsize=10,
    )
    img = _save(fig, figures, "depth.png")
    table = _table(
        [
            "depth",
            "λ0",
            "lr / (2/λ0)",
            "lr",
            "status",
            "consecutive step pairs",
            "max angle (rad)",
            "median angle (rad)",
            "max relative residual",
            "solver tol",
            "max angle ≤ tol",
        ],
        rows,
    )
    d1 = [
        (max(an.series(r.records, "max_principal_angle")[1], default=math.nan), r)
        for m, r in runs
        if m["depth"] == 1
    ]
    deeper = [
        max(an.series(r.records, "max_principal_angle")[1], default=math.nan)
        for m, r in runs
        if m["depth"] > 1
    ]
    parts = []
    if d1:
        worst = max(a for a, _ in d1)
        parts.append(
            f"at depth 1 the largest angle over all steps and learning rates is "
            f"{_f(worst)} rad (solver tolerance {_f(d1[0][1].settings.get('tol'))})"
        )
    if deeper:
        parts.append(
            f"at depth > 1 the largest angles per run range from "
            f"{_f(min(deeper))} to {_f(max(deeper))} rad"
        )
    return (
        head
        + "Bias-free deep linear networks (depth = number of linear layers; depth 1 "
        "is a linear model, whose MSE Hessian X^T X / n ⊗ I is the same at every "
        "parameter), at learning rates set from each network's initial sharpness "
        "λ0. Solves use residual certificates (no Kato-Temple) at a tight tolerance "
        "so that the eigenvectors, not only the values, are accurate to the "
        "tolerance. Angle: the largest principal angle between the top-k subspaces "
        "(extended to whole clusters: at depth 1 every eigenvalue repeats once per "
        "output) of consecutive steps. Expected: 0 at depth 1 at every learning "
        "rate, also while GD diverges; non-zero beyond it.\n\n"
        f"![angles and lr·S/2 per depth]({img})\n\n"
        + table
        + "\n\nMeasured: "
        + "; ".join(parts)
        + ".\n"
    )


def _section_sweep(out: Path, plan: dict, figures: Path) -> str:
    head = "## 4. Learning-rate sweep\n\n"
    sweep = plan.get("experiments", {}).get("sweep", {})
    size = plan.get("size", {})
    info: dict[str, dict] = {}
    for meta in sweep.get("runs", []):
        lam0 = sweep.get("lambda0", {}).get(meta["loss"])
        if lam0 is not None and _load(out, "sweep", meta["name"]) is not None:
            info.setdefault(meta["loss"], {"lambda0": lam0, "runs": []})
            info[meta["loss"]]["runs"].append(meta)
    if not info:
        return head + "Not run (no finished runs under `sweep/`).\n"
    first_meta = next(iter(info.values()))["runs"][0]
    first = _load(out, "sweep", first_meta["name"])
    n_losses = len(info)
    fig, axes = _figure(n_losses, 3, size=(13, 3.6 * n_losses + 0.4))
    text = []
    for li, (loss, linfo) in enumerate(info.items()):
        lam0 = linfo["lambda0"]
        thr_lr = 2.0 / lam0
        by_power: dict[int, list[tuple[dict, _Run]]] = {}
        for meta in linfo["runs"]:
            run = _load(out, "sweep", meta["name"])
            if run is not None:
                by_power.setdefault(meta["power"], []).append((meta, run))
        rows = []
        pts: dict[str, list[tuple[float, list[float]]]] = {
            "test_acc": [],
            "sharp": [],
            "rot": [],
        }
        diverged_lrs = []
        target = dict(map(tuple, size.get("sweep_target", []))).get(loss)
        best = None
        for power in sorted(by_power):
            group = by_power[power]
            lr = group[0][0]["lr"]
            div = [r for _, r in group if r.status == "diverged"]
            ok = [r for _, r in group if r.status != "diverged"]
            acc = [r.final("test_acc") for r in ok]
            sharp = [r.summary.get("final_sharpness") for r in ok]
            rot = [an.accumulated_rotation(r.records)["top1"] for r in ok]
            reached = [r for r in ok if r.summary.get("stopped") == "target"]
            steps = [r.summary.get("last_step") for r in ok]
            pts["test_acc"].append((lr, acc))
            pts["sharp"].append((lr, sharp))
            pts["rot"].append((lr, rot))
            if len(div) == len(group):
                diverged_lrs.append(lr)
            good = [a for a in acc if an.finite(a)]
            if good and (best is None or statistics.mean(good) > best[1]):
                best = (lr, statistics.mean(good), power)
            rows.append(
                [
                    _f(lr),
                    f"2^{power}",
                    str(len(group)),
                    f"{len(div)}/{len(group)}",
                    f"{len(reached)}/{len(ok)}" if ok else "–",
                    _f(statistics.median(steps)) if steps else "–",
                    _pm(acc) if ok else "diverged",
                    _pm(sharp) if ok else "diverged",
                    _pm(rot) if ok else "diverged",
                ]
            )
        color = f"C{li}"
        for key, ax in zip(("test_acc", "sharp", "rot"), axes[li], strict=True):
            xs = [lr for lr, v in pts[key] if any(an.finite(x) for x in v)]
            means = [
                statistics.mean([x for x in v if an.finite(x)])
                for _, v in pts[key]
                if any(an.finite(x) for x in v)
            ]
            errs = [
                statistics.stdev([x for x in v if an.finite(x)])
                if sum(an.finite(x) for x in v) > 1
                else 0.0
                for _, v in pts[key]
                if any(an.finite(x) for x in v)
            ]
            ax.errorbar(
                xs,
                means,
                yerr=errs,
                color=color,
                marker="o",
                ms=4,
                capsize=3,
                label=f"{loss.upper()}: mean ± sd over seeds",
            )
            ax.set_title(f"{loss.upper()}, λ0 = {lam0:.4g}", fontsize=9)
            for lr, v in pts[key]:
                for x in v:
                    if an.finite(x):
                        ax.plot(lr, x, ".", color=color, alpha=0.35, ms=3)
            ax.axvline(thr_lr, color="k", ls="--", lw=0.9, label="2/λ0")
            if key == "sharp" and pts[key]:
                grid = [lr for lr, _ in pts[key]]
                ax.plot(
                    grid,
                    [2 / lr for lr in grid],
                    color="0.5",
                    ls=":",
                    lw=1,
                    label="2/lr",
                )
            for lr in diverged_lrs:
                ax.plot(
                    lr,
                    0.02,
                    "x",
                    color=color,
                    ms=8,
                    mew=2,
                    transform=ax.get_xaxis_transform(),
                    label="all seeds diverged" if lr == diverged_lrs[0] else None,
                )
            ax.legend(fontsize=7)
        table = _table(
            [
                "lr",
                "lr / (2/λ0)",
                "seeds",
                "diverged",
                f"reached loss {_f(target)}",
                "steps (median)",
                "test acc",
                "final sharpness",
                "accumulated top-1 rotation (rad)",
            ],
            rows,
        )
        verdict = ""
        if best is not None:
            side = {1: "past", 0: "at", -1: "below"}[(best[2] > 0) - (best[2] < 0)]
            verdict = (
                f"\n\nMeasured ({loss.upper()}): the best mean test accuracy, "
                f"{_f(best[1])}, is at lr = {_f(best[0])} = 2^{best[2]} x 2/λ0, "
                f"{side} the threshold 2/λ0 = {_f(thr_lr)}."
            )
        text.append(
            f"### {loss.upper()} (λ0 = {_f(lam0)}, 2/λ0 = {_f(thr_lr)})\n\n"
            + table
            + verdict
        )
    for row in axes:
        for ax, ylabel in zip(
            row,
            ("test accuracy", "final sharpness", "accumulated top-1 rotation (rad)"),
            strict=True,
        ):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
        row[1].set_yscale("log")
    img = _save(fig, figures, "sweep.png")
    seeds = size.get("sweep_seeds", [])
    return (
        head + f"{_setting(first)}, "
        f"full-batch GD at lr = 2^p x 2/λ0 (λ0: the initial sharpness of seed "
        f"{seeds[0] if seeds else 0}) from p = {size.get('sweep_min_power')} up to "
        f"the first p at which every seed diverged (at most p = "
        f"{size.get('sweep_max_power')}); seeds {', '.join(map(str, seeds))}; each "
        f"run stops at the training-loss target or after {size.get('sweep_steps')} "
        f"steps; a run diverged when its loss became non-finite or exceeded "
        f"{_f(size.get('sweep_diverge_factor'))} x its initial loss. Test accuracy "
        "on the test split at the final parameters, mean ± standard deviation over "
        "the seeds that did not diverge; diverged learning rates are marked x on the "
        "axis; accumulated rotation: the sum of the top-1 angles arccos|cos| between "
        f"tracked steps (every {size.get('sweep_track_every')} steps). Expected "
        "(Wang & Roberts): learning rates past 2/λ0 but not divergent generalize "
        "best.\n\n"
        f"![test accuracy, final sharpness and rotation against lr]({img})\n\n"
        + "\n\n".join(text)
        + "\n"
    )


def _section_optim(out: Path, plan: dict, figures: Path) -> str:
    head = "## 5. Momentum and Adam\n\n"
    info = plan.get("experiments", {}).get("optim", {})
    runs = [(m, _load(out, "optim", m["name"])) for m in info.get("runs", [])]
    runs = [(m, r) for m, r in runs if r is not None]
    if not runs:
        return head + "Not run (no finished runs under `optim/`).\n"
    fig, axes = _figure(1, len(runs), size=(5 * len(runs), 4))
    rows = []
    for i, (meta, run) in enumerate(runs):
        ax = axes[0, i]
        pre = meta["optimizer"] == "adam"
        # Adam's first record has no state yet: the plain Hessian, left out
        records = [
            r
            for r in run.records
            if not (pre and r.get("track_preconditioned") is False)
        ]
        xs, ys = an.series(records, "sharpness")
        rule = run.config["optimizer"]["threshold_rule"]
        ax.plot(xs, ys, lw=1, label="preconditioned sharpness" if pre else "sharpness")
        ax.axhline(
            run.threshold,
            color="k",
            ls="--",
            lw=1,
            label=f"{rule} = {run.threshold:.4g}",
        )
        ax.set_xlabel("step")
        ax.set_ylabel(
            r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$" if pre else r"$\lambda_{\max}(H)$"
        )
        ax.set_title(f"{meta['optimizer']}, lr = {run.lr:.4g}", fontsize=9)
        if pre:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        pr = an.plateau_ratio(records, run.threshold)
        rows.append(
            [
                meta["optimizer"],
                _f(run.lr),
                rule,
                _f(run.threshold),
                _f(pr["first_crossing"])
                if pr["first_crossing"] is not None
                else "never",
                _f(pr["median"]),
                f"{_f(pr['p10'])} – {_f(pr['p90'])}",
                _f(run.final("train_loss")),
            ]
        )
    img = _save(fig, figures, "optimizers.png")
    return (
        head + f"{_setting(runs[0][1])}, MSE, full batch. Heavy-ball momentum (β = "
        f"{plan.get('size', {}).get('momentum_beta')}) is stable on a quadratic "
        "while the sharpness is below 2(1+β)/lr; Adam's preconditioned sharpness "
        "λmax(P^-1/2 H P^-1/2), P from Adam's state, settles at (2+2β1)/((1-β1) lr) "
        "= 38/lr at β1 = 0.9 (Cohen et al. 2022). Plateau ratio as in section 1 (for "
        "Adam from its first step with state: step 0 measures the plain Hessian).\n\n"
        f"![sharpness against the optimizer's threshold]({img})\n\n"
        + _table(
            [
                "optimizer",
                "lr",
                "threshold rule",
                "threshold",
                "first crossing (step)",
                "plateau ratio median",
                "p10 – p90",
                "final train loss",
            ],
            rows,
        )
        + "\n"
    )


def _section_uv(out: Path, plan: dict, figures: Path) -> str:
    head = "## 6. The uv model: a catapult\n\n"
    path = out / "uv" / "trajectory.jsonl"
    if not (out / "uv" / "summary.json").is_file() or not path.is_file():
        return head + "Not run (no `uv/trajectory.jsonl`).\n"
    import numpy as np

    traj = read_metrics(path)
    summary = read_json(out / "uv" / "summary.json")
    lr = summary["lr"]
    a = np.array([r["a"] for r in traj])
    b = np.array([r["b"] for r in traj])
    fig = _figure(1, 1, size=(11, 4.8))[0]
    fig.clear()
    grid = fig.add_gridspec(2, 2, width_ratios=[1.2, 1])
    ax = fig.add_subplot(grid[:, 0])
    ax_s = fig.add_subplot(grid[0, 1])
    ax_c = fig.add_subplot(grid[1, 1], sharex=ax_s)

    # The loss surface, the minima ab = y and the path with the top eigenvector
    pad = 0.4
    lo_a, hi_a = min(a.min(), 0.0) - pad, a.max() + pad
    lo_b, hi_b = min(b.min(), 0.0) - pad, max(b.max(), 1.5) + pad
    ga, gb = np.meshgrid(np.linspace(lo_a, hi_a, 300), np.linspace(lo_b, hi_b, 300))
    gl = 0.5 * (ga * gb - summary["target"]) ** 2
    levels = np.geomspace(1e-3, max(float(gl.max()), 1e-2), 16)
    ax.contour(ga, gb, gl, levels=levels, cmap="Greys", linewidths=0.6)
    hyper = np.linspace(summary["target"] / hi_b, hi_a, 200)
    ax.plot(
        hyper,
        summary["target"] / hyper,
        color="tab:green",
        lw=0.9,
        ls="--",
        label="minima: ab = 1",
    )
    ax.plot(a, b, "-o", color="C0", ms=2.5, lw=0.8, label="GD trajectory")
    v = np.array([r["eigvec"] for r in traj])
    scale = 0.1 * (hi_a - lo_a)
    for r, vec in zip(traj, v, strict=True):
        ax.plot(
            [r["a"] - scale * vec[0], r["a"] + scale * vec[0]],
            [r["b"] - scale * vec[1], r["b"] + scale * vec[1]],
            color="tab:red",
            lw=0.9,
            alpha=0.8,
        )
    ax.plot([], [], color="tab:red", lw=1, label="top Hessian eigenvector")
    ax.annotate("start", (a[0], b[0]), xytext=(6, -10), textcoords="offset points")
    ax.set_xlim(lo_a, hi_a)
    ax.set_ylim(lo_b, hi_b)
    ax.set_xlabel("a")
    ax.set_ylabel("b")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"L(a, b) = (ab - 1)²/2, GD from (3, 0.4), lr = {lr}", fontsize=9)

    # Sharpness against 2/lr; |cos| between steps and the loss
    steps = [r["step"] for r in traj]
    losses = [r["loss"] for r in traj]
    settled = next(
        (r["step"] for r in traj if r["loss"] is not None and r["loss"] < 1e-8),
        steps[-1],
    )
    ax_s.plot(
        steps, [r["sharpness"] for r in traj], "-o", ms=2, lw=1, label="sharpness"
    )
    ax_s.axhline(2 / lr, color="k", ls="--", lw=0.8, label=f"2/lr = {2 / lr:.4g}")
    ax_s.set_ylabel("sharpness")
    ax_s.legend(fontsize=7)
    cs, cv = [], []
    for r in traj:
        if an.finite(r.get("rotation_top1")):
            cs.append(r["step"])
            cv.append(r["rotation_top1"])
    ax_c.plot(
        cs, cv, "-o", ms=2, color="tab:red", lw=1, label="top-1 |cos| between steps"
    )
    ax_c.set_ylim(0, 1.05)
    ax_c.set_ylabel("|cos|")
    ax_c.set_xlabel("step")
    ax_l = ax_c.twinx()
    ax_l.plot(steps, [max(x, 1e-12) for x in losses], color="C2", lw=1, label="loss")
    ax_l.set_yscale("log")
    ax_l.set_ylabel("loss", color="C2")
    ax_c.set_xlim(-0.5, min(steps[-1], settled + 5) + 0.5)
    h1, l1 = ax_c.get_legend_handles_labels()
    h2, l2 = ax_l.get_legend_handles_labels()
    ax_c.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    img = _save(fig, figures, "uv.png")
    measured = {
        "initial sharpness": traj[0]["sharpness"],
        "min top-1 |cos| between steps": min(cv) if cv else None,
        "final sharpness": traj[-1]["sharpness"],
    }
    rows = [[k, _f(UV_EXPECTED[k]), _f(measured[k])] for k in UV_EXPECTED]
    rows.append(["2/lr", "6.667", _f(2 / lr)])
    rows.append(["largest loss in the first 10 steps", "~2.3", _f(max(losses[:10]))])
    rows.append(["final top-1 |cos|", "1", _f(cv[-1] if cv else None)])
    return (
        head
        + "L(a, b) = (ab - 1)²/2 from (a, b) = (3, 0.4) with lr = 0.3 (science.md): "
        "the initial sharpness is above 2/lr, the loss catapults, the top "
        "eigenvector turns as the trajectory crosses to the balanced side, and GD "
        "settles at a flatter minimum below 2/lr, where the eigenvector stops "
        "moving. Expected values are science.md's; measured ones come from "
        "`uv/trajectory.jsonl` (the tracker, every step).\n\n"
        f"![uv trajectory]({img})\n\n"
        + _table(["quantity", "expected", "measured"], rows)
        + "\n"
    )


def _costs(out: Path, plan: dict) -> str:
    rows = []
    total = 0.0
    for exp in ("eos", "depth", "sweep", "optim"):
        metas = plan.get("experiments", {}).get(exp, {}).get("runs", [])
        secs, n = 0.0, 0
        for meta in metas:
            run = _load(out, exp, meta["name"])
            if run is not None:
                secs += float(run.summary.get("wall_seconds") or 0)
                n += 1
        if n:
            total += secs
            rows.append([exp, str(n), _secs(secs), _minutes(secs)])
    try:
        uv = read_json(out / "uv" / "summary.json")
        secs = float(uv.get("wall_seconds") or 0)
        total += secs
        rows.append(["uv", "1", _secs(secs), _minutes(secs)])
    except (OSError, ValueError, AttributeError):
        pass
    rows.append(["total", "", _secs(total), _minutes(total)])
    return _table(["experiment", "runs", "run seconds", "minutes"], rows)


def code_fingerprint() -> str:
    """A short hash of the code that makes the report: the experiments
    (:mod:`curvx.harness.reproduce`), :mod:`curvx.harness.analysis` and this
    module. The report states it, so a committed copy can be checked against
    the code."""
    import hashlib

    from curvx.harness import reproduce

    h = hashlib.sha256()
    for mod in (reproduce.__file__, an.__file__, __file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:12]


def check_destination(dest: str | os.PathLike) -> None:
    """Raises ValueError unless ``dest`` can take a report: a folder (or
    nothing yet) whose ``report.md``, if any, is a curvx report."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"report folder {dest} exists and is not a folder")
    path = dest / "report.md"
    if path.is_file() and not path.read_text(errors="replace").startswith(_TITLE):
        raise ValueError(
            f"{path} exists and is not a curvx reproduce report: not overwriting it"
        )


def write_report(
    out: str | os.PathLike, report_dir: str | os.PathLike | None = None
) -> Path:
    """Writes ``report.md`` and ``figures/`` for the reproduction in ``out``.

    Args:
        out: The output folder of :func:`curvx.harness.reproduce.reproduce`.
        report_dir: Folder for ``report.md`` and ``figures/`` (default ``out``).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: ``out`` has no ``plan.json``.
        ValueError: An unreadable plan, a report folder that is a file, or a
            ``report.md`` there that is not a curvx report (never overwritten).
    """
    out = Path(out)
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path} not found: not a curvx reproduce folder?")
    try:
        plan = read_json(plan_path)
    except ValueError as exc:
        raise ValueError(f"{plan_path} is not readable JSON: {exc}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("experiments", {}), dict):
        raise ValueError(f"{plan_path} is not a curvx reproduce plan")
    dest = Path(report_dir) if report_dir is not None else out
    check_destination(dest)
    path = dest / "report.md"
    figures = dest / "figures"
    for name in FIGURES:  # only the files this report writes
        (figures / name).unlink(missing_ok=True)
    sections = [
        _section_eos(out, plan, figures),
        _section_rotation(out, plan, figures),
        _section_depth(out, plan, figures),
        _section_sweep(out, plan, figures),
        _section_optim(out, plan, figures),
        _section_uv(out, plan, figures),
    ]
    versions = {}
    for run_dir in sorted(out.glob("*/*/config.json")):
        versions = read_json(run_dir).get("versions", {})
        break
    size = plan.get("size", {})
    header = (
        f"{_TITLE}\n\n"
        f"Size `{size.get('name')}`; data {size.get('dataset')}, model "
        f"{size.get('model')}; command "
        f"`{plan.get('command')}`; started {plan.get('started_at')}, last finished "
        f"{plan.get('finished_at')}. curvx {versions.get('curvx')}, torch "
        f"{versions.get('torch')}, Python {versions.get('python')} on "
        f"{versions.get('platform')}. Every number below is computed from the run "
        "folders next to this report (`curvx report` redraws it); each run's "
        "`config.json` holds the `curvx train` command that repeats it.\n\n"
        + _costs(out, plan)
        + "\n"
    )
    footer = (
        f"\n---\nWritten by `curvx report` (report code {code_fingerprint()}) at "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
        ".\n"
    )
    text = header + "\n" + "\n".join(sections) + footer
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("report.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
