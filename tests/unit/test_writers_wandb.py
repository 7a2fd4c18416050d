"""wandb across segments of one run (offline, real wandb): one run id, every logged step once, in order."""

from __future__ import annotations

import pytest

from disttrain.config import REDACTED
from disttrain.writers import read_jsonl, resume_spans, wandb_history
from tests.unit.test_writers_support import shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def _segments(run):
    run_id = (run.run_dir / "wandb_id.txt").read_text().strip()
    return run_id, sorted((run.run_dir / "wandb").glob("offline-run-*"))


def test_every_segment_continues_the_same_wandb_run(run):
    assert run.codes == [-9, 1, 143, 0]
    run_id, dirs = _segments(run)
    assert len(dirs) == 4, "one offline segment per process"
    assert all(d.name.endswith(f"-{run_id}") and (d / f"run-{run_id}.wandb").is_file() for d in dirs)
    assert all(f"wandb: run {run_id} (offline)" in out for out in run.outputs)


def test_each_logged_step_reaches_wandb_once_in_order(run):
    run_id, dirs = _segments(run)
    rows = [row for d in dirs for row in wandb_history((d / f"run-{run_id}.wandb").read_bytes())]
    steps = [step for step, _ in rows]
    metrics = read_jsonl(str(run.run_dir / "metrics.jsonl"))
    assert steps == sorted({m["step"] for m in metrics}), "no step twice, none missing, none out of order"
    # Steps 41-50 were logged by the segment that failed, then redone after resuming from 40: wandb
    # keeps the first values (skipped, not re-sent); everything else matches metrics.jsonl exactly.
    redone = {
        s
        for start, end, _ in resume_spans(read_jsonl(str(run.run_dir / "events.jsonl")))
        for s in range(start + 1, end + 1)
    }
    assert {45, 50} <= redone
    by_step = dict(rows)
    for record in metrics:
        row = by_step[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert key in row
                if record["step"] not in redone:
                    assert row[key] == pytest.approx(value, rel=1e-9), (record["step"], key)


def test_kill_9_losses_are_backfilled_and_redone_steps_skipped(run):
    assert "re-sent" in run.outputs[1], "segment 2 re-sent what wandb lost when segment 1 was killed"
    run_id, dirs = _segments(run)
    third = [s for s, _ in wandb_history((dirs[2] / f"run-{run_id}.wandb").read_bytes())]
    assert third and min(third) > 50, "segment 3 did not log steps 45 and 50 again"


def test_config_is_logged_redacted(run):
    run_id, dirs = _segments(run)
    data = (dirs[1] / f"run-{run_id}.wandb").read_bytes()  # segment 1 was killed before a flush
    assert b"api_token" in data and REDACTED.encode() in data and b"step_delay" in data
