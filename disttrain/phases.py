"""Where a segment's start-up goes: from the moment the process (or the SLURM job) started to its
first training step, split into named phases, recorded in the `ready` event (goodput, DESIGN §3).

Every segment of a preemptible run pays its start-up again, so it is measured from the real beginning:
the process's start time as the kernel recorded it (the interpreter's own start and every import are
counted), or the job's start where SLURM says (SLURM_JOB_START_TIME, SLURM >= 23.02: srun and the
launch are counted too). The clock is process-global because the phases span the entry point, the run
lifecycle and the trainer; stdlib only, so the entry point can hold it before anything heavy loads.

    phases.CLOCK.mark("process_group")   # the time since the previous mark went to the process group
    phases.CLOCK.ready_fields()          # the `ready` event's fields, at the first step
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Mapping
from typing import Any

# The phases the trainer marks, in order; `other` is what is left up to the first step.
IMPORTS = "imports"  # interpreter start, imports (torch, accelerate, the pipeline), input checks
PROCESS_GROUP = "process_group"  # torch.distributed init: the rendezvous waits for the slowest rank
BUILD = "build"  # the pipeline's data and model, the optimizer, the DDP wrapper
CHECKPOINT = "checkpoint"  # finding, verifying and loading the checkpoint resumed from
OTHER = "other"


def process_start_time() -> float | None:
    """Wall-clock time at which this process started, from /proc (Linux); None elsewhere.

    /proc/self/stat gives the start in clock ticks after boot; /proc/uptime the time since boot (both
    10 ms resolution), so the age needs no boot-time stamp (btime is whole seconds and drifts)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            started_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - max(0.0, age)


def job_start_time(environ: Mapping[str, str] | None = None) -> float | None:
    """When SLURM started this job (this attempt of it), if SLURM says: SLURM_JOB_START_TIME."""
    text = (os.environ if environ is None else environ).get("SLURM_JOB_START_TIME", "")
    return float(text) if text.strip().isdigit() else None


class StartupClock:
    """Marks along one process's way to its first step. The first mark's phase began at the process's
    start (the clock's creation time where /proc is not available)."""

    def __init__(self) -> None:
        self.process_start = process_start_time() or time.time()
        self.marks: list[tuple[str, float]] = []
        self.used = False  # a segment's start-up was reported: a later one in this process starts anew

    def begin_segment(self) -> None:
        """Called as a trainer is built: a second trainer in one process (tests, notebooks) measures its
        start-up from here, not from the process start."""
        if self.used:
            self.process_start, self.marks, self.used = time.time(), [], False

    def mark(self, phase: str, at: float | None = None) -> None:
        """The time since the previous mark (or the process start) went to `phase`; added up if repeated."""
        self.marks.append((phase, time.time() if at is None else at))

    def split(self, until: float) -> dict[str, float]:
        """Seconds per phase from the process start to `until`; what no mark covers is `other`."""
        out: dict[str, float] = {}
        previous = self.process_start
        for phase, at in self.marks:
            at = min(max(at, previous), until)
            out[phase] = out.get(phase, 0.0) + (at - previous)
            previous = at
        out[OTHER] = out.get(OTHER, 0.0) + max(0.0, until - previous)
        return {phase: round(seconds, 3) for phase, seconds in out.items()}

    def ready_fields(self, now: float | None = None) -> dict[str, Any]:
        """The `ready` event's fields: when the process (and the job) started and where the time went."""
        now = time.time() if now is None else now
        self.used = True
        fields: dict[str, Any] = {"process_start": round(self.process_start, 3), "startup": self.split(now)}
        job = job_start_time()
        if job is not None and job <= self.process_start:
            fields["job_start"] = job
        return fields


CLOCK = StartupClock()  # the one clock of this process (the trainer and the entry points mark it)
_gc_paused = False


def pause_gc() -> None:
    """At an entry point, before the heavy imports: no cyclic garbage collection until the first step.

    Importing torch, accelerate and a pipeline creates some 700k objects, and the collector, triggered
    by allocation counts, walks them again and again: with it paused, imports and build take 30-45 %
    less time here (measured on 2 cores). resume_gc() turns it back on."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """At the first step (and on any way out): freeze what start-up built, then collect as usual.

    Frozen objects (modules, the model, the data) are never walked again, so later collections, the
    one in Trainer.close() included, take milliseconds instead of a second. The price: the cyclic
    garbage start-up left (about 10k objects, a few MB, once) is never freed. Only undoes pause_gc()."""
    global _gc_paused
    if _gc_paused:
        gc.freeze()
        gc.enable()
        _gc_paused = False
