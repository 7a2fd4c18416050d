"""`disttrain plot RUN_DIR [--out FILE.png] [--metrics train/loss,eval/accuracy]`: the curves of a run
(local or s3://) as a PNG, one panel per metric, with the resumes marked (drawing: writers.write_curves,
which the trainer's curves writer also uses at the end of every segment when log.plot is on)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from disttrain import fs
from disttrain.rundir import RunDir


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain plot", description="Draw the curves of a run as a PNG.")
    parser.add_argument("run_dir", help="run directory: a path or a URL such as s3://bucket/prefix")
    parser.add_argument("--out", help="where to write the PNG, path or URL (default: RUN_DIR/curves.png)")
    parser.add_argument("--metrics", help="comma-separated metric names (default: every metric logged)")
    parser.add_argument(
        "--timeline", action="store_true", help="draw where the time went instead: segments, lost time by "
        "cause, queue (default out: RUN_DIR/timeline.png)",
    )  # fmt: skip
    args = parser.parse_args(list(argv))
    if args.timeline:
        return _timeline(args.run_dir, args.out)
    if not fs.exists(RunDir(args.run_dir).metrics):
        print(
            f"disttrain plot: error: {args.run_dir} has no metrics.jsonl; give the run_dir of a run",
            file=sys.stderr,
        )
        return 2
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("disttrain plot: error: matplotlib is not installed: pip install 'disttrain[plot]'", file=sys.stderr)
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


def _timeline(run_dir: str, out: str | None) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("disttrain plot: error: matplotlib is not installed: pip install 'disttrain[plot]'", file=sys.stderr)
        return 2
    from disttrain.commands import timeline

    try:
        print(timeline.write(run_dir, out))
    except ValueError as err:
        print(f"disttrain plot: error: {err}; give the run_dir of a run that has started", file=sys.stderr)
        return 2
    return 0
