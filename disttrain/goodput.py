"""Goodput: the share of a run's running time that went into steps that survive in its result, and
where the rest went, from events.jsonl alone (DESIGN §3). Torch-free: `disttrain status` answers on a
login node, for a local or an s3:// run dir, and a sweep's status calls it once per task.

A run is a list of segments (one process lifetime each, opening with `start`):

    begin -- start-up -- ready -- steps, evals, saves -- [signal -- stop save, requeue] -- end -- queued --

- begin: the job's start (SLURM_JOB_START_TIME) or the process's start, both in the `ready` event;
  the `start` event for run dirs written before `ready` existed (their start-up is then unknown).
- end: the `exit` event; else the last event that ends a segment (events.ENDS); else, after a kill -9
  or a lost node, the last event extended by the steps the next segment says were reached.
- pace: the median, over the intervals between a segment's markers (ready, saves, evals, the end of
  its loop), of (time - saves - evals) / steps. Steps at that pace are training; what the loop spent
  beyond it is `unexplained` (a slow batch, a busy machine).
- stragglers: the seconds every rank waited for a slow one, as the `straggler` events measured them
  (features.stragglers: the slow rank's busy time beyond the others' median, window by window). That
  wait is paid inside the loop, at the slow rank's pace: it is carved out of the loop's time, first
  from `unexplained` (a rank slow for part of the segment makes its steps slower than the median pace)
  and the rest from training (a rank slow all along sets the pace itself), so the shares still add up
  to the running time. Only the wait in kept steps counts here (events up to the kept step); the wait
  in steps that were redone is already lost as `redone`.
- kept: steps up to where the next segment resumed (all of them for a last segment that finished, was
  stopped with a save, or is running); the others were redone.

Lost time by cause: start-up (launch, imports, process group, build, checkpoint load, other), checkpoint
(blocking saves in the loop), eval, stop (the agreed stop to the end: stop save, requeue, exit), teardown
(the end of a segment that finished or failed), restart (the gap before a segment that torchrun's agent
restarted inside the same allocation: detecting the failure, stopping the other ranks, starting new
processes), redone, stragglers, unexplained. Other gaps between segments are queue time, shown apart and
not running time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from disttrain import events as ev
from disttrain.events import Event

PHASES = ("launch", "imports", "process_group", "build", "checkpoint", "other")  # start-up, in order
CAUSES = (
    "startup",
    "checkpoint",
    "eval",
    "stop",
    "teardown",
    "restart",
    "redone",
    "stragglers",
    "unexplained",
)
CAUSE_WORDS = {"startup": "start-up", "stop": "signal-to-exit", "checkpoint": "checkpoint saves",
               "restart": "restart in place"}  # fmt: skip
PHASE_WORDS = {"process_group": "process group", "checkpoint": "checkpoint load"}
_KEEPS_ALL = (ev.FINISH, "running", ev.STOPPED, ev.REQUEUE, ev.REQUEUE_REFUSED)


@dataclass
class SegmentTime:
    """One segment's time, in seconds, and its steps."""

    index: int
    job_id: str
    begin: float
    ready: float
    end: float
    ended: str  # the ending event (events.ENDS), exit (none recorded), killed (no exit either) or running
    start_step: int
    reached: int
    kept: int
    pace_s: float | None  # seconds per step
    training_s: float
    startup: dict[str, float]  # by phase; empty when the run dir predates `ready`
    lost: dict[str, float]
    queued_before_s: float = 0.0
    signal_to_exit_s: float | None = None  # from the first signal received to the end

    @property
    def running_s(self) -> float:
        return self.end - self.begin


@dataclass
class Goodput:
    """A run's goodput: training time over running time, and the rest by cause."""

    running_s: float
    queued_s: float
    training_s: float
    lost: dict[str, float]
    startup: dict[str, float]
    segments: list[SegmentTime] = field(default_factory=list)
    interval: dict[str, Any] | None = None  # the checkpoint interval in force (auto), from the last save

    @property
    def ratio(self) -> float | None:
        return self.training_s / self.running_s if self.running_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "segments"}
        out = {**out, "goodput": None if self.ratio is None else round(self.ratio, 4)}
        out["segments"] = [{**asdict(s), "running_s": round(s.running_s, 3)} for s in self.segments]
        return _rounded(out)


