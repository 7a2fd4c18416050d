"""Hangs named (DESIGN §7b): where a stalled rank was, written where its peers can read it, and the line
that names the rank that did not arrive.

A rank that reaches no step boundary for half of `trainer.collective_timeout_s` writes
`RUN_DIR/stacks/rank_R.json`: its host and pid, the step, the section it last entered (`sections`), how
long it has been there, and its main thread's Python stack. Every stalled rank writes one: the rank
that hangs (in a loss, a data loader, a stuck file) and the ranks waiting for it in a collective. When
the waiting ranks' collective gives up at the full timeout, the hung rank's file is there to read:
the ranks whose file says they were *not* in a collective are the ones that did not arrive; a rank with
no fresh file died or is frozen (a process stuck in the kernel, or SIGSTOPped, runs no Python).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from disttrain.cluster import host_name
from disttrain.sections import BUSY, WAITING_FOR

# fs and rundir (fsspec) are imported where a file is written or read: the stop path imports this module
# before torch, at the entry point, and must stay cheap.

# Frames of these files are the machinery a rank waits in, not where it is stuck.
_STDLIB = sysconfig.get_paths()["stdlib"]
_COLLECTIVE_MARKERS = ("torch/distributed/", "disttrain/dist.py", "torch/nn/parallel/", "accelerate/")


def stack_path(run_dir: str, rank: int) -> str:
    from disttrain import fs
    from disttrain.rundir import RunDir

    return fs.join(RunDir(run_dir).stacks, f"rank_{rank}.json")


def main_thread_stack() -> list[traceback.FrameSummary]:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return list(traceback.extract_stack(frame)) if frame is not None else []


def frame_of(stack: list[traceback.FrameSummary]) -> str:
    """Where a stack is stuck, in one phrase: the innermost frame outside Python's own library (a
    `time.sleep` or a queue's `get` is where it waits, not what it is doing)."""
    for frame in reversed(stack):
        if not frame.filename.startswith(_STDLIB):
            return f"{frame.filename}:{frame.lineno} {frame.name}()"
    return f"{stack[-1].filename}:{stack[-1].lineno} {stack[-1].name}()" if stack else "an unknown place"


def in_collective(stack: list[traceback.FrameSummary]) -> bool:
    return any(marker in frame.filename for frame in stack[-8:] for marker in _COLLECTIVE_MARKERS)


def write_stack(run_dir: str, rank: int, step: int, section: str, since_s: float) -> str:
    """This rank's record of a stall (main thread's stack, section, step); returns the file written."""
    stack = main_thread_stack()
    record = {
        "rank": rank,
        "host": host_name(),
        "pid": os.getpid(),
        "time": round(time.time(), 3),
        "step": step,
        "section": section,
        "stalled_s": round(since_s, 1),
        "frame": frame_of(stack),
        "in_collective": in_collective(stack),
        "stack": traceback.format_list(stack),
    }
    from disttrain import fs
    from disttrain.rundir import RunDir

    path = stack_path(run_dir, rank)
    fs.makedirs(RunDir(run_dir).stacks)
    fs.atomic_write(path, json.dumps(record, indent=1))  # a reader never sees half a record
    return path


@dataclass(frozen=True)
class Culprit:
    """A rank that did not reach the collective its peers waited in."""

    rank: int
    host: str
    frame: str  # "" when it left no record (died, or frozen)
    section: str

    def describe(self, waited_for: str, seconds: float) -> str:
        """One phrase for the line of a rank that waited `seconds` in `waited_for`."""
        where = f"rank {self.rank}" + (f" on {self.host}" if self.host else "")
        if not self.frame:
            return f"{where} did not reach {waited_for} (waited {seconds:.0f} s): it died or is frozen (it wrote no stack)"
        doing = "waiting for its data loader" if self.section == "data" else f"in section {self.section}"
        return f"{where} did not reach {waited_for} for {seconds:.0f} s; it was {doing} at {self.frame}"


def culprits(
    run_dir: str, world: int, me: int, since: float, hosts: list[str] | None = None
) -> list[Culprit]:
    """The ranks that did not arrive, from the stack files written since `since` (wall clock): those
    stalled outside any collective, and those that wrote nothing (the writer of each file is alive)."""
    records = {}
    for rank in range(world):
        if rank == me:
            continue
        record = _read(stack_path(run_dir, rank))
        if record is not None and float(record.get("time", 0)) >= since:
            records[rank] = record
    out = []
    for rank in range(world):
        if rank == me:
            continue
        record = records.get(rank)
        host = (hosts[rank] if hosts and rank < len(hosts) else "") or ""
        if record is None:
            out.append(Culprit(rank, host, "", ""))
        elif not record.get("in_collective") or record.get("section") in BUSY:
            out.append(
                Culprit(rank, str(record.get("host") or host), str(record["frame"]), str(record["section"]))
            )
    return out


def waiting_for(section: str) -> str:
    return WAITING_FOR.get(section, "the collective")


def _read(path: str) -> dict[str, Any] | None:
    from disttrain import fs

    try:
        record = json.loads(fs.read_text(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "frame" in record else None
