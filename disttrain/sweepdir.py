"""The sweep directory contract (DESIGN §3): what `disttrain submit --sweep` leaves and `disttrain status`
and `disttrain plot` read.

    SWEEP_DIR/
      sweep.json        {"sweep_dir", "time", "job_id" (the array), "job_name", "array_parallelism",
                         "tasks": [{"index", "name", "overrides", "job_id" (A_T), "run_dir"}, ...]}
      slurm/            the job array's submitit files
      <task name>/      one run dir per task (rundir.py), named from the task's overrides

A task's run dir is found under the sweep dir as it is now, by name (a sweep dir that was moved or
copied still reads). Torch-free and stdlib-only but for fs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from disttrain import fs
from disttrain.rundir import SWEEP


@dataclass(frozen=True)
class SweepTask:
    """One task of a sweep as sweep.json records it."""

    index: int
    name: str  # its run dir's name under the sweep dir
    overrides: tuple[str, ...]
    job_id: str  # `A_T`: what scontrol takes for this task alone

    def record(self, sweep_dir: str) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "overrides": list(self.overrides), "job_id": self.job_id,
                "run_dir": run_dir(sweep_dir, self.name)}  # fmt: skip


def path(sweep_dir: str) -> str:
    return fs.join(sweep_dir, SWEEP)


def run_dir(sweep_dir: str, name: str) -> str:
    """The run dir of the task called `name`."""
    return fs.join(sweep_dir, name)


def is_sweep_dir(where: str) -> bool:
    return fs.exists(path(where))


def write(sweep_dir: str, tasks: Sequence[SweepTask], **info: Any) -> None:
    """Record the tasks of a submission. Tasks of an earlier submission to the same sweep dir that this
    one does not repeat are kept, so `status` still shows them; a repeated one takes the new job id."""
    old = (
        {t["name"]: t for t in read(sweep_dir)["tasks"] if isinstance(t, dict)}
        if is_sweep_dir(sweep_dir)
        else {}
    )
    for task in tasks:
        old[task.name] = task.record(sweep_dir)
    record = {"sweep_dir": sweep_dir, "time": round(time.time(), 3), **info, "tasks": list(old.values())}
    fs.makedirs(sweep_dir)  # with --log-dir elsewhere, nothing has created it yet
    fs.atomic_write(path(sweep_dir), json.dumps(record, indent=1) + "\n")


def read(sweep_dir: str) -> dict[str, Any]:
    """SWEEP_DIR/sweep.json; ValueError if it is not a sweep record."""
    where = path(sweep_dir)
    try:
        data = json.loads(fs.read_text(where))
    except (OSError, ValueError) as err:
        raise ValueError(f"{where} is not readable: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise ValueError(f"{where} holds no task list")
    return data


def tasks(sweep_dir: str) -> list[SweepTask]:
    """Every task the sweep dir records, in task order. ValueError for a broken sweep.json."""
    out = []
    for i, entry in enumerate(t for t in read(sweep_dir)["tasks"] if isinstance(t, dict)):
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"{path(sweep_dir)}: task {i} has no name")
        overrides = tuple(str(o) for o in entry.get("overrides") or ())
        out.append(
            SweepTask(int(entry.get("index", i)), entry["name"], overrides, str(entry.get("job_id", "")))
        )
    return out


def task_dirs(sweep_dir: str) -> list[tuple[str, str]]:
    """(name, run dir) of every task, in task order."""
    return [(t.name, run_dir(sweep_dir, t.name)) for t in tasks(sweep_dir)]
