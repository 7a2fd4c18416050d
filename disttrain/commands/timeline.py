"""`disttrain plot RUN_DIR --timeline`: where a run's hours went, as a picture. The top lane shows every
segment over wall-clock time (start-up, training, saves, evals, waiting for stragglers, the stop, steps
redone, teardown) and the queue between segments; the bar below adds each cause up. A sweep dir gets one
lane per task that has started, on one clock (so the array's parallelism shows), and the bar adds up
every task. From events.jsonl alone (disttrain.events, disttrain.goodput), local or s3://."""

from __future__ import annotations

import io
from typing import Any

from disttrain import events as ev
from disttrain import fs, goodput, sweepdir
from disttrain.rundir import TIMELINE, RunDir

COLORS = {
    "training": "#4c9a4c", "startup": "#f0a030", "checkpoint": "#3a78c2", "eval": "#9467bd",
    "stop": "#d62728", "teardown": "#8c564b", "restart": "#9467bd", "redone": "#ff9896", "stragglers": "#e377c2", "unexplained": "#bbbbbb",
    "queued": "#e8e8e8",
}  # fmt: skip
WORDS = {**goodput.CAUSE_WORDS, "queued": "queued (not counted)"}
Span = tuple[float, float, str]  # (start, end, what), seconds since the first segment began
Lane = tuple[str, list[ev.Event], goodput.Goodput]  # (label, events, their goodput)


def spans(events: list[ev.Event], g: goodput.Goodput, origin: float | None = None) -> list[Span]:
    """Every segment's pieces, in the order drawn (later ones paint over training), in seconds after
    `origin` (default: the run's first segment's begin)."""
    out: list[Span] = []
    origin = (g.segments[0].begin if g.segments else 0.0) if origin is None else origin
    for seg, evs in zip(g.segments, ev.split_segments(events)):
        out += _segment_spans(seg, evs, origin)
        if seg.queued_before_s > 0:
            out.append((seg.begin - seg.queued_before_s - origin, seg.begin - origin, "queued"))
    return out


def _segment_spans(seg: goodput.SegmentTime, evs: list[ev.Event], origin: float) -> list[Span]:
    def at(start: float, end: float, what: str) -> Span:
        return (start - origin, end - origin, what)

    restart = seg.lost.get("restart", 0.0)  # the gap before a restart in place opens the segment
    out = [at(seg.begin + restart, seg.ready, "startup"), at(seg.ready, seg.end, "training")]
    if restart > 0:
        out.insert(0, at(seg.begin, seg.begin + restart, "restart"))
    for e in evs:
        kind, seconds = ev.kind(e), e.get("seconds")
        if (
            kind in (ev.CHECKPOINT, ev.EVAL)
            and isinstance(seconds, (int, float))
            and e.get("reason") != "stop"
        ):
            out.append(at(e["time"] - seconds, e["time"], kind))
    out += _straggler_spans(seg, evs, origin)
    loop_end = seg.end - seg.lost["stop"] - seg.lost["teardown"]
    if seg.lost["redone"] > 0:  # the steps after the last save that survived: the loop's last ones
        out.append(at(loop_end - seg.lost["redone"], loop_end, "redone"))
    if seg.lost["stop"] > 0:
        out.append(at(loop_end, seg.end, "stop"))
    if seg.lost["teardown"] > 0:
        out.append(at(loop_end, seg.end, "teardown"))
    return out


def _straggler_spans(seg: goodput.SegmentTime, evs: list[ev.Event], origin: float) -> list[Span]:
    """The waiting goodput counted, drawn as it was recorded: each `straggler` event's wait just before
    it (the windows it covers end there), scaled so the pieces add up to the segment's count."""
    found = [
        e for e in evs if ev.kind(e) == ev.STRAGGLER and ev.step(e) <= seg.kept and seg.ready < e["time"]
    ]
    waits = [float(w) if isinstance(w := e.get("waited_s"), (int, float)) else 0.0 for e in found]
    if not sum(waits) or not seg.lost["stragglers"]:
        return []
    scale = seg.lost["stragglers"] / sum(waits)
    return [
        (e["time"] - w * scale - origin, e["time"] - origin, "stragglers")
        for e, w in zip(found, waits)
        if w > 0
    ]


