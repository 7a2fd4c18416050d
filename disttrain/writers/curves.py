"""Curves as a PNG, with resumes marked; drawn with matplotlib at the end of every segment."""

from __future__ import annotations

import io
import sys
from typing import Any

from disttrain import events as ev
from disttrain import fs, rundir
from disttrain.writers.base import Writer, read_jsonl


class CurvesWriter(Writer):
    """Draws RUN_DIR/curves.png whenever a segment ends (log.plot), so a stopped run has current curves."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def close(self) -> None:
        try:
            write_curves(self.run_dir)
        except fs.LeaseLost:
            return  # the run's own line says it: nothing more is written there
        except (ImportError, OSError, ValueError) as err:  # a missing plot must not fail the run
            print(f"disttrain: curves.png not drawn: {err}", file=sys.stderr)


def write_curves(run_dir: str, out: str | None = None, metrics: list[str] | None = None) -> str:
    """Draw metrics.jsonl, one panel per metric, with a dashed line at every resume and a shaded band
    over the steps redone after an interruption. Writes a PNG (default RUN_DIR/curves.png); returns
    its path. Raises ValueError when there is nothing (or no such metric) to draw."""
    rows = read_jsonl(fs.join(run_dir, rundir.METRICS))
    if not rows:
        raise ValueError(f"{fs.join(run_dir, 'metrics.jsonl')} holds no metrics yet")
    present = list(dict.fromkeys(k for row in rows for k, v in row.items() if k != "step" and v is not None))
    missing = [k for k in metrics or [] if k not in present]
    if missing:
        raise ValueError(f"no metric {', '.join(missing)} in metrics.jsonl; it has {', '.join(present)}")
    events = read_jsonl(fs.join(run_dir, rundir.EVENTS))
    png = _draw(metrics or present, rows, resume_spans(events), fs.basename(run_dir))
    out = out or fs.join(run_dir, rundir.CURVES)
    fs.atomic_write(out, png)
    return out


def resume_spans(events: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(resumed from, interrupted at, cause) for every resume: where the segment before got to
    (events.reached: its stop's step, or what the resume says it had logged before a kill)."""
    spans: list[tuple[int, int, str]] = []
    segments = ev.split_segments(events)
    for i, segment in enumerate(segments):
        resume = ev.resumed_from(segment)
        if resume is not None:
            start = ev.step(resume)
            before = segments[i - 1] if i else []
            spans.append((start, max(start, ev.reached(before, segment)), str(resume.get("cause", ""))))
    return spans


def _draw(
    keys: list[str], rows: list[dict[str, Any]], spans: list[tuple[int, int, str]], title: str
) -> bytes:
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg, no pyplot or display

    cols = 1 if len(keys) == 1 else 2
    fig = Figure(figsize=(6 * cols, 2.8 * -(-len(keys) // cols)), layout="constrained")
    axes = fig.subplots(-(-len(keys) // cols), cols, squeeze=False).ravel()
    last_step = max(int(r.get("step", 0)) for r in rows)
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="." if len(points) < 40 else None, lw=1.2)
        for start, end, cause in spans:
            ax.axvline(start, color="tab:red", ls="--", lw=1, label=f"resumed from {start} ({cause})")
            if end > start:
                ax.axvspan(start, end, color="tab:red", alpha=0.12, label=f"redone {start + 1}-{end}")
        ax.set_xlim(0, last_step * 1.02 + 1)  # one x range for all panels, even a metric seen once
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if spans:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
