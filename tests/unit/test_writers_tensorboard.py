"""TensorBoard across segments of one run: one event file per segment, each step once when read."""

from __future__ import annotations

import pytest

from disttrain.writers import read_jsonl
from tests.unit.writers_support import shared_run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
event_file_loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def test_each_step_once_with_the_values_of_metrics_jsonl(run):
    tb = run.run_dir / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 4, "one event file per segment"
    acc = event_accumulator.EventAccumulator(str(tb))
    acc.Reload()
    metrics = read_jsonl(str(run.run_dir / "metrics.jsonl"))
    for tag in ("train/loss", "train/lr", "eval/accuracy", "eval/loss"):
        expected = [(m["step"], m[tag]) for m in metrics if tag in m]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag


def test_replayed_steps_are_on_disk_twice_and_purged_on_read(run):
    # The proof that purge_step does the work: the raw files do hold redone steps twice.
    raw = [
        event.step
        for path in sorted((run.run_dir / "tb").glob("events.out.tfevents.*"))
        for event in event_file_loader.EventFileLoader(str(path)).Load()
        if any(v.tag == "train/loss" for v in event.summary.value)
    ]
    assert len(raw) > len(set(raw)) and {45, 50} <= {s for s in raw if raw.count(s) > 1}
