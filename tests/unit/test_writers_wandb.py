"""wandb across segments of one run (offline, real wandb): one run id; every metric once per step, in
order, including the steps wandb lost to a kill -9, a redone stretch after a failure, and an eval cut
short by a stop and redone after the resume."""

from __future__ import annotations

import pytest

from disttrain.secrets import REDACTED
from disttrain.writers import STEP_KEY, read_jsonl, wandb_history
from tests.unit.writers_support import shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def _segments(run):
    run_id = (run.run_dir / "wandb_id.txt").read_text().strip()
    logs = [d / f"run-{run_id}.wandb" for d in sorted((run.run_dir / "wandb").glob("offline-run-*"))]
    return run_id, [[row for _, row in wandb_history(log.read_bytes())] for log in logs]


def test_every_segment_continues_the_same_wandb_run(run):
    assert run.codes == [-9, 1, 143, 0]
    run_id, segments = _segments(run)
    assert len(segments) == 4, "one offline segment dir per process, all with the run's id"
    assert all(f"wandb: run {run_id} (offline)" in out for out in run.outputs)


def test_each_metric_reaches_wandb_once_per_step_in_order(run):
    _, segments = _segments(run)
    rows = [row for segment in segments for row in segment]
    metrics = read_jsonl(str(run.run_dir / "metrics.jsonl"))
    for key in {k for m in metrics for k in m if k != "step"}:
        got = [(row[STEP_KEY], row[key]) for row in rows if key in row]
        want = [(m["step"], m[key]) for m in metrics if key in m]
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: a step twice, missing or out of order"
        if key != "train/samples_per_sec":  # a timing; the rest is exact (DESIGN §6)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12, abs=0), key


def test_what_each_segment_sent(run):
    _, (first, second, third, fourth) = _segments(run)
    steps = [[row[STEP_KEY] for row in seg if "train/loss" in row] for seg in (first, second, third, fourth)]
    assert steps[1][:4] == [5, 10, 15, 20] and "re-sent 4 logged steps" in run.outputs[1], (
        "segment 1 was killed before wandb flushed; segment 2 re-sent its steps up to the checkpoint"
    )
    assert steps[1][-1] == 50 and min(steps[2]) == 55, (
        "45 and 50, redone after the failure, were not sent again"
    )
    assert max(steps[2]) == 60 and not any(r[STEP_KEY] == 60 and "eval/accuracy" in r for r in third)
    assert any(r[STEP_KEY] == 60 and "eval/accuracy" in r for r in fourth), (
        "the eval cut short by the stop, redone"
    )


def test_config_is_logged_redacted(run):
    run_id = (run.run_dir / "wandb_id.txt").read_text().strip()
    for log in (run.run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"):
        data = log.read_bytes()
        assert len(data) < 100 or (
            b"api_token" in data and REDACTED.encode() in data and b"eval_delay" in data
        )