# ---------------------------------------------------------------------------------------- compute


def compute(events: list[Event], open_until: float | None = None, open_step: int | None = None) -> Goodput:
    """Goodput over every segment of `events` (those with a numeric `time`). A last segment with no
    recorded end is still running up to `open_until` at step `open_step` when the caller knows it is
    alive (status does); without `open_until` it counts as killed at its last event."""
    events = _timed_records(events)
    segments = ev.split_segments(events)
    timed: list[SegmentTime] = []
    for i, seg in enumerate(segments):
        after = segments[i + 1] if i + 1 < len(segments) else None
        alive = open_until if after is None else None
        timed.append(_segment(i, seg, after, alive, open_step))
    for (before, later), seg in zip(zip(timed, timed[1:]), segments[1:]):
        gap = max(0.0, later.begin - before.end)
        if _restarted_in_place(seg) and before.ended not in (ev.REQUEUE, ev.REQUEUE_REFUSED):
            later.begin -= gap  # the allocation was held: failure detection, teardown, the new processes
            later.lost["restart"] = gap
        else:
            later.queued_before_s = gap
    return _total(timed, _interval(events))


def _restarted_in_place(seg: list[Event]) -> bool:
    """A segment torchrun's agent started again inside the same allocation (`--max-restarts`, or a SLURM
    job's in-job agents), rather than one that waited in a queue: its gap is lost running time."""
    resume = next((e for e in seg if ev.kind(e) == ev.RESUME), None)
    return resume is not None and str(resume.get("cause", "")).startswith("torchrun restart")


def _total(segments: list[SegmentTime], interval: dict[str, Any] | None) -> Goodput:
    lost = {cause: sum(s.lost.get(cause, 0.0) for s in segments) for cause in CAUSES}
    startup: dict[str, float] = {}
    for seg in segments:
        for phase, seconds in seg.startup.items():
            startup[phase] = startup.get(phase, 0.0) + seconds
    order = {phase: i for i, phase in enumerate(PHASES)}  # in the order they happen; unknown ones last
    startup = dict(sorted(startup.items(), key=lambda item: order.get(item[0], len(order))))
    return Goodput(
        running_s=sum(s.running_s for s in segments),
        queued_s=sum(s.queued_before_s for s in segments),
        training_s=sum(s.training_s for s in segments),
        lost=lost,
        startup=startup,
        segments=segments,
        interval=interval,
    )


@dataclass
class _Parsed:
    """What one segment's events say, before any arithmetic."""

    start: Event
    ready: Event | None
    exit: Event | None
    end_event: Event | None
    signal: Event | None
    busy: list[Event]  # checkpoints (not the stop save) and evals: blocking time inside the loop
    stragglers: list[Event]  # the waiting for slow ranks they measured
    last: Event

    @classmethod
    def of(cls, seg: list[Event]) -> _Parsed:
        def first(kind: str) -> Event | None:
            return next((e for e in seg if ev.kind(e) == kind), None)

        busy = [e for e in seg if _is_busy(e)]
        slow = [e for e in seg if ev.kind(e) == ev.STRAGGLER and _num(e.get("waited_s")) > 0]
        end = ev.last_end(seg)
        return cls(seg[0], first(ev.READY), first(ev.EXIT), end, first(ev.SIGNAL), busy, slow, seg[-1])


def _is_busy(event: Event) -> bool:
    kind = ev.kind(event)
    blocking = kind == ev.EVAL or (kind == ev.CHECKPOINT and event.get("reason") != "stop")
    return blocking and _num(event.get("seconds")) > 0


