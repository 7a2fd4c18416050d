"""What `disttrain status RUN_DIR` reports of one run (and each task row of a sweep's view): state,
progress, metrics, checkpoints, interruption history, skipped steps, slow and hung ranks
(commands/attribution.py) and goodput, as plain data, and its human rendering. Not a command:
`commands/status.py` is, and `commands/sweep_status.py` reads each task through this module.

It reads only the run dir contract (DESIGN §3): config.yaml, metrics.jsonl, events.jsonl (disttrain.
events) and the checkpoint manifests (disttrain.manifest), through `fs`. It imports neither torch nor the
checkpoint manager, so it answers in a blink on a login node, even while the run is writing.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import yaml

from disttrain import events as ev
from disttrain import fs, goodput, manifest
from disttrain.commands import attribution
from disttrain.errors import CheckpointError
from disttrain.rundir import RunDir, read_jsonl, step_name

STALE_AFTER_S = 900.0  # no event or metric for this long: a "running" run may have died (kill -9, node loss)
SKIPPED_WARN_SHARE = 0.1  # skipped (non-finite) steps above this share of the run: said loudly
RUNNING = ("running", "running-or-died")
Record = dict[str, Any]


class StatusError(Exception):
    """RUN_DIR is not a run directory; the entry point prints one line and exits with code 2."""


# ---------------------------------------------------------------------------------------- collect


def collect(run_dir: str, now: float | None = None, stale_after: float = STALE_AFTER_S) -> dict[str, Any]:
    """Everything `status` reports, as plain data (what --json prints). Raises StatusError."""
    now = time.time() if now is None else now
    events, config = _events(run_dir), _config(run_dir)
    layout = RunDir(run_dir)
    metrics = read_jsonl(layout.metrics)
    segments = ev.split_segments(events)
    current = segments[-1]
    max_steps = _get(config, "trainer", "max_steps") or next(
        (e["max_steps"] for e in current if e.get("max_steps")), None
    )
    step = max(ev.step(e) for e in current + metrics[-1:])
    activity = max(events[-1]["time"], _mtime(layout.metrics) or 0.0)
    rate = _rate(current[0], step, activity, metrics, config)
    state, detail = _state(current, now - activity, stale_after, rate, config)
    interruptions = [
        _interruption(seg, prev) for prev, seg in zip(segments, segments[1:]) if _interrupted(prev, seg)
    ]
    skipped = _skipped(events)
    return {
        "run_dir": run_dir,
        "name": config.get("name") or fs.basename(run_dir),
        "state": state,
        "detail": detail,
        "step": step,
        "max_steps": max_steps,
        "progress": round(step / max_steps, 4) if max_steps else None,
        "last_event": {
            **_pick(events[-1], "event", "time", "step", "job_id"),
            "age_s": round(now - events[-1]["time"], 1),
        },
        "last_activity_age_s": round(now - activity, 1),
        "last_train": _last_with(metrics, "train/"),
        "last_eval": _last_with(metrics, "eval/"),
        "checkpoints": _checkpoints(run_dir),
        "segments": len(segments),
        "requeues": [
            _pick(e, "time", "step", "job_id", "restart_count") for e in events if ev.kind(e) == ev.REQUEUE
        ],
        "interruptions": interruptions,
        "steps_lost": sum(i["steps_lost"] for i in interruptions),
        "steps_per_s": round(rate, 4) if rate else None,
        "skipped_steps": skipped,
        "skipped_share": round(skipped / step, 4) if step else None,
        "profiles": [_pick(e, "first", "last", "path") for e in events if ev.kind(e) == ev.PROFILE],
        "eta_s": _eta(state, step, max_steps, rate),
        "stragglers": attribution.stragglers(events),
        "hangs": attribution.hangs(events),
        "goodput": goodput.compute(
            events, open_until=activity if state in RUNNING else None, open_step=step
        ).as_dict(),
    }


def _events(run_dir: str) -> list[Record]:
    if not fs.exists(run_dir):
        raise StatusError(f"{run_dir} does not exist; give the run_dir of a run")
    events = ev.read(run_dir)
    if not events:
        raise StatusError(f"{run_dir} has no events.jsonl records: not a run dir, or its run never started")
    return events


def _config(run_dir: str) -> dict[str, Any]:
    path = RunDir(run_dir).config
    if not fs.exists(path):
        return {}
    try:
        data = yaml.safe_load(fs.read_text(path))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: str) -> float | None:
    """Last-modified time of a file, local or remote (None if unknown)."""
    try:
        if fs.is_local(path):
            return os.path.getmtime(path.removeprefix("file://"))
        filesystem, inner = fs.filesystem(path)
        return filesystem.modified(inner).replace(tzinfo=datetime.timezone.utc).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        return None


def _state(
    segment: list[Record], idle_s: float, stale_after: float, rate: float | None, config: dict[str, Any]
) -> tuple[str, str]:
    """The state from the current segment's last event other than its `exit` (DESIGN §5)."""
    last = ([e for e in segment if ev.kind(e) != ev.EXIT] or segment)[-1]
    kind = ev.kind(last)
    if kind == ev.FINISH:
        why = f": {last['reason']}" if last.get("reason") else ""
        return "finished", f"finished at step {last.get('step')}{why}"
    if kind == ev.ERROR or (kind == ev.NONFINITE and ev.ends_segment(last)):
        return "failed", str(last.get("error", "an error was recorded"))
    if kind == ev.REQUEUE and last.get("failing_nodes"):  # an in-job restart that gave up on a node
        nodes = ", ".join(last.get("excluded") or last["failing_nodes"])
        return (
            "requeued",
            f"requeued without node(s) {nodes}, whose ranks kept failing in this job; waiting for SLURM",
        )
    if kind == ev.REQUEUE and "lost_nodes" in last:  # a node lost whole, no spare: the agents gave up on it
        nodes = ", ".join(last.get("excluded") or last["lost_nodes"]) or "a node"
        return "requeued", f"requeued without {nodes}, lost during the job; waiting for SLURM"
    if any(ev.kind(e) == ev.REQUEUE for e in segment):
        return (
            "requeued",
            "stopped, saved and requeued; waiting for SLURM to start it again (no ETA while it waits)",
        )
    if kind == ev.INTERRUPTED:
        return (
            "interrupted",
            f"interrupted by Ctrl-C twice at step {last.get('step')}, without a checkpoint; run it again to resume",
        )
    if kind in (ev.STOPPED, ev.REQUEUE_REFUSED):
        stop = next(e for e in reversed(segment) if ev.kind(e) in (ev.STOPPED, ev.REQUEUE_REFUSED))
        why = f" by {stop['signal']}" if stop.get("signal") else ""
        return (
            "stopped-awaiting-requeue",
            f"stopped{why} at step {stop.get('step')} after a checkpoint; run it again to resume",
        )
    log_every = _get(config, "trainer", "log_every") or 1
    allowance = max(stale_after, 3 * log_every / rate) if rate else stale_after
    if idle_s > allowance:
        return (
            "running-or-died",
            f"last '{kind}' event, no event or metric for {_duration(idle_s)}: still running, or died without a trace",
        )
    return "running", f"last event '{kind}' {_duration(idle_s)} ago"


