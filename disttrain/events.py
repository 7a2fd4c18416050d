"""RUN_DIR/events.jsonl as a contract (DESIGN §3): every event name, the fields each record carries, what
ends a segment, and how the records split into segments. Every writer (the trainer, the run lifecycle,
the features) and every reader (`status`, goodput, `follow`, the curves, the checkpoint interval) takes
them from here. Torch-free.

A record is one JSON object a line: {"time", "event", "job_id", "restart_count", ...its fields}. A run
is a list of segments, one process lifetime each (one SLURM attempt, one torchrun restart), each opening
with `start` and closing, unless it was killed, with `exit`:

    start [config_changed] [tier_fallback] [resume] ready (eval | checkpoint | nonfinite | profile | straggler)* [signal checkpoint]
          (finish | stopped [requeue | requeue_refused] | [hang] error | nonfinite(stop) | interrupted) exit
"""

from __future__ import annotations

from typing import Any

from disttrain.rundir import RunDir, read_jsonl

Event = dict[str, Any]

START = "start"  # step, world_size, max_steps: a segment's first record, before any other
CONFIG_CHANGED = "config_changed"  # step, changes: config keys applied from this step on (resume)
# step (resumed from), cause, interrupted_at (the last step logged before), tier (local: each rank's own
# piece in checkpoint.local.dir; durable: the run dir's checkpoints)
RESUME = "resume"
# tier (the one that could not serve: local), step (null when a rank had no piece), reason (which rank,
# its host, why), served (the tier that did): just before the `resume` it explains
TIER_FALLBACK = "tier_fallback"
READY = "ready"  # step, process_start, job_start, startup {phase: seconds}: start-up ends, training begins
EVAL = "eval"  # step, split, seconds (blocking), cut (true: a stop was agreed part way)
CHECKPOINT = (
    "checkpoint"  # step, seconds (blocking), bytes, reason (periodic | final | stop | manual), interval
)
NONFINITE = "nonfinite"  # step, quantity, action (skip | stop), skipped (steps skipped so far) or error
PROFILE = "profile"  # step, first, last, path: a torch.profiler trace written
SIGNAL = "signal"  # step, signal, signals, received (time of the first): a stop every rank agreed on
STOPPED = "stopped"  # step, signal: the loop left after the stop checkpoint
REQUEUE = "requeue"  # step, signal, reason, budget_left, signal_time, [excluded]: SLURM has the job again
REQUEUE_REFUSED = "requeue_refused"  # step, signal, reason, signal_time: stopped for good
FINISH = "finish"  # step, reason (early stopping): max_steps reached, or ended early as finished
ERROR = "error"  # step, error: the run failed (also a hung rank's record, from its watch)
INTERRUPTED = "interrupted"  # step, signal, saved: Ctrl-C twice, out without a save
STRAGGLER = "straggler"  # step, rank, host, section, ratio, waited_s, windows: a rank slow for a streak
HANG = "hang"  # step, ranks [{rank, host, section, frame}]: the rank(s) a collective gave up waiting for
EXIT = "exit"  # step: the process is done with the run dir (goodput's end of the segment)

NAMES = (
    START, CONFIG_CHANGED, TIER_FALLBACK, RESUME, READY, EVAL, CHECKPOINT, NONFINITE, PROFILE, SIGNAL, STOPPED, REQUEUE,
    REQUEUE_REFUSED, FINISH, ERROR, INTERRUPTED, STRAGGLER, HANG, EXIT,
)  # fmt: skip
COMMON = ("time", "event", "job_id", "restart_count")  # in every record (writers.EventLog)

# What ends a segment's run (the exit that follows closes the process). A `nonfinite` record ends it
# only when its action is stop: a skipped step is routine under trainer.nonfinite=skip.
ENDS = frozenset({FINISH, STOPPED, REQUEUE, REQUEUE_REFUSED, ERROR, INTERRUPTED, NONFINITE})


def kind(record: Event) -> str:
    return str(record.get("event", ""))


def step(record: Event) -> int:
    """A record's step; 0 when it has none (or not a number)."""
    try:
        return int(record.get("step") or 0)
    except (TypeError, ValueError):
        return 0


def ends_segment(record: Event) -> bool:
    if kind(record) == NONFINITE:
        return record.get("action") == "stop"
    return kind(record) in ENDS


def last_end(records: list[Event]) -> Event | None:
    """The last record that ended a segment, if any."""
    return next((r for r in reversed(records) if ends_segment(r)), None)


def read(run_dir: str) -> list[Event]:
    """The records of RUN_DIR/events.jsonl that carry a numeric time, in order; [] when there are none.
    (A torn last line, from a kill -9 or a full disk, is skipped: rundir.read_jsonl.)"""
    return [r for r in read_jsonl(RunDir(run_dir).events) if isinstance(r.get("time"), (int, float))]


def split_segments(records: list[Event]) -> list[list[Event]]:
    """Records split into segments, each opening with its `start` (records before the first start, if
    any, form a segment of their own)."""
    out: list[list[Event]] = [[]]
    for record in records:
        if kind(record) == START and out[-1]:
            out.append([])
        out[-1].append(record)
    return [seg for seg in out if seg]


def reached(segment: list[Event], after: list[Event] | None = None) -> int:
    """The last step a segment trained: the highest step its records report (the stop's step comes
    with its signal, checkpoint and stopped records), or what the next segment's `resume` says it had
    logged (`interrupted_at`: the steps a kill -9 left no record of), whichever is higher."""
    seen = max((step(r) for r in segment), default=0)
    resume = next((r for r in after or [] if kind(r) == RESUME), None)
    at = resume.get("interrupted_at") if resume else None
    return max(seen, step({"step": at})) if at is not None else seen


def resumed_from(segment: list[Event]) -> Event | None:
    """The segment's `resume` record, if it continued from a checkpoint."""
    return next((r for r in segment if kind(r) == RESUME), None)
