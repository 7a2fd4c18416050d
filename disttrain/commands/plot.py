"""`disttrain plot RUN_DIR [--out FILE.png] [--metrics train/loss,eval/accuracy]`: the curves of a run
(local or s3://) as a PNG, one panel per metric, with the resumes marked (drawing: writers.write_curves,
which the trainer's curves writer also uses at the end of every segment when log.plot is on).
Several runs, or a sweep dir: their curves overlaid (commands/plot_overlay.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from disttrain import fs, sweepdir
from disttrain.rundir import CURVES, RunDir


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="disttrain plot",
        description="Draw the curves of a run as a PNG; several runs or a sweep dir are overlaid.",
    )
    parser.add_argument(
        "run_dir", nargs="+", help="run dirs or sweep dirs: paths or URLs such as s3://bucket/prefix"
    )
    parser.add_argument("--out", help="where to write the PNG, path or URL (default: RUN_DIR/curves.png)")
    parser.add_argument("--metrics", help="comma-separated metric names (default: every metric logged)")
    parser.add_argument(
        "--timeline", action="store_true", help="draw where the time went instead: segments, lost time by "
        "cause, queue (one run, or one lane per task of a sweep dir; default out: RUN_DIR/timeline.png)",
    )  # fmt: skip
    args = parser.parse_args(list(argv))
    if args.timeline:
        if len(args.run_dir) > 1:
            print(
                "disttrain plot: error: --timeline draws one run or one sweep; give one dir", file=sys.stderr
            )
            return 2
        return _timeline(args.run_dir[0], args.out)
    if len(args.run_dir) > 1 or sweepdir.is_sweep_dir(args.run_dir[0]):
        return _overlay(args)
    args.run_dir = args.run_dir[0]
    if not fs.exists(RunDir(args.run_dir).metrics):
        print(
            f"disttrain plot: error: {args.run_dir} has no metrics.jsonl; give the run_dir of a run",
            file=sys.stderr,
        )
        return 2
    if not _have_matplotlib():
        return 2
    from disttrain.writers import write_curves  # lazy: torch and matplotlib only once input is valid

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        out = write_curves(args.run_dir, out=args.out, metrics=metrics)
    except ValueError as err:
        print(f"disttrain plot: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _have_matplotlib() -> bool:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print(
            "disttrain plot: error: matplotlib is not installed: pip install 'disttrain[plot]'",
            file=sys.stderr,
        )
        return False
    return True


def _timeline(run_dir: str, out: str | None) -> int:
    if not _have_matplotlib():
        return 2
    from disttrain.commands import timeline

    try:
        print(timeline.write(run_dir, out))
    except ValueError as err:
        print(f"disttrain plot: error: {err}", file=sys.stderr)
        return 2
    return 0


def _overlay(args: argparse.Namespace) -> int:
    """Several runs (or a sweep's tasks) in one figure; written to --out, or SWEEP_DIR/curves.png."""
    from disttrain.commands import plot_overlay

    out = args.out or (fs.join(args.run_dir[0], CURVES) if len(args.run_dir) == 1 else None)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if not _have_matplotlib():
        return 2
    try:
        if out is None:
            raise ValueError("several runs make one figure: give it a place with --out FILE.png")
        print(plot_overlay.write_overlay(plot_overlay.expand(args.run_dir), out, metrics))
    except ValueError as err:
        print(f"disttrain plot: error: {err}", file=sys.stderr)
        return 2
    return 0