def _segment(
    index: int, seg: list[Event], after: list[Event] | None, alive: float | None, open_step: int | None
) -> SegmentTime:
    p = _Parsed.of(seg)
    begin, ready, startup = _startup(p)
    end, ended = _end(p, alive)
    loop_end = p.signal["time"] if p.signal else (p.end_event["time"] if p.end_event else end)
    start_step = _int(p.start.get("step"))
    seen = max(ev.step(e) for e in seg)
    reached = max(seen, open_step) if ended == "running" and open_step is not None else ev.reached(seg, after)
    busy = [e for e in p.busy if ready < e["time"] <= loop_end]
    loop_s = max(0.0, loop_end - ready - sum(_num(e["seconds"]) for e in busy))
    pace = _pace(ready, start_step, busy, loop_end, reached if ended == "running" else seen)
    if pace is not None and ended == "killed" and reached > seen:
        end += (reached - seen) * pace  # the steps logged after the last event, before the kill
        loop_s += (reached - seen) * pace
    kept = _kept(p, ended, start_step, reached, after)
    steps = max(0, reached - start_step)
    pace = min(pace, loop_s / steps) if pace is not None and steps else None
    training = (kept - start_step) * pace if pace else 0.0
    redone = (reached - kept) * pace if pace else 0.0
    counted = [e for e in p.stragglers if ready < e["time"] <= loop_end and ev.step(e) <= kept]
    training, stragglers, unexplained = _carve(
        sum(_num(e["waited_s"]) for e in counted), training, max(0.0, loop_s - training - redone)
    )
    lost = {
        "startup": ready - begin,
        "checkpoint": sum(_num(e["seconds"]) for e in busy if ev.kind(e) == ev.CHECKPOINT),
        "eval": sum(_num(e["seconds"]) for e in busy if ev.kind(e) == ev.EVAL),
        "stop": end - p.signal["time"] if p.signal else 0.0,
        "teardown": end - p.end_event["time"] if (p.exit and p.end_event and not p.signal) else 0.0,
        "restart": 0.0,  # set by compute: the gap before a segment restarted in its allocation
        "redone": redone,
        "stragglers": stragglers,
        "unexplained": unexplained,
    }
    received = p.signal.get("received") if p.signal else None
    return SegmentTime(
        index=index,
        job_id=str(p.start.get("job_id", "")),
        begin=begin,
        ready=ready,
        end=end,
        ended=ended,
        start_step=start_step,
        reached=reached,
        kept=kept,
        pace_s=pace,
        training_s=training,
        startup=startup,
        lost=lost,
        signal_to_exit_s=end - received if isinstance(received, (int, float)) else None,
    )


def _carve(waited: float, training: float, unexplained: float) -> tuple[float, float, float]:
    """(training, stragglers, unexplained) once the waiting for slow ranks is taken out of the loop's
    time: first from what lies beyond the pace, then from the pace itself (the module's docstring)."""
    from_unexplained = min(waited, unexplained)
    from_training = min(waited - from_unexplained, training)
    return training - from_training, from_unexplained + from_training, unexplained - from_unexplained


def _startup(p: _Parsed) -> tuple[float, float, dict[str, float]]:
    """(begin, ready time, seconds per start-up phase) of a segment."""
    if p.ready is None:  # a run dir written before `ready` existed: start-up unknown, counted as none
        return p.start["time"], p.start["time"], {}
    ready = p.ready["time"]
    process = _opt(p.ready.get("process_start"), ready)
    job = _opt(p.ready.get("job_start"), process)
    phases = {k: _num(v) for k, v in (p.ready.get("startup") or {}).items()}
    if job < process:
        phases = {"launch": process - job, **phases}
    return min(job, process), ready, phases


def _end(p: _Parsed, alive: float | None) -> tuple[float, str]:
    if p.exit is not None or p.end_event is not None:
        ended = ev.kind(p.end_event) if p.end_event else ev.EXIT
        return (p.exit or p.end_event or {})["time"], ended
    if alive is not None:
        return max(alive, p.last["time"]), "running"
    return p.last["time"], "killed"


def _kept(p: _Parsed, ended: str, start: int, reached: int, after: list[Event] | None) -> int:
    """The last step of this segment that survives: where the next one started, else all (finished,
    stopped with a save, running), else its newest save (failed or killed: the rest is redone later)."""
    if after is not None:
        return min(max(_int(after[0].get("step")), start), reached)
    if ended in _KEEPS_ALL:
        return reached
    saved = [ev.step(e) for e in p.busy if ev.kind(e) == ev.CHECKPOINT]
    return min(max([start, *saved]), reached)


