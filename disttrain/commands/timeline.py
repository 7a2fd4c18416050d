"""`disttrain plot RUN_DIR --timeline`: where a run's hours went, as a picture. The top lane shows every
segment over wall-clock time (start-up, training, saves, evals, the stop, steps redone, teardown) and
the queue between segments; the bar below adds each cause up. From events.jsonl alone (disttrain.goodput),
local or s3://."""

from __future__ import annotations

import io
from typing import Any

from disttrain import fs, goodput
from disttrain.rundir import RunDir, read_jsonl

COLORS = {
    "training": "#4c9a4c", "startup": "#f0a030", "checkpoint": "#3a78c2", "eval": "#9467bd",
    "stop": "#d62728", "teardown": "#8c564b", "redone": "#ff9896", "unexplained": "#bbbbbb", "queued": "#e8e8e8",
}  # fmt: skip
WORDS = {**goodput.CAUSE_WORDS, "queued": "queued (not counted)"}
Span = tuple[float, float, str]  # (start, end, what), seconds since the run's first segment began


def spans(events: list[dict[str, Any]], g: goodput.Goodput) -> list[Span]:
    """Every segment's pieces, in the order drawn (later ones paint over training)."""
    out: list[Span] = []
    origin = g.segments[0].begin if g.segments else 0.0
    for seg, evs in zip(g.segments, goodput.split_segments(events)):
        out += _segment_spans(seg, evs, origin)
        if seg.queued_before_s > 0:
            out.append((seg.begin - seg.queued_before_s - origin, seg.begin - origin, "queued"))
    return out


def _segment_spans(seg: goodput.SegmentTime, evs: list[dict[str, Any]], origin: float) -> list[Span]:
    def at(start: float, end: float, what: str) -> Span:
        return (start - origin, end - origin, what)

    out = [at(seg.begin, seg.ready, "startup"), at(seg.ready, seg.end, "training")]
    for e in evs:
        kind, seconds = e.get("event"), e.get("seconds")
        if kind in ("checkpoint", "eval") and isinstance(seconds, (int, float)) and e.get("reason") != "stop":
            out.append(at(e["time"] - seconds, e["time"], str(kind)))
    loop_end = seg.end - seg.lost["stop"] - seg.lost["teardown"]
    if seg.lost["redone"] > 0:  # the steps after the last save that survived: the loop's last ones
        out.append(at(loop_end - seg.lost["redone"], loop_end, "redone"))
    if seg.lost["stop"] > 0:
        out.append(at(loop_end, seg.end, "stop"))
    if seg.lost["teardown"] > 0:
        out.append(at(loop_end, seg.end, "teardown"))
    return out


def draw(run_dir: str) -> bytes:
    """The timeline PNG of a run. Raises ValueError when its events hold no segment."""
    events = [e for e in read_jsonl(RunDir(run_dir).events) if isinstance(e.get("time"), (int, float))]
    g = goodput.compute(events)
    if not g.segments:
        raise ValueError(f"{RunDir(run_dir).events} holds no segment yet")
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    lane, total = fig.subplots(2, 1, height_ratios=[2, 1])
    scale, unit = (60.0, "min") if g.running_s + g.queued_s > 600 else (1.0, "s")
    for start, end, what in spans(events, g):
        lane.barh(0, (end - start) / scale, left=start / scale, height=0.6, color=COLORS[what], lw=0)
    lane.set_yticks([])
    lane.set_xlabel(f"{unit} since the first segment began")
    ratio = "-" if g.ratio is None else f"{g.ratio:.1%}"
    lane.set_title(f"{fs.basename(run_dir)}: goodput {ratio} of {goodput.duration(g.running_s)} running, "
                   f"{len(g.segments)} segment(s), queued {goodput.duration(g.queued_s)}", fontsize=10)  # fmt: skip
    _totals(total, g)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


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


def write(run_dir: str, out: str | None = None) -> str:
    """Draw RUN_DIR's timeline to `out` (default RUN_DIR/timeline.png); returns where."""
    png = draw(run_dir)
    out = out or RunDir(run_dir).file("timeline.png")
    fs.atomic_write(out, png)
    return out
