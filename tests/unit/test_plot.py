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
