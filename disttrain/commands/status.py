"""`disttrain status RUN_DIR [--json]`: state, progress, metrics, checkpoints and interruption history
of a run, local or remote (s3://), finished, running, failed or stopped.

It reads only the run dir contract (DESIGN §3): config.yaml, metrics.jsonl, events.jsonl and the
checkpoint manifests, through `fs`. It imports neither torch nor the checkpoint manager, so it answers
in a blink on a login node, even while the run is writing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml

from disttrain import fs, goodput
from disttrain.rundir import MANIFEST, RunDir, read_jsonl, step_name

STALE_AFTER_S = 900.0  # no event or metric for this long: a "running" run may have died (kill -9, node loss)


class StatusError(Exception):
    """RUN_DIR is not a run directory; the entry point prints one line and exits with code 2."""


# ---------------------------------------------------------------------------------------- collect


def collect(run_dir: str, now: float | None = None, stale_after: float = STALE_AFTER_S) -> dict[str, Any]:
    """Everything `status` reports, as plain data (what --json prints)."""
    now = time.time() if now is None else now
    events, config = _events(run_dir), _config(run_dir)
    layout = RunDir(run_dir)
    metrics = read_jsonl(layout.metrics)
    segments = _segments(events)
    current = segments[-1]
    max_steps = _get(config, "trainer", "max_steps") or next(
        (e["max_steps"] for e in current if e.get("max_steps")), None
    )
    step = max(_int(e.get("step")) for e in current + metrics[-1:])
    activity = max(events[-1]["time"], _mtime(layout.metrics) or 0.0)
    rate = _rate(current[0], step, activity, metrics, config)
    state, detail = _state(current, now - activity, stale_after, rate, config)
    interruptions = [
        _interruption(seg, prev) for prev, seg in zip(segments, segments[1:]) if _interrupted(prev, seg)
    ]
    alive = activity if state in ("running", "running-or-died") else None
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
            _pick(e, "time", "step", "job_id", "restart_count") for e in events if e.get("event") == "requeue"
        ],
        "interruptions": interruptions,
        "steps_lost": sum(i["steps_lost"] for i in interruptions),
        "steps_per_s": round(rate, 4) if rate else None,
        "skipped_steps": sum(
            1 for e in events if e.get("event") == "nonfinite" and e.get("action") == "skip"
        ),
        "profiles": [_pick(e, "first", "last", "path") for e in events if e.get("event") == "profile"],
        "eta_s": _eta(state, step, max_steps, rate),
        "goodput": goodput.compute(events, open_until=alive, open_step=step).as_dict(),
    }


def _segments(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Events split into segments (one process lifetime each), each opening with its `start`."""
    out: list[list[dict[str, Any]]] = [[]]
    for event in (e for e in events if e.get("event") != "exit"):  # exit: the segment's end, for goodput
        if event.get("event") == "start" and out[-1]:
            out.append([])
        out[-1].append(event)
    return out


def _events(run_dir: str) -> list[dict[str, Any]]:
    if not fs.exists(run_dir):
        raise StatusError(f"{run_dir} does not exist; give the run_dir of a run")
    events = [e for e in read_jsonl(RunDir(run_dir).events) if isinstance(e.get("time"), (int, float))]
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
    segment: list[dict[str, Any]],
    idle_s: float,
    stale_after: float,
    rate: float | None,
    config: dict[str, Any],
) -> tuple[str, str]:
    """The state from the current segment's last lifecycle event (DESIGN §5)."""
    last = segment[-1]
    kind = last.get("event")
    if kind == "finish":
        why = f": {last['reason']}" if last.get("reason") else ""
        return "finished", f"finished at step {last.get('step')}{why}"
    if kind == "error" or (kind == "nonfinite" and last.get("action") == "stop"):
        return "failed", str(last.get("error", "an error was recorded"))
    if any(e.get("event") == "requeue" for e in segment):
        return "requeued", "stopped, saved and requeued; waiting for the scheduler to start it again"
    if kind == "interrupted":
        return (
            "interrupted",
            f"interrupted by Ctrl-C twice at step {last.get('step')}, without a checkpoint; run it again to resume",
        )
    if kind == "stopped":
        why = f" by {last['signal']}" if last.get("signal") else ""
        return (
            "stopped-awaiting-requeue",
            f"stopped{why} at step {last.get('step')} after a checkpoint; run it again to resume",
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
    start: dict[str, Any], step: int, activity: float, metrics: list[dict[str, Any]], config: dict[str, Any]
) -> float | None:
    """Optimizer steps per second over the current segment, from its start to the latest activity;
    from the last logged throughput when the segment is too young to tell."""
    done, elapsed = step - _int(start.get("step")), activity - start["time"]
    if done > 0 and elapsed > 0:
        return done / elapsed
    batch = _get(config, "data", "batch_size")
    sps = next(
        (m["train/samples_per_sec"] for m in reversed(metrics) if m.get("train/samples_per_sec")), None
    )
    return sps / batch if sps and batch else None


def _eta(state: str, step: int, max_steps: int | None, rate: float | None) -> float | None:
    if state == "finished":
        return 0.0
    return round(max(0, max_steps - step) / rate, 1) if rate and max_steps else None


