"""`disttrain status SWEEP_DIR`: one row per task of a sweep (state, step, best eval metric, requeues,
goodput).

A sweep dir is recognised by its sweep.json (launch/sweep.py). Each task's row comes from the same
reading of its run dir as `disttrain status RUN_DIR` (commands/status.py), so a task reads the same in
both; a task whose run has not written an event yet (still queued) is `not started`. torch-free.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from disttrain.commands import status
from disttrain.launch.sweep import is_sweep_dir, read_manifest, task_dirs
from disttrain.rundir import RunDir, read_jsonl

DEFAULT_METRICS = ("eval/accuracy", "eval/loss")
_LOWER_IS_BETTER = re.compile(r"loss|error|perplexity|ppl|wer|cer", re.I)

__all__ = ["best_metric", "collect", "is_sweep_dir", "render", "show"]


def collect(sweep_dir: str, metric: str | None = None, now: float | None = None,
            stale_after: float = status.STALE_AFTER_S) -> dict[str, Any]:  # fmt: skip
    """Everything the sweep view reports, as plain data (what --json prints)."""
    now = time.time() if now is None else now
    manifest = read_manifest(sweep_dir)
    job_ids = [str(t.get("job_id", "")) for t in manifest["tasks"] if isinstance(t, dict)]
    rows = []
    for index, ((name, run_dir), job_id) in enumerate(zip(task_dirs(sweep_dir), job_ids)):
        rows.append(
            {"task": index, "name": name, "job_id": job_id, **_task_row(run_dir, metric, now, stale_after)}
        )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"sweep_dir": sweep_dir, "job_id": manifest.get("job_id"), "counts": counts, "tasks": rows}


def _task_row(run_dir: str, metric: str | None, now: float, stale_after: float) -> dict[str, Any]:
    try:
        report = status.collect(run_dir, now=now, stale_after=stale_after)
    except status.StatusError:
        return {"run_dir": run_dir, "state": "not started", "step": 0, "max_steps": None, "best": None,
                "requeues": 0, "steps_lost": 0, "goodput": None}  # fmt: skip
    return {
        "run_dir": run_dir,
        "state": report["state"],
        "step": report["step"],
        "max_steps": report["max_steps"],
        "best": best_metric(read_jsonl(RunDir(run_dir).metrics), metric),
        "requeues": len(report["requeues"]),
        "steps_lost": report["steps_lost"],
        "goodput": (report.get("goodput") or {}).get("goodput"),  # running time into kept steps (goodput.py)
    }


def best_metric(records: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any] | None:
    """The best value of an eval metric over a run: `metric`, else eval/accuracy, else eval/loss; the
    lowest for losses and error rates, the highest otherwise. None when the run logged no such metric."""
    logged = [r for r in records if isinstance(r.get("step"), int)]
    name = metric or next((m for m in DEFAULT_METRICS if any(m in r for r in logged)), None)
    points = [(r[name], r["step"]) for r in logged if name and isinstance(r.get(name), (int, float))]
    if not name or not points:
        return None
    pick = min if _LOWER_IS_BETTER.search(name) else max
    value, step = pick(points, key=lambda p: p[0])
    return {"metric": name, "value": value, "step": step, "mode": pick.__name__}


def render(report: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report["counts"].items()))
    lines = [
        f"sweep     {report['sweep_dir']} (job array {report['job_id']}; {len(report['tasks'])} task(s): {counts})",
        f"{'task':>4}  {'job':<10} {'state':<24} {'step':>11}  {'best eval':<28} {'requeues':>8} {'goodput':>8}  run",
    ]
    for row in report["tasks"]:
        steps = f"{row['step']}/{row['max_steps']}" if row["max_steps"] else str(row["step"])
        lines.append(
            f"{row['task']:>4}  {row['job_id']:<10} {row['state']:<24} {steps:>11}  {_best(row['best']):<28} "
            f"{row['requeues']:>8} {_percent(row.get('goodput')):>8}  {row['name']}"
        )
    return "\n".join(lines) + "\n"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _best(best: dict[str, Any] | None) -> str:
    if not best:
        return "-"
    value = best["value"]
    shown = f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"
    return f"{best['metric'].split('/', 1)[-1]} {shown} @ step {best['step']}"


def show(sweep_dir: str, as_json: bool, metric: str | None, stale_after: float) -> int:
    """The entry point `disttrain status` hands a sweep dir to. 0, or 2 for a broken sweep.json."""
    try:
        report = collect(sweep_dir, metric=metric, stale_after=stale_after)
    except ValueError as err:
        print(
            f"disttrain status: error: {err}; resubmit the sweep or give one task's run dir", file=sys.stderr
        )
        return 2
    print(json.dumps(report) if as_json else render(report), end="\n" if as_json else "")
    return 0
