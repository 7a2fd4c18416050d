"""What `disttrain status SWEEP_DIR` reports: one row per task of a sweep (state, step, best eval metric,
requeues, goodput, its costliest slow rank). Not a command: `commands/status.py` is.

A sweep dir is recognised by its sweep.json (disttrain.sweepdir). Each task's row comes from the same
reading of its run dir as `disttrain status RUN_DIR` (commands/run_status.py), so a task reads the same
in both. A task whose run has written no event yet is what SLURM says of its job (disttrain.slurm):
pending, starting (running, no event yet), cancelled, or another end; `not started` only where SLURM
cannot be asked (no scontrol on this machine). torch-free.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from disttrain import slurm, sweepdir
from disttrain.commands import attribution, run_status
from disttrain.rundir import RunDir, read_jsonl

DEFAULT_METRICS = ("eval/accuracy", "eval/loss")
_LOWER_IS_BETTER = re.compile(r"loss|error|perplexity|ppl|wer|cer", re.I)
Show = Callable[[str], slurm.JobInfo | None]
# SLURM's word for a task that wrote no event yet, as the sweep view says it.
_QUEUE_STATES = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "starting", "RUNNING": "starting",
                 "COMPLETING": "starting", "CANCELLED": "cancelled"}  # fmt: skip


def collect(sweep_dir: str, metric: str | None = None, now: float | None = None,
            stale_after: float = run_status.STALE_AFTER_S, show: Show = slurm.show_job) -> dict[str, Any]:  # fmt: skip
    """Everything the sweep view reports, as plain data (what --json prints). ValueError for a broken
    sweep.json. `show` asks SLURM about a task's job (a test passes its own)."""
    now = time.time() if now is None else now
    record = sweepdir.read(sweep_dir)
    queue = _Queue(show)
    rows = []
    for index, task in enumerate(sweepdir.tasks(sweep_dir)):
        run_dir = sweepdir.run_dir(sweep_dir, task.name)
        row = _task_row(run_dir, metric, now, stale_after) or _queued_row(run_dir, queue.state(task.job_id))
        rows.append({"task": index, "name": task.name, "job_id": task.job_id, **row})
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"sweep_dir": sweep_dir, "job_id": record.get("job_id"), "counts": counts, "tasks": rows}


def _task_row(run_dir: str, metric: str | None, now: float, stale_after: float) -> dict[str, Any] | None:
    """A started task's row, from its run dir; None before its run wrote an event."""
    try:
        report = run_status.collect(run_dir, now=now, stale_after=stale_after)
    except run_status.StatusError:
        return None
    return {
        "run_dir": run_dir,
        "state": report["state"],
        "step": report["step"],
        "max_steps": report["max_steps"],
        "best": best_metric(read_jsonl(RunDir(run_dir).metrics), metric),
        "requeues": len(report["requeues"]),
        "steps_lost": report["steps_lost"],
        "goodput": (report.get("goodput") or {}).get("goodput"),  # running time into kept steps (goodput.py)
        "skipped_share": report["skipped_share"],
        "slowest": (report["stragglers"]["ranks"] or [None])[0],  # its costliest slow rank (attribution.py)
    }


def _queued_row(run_dir: str, state: str) -> dict[str, Any]:
    return {"run_dir": run_dir, "state": state, "step": 0, "max_steps": None, "best": None, "requeues": 0,
            "steps_lost": 0, "goodput": None, "skipped_share": None, "slowest": None}  # fmt: skip


class _Queue:
    """SLURM's view of tasks that wrote no event yet. Once scontrol cannot be asked (not a SLURM
    machine, a controller that does not answer), the other tasks are not asked either: each try could
    cost its timeout."""

    def __init__(self, show: Show):
        self.show, self.reachable = show, True

    def state(self, job_id: str) -> str:
        if not job_id or not self.reachable:
            return "not started"
        info = self.show(job_id)
        if info is None:
            self.reachable = False
            return "not started"
        if not info:  # SLURM forgot it (MinJobAge after its end) and its run never wrote an event
            return "gone (never started)"
        state = info.get("JobState", "UNKNOWN")
        return _QUEUE_STATES.get(state, state.lower())


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
        f"{'task':>4}  {'job':<10} {'state':<24} {'step':>11}  {'best eval':<28} {'requeues':>8} {'goodput':>8}  {'slowest rank':<22} run",
    ]
    for row in report["tasks"]:
        steps = f"{row['step']}/{row['max_steps']}" if row["max_steps"] else str(row["step"])
        lines.append(
            f"{row['task']:>4}  {row['job_id']:<10} {row['state']:<24} {steps:>11}  {_best(row['best']):<28} "
            f"{row['requeues']:>8} {_percent(row.get('goodput')):>8}  {attribution.cell(row.get('slowest')):<22} {row['name']}"
        )
    skipping = [r for r in report["tasks"] if (r.get("skipped_share") or 0) >= run_status.SKIPPED_WARN_SHARE]
    for row in skipping:
        lines.append(
            f"WARNING   task {row['task']} skipped {row['skipped_share']:.0%} of its steps (non-finite loss or "
            f"gradient): disttrain status {row['run_dir']}"
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
