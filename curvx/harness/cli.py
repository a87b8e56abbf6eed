"""The ``curvx`` command line: ``curvx train``, ``plot``, ``reproduce``, ``report``.

Examples::

    curvx train                                   # Fashion-MNIST 5k, fc-tanh, MSE, GD
    curvx train --dataset digits --n-train 300 --steps 50 --k 2
    curvx train --optimizer momentum --momentum 0.9 --lr 0.01 --lambda-min
    curvx plot runs/fashion-mnist-fc-tanh-mse-lr0.05-s0
    curvx reproduce                               # the paper's findings, < 1 h
    curvx reproduce --quick --out /tmp/rq         # the same pipeline in a minute
    curvx report runs/reproduce                   # redraw the report

Also runnable as ``python -m curvx.harness.cli ...``.

Exit codes of ``curvx train``: 0 when the run finished, including a run that
diverged (non-finite loss: the run stops cleanly, ``summary.json`` has
``"status": "diverged"`` and ``"diverged_at_step"``); 2 for invalid arguments, a
missing dataset or an occupied run folder (message on stderr); 130 when interrupted
by Ctrl-C and 143 by SIGTERM (the summary says ``"interrupted"``, plots are drawn);
1 for an unexpected error (traceback;
the summary says ``"error"``). Everything written before the end stays on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_K", "DEFAULT_LR", "DEFAULT_STEPS", "build_parser", "main"]

#: Default learning rate of ``curvx train``: at the fc-tanh init on the Fashion-MNIST
#: 5k subset the sharpness is ~38 < 2/lr = 40; progressive sharpening reaches 2/lr
#: near step 110 and GD then stays at the edge of stability.
DEFAULT_LR = 0.05
#: Default number of optimizer updates of ``curvx train``.
DEFAULT_STEPS = 300
#: Default number of tracked top eigenpairs.
DEFAULT_K = 2
#: Default test-evaluation interval in steps.
DEFAULT_EVAL_EVERY = 10

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the run folder is closed the same way."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While training, SIGTERM (a job scheduler's stop) ends the run like Ctrl-C:
    summary and plots are written before the process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            msg = f"expected an integer, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {val}")
        return val

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(val) and val > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return val


def _unit_interval(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= val < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return val


def _track_option(text: str) -> tuple[str, object]:
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        msg = f"expected KEY=VALUE with KEY a curvx.track argument, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        val = json.loads(raw)
    except ValueError:
        val = raw  # a bare word: a string
    return key, val


def _add_train_parser(sub) -> None:
    from curvx.harness.data import DATASETS
    from curvx.harness.losses import LOSSES
    from curvx.harness.models import MODELS
    from curvx.harness.train import OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="full-batch training with per-step Hessian eigenpair tracking",
        description="Train by full-batch GD (or momentum / Adam) and track the top "
        "Hessian eigenpairs of the training loss every step. Writes config.json, "
        "metrics.jsonl (one line per step, durable), summary.json and PNG plots "
        "into the run folder. Nothing is downloaded: data must be on disk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder holding the dataset files (fashion-mnist: the four IDX files, "
        "default /usr/share/datasets/fashion-mnist; cifar10: the python batches "
        "here or in its cifar-10-batches-py)",
    )
    g.add_argument(
        "--n-train",
        type=_int_at_least(1),
        default=None,
        help="first N training examples (default: 5000, or all if fewer; more "
        "than available is an error)",
    )
    g.add_argument(
        "--n-test",
        type=_int_at_least(0),
        default=None,
        help="first N test examples (default: 10000, clipped to what exists; 0: "
        "no test evaluation)",
    )
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", choices=MODELS, default="fc-tanh")
    g.add_argument(
        "--depth",
        type=_int_at_least(0),
        default=None,
        help="hidden layers (fc-*, default 2); linear layers for deep-linear "
        "(default 2; 1 = plain linear model); ignored by cnn",
    )
    g.add_argument(
        "--width",
        type=_int_at_least(1),
        default=None,
        help="hidden units (fc-*, deep-linear: default 200) or conv channels "
        "(cnn: default 32)",
    )
    g.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="biases in every layer (default: on, off for deep-linear)",
    )
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="mse",
        help="mse: 1/2 sum over outputs of (f(x) - onehot(y))^2, mean over "
        "examples; ce: cross entropy, mean over examples",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_positive_float, default=DEFAULT_LR)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="gd")
    g.add_argument(
        "--momentum", type=_unit_interval, default=0.9, help="heavy-ball beta"
    )
    g.add_argument("--beta1", type=_unit_interval, default=0.9, help="Adam beta1")
    g.add_argument("--beta2", type=_unit_interval, default=0.999, help="Adam beta2")
    g.add_argument("--eps", type=_positive_float, default=1e-8, help="Adam epsilon")
    g.add_argument(
        "--steps",
        type=_int_at_least(0),
        default=DEFAULT_STEPS,
        help="optimizer updates (steps + 1 records)",
    )
    g.add_argument("--seed", type=int, default=0, help="model init and tracker seed")
    g = p.add_argument_group("tracking")
    g.add_argument(
        "--k", type=_int_at_least(1), default=DEFAULT_K, help="top eigenpairs"
    )
    g.add_argument(
        "--lambda-min",
        action="store_true",
        help="also track the most negative eigenvalue",
    )
    g.add_argument(
        "--track-every",
        type=_int_at_least(0),
        default=1,
        help="track every N steps (and at the final step); 0 = off",
    )
    g.add_argument(
        "--eval-every",
        type=_int_at_least(0),
        default=DEFAULT_EVAL_EVERY,
        help="test evaluation every N steps (and at the final step); 0 = final only",
    )
    g.add_argument(
        "--chunk-size",
        type=_int_at_least(1),
        default=None,
        help="examples per chunk for loss, gradient and HVPs (default: all at once)",
    )
    g.add_argument(
        "--tol",
        type=_positive_float,
        default=1e-3,
        help="relative eigenvalue accuracy of the tracker (default 1e-3)",
    )
    g.add_argument(
        "--unfused",
        action="store_true",
        help="compute the training gradient with a separate backward before "
        "tracking (default: the tracker's fused step fills .grad from the same pass)",
    )
    g.add_argument(
        "--track-method", default="auto", help="tracker method (curvx.track method=)"
    )
    g.add_argument(
        "--track-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_track_option,
        help="another curvx.track keyword argument, VALUE as JSON (e.g. "
        "kato_temple=false, guard_every=1); repeatable",
    )
    g.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="stop once the training loss is at or below this (that step is the "
        "final, tracked and evaluated record)",
    )
    g.add_argument(
        "--diverge-factor",
        type=_positive_float,
        default=None,
        help="call the run diverged once the training loss exceeds this multiple "
        "of its step-0 value (default: only a non-finite loss)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        default=None,
        help="run folder (default: runs/<dataset>-<model>-<loss>-lr<lr>-s<seed>)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files already in --out",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = cuda if available, else cpu",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_train)


def _add_plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="(re)draw the PNG plots of run folders",
        description="Write loss.png, sharpness.png and rotation.png into each run "
        "folder from its config.json and metrics.jsonl (works on unfinished runs).",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_plot)


def _add_reproduce_parser(sub) -> None:
    from curvx.harness.data import DATASETS
    from curvx.harness.models import MODELS
    from curvx.harness.reproduce import EXPERIMENTS

    p = sub.add_parser(
        "reproduce",
        help="run the paper's experiments and write a report with figures",
        description="Run the edge-of-stability experiments (1 eos, 2 rotation, 3 "
        "depth, 4 sweep, 5 optim, 6 uv) on real data, keep every run folder under "
        "--out and write OUT/report.md with PNG figures. Finished runs are reused: "
        "run the same command again to resume after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (a minute or two on a laptop): checks the pipeline, not "
        "the science",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/reproduce, or runs/reproduce-quick)",
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated experiments to run, of {','.join(EXPERIMENTS)}",
    )
    p.add_argument(
        "--redo", action="store_true", help="run finished runs again instead of reusing"
    )
    p.add_argument(
        "--report-dir",
        default=None,
        help="where report.md and figures/ go (default: --out)",
    )
    g = p.add_argument_group(
        "change the setting",
        "--dataset, --data-dir and --n-train apply to experiments 1-5 (the depth "
        "experiment keeps its deep linear networks); --model and --width to 1, 2, "
        "4 and 5. Learning rates follow the new model's initial sharpness.",
    )
    g.add_argument("--dataset", choices=DATASETS, default=None)
    g.add_argument("--data-dir", default=None)
    g.add_argument("--model", choices=MODELS, default=None)
    g.add_argument("--width", type=_int_at_least(1), default=None)
    g.add_argument(
        "--n-train",
        type=_int_at_least(1),
        default=None,
        help="training examples of every experiment (default: 5000 for 1, 2 and "
        "5; 2000 for 3 and 4)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reproduce)


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="(re)write the report of a curvx reproduce folder",
        description="Write OUT/report.md and OUT/figures/ from the run folders of "
        "a (possibly partial) `curvx reproduce` output folder.",
    )
    p.add_argument("out", metavar="OUT")
    p.add_argument("--report-dir", default=None)
    p.set_defaults(func=_cmd_report)


def _cmd_reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    import dataclasses

    from curvx.harness.data import DatasetError
    from curvx.harness.reproduce import SIZES, ReproduceError, reproduce
    from curvx.harness.train import ConfigError

    size = SIZES["quick" if args.quick else "full"]
    changes = {
        key: getattr(args, key)
        for key in ("dataset", "data_dir", "model", "width", "n_train")
        if getattr(args, key) is not None
    }
    if "n_train" in changes:
        changes["sweep_n_train"] = changes["depth_n_train"] = changes["n_train"]
    size = dataclasses.replace(size, **changes)
    out = args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    only = None
    if args.only is not None:
        only = [e.strip() for e in args.only.split(",") if e.strip()]

    def say(line: str) -> None:
        if not args.quiet:
            print(f"curvx reproduce: {line}", file=sys.stderr, flush=True)

    try:
        with _sigterm_interrupts():
            path = reproduce(
                out,
                size=size,
                only=only,
                redo=args.redo,
                progress=not args.quiet,
                report_dir=args.report_dir,
                command=["curvx", *argv],
                log=say,
            )
    except (ReproduceError, ConfigError, DatasetError) as exc:
        return _error("reproduce", str(exc))
    except KeyboardInterrupt as exc:
        print(
            f"curvx reproduce: interrupted; finished runs are kept in {out} (run "
            "the same command to resume)",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    print(path)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from curvx.harness.report import write_report

    try:
        path = write_report(args.out, report_dir=args.report_dir)
    except (OSError, ValueError) as exc:
        return _error("report", str(exc))
    print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``curvx`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="curvx",
        description="curvx: track the loss Hessian's top eigenpairs during training.",
    )
    try:
        import curvx

        version = getattr(curvx, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - the parser must build regardless
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"curvx {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_plot_parser(sub)
    _add_reproduce_parser(sub)
    _add_report_parser(sub)
    return parser


def _error(command: str, msg: str) -> int:
    print(f"curvx {command}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from curvx.harness.data import DatasetError
    from curvx.harness.train import (
        ConfigError,
        TrainConfig,
        default_out_dir,
        run_training,
    )

    out = args.out or default_out_dir(
        args.dataset, args.model, args.loss, args.lr, args.seed
    )
    cfg = TrainConfig(
        lr=args.lr,
        steps=args.steps,
        out=out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        n_train=args.n_train,
        n_test=args.n_test,
        model=args.model,
        depth=args.depth,
        width=args.width,
        bias=args.bias,
        loss=args.loss,
        optimizer=args.optimizer,
        momentum=args.momentum,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        k=args.k,
        lambda_min=args.lambda_min,
        track_every=args.track_every,
        eval_every=args.eval_every,
        chunk_size=args.chunk_size,
        tol=args.tol,
        fused=not args.unfused,
        track_method=args.track_method,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        plots=not args.no_plots,
        progress=not args.quiet,
        overwrite=args.overwrite,
        target_loss=args.target_loss,
        diverge_factor=args.diverge_factor,
        track_options=dict(args.track_option) or None,
    )
    try:
        with _sigterm_interrupts():
            summary = run_training(cfg, command=["curvx", *argv])
    except (ConfigError, DatasetError) as exc:
        return _error("train", str(exc))
    except KeyboardInterrupt as exc:
        print("curvx train: interrupted; metrics kept in " + out, file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    if not args.quiet:
        print(_describe(summary))
    if summary.get("n_track_failures"):
        print(
            f"curvx train: warning: tracking failed at {summary['n_track_failures']} "
            "step(s); see track_status in metrics.jsonl",
            file=sys.stderr,
        )
    return EXIT_OK


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _describe(summary: dict) -> str:
    loss = summary["train_loss"]["final"]
    sharp = summary["final_sharpness"]
    head = (
        f"diverged at step {summary.get('diverged_at_step')}"
        if summary["status"] == "diverged"
        else f"{summary['status']} at step {summary['last_step']}"
    )
    return (
        f"curvx train: {head} in {summary['wall_seconds']:.1f} s; train loss "
        f"{_fmt(loss)}, test acc {_fmt(summary['test_acc']['final'])}, sharpness "
        f"{_fmt(sharp)} vs {summary.get('threshold_rule')} = "
        f"{_fmt(summary['threshold'])}; median track "
        f"{_fmt(summary['median_track_seconds'])} s/step; run folder {summary['out']}"
    )


def _cmd_plot(args: argparse.Namespace, argv: list[str]) -> int:
    from curvx.harness.plots import plot_run

    status = EXIT_OK
    for run_dir in args.run_dirs:
        try:
            written = plot_run(run_dir)
        except FileNotFoundError as exc:
            status = _error("plot", str(exc))
            continue
        print(" ".join(str(p) for p in written))
    return status


def main(argv: list[str] | None = None) -> int:
    """Runs the ``curvx`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code (see the module docstring); argparse usage errors and
        ``--help`` return their code instead of exiting.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return args.func(args, argv)


if __name__ == "__main__":
    sys.exit(main())