def _rate(
    start: Record, step: int, activity: float, metrics: list[Record], config: dict[str, Any]
) -> float | None:
    """Optimizer steps per second over the current segment, from its start to the latest activity;
    from the last logged throughput when the segment is too young to tell."""
    done, elapsed = step - ev.step(start), activity - start["time"]
    if done > 0 and elapsed > 0:
        return done / elapsed
    batch = _get(config, "data", "batch_size")
    sps = next(
        (m["train/samples_per_sec"] for m in reversed(metrics) if m.get("train/samples_per_sec")), None
    )
    return sps / batch if sps and batch else None


def _eta(state: str, step: int, max_steps: int | None, rate: float | None) -> float | None:
    """Time to max_steps at the current rate, while the run trains; none while it waits (requeued,
    stopped) or may have died: its rate says nothing about when the scheduler starts it again."""
    if state == "finished":
        return 0.0
    if state != "running" or not rate or not max_steps:
        return None
    return round(max(0, max_steps - step) / rate, 1)


def _skipped(events: list[Record]) -> int:
    """Steps skipped with a non-finite loss or gradient (trainer.nonfinite=skip) over the whole run: the
    run's own count, which `nonfinite` records carry and checkpoints keep (a record replayed after a
    resume is not counted twice); the number of records for runs written before they carried it."""
    skips = [e for e in events if ev.kind(e) == ev.NONFINITE and e.get("action") == "skip"]
    counts = [int(e["skipped"]) for e in skips if isinstance(e.get("skipped"), int)]
    return max(counts) if counts else len(skips)


def _interrupted(previous: list[Record], segment: list[Record]) -> bool:
    """A segment that resumed after one that did not finish (a finished one resumed is an extension)."""
    ended = ev.last_end(previous)
    return ev.resumed_from(segment) is not None and not (ended and ev.kind(ended) == ev.FINISH)


def _interruption(segment: list[Record], previous: list[Record]) -> dict[str, Any]:
    """Where the earlier segment got to (events.reached: its stop's step, or the last step it logged
    before a kill), the step resumed from, and the steps redone."""
    resume = ev.resumed_from(segment) or {}
    ending = ev.last_end(previous) or {}
    signal = next((e.get("signal") for e in reversed(previous) if ev.kind(e) == ev.SIGNAL), None)
    at, frm = ev.reached(previous, segment), ev.step(resume)
    by = {ev.ERROR: "error", ev.REQUEUE: "requeue", ev.STOPPED: "stop", ev.NONFINITE: "non-finite stop"}
    return {
        "time": resume.get("time"),
        "interrupted_at": at,
        "resumed_from": frm,
        "steps_lost": max(0, at - frm),
        "by": signal or by.get(ev.kind(ending)) or "killed (no stop recorded)",
        "error": ending.get("error") if ev.kind(ending) in (ev.ERROR, ev.NONFINITE) else None,
        "cause": resume.get("cause"),
        "job_id": resume.get("job_id"),
        "restart_count": resume.get("restart_count"),
        "tier": resume.get("tier"),  # local | peer | durable (checkpoint.local); absent before the local tier
        "fallback": next((e.get("reason") for e in segment if ev.kind(e) == ev.TIER_FALLBACK), None),
        "left_out": ending.get("excluded") or [],  # nodes the requeue excluded (slow, or failing twice)
    }