def _pace(ready: float, start: int, busy: list[Event], loop_end: float, last_step: int) -> float | None:
    """Median seconds per step over the intervals between markers (saves, evals, the loop's end)."""
    marks: dict[int, float] = {start: ready}
    for e in busy:
        marks[_int(e.get("step"))] = max(marks.get(_int(e.get("step")), 0.0), e["time"])
    marks[last_step] = max(marks.get(last_step, 0.0), loop_end)
    points = sorted((s, t) for s, t in marks.items() if s >= start)
    paces = []
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        inside = sum(_num(e["seconds"]) for e in busy if t0 < e["time"] <= t1)
        if s1 > s0:
            paces.append(max(0.0, t1 - t0 - inside) / (s1 - s0))
    return statistics.median(paces) if paces else None


def _interval(events: list[Event]) -> dict[str, Any] | None:
    """The checkpoint interval the newest save recorded (checkpoint.interval=auto), if any."""
    for event in reversed(events):
        if ev.kind(event) == ev.CHECKPOINT and isinstance(event.get("interval"), dict):
            return dict(event["interval"])
    return None


# ---------------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class History:
    """What the checkpoint interval rule needs from a run's past segments."""

    running_s: float
    unclean: int  # segments that ended without a recorded stop or finish: killed, lost, failed
    save_s: list[float]  # blocking seconds of past saves, oldest first
    local_served: int = 0  # of the unclean ones, those the next segment resumed from the local tier


def history(events: list[Event]) -> History:
    """A run's interruption and save history (every segment here has ended: call it before `start`)."""
    g = compute(events)
    lost = [s.ended in ("killed", ev.ERROR) for s in g.segments]
    after = [ev.resumed_from(seg) for seg in ev.split_segments(_timed_records(events))][1:] + [None]
    served = sum(
        1 for was, r in zip(lost, after) if was and r is not None and r.get("tier") in ("local", "peer")
    )
    saves = [_num(e.get("seconds")) for e in events if ev.kind(e) == ev.CHECKPOINT and e.get("seconds")]
    return History(g.running_s, sum(lost), saves, served)


def _timed_records(events: list[Event]) -> list[Event]:
    """The records `compute` splits into segments (those with a numeric time)."""
    return [e for e in events if isinstance(e.get("time"), (int, float))]


# ---------------------------------------------------------------------------------------- render


def render(report: dict[str, Any]) -> list[str]:
    """Status lines from `Goodput.as_dict()`: goodput, lost time by cause, start-up by phase, and the
    checkpoint interval in force."""
    if report.get("goodput") is None:
        return ["goodput      - (no running time recorded yet)"]
    lost = report["lost"]
    lines = [
        f"goodput      {report['goodput']:.1%}: {duration(report['training_s'])} of {duration(report['running_s'])} "
        f"running went into kept steps (queued {duration(report['queued_s'])} between segments, not counted)",
        "  lost       " + ", ".join(f"{CAUSE_WORDS.get(c, c)} {duration(lost[c])}" for c in CAUSES),
    ]
    if report.get("startup"):
        phases = ", ".join(f"{PHASE_WORDS.get(k, k)} {duration(v)}" for k, v in report["startup"].items())
        lines.append(f"  start-up   {len(report['segments'])} segment(s): {phases}")
    if report.get("interval"):
        lines.append(f"  interval   {describe_interval(report['interval'])}")
    return lines


def describe_interval(info: dict[str, Any]) -> str:
    """One line: the checkpoint interval in force and why (the auto rule's inputs)."""
    return (
        f"auto, {duration(_num(info.get('seconds')))} = sqrt(2 x MTBI {duration(_num(info.get('mtbi_s')))} x save "
        f"{duration(_num(info.get('save_s')))}); MTBI from {_int(info.get('unclean'))} unclean interruption(s) in "
        f"{duration(_num(info.get('running_s')))} running plus the prior {duration(_num(info.get('prior_s')))}"
        + (
            f" ({_int(info['local_served'])} more served by the local tier)"
            if info.get("local_served")
            else ""
        )
    )


def duration(seconds: float) -> str:
    """0.43s, 12.0s, 4m05s, 2h03m."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    whole = int(round(s))
    return (
        f"{whole // 3600}h{whole % 3600 // 60:02d}m" if whole >= 3600 else f"{whole // 60}m{whole % 60:02d}s"
    )


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _opt(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _rounded(node: Any) -> Any:
    if isinstance(node, float):
        return round(node, 3)
    if isinstance(node, dict):
        return {k: _rounded(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rounded(v) for v in node]
    return node
