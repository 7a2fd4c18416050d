"""events.jsonl as a contract (disttrain.events): what a real run writes is what readers expect, one
rule for the end of a segment, one segment split, and where a segment got to."""

from __future__ import annotations

import io
import json

import pytest

from disttrain import events as ev
from disttrain import goodput
from disttrain.launch.follow import EventTail, _verdict
from tests.unit.writers_support import shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def test_a_real_run_writes_only_named_events_with_the_common_fields(run):
    """Four segments (killed, failed, stopped, finished): every record's name is one events.py defines,
    each carries the common fields, and each segment but the killed one ends as the contract says."""
    records = ev.read(str(run.run_dir))
    assert {ev.kind(r) for r in records} <= set(ev.NAMES)
    assert all(set(ev.COMMON) <= set(r) for r in records)
    segments = ev.split_segments(records)
    assert len(segments) == 4 and all(ev.kind(seg[0]) == ev.START for seg in segments)
    ends = [ev.last_end(seg) for seg in segments]
    assert ends[0] is None, "a kill -9 leaves no end"
    assert [ev.kind(e) for e in ends[1:] if e] == [ev.ERROR, ev.STOPPED, ev.FINISH]
    assert [ev.kind(seg[-1]) for seg in segments[1:]] == [ev.EXIT] * 3


@pytest.mark.parametrize(
    "record, ends",
    [
        ({"event": "nonfinite", "action": "skip"}, False),  # routine under trainer.nonfinite=skip
        ({"event": "nonfinite", "action": "stop"}, True),  # the run failed
        ({"event": "interrupted"}, True),
        ({"event": "requeue_refused"}, True),
        ({"event": "checkpoint", "reason": "stop"}, False),
        ({"event": "exit"}, False),  # closes the process, after the end
    ],
)
def test_one_rule_for_what_ends_a_segment(record, ends):
    assert ev.ends_segment(record) is ends


def _segment(*records):
    return [{"time": 100.0 + i, "job_id": "1", "restart_count": 0, **r} for i, r in enumerate(records)]


def test_follow_and_goodput_agree_on_a_non_finite_stop(tmp_path):
    """`submit --wait` and goodput read the same end: a NaN stop fails the run, a skip does not."""
    records = _segment(
        {"event": "start", "step": 0},
        {"event": "ready", "step": 0},
        {"event": "nonfinite", "step": 5, "action": "skip", "skipped": 1},
        {"event": "nonfinite", "step": 9, "action": "stop", "error": "non-finite loss at step 9"},
        {"event": "exit", "step": 9},
    )
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = io.StringIO()
    assert _verdict(EventTail(str(tmp_path)), "FAILED", out) == 1
    assert "did not finish (FAILED): nonfinite at step 9: non-finite loss at step 9" in out.getvalue()
    [seg] = goodput.compute(records).segments
    assert seg.ended == ev.NONFINITE and seg.lost["teardown"] == pytest.approx(1.0)  # nonfinite to exit


def test_reached_is_the_stop_step_or_what_the_next_resume_logged():
    stopped = _segment(
        {"event": "start", "step": 0}, {"event": "signal", "step": 233}, {"event": "stopped", "step": 233}
    )
    after = _segment({"event": "start", "step": 233}, {"event": "resume", "step": 233, "interrupted_at": 230})
    assert ev.reached(stopped, after) == 233
    killed = _segment({"event": "start", "step": 0}, {"event": "checkpoint", "step": 200})
    after = _segment({"event": "start", "step": 200}, {"event": "resume", "step": 200, "interrupted_at": 230})
    assert ev.reached(killed, after) == 230 and ev.reached(killed) == 200