def _tier(interruption: dict[str, Any]) -> str:
    """`; local tier`, or the tier that served and why a faster one did not (a piece missing or bad)."""
    if interruption["fallback"]:
        return f"; {interruption['tier'] or 'durable'} tier: {interruption['fallback']}"
    return f"; {interruption['tier']} tier" if interruption["tier"] else ""


def _checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """Committed checkpoints (rundir's definition: a step dir holding its manifest), oldest first."""
    layout = RunDir(run_dir)
    out = []
    for step in reversed(layout.committed_steps()):
        try:
            m = manifest.read(layout.step_dir(step))
        except CheckpointError:
            continue  # being written by an object store that shows partial objects, or not disttrain's
        out.append(
            {"step": step, "name": step_name(step), "time": m.get("time"), "bytes": manifest.total_bytes(m)}
        )
    return out


def _last_with(metrics: list[Record], prefix: str) -> dict[str, Any] | None:
    for row in reversed(metrics):
        values = {k: v for k, v in row.items() if k.startswith(prefix)}
        if values:
            return {"step": row.get("step"), **values}
    return None


def _pick(record: Record, *keys: str) -> dict[str, Any]:
    return {k: record.get(k) for k in keys}


def _get(data: dict[str, Any], section: str, key: str) -> Any:
    node = data.get(section)
    return node.get(key) if isinstance(node, dict) else None


# ---------------------------------------------------------------------------------------- render


def render(report: dict[str, Any]) -> str:
    """The human view: a few aligned lines."""
    r = report
    steps = f"{r['step']} / {r['max_steps']}" if r["max_steps"] else str(r["step"])
    pct = f" ({r['progress']:.0%})" if r["progress"] is not None else ""
    speed = f", {r['steps_per_s']:.2f} steps/s" if r["steps_per_s"] else ""
    eta = f", eta {_duration(r['eta_s'])}" if r["eta_s"] else ""
    lines = [f"run          {r['run_dir']} ({r['name']})", f"state        {r['state']}: {r['detail']}"]
    lines += _skipped_warning(r)
    lines += [
        f"step         {steps}{pct}{speed}{eta}",
        f"train        {_metrics_line(r['last_train'])}",
        f"eval         {_metrics_line(r['last_eval'])}",
    ]
    ckpts = r["checkpoints"]
    lines.append(
        f"checkpoints  {len(ckpts)} committed" + (f", latest step {ckpts[-1]['step']}" if ckpts else "")
    )
    lines += [f"  step {c['step']:>8}  {_when(c['time'])}  {fs.human_size(c['bytes'])}" for c in ckpts]
    lines.append(
        f"history      {r['segments']} segment(s), {len(r['requeues'])} requeue(s), "
        f"{len(r['interruptions'])} interruption(s), {r['steps_lost']} step(s) redone"
    )
    for i in r["interruptions"]:
        lines.append(
            f"  {_when(i['time'])}  {i['by']} at step {i['interrupted_at']}, resumed from {i['resumed_from']} "
            f"({i['steps_lost']} lost; {i['cause']}{_tier(i)}"
            + (f"; {', '.join(i['left_out'])} left out" if i.get("left_out") else "")
            + ")"
        )
    if r["skipped_steps"]:
        share = (
            f" ({r['skipped_share']:.1%} of the {r['step']} trained)"
            if r["skipped_share"] is not None
            else ""
        )
        lines.append(
            f"skipped      {r['skipped_steps']} step(s){share}: non-finite loss or gradient, update not applied"
        )
    lines += attribution.render(r)
    lines += [f"profile      steps {p['first']}-{p['last']}: {p['path']}" for p in r["profiles"]]
    lines += goodput.render(r["goodput"])
    return "\n".join(lines) + "\n"


def _skipped_warning(r: dict[str, Any]) -> list[str]:
    """A run whose updates were mostly skipped has barely trained, whatever its state says."""
    share = r.get("skipped_share")
    if share is None or share < SKIPPED_WARN_SHARE:
        return []
    return [
        f"WARNING      {share:.0%} of the steps were skipped (non-finite loss or gradient, trainer.nonfinite=skip): "
        f"the weights saw {r['step'] - r['skipped_steps']} update(s) in {r['step']} steps; lower optim.lr or check the data"
    ]


def _metrics_line(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    values = "  ".join(f"{k.split('/', 1)[-1]} {_num(v)}" for k, v in record.items() if k != "step")
    return f"step {record['step']}: {values}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value and (abs(value) >= 1e4 or abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)


def _when(stamp: Any) -> str:
    if not isinstance(stamp, (int, float)):
        return "?"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
