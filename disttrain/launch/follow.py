"""`disttrain submit --wait`: follow a job through its requeues until it ends, echoing its lifecycle.

There is no accounting database on every cluster (submitit then reports UNKNOWN), so the state comes
from `scontrol show job`, and how the run ended from RUN_DIR/events.jsonl, which outlives the job.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from disttrain import events as ev
from disttrain import slurm
from disttrain.errors import EXIT_FAILURE, EXIT_OK
from disttrain.slurm import FINAL_STATES

POLL_S = 2.0


def follow_slurm(job_id: str, run_dir: str, out: TextIO = sys.stdout, poll_s: float = POLL_S) -> int:
    """Poll the job's state until it stays final (or the controller forgot it). 0 if the run finished."""
    events = EventTail(run_dir)
    last, final_seen = None, 0
    while True:
        info = _job_info(job_id)
        state = info.get("JobState")
        events.echo(out)
        now = (state, info.get("Restarts"))
        if now != last and state:
            print(f"job {job_id}: {state} (restarts {info.get('Restarts', '0')})", file=out, flush=True)
            last = now
        # A final state must hold for two polls: a requeue passes through CANCELLED/COMPLETING briefly.
        final_seen = final_seen + 1 if (state in FINAL_STATES or not info) else 0
        if final_seen >= 2:
            events.echo(out)
            return _verdict(events, state or "gone from the queue", out)
        time.sleep(poll_s)


def follow_local(job: Any, run_dir: str, out: TextIO = sys.stdout, poll_s: float = POLL_S) -> int:
    """Wait for a submitit local job. 0 if the run finished."""
    events = EventTail(run_dir)
    while not job.done():
        events.echo(out)
        time.sleep(poll_s)
    events.echo(out)
    try:
        job.results()
    except Exception as err:  # the job's own exception, as submitit recorded it
        print(f"job {job.job_id}: {str(err).strip().splitlines()[-1]}", file=out)
    return _verdict(events, "done", out)


def _verdict(events: EventTail, state: str, out: TextIO) -> int:
    last = events.last_end()
    if last and ev.kind(last) == ev.FINISH:
        print(f"finished at step {last.get('step')} ({state})", file=out, flush=True)
        return EXIT_OK
    what = f"{ev.kind(last)} at step {last.get('step')}" if last else "no events recorded"
    detail = last.get("error") or last.get("reason") or "" if last else ""
    print(f"did not finish ({state}): {what}" + (f": {detail}" if detail else ""), file=out, flush=True)
    return EXIT_FAILURE


class EventTail:
    """Reads RUN_DIR/events.jsonl incrementally (local paths and fsspec URLs alike)."""

    def __init__(self, run_dir: str):
        from disttrain.rundir import RunDir

        self.path = RunDir(run_dir).events
        self.seen = 0
        self.records: list[dict[str, Any]] = []

    def read_new(self) -> list[dict[str, Any]]:
        from disttrain import fs

        if not fs.exists(self.path):
            return []
        lines = [line for line in fs.read_text(self.path).splitlines() if line.strip()]
        new = []
        for line in lines[self.seen :]:
            try:
                new.append(json.loads(line))
            except ValueError:
                break  # a line still being written: read it next time
        self.seen += len(new)
        self.records += new
        return new

    def echo(self, out: TextIO) -> None:
        for record in self.read_new():
            print(describe(record), file=out, flush=True)

    def last_end(self) -> dict[str, Any] | None:
        """The newest record that ended a segment (events.ends_segment)."""
        self.read_new()
        return ev.last_end(self.records)


def describe(record: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.get("time", 0)))
    keys = ("step", "signal", "seconds", "budget_left", "reason", "error", "cause")
    extra = " ".join(f"{k}={record[k]}" for k in keys if record.get(k) not in (None, ""))
    return f"  {stamp} [restart {record.get('restart_count', 0)}] {record.get('event')} {extra}".rstrip()


def _job_info(job_id: str, show: Callable[[str], slurm.JobInfo | None] = slurm.show_job) -> slurm.JobInfo:
    """The job's fields; {"JobState": "UNKNOWN"} while the controller does not answer (keep waiting),
    {} once it does not know the job (gone from the queue: counts as final)."""
    info = show(job_id)
    return {"JobState": "UNKNOWN"} if info is None else info