def _interrupted(previous: list[dict[str, Any]], segment: list[dict[str, Any]]) -> bool:
    """A segment that resumed after one that did not finish (a finished one resumed is an extension)."""
    return any(e.get("event") == "resume" for e in segment) and previous[-1].get("event") != "finish"


def _interruption(segment: list[dict[str, Any]], previous: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the earlier segment stopped (the trainer's `interrupted_at`: the last step it logged, when
    recorded; else the last step its events report), the step resumed from, and the steps redone."""
    resume = next(e for e in segment if e.get("event") == "resume")
    ending = previous[-1]
    signal = next((e.get("signal") for e in reversed(previous) if e.get("event") == "signal"), None)
    at = resume.get("interrupted_at")
    at = _int(at) if at is not None else max(_int(e.get("step")) for e in previous)
    frm = _int(resume.get("step"))
    return {
        "time": resume.get("time"),
        "interrupted_at": at,
        "resumed_from": frm,
        "steps_lost": max(0, at - frm),
        "by": signal
        or {"error": "error", "requeue": "requeue", "stopped": "stop"}.get(ending.get("event", ""))
        or "killed (no stop recorded)",
        "error": ending.get("error") if ending.get("event") == "error" else None,
        "cause": resume.get("cause"),
        "job_id": resume.get("job_id"),
        "restart_count": resume.get("restart_count"),
    }


def _checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """Committed checkpoints (rundir's definition: a step dir holding its manifest), oldest first."""
    layout = RunDir(run_dir)
    out = []
    for step in reversed(layout.committed_steps()):
        try:
            manifest = json.loads(fs.read_text(fs.join(layout.step_dir(step), MANIFEST)))
        except (ValueError, OSError):
            continue  # being written by an object store that shows partial objects: not committed yet
        files = manifest.get("files") or {}
        size = sum(_int(f.get("bytes", f.get("size"))) for f in files.values() if isinstance(f, dict))
        out.append({"step": step, "name": step_name(step), "time": manifest.get("time"), "bytes": size})
    return out


def _last_with(metrics: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    for row in reversed(metrics):
        values = {k: v for k, v in row.items() if k.startswith(prefix)}
        if values:
            return {"step": row.get("step"), **values}
    return None


def _pick(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: record.get(k) for k in keys}


def _get(data: dict[str, Any], section: str, key: str) -> Any:
    node = data.get(section)
    return node.get(key) if isinstance(node, dict) else None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------- render


def render(report: dict[str, Any]) -> str:
    """The human view: a few aligned lines."""
    r = report
    steps = f"{r['step']} / {r['max_steps']}" if r["max_steps"] else str(r["step"])
    pct = f" ({r['progress']:.0%})" if r["progress"] is not None else ""
    speed = f", {r['steps_per_s']:.2f} steps/s" if r["steps_per_s"] else ""
    eta = f", eta {_duration(r['eta_s'])}" if r["eta_s"] else ""
    lines = [
        f"run          {r['run_dir']} ({r['name']})",
        f"state        {r['state']}: {r['detail']}",
        f"step         {steps}{pct}{speed}{eta}",
        f"train        {_metrics_line(r['last_train'])}",
        f"eval         {_metrics_line(r['last_eval'])}",
    ]
    ckpts = r["checkpoints"]
    lines.append(
        f"checkpoints  {len(ckpts)} committed" + (f", latest step {ckpts[-1]['step']}" if ckpts else "")
    )
    lines += [f"  step {c['step']:>8}  {_when(c['time'])}  {_size(c['bytes'])}" for c in ckpts]
    lines.append(
        f"history      {r['segments']} segment(s), {len(r['requeues'])} requeue(s), "
        f"{len(r['interruptions'])} interruption(s), {r['steps_lost']} step(s) redone"
    )
    for i in r["interruptions"]:
        lines.append(
            f"  {_when(i['time'])}  {i['by']} at step {i['interrupted_at']}, resumed from {i['resumed_from']} "
            f"({i['steps_lost']} lost; {i['cause']})"
        )
    if r["skipped_steps"]:
        lines.append(
            f"skipped      {r['skipped_steps']} step(s) with a non-finite loss or gradient (events.jsonl)"
        )
    lines += [f"profile      steps {p['first']}-{p['last']}: {p['path']}" for p in r["profiles"]]
    lines += goodput.render(r["goodput"])
    return "\n".join(lines) + "\n"


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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------- entry


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain status", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", help="run directory, or a sweep dir: a path or a URL such as s3://bucket/prefix"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        metavar="S",
        help=f"seconds without an event or metric before a running run is 'running-or-died' (default {STALE_AFTER_S:.0f})",
    )
    parser.add_argument(
        "--metric",
        help="for a sweep dir: the eval metric that ranks tasks (default eval/accuracy, else eval/loss)",
    )
    args = parser.parse_args(list(argv))
    from disttrain.commands import sweep_status  # a sweep dir: one row per task

    if sweep_status.is_sweep_dir(args.run_dir):
        return sweep_status.show(args.run_dir, args.json, args.metric, args.stale_after)
    try:
        report = collect(args.run_dir, stale_after=args.stale_after)
    except StatusError as err:
        print(f"disttrain status: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report), end="\n" if args.json else "")
    return 0
