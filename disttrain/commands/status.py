"""`disttrain status RUN_DIR [--json]`: state, progress, metrics, checkpoints and interruption history
of a run, local or remote (s3://), finished, running, failed or stopped; or, for a sweep dir, one row
per task.

What is reported, and how it is read from the run dir alone, is commands/run_status.py's (one run) and
commands/sweep_status.py's (a sweep); this module parses the command line and prints. torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from disttrain import sweepdir
from disttrain.commands import run_status, sweep_status
from disttrain.errors import EXIT_BAD_INPUT, EXIT_OK


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain status", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", help="run directory, or a sweep dir: a path or a URL such as s3://bucket/prefix"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=run_status.STALE_AFTER_S,
        metavar="S",
        help="seconds without an event or metric before a running run is 'running-or-died' "
        f"(default {run_status.STALE_AFTER_S:.0f})",
    )
    parser.add_argument(
        "--metric",
        help="for a sweep dir: the eval metric that ranks tasks (default eval/accuracy, else eval/loss)",
    )
    args = parser.parse_args(list(argv))
    if sweepdir.is_sweep_dir(args.run_dir):
        try:
            report = sweep_status.collect(args.run_dir, metric=args.metric, stale_after=args.stale_after)
        except ValueError as err:  # a broken sweep.json
            return _error(f"{err}; resubmit the sweep or give one task's run dir")
        return _print(report, args.json, sweep_status.render)
    try:
        report = run_status.collect(args.run_dir, stale_after=args.stale_after)
    except run_status.StatusError as err:
        return _error(str(err))
    return _print(report, args.json, run_status.render)


def _error(message: str) -> int:
    print(f"disttrain status: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _print(report: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> int:
    print(json.dumps(report) if as_json else render(report), end="\n" if as_json else "")
    return EXIT_OK
