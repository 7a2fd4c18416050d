"""`disttrain plot RUN_OR_SWEEP...` with more than one run: the runs' curves overlaid, one panel per
metric and one line per run, labelled by the run's name (a sweep task's name is its overrides).

A sweep dir stands for every task in it that has logged metrics. torch-free; matplotlib is imported
only to draw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from disttrain import fs
from disttrain.rundir import RunDir, read_jsonl
from disttrain.sweepdir import is_sweep_dir, task_dirs

# Throughput is wall-clock noise between runs of a sweep, not a curve to compare.
SKIPPED_BY_DEFAULT = ("train/samples_per_sec",)


def expand(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(label, run dir) of every run the arguments name: a run dir itself, or each task of a sweep dir
    that has metrics. A label carries the sweep's name when several paths are given. ValueError if a
    path is neither a run with metrics nor a sweep with one."""
    runs: list[tuple[str, str]] = []
    for path in paths:
        if is_sweep_dir(path):
            tasks = [(name, d) for name, d in task_dirs(path) if fs.exists(RunDir(d).metrics)]
            if not tasks:
                raise ValueError(f"sweep {path} has no task with metrics yet")
            prefix = f"{fs.basename(path)}/" if len(paths) > 1 else ""
            runs += [(prefix + name, d) for name, d in tasks]
        elif fs.exists(RunDir(path).metrics):
            runs.append((fs.basename(path), path))
        else:
            raise ValueError(f"{path} has no metrics.jsonl and no sweep.json; give a run dir or a sweep dir")
    return runs


def write_overlay(runs: list[tuple[str, str]], out: str, metrics: list[str] | None = None) -> str:
    """Draw every run's metrics.jsonl into one PNG at `out`; returns `out`. ValueError when a metric
    asked for was logged by no run."""
    rows = {label: read_jsonl(RunDir(d).metrics) for label, d in runs}
    present = list(dict.fromkeys(k for rs in rows.values() for r in rs for k, v in r.items()
                                 if k != "step" and isinstance(v, (int, float))))  # fmt: skip
    missing = [m for m in metrics or [] if m not in present]
    if missing:
        raise ValueError(f"no run logged {', '.join(missing)}; they have {', '.join(present)}")
    keys = metrics or [k for k in present if k not in SKIPPED_BY_DEFAULT]
    buffer = io.BytesIO()
    figure(keys, rows).savefig(buffer, format="png", dpi=100)
    fs.atomic_write(out, buffer.getvalue())
    return out


def colors(labels: list[str]) -> dict[str, Any]:
    """One colour per run, the same in every panel (a panel where some run logged nothing must not
    shift the others' colours): matplotlib's ten, then a 20-colour map, then a continuous one."""
    from matplotlib import colormaps

    n = len(labels)
    if n <= 10:
        return {label: f"C{i}" for i, label in enumerate(labels)}
    cmap = colormaps["tab20"] if n <= 20 else colormaps["viridis"]
    return {label: cmap(i if n <= 20 else i / (n - 1)) for i, label in enumerate(labels)}


def figure(keys: list[str], rows: dict[str, list[dict[str, Any]]]) -> Any:
    """The overlay as a matplotlib Figure: one panel per metric, one line per run."""
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg, no pyplot or display

    cols = 1 if len(keys) == 1 else 2
    fig = Figure(figsize=(6 * cols, 3 * -(-len(keys) // cols) + 0.3 * len(rows)), layout="constrained")
    axes = fig.subplots(-(-len(keys) // cols), cols, squeeze=False).ravel()
    color = colors(list(rows))
    for ax, key in zip(axes, keys):
        for label, records in rows.items():
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(
                    *zip(*points),
                    lw=1.2,
                    marker="." if len(points) < 40 else None,
                    label=label,
                    color=color[label],
                )
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}  # one entry per run, from whichever panel has its line
    for ax in axes[: len(keys)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = list(legend)
    fig.legend(
        list(legend.values()), labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8
    )
    fig.suptitle(f"{len(rows)} runs")
    return fig
