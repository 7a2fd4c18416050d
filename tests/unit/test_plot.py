"""`disttrain plot` and the curves the trainer draws at the end of every segment."""

from __future__ import annotations

import json
import shutil

import pytest

from disttrain import cli
from disttrain.writers import read_jsonl, resume_spans
from tests.unit.writers_support import shared_run

Image = pytest.importorskip("PIL.Image")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def _check_png(path, min_size=(600, 250)):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and 10_000 < len(data) < 3_000_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        image.verify()


def test_plot_cli_draws_the_chosen_metrics(run, tmp_path, capsys):
    out = tmp_path / "two.png"
    code = cli.main(["plot", str(run.run_dir), "--out", str(out), "--metrics", "train/loss,eval/accuracy"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    _check_png(out)


def test_plot_cli_default_out_is_run_dir_curves_png(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir / "checkpoints", copy / "checkpoints")
    for name in ("metrics.jsonl", "events.jsonl"):
        shutil.copy(run.run_dir / name, copy / name)
    assert cli.main(["plot", str(copy)]) == 0
    _check_png(copy / "curves.png", min_size=(1000, 600))  # six metrics: 2 x 3 panels


def test_each_segment_left_current_curves(run):
    _check_png(run.run_dir / "curves.png")  # log.plot=true: drawn when the last segment closed


def test_resumes_are_marked_where_they_happened(run):
    spans = resume_spans(read_jsonl(str(run.run_dir / "events.jsonl")))
    assert [start for start, _, _ in spans][:2] == [20, 40] and len(spans) == 3
    assert spans[1][1] == 50, "the failed segment had reached step 50: 41-50 are shaded as redone"
    assert all(cause for _, _, cause in spans)


def test_plot_refuses_a_missing_run_or_metric(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    assert cli.main(["plot", str(tmp_path), "--metrics", "eval/bleu"]) == 2
    assert "no metric eval/bleu in metrics.jsonl; it has train/loss" in capsys.readouterr().err


def _sweep_of(tmp_path, run_dirs, names):
    """A sweep dir whose tasks are copies of `run_dirs` (None: a task that has not started)."""
    from disttrain import sweepdir

    sweep = tmp_path / "sweep"
    sweepdir.write(str(sweep), [sweepdir.SweepTask(i, n, (n,), f"7_{i}") for i, n in enumerate(names)])
    for source, name in zip(run_dirs, names):
        if source is not None:
            (sweep / name).mkdir()
            for file in ("metrics.jsonl", "events.jsonl"):
                shutil.copy(source / file, sweep / name / file)
    return sweep


def test_timeline_of_a_sweep_has_one_lane_per_started_task(run, tmp_path, capsys):
    """issue 19: `plot SWEEP_DIR --timeline` said "events.jsonl holds no segment yet"."""
    pytest.importorskip("matplotlib")
    from disttrain.commands import timeline

    sweep = _sweep_of(tmp_path, [run.run_dir, run.run_dir, None], ["seed=1", "seed=2", "seed=3"])
    assert [label for label, _, _ in timeline.lanes(str(sweep))] == ["seed=1", "seed=2"]
    assert cli.main(["plot", str(sweep), "--timeline"]) == 0
    assert capsys.readouterr().out.strip() == str(sweep / "timeline.png")
    _check_png(sweep / "timeline.png", min_size=(1000, 400))
    empty = _sweep_of(tmp_path / "empty", [None], ["seed=1"])
    assert cli.main(["plot", str(empty), "--timeline"]) == 2
    assert f"no task of the sweep {empty} has started yet" in capsys.readouterr().err


def test_an_overlay_keeps_each_run_in_one_colour_in_every_panel(tmp_path):
    """issue 19: colours were assigned per panel, so a run that logged nothing in one panel shifted
    every later run's colour there."""
    pytest.importorskip("matplotlib")
    from disttrain.commands.plot_overlay import figure

    rows = {
        "a": [{"step": s, "train/loss": 1.0 / s} for s in range(1, 5)],  # no eval
        "b": [{"step": s, "train/loss": 2.0 / s, "eval/loss": 3.0 / s} for s in range(1, 5)],
        "c": [{"step": s, "train/loss": 3.0 / s, "eval/loss": 4.0 / s} for s in range(1, 5)],
    }
    fig = figure(["train/loss", "eval/loss"], rows)
    seen: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(seen) == {"a", "b", "c"} and all(len(colors) == 1 for colors in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == 3, "and different runs differ"