def lanes(path: str) -> list[Lane]:
    """The lanes of a run dir (one) or of a sweep dir (one per task that has started). Raises
    ValueError when none has a segment yet."""
    sweep = sweepdir.is_sweep_dir(path)
    named = sweepdir.task_dirs(path) if sweep else [(fs.basename(path), path)]
    out = []
    for label, run_dir in named:
        events = ev.read(run_dir)
        g = goodput.compute(events)
        if g.segments:
            out.append((label, events, g))
    if not out and sweep:
        raise ValueError(f"no task of the sweep {path} has started yet; see disttrain status {path}")
    if not out:
        raise ValueError(
            f"{RunDir(path).events} holds no segment yet; give the run_dir of a run that has started"
        )
    return out


def draw(path: str) -> bytes:
    """The timeline PNG of a run, or of every started task of a sweep. Raises ValueError when there is
    no segment to draw."""
    drawn = lanes(path)
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg

    fig = Figure(figsize=(11, 2.4 + 1.2 * len(drawn)), layout="constrained")
    lane_ax, total_ax = fig.subplots(2, 1, height_ratios=[1 + len(drawn), 1])
    origin = min(g.segments[0].begin for _, _, g in drawn)
    end = max(s.end for _, _, g in drawn for s in g.segments) - origin
    scale, unit = (60.0, "min") if end > 600 else (1.0, "s")
    for row, (_, events, g) in enumerate(drawn):
        for start, stop, what in spans(events, g, origin):
            lane_ax.barh(
                -row, (stop - start) / scale, left=start / scale, height=0.6, color=COLORS[what], lw=0
            )
    if len(drawn) > 1:
        lane_ax.set_yticks([-row for row in range(len(drawn))], [label for label, _, _ in drawn], fontsize=7)
    else:
        lane_ax.set_yticks([])
    lane_ax.set_xlabel(f"{unit} since the first segment began")
    total = _sum([g for _, _, g in drawn])
    lane_ax.set_title(_title(path, total, drawn), fontsize=10)
    _totals(total_ax, total)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _sum(runs: list[goodput.Goodput]) -> goodput.Goodput:
    """Every run's time added up (one run: itself)."""
    if len(runs) == 1:
        return runs[0]
    return goodput.Goodput(
        running_s=sum(g.running_s for g in runs),
        queued_s=sum(g.queued_s for g in runs),
        training_s=sum(g.training_s for g in runs),
        lost={c: sum(g.lost[c] for g in runs) for c in goodput.CAUSES},
        startup={},
        segments=[s for g in runs for s in g.segments],
    )


def _title(path: str, total: goodput.Goodput, drawn: list[Lane]) -> str:
    ratio = "-" if total.ratio is None else f"{total.ratio:.1%}"
    tasks = f", {len(drawn)} task(s)" if len(drawn) > 1 else ""
    return (
        f"{fs.basename(path)}: goodput {ratio} of {goodput.duration(total.running_s)} running{tasks}, "
        f"{len(total.segments)} segment(s), queued {goodput.duration(total.queued_s)}"
    )


def _totals(ax: Any, g: goodput.Goodput) -> None:
    parts = [("training", g.training_s)] + [(c, g.lost[c]) for c in goodput.CAUSES] + [("queued", g.queued_s)]
    left = 0.0
    for what, seconds in parts:
        if seconds > 0:
            label = f"{WORDS.get(what, what)} {goodput.duration(seconds)}"
            ax.barh(0, seconds, left=left, height=0.6, color=COLORS[what], lw=0, label=label)
            left += seconds
    ax.set_yticks([])
    ax.set_xlabel("seconds, all segments added up")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.55), frameon=False)


def write(path: str, out: str | None = None) -> str:
    """Draw the timeline of RUN_DIR (or SWEEP_DIR) to `out` (default PATH/timeline.png); returns where."""
    png = draw(path)
    out = out or fs.join(path, TIMELINE)
    fs.atomic_write(out, png)
    return out
