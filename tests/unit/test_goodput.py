"""Goodput from events.jsonl: synthetic logs whose every second is known, and the real interrupted run
(kill -9, a failure, SIGTERM, a finish) that the status tests share."""

from __future__ import annotations

import json

import pytest

from disttrain import cli, goodput
from tests.unit.writers_support import shared_run


def _events(*rows):
    """(time, event, step, extra) -> event records as the trainer writes them."""
    return [{"time": t, "event": e, "job_id": "7", "restart_count": 0, "step": s, **x} for t, e, s, x in rows]


def _balanced(g: goodput.Goodput) -> None:
    """Every second of running time is training or one of the causes, segment by segment."""
    for seg in g.segments:
        assert seg.running_s == pytest.approx(seg.training_s + sum(seg.lost.values()), abs=1e-9)
    assert g.running_s == pytest.approx(g.training_s + sum(g.lost.values()), abs=1e-9)


PREEMPTED_THEN_FINISHED = _events(
    (4.0, "start", 0, {}),
    (4.0, "ready", 0, {"process_start": 0.0,
                       "startup": {"imports": 2.0, "process_group": 0.5, "build": 1.0, "checkpoint": 0.0, "other": 0.5}}),
    (14.5, "eval", 100, {"seconds": 0.5, "split": "eval"}),
    (15.0, "checkpoint", 100, {"seconds": 0.5, "reason": "periodic"}),
    (20.0, "signal", 150, {"signal": "SIGTERM", "received": 19.8}),
    (20.6, "checkpoint", 150, {"seconds": 0.6, "reason": "stop"}),
    (20.8, "stopped", 150, {}),
    (20.9, "requeue", 150, {}),
    (21.0, "exit", 150, {}),
    # queued from 21 to 30; SLURM started the job at 30, the process at 31
    (34.0, "start", 150, {"restart_count": 1}),
    (34.0, "resume", 150, {"interrupted_at": 150}),
    (34.0, "ready", 150, {"process_start": 31.0, "job_start": 30.0,
                          "startup": {"imports": 1.5, "process_group": 0.5, "build": 0.5, "checkpoint": 0.5}}),
    (39.5, "eval", 200, {"seconds": 0.5}),
    (40.0, "checkpoint", 200, {"seconds": 0.5, "reason": "periodic"}),
    (45.5, "checkpoint", 250, {"seconds": 0.5, "reason": "periodic"}),
    (52.5, "eval", 300, {"seconds": 0.5}),  # 1.5 s more than 50 steps at 0.1 s: a stall
    (53.0, "checkpoint", 300, {"seconds": 0.5, "reason": "final"}),
    (53.0, "finish", 300, {}),
    (53.4, "exit", 300, {}),
)  # fmt: skip


def test_a_preempted_then_finished_run_second_by_second():
    g = goodput.compute(PREEMPTED_THEN_FINISHED)
    _balanced(g)
    first, second = g.segments
    assert (first.begin, first.ready, first.end, first.ended) == (0.0, 4.0, 21.0, "requeue")
    assert first.pace_s == pytest.approx(0.1) and first.training_s == pytest.approx(15.0)
    assert first.lost["stop"] == pytest.approx(1.0)  # agreed stop to exit: stop save, requeue, teardown
    assert first.signal_to_exit_s == pytest.approx(1.2) and first.lost["unexplained"] == pytest.approx(0)
    assert (second.begin, second.queued_before_s) == (30.0, 9.0)  # from the job's start, not the process's
    assert second.startup == {
        "launch": 1.0,
        "imports": 1.5,
        "process_group": 0.5,
        "build": 0.5,
        "checkpoint": 0.5,
    }
    assert second.pace_s == pytest.approx(0.1)  # the median interval: the stall is not its pace
    assert second.lost["unexplained"] == pytest.approx(1.5) and second.lost["teardown"] == pytest.approx(0.4)
    assert g.running_s == pytest.approx(44.4) and g.queued_s == pytest.approx(9.0)
    assert g.training_s == pytest.approx(30.0) and g.ratio == pytest.approx(30 / 44.4)
    assert g.lost == pytest.approx({"startup": 8.0, "checkpoint": 2.0, "eval": 1.5, "stop": 1.0,
                                    "teardown": 0.4, "restart": 0.0, "redone": 0.0, "stragglers": 0.0,
                                    "unexplained": 1.5})  # fmt: skip
    assert g.startup["imports"] == pytest.approx(3.5) and g.startup["launch"] == pytest.approx(1.0)


def test_a_restart_in_place_is_lost_running_time_not_queue():
    """A rank killed at 12 s; torchrun's agent (or a SLURM job's in-job agents) starts the ranks again
    inside the allocation: the 3 s until the new processes begin is the cause `restart`, not queue time.
    A gap after a requeue stays queue time."""
    rows = _events(
        (2.0, "start", 0, {}),
        (2.0, "ready", 0, {"process_start": 0.0, "startup": {"imports": 2.0}}),
        (7.0, "checkpoint", 50, {"seconds": 0.0, "reason": "local"}),
        (12.0, "error", 100, {}),
        # restarted in place: the new processes start at 15
        (17.0, "start", 100, {"restart_count": 1}),
        (17.0, "resume", 100, {"interrupted_at": 100, "cause": "torchrun restart 1", "tier": "local"}),
        (17.0, "ready", 100, {"process_start": 15.0, "startup": {"imports": 2.0}}),
        (27.0, "finish", 200, {}),
        (27.0, "exit", 200, {}),
    )  # fmt: skip
    g = goodput.compute(rows)
    _balanced(g)
    first, second = g.segments
    assert second.lost["restart"] == pytest.approx(3.0) and second.queued_before_s == 0.0
    assert (second.begin, second.running_s) == (12.0, pytest.approx(15.0))
    assert (
        g.queued_s == 0.0 and g.running_s == pytest.approx(27.0) and g.lost["restart"] == pytest.approx(3.0)
    )
    requeued = [dict(r) for r in rows]
    requeued[3]["event"] = "requeue"  # the same gap after a requeue: SLURM's queue
    requeued[5]["cause"] = "torchrun restart 1"
    g = goodput.compute(requeued)
    assert g.lost["restart"] == 0.0 and g.queued_s == pytest.approx(3.0)


KILLED_THEN_FINISHED = _events(
    (3.0, "start", 0, {}),
    (3.0, "ready", 0, {"process_start": 0.0, "startup": {"imports": 3.0}}),
    (8.5, "checkpoint", 50, {"seconds": 0.5, "reason": "periodic"}),
    # kill -9 after step 60 was logged: no event says when
    (20.0, "start", 50, {}),
    (20.0, "resume", 50, {"interrupted_at": 60}),
    (20.0, "ready", 50, {"process_start": 17.0, "startup": {"imports": 3.0}}),
    (30.0, "finish", 150, {}),
)


def test_steps_after_the_last_save_are_redone_after_a_kill():
    g = goodput.compute(KILLED_THEN_FINISHED)
    _balanced(g)
    killed, resumed = g.segments
    assert (killed.ended, killed.reached, killed.kept) == ("killed", 60, 50)
    assert killed.end == pytest.approx(9.5)  # its last event, plus the 10 steps it logged after it
    assert killed.lost["redone"] == pytest.approx(1.0) and killed.training_s == pytest.approx(5.0)
    assert resumed.queued_before_s == pytest.approx(7.5) and resumed.training_s == pytest.approx(10.0)
    assert g.ratio == pytest.approx(15.0 / 22.5)
    h = goodput.history(KILLED_THEN_FINISHED)
    assert (h.unclean, h.running_s, h.save_s) == (1, pytest.approx(22.5), [0.5])


def test_an_old_run_dir_without_ready_or_exit_events_still_reads():
    g = goodput.compute(_events((0.0, "start", 0, {}), (10.0, "checkpoint", 100, {"seconds": 0.5, "reason": "periodic"}),
                                (20.0, "finish", 200, {})))  # fmt: skip
    _balanced(g)
    assert g.startup == {} and g.lost["startup"] == 0 and g.ratio == pytest.approx(19.5 / 20)


def test_a_running_segment_counts_up_to_its_last_sign_of_life():
    events = _events((2.0, "start", 0, {}), (2.0, "ready", 0, {"process_start": 0.0, "startup": {}}),
                     (12.0, "checkpoint", 100, {"seconds": 0.2, "reason": "periodic"}))  # fmt: skip
    g = goodput.compute(events, open_until=22.0, open_step=200)
    _balanced(g)
    (seg,) = g.segments
    assert (seg.ended, seg.end, seg.reached, seg.kept) == ("running", 22.0, 200, 200)
    assert seg.training_s == pytest.approx(19.8)
    assert goodput.compute(events).segments[0].ended == "killed"  # nobody vouches for it: it died


def test_render_names_every_cause_and_phase():
    lines = goodput.render(goodput.compute(PREEMPTED_THEN_FINISHED).as_dict())
    assert lines[0].startswith("goodput      67.6%: 30.0s of 44.4s running")
    assert "queued 9.00s between segments" in lines[0]
    assert "signal-to-exit 1.00s" in lines[1] and "unexplained 1.50s" in lines[1]
    assert "launch 1.00s, imports 3.50s, process group 1.00s" in lines[2]
    assert goodput.duration(0.434) == "0.43s" and goodput.duration(245) == "4m05s"
    assert goodput.render(goodput.compute([]).as_dict()) == ["goodput      - (no running time recorded yet)"]


# ----------------------------------------------------------------------------- the real run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def test_goodput_of_the_real_interrupted_run(run, capsys):
    assert cli.main(["status", str(run.run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["goodput"]
    killed, failed, stopped, finished = report["segments"]
    assert (killed["ended"], killed["kept"]) == ("killed", 20) and killed["reached"] >= 30
    assert killed["lost"]["redone"] > 0
    assert (failed["ended"], failed["kept"], failed["reached"]) == ("error", 40, 50)
    assert failed["lost"]["redone"] == pytest.approx(10 * failed["pace_s"], rel=0.02)  # both rounded
    assert stopped["ended"] == "stopped" and stopped["lost"]["stop"] > 0 and stopped["signal_to_exit_s"] > 0
    assert finished["ended"] == "finish" and finished["kept"] == finished["reached"] == 80
    for seg in report["segments"]:
        assert seg["startup"]["imports"] > 0.3 and seg["startup"]["build"] > 0  # torch alone takes that
        assert seg["running_s"] == pytest.approx(seg["training_s"] + sum(seg["lost"].values()), abs=0.01)
    assert all(seg["startup"]["checkpoint"] > 0 for seg in (failed, stopped, finished))  # resumed ones
    assert 0.05 < report["goodput"] < 1 and report["queued_s"] >= 0
    assert cli.main(["status", str(run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"goodput      {report['goodput']:.1%}" in out and "  start-up   4 segment(s): imports" in out


def test_timeline_of_the_real_run_shows_every_piece(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from disttrain.commands import timeline

    events = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines()]
    g = goodput.compute(events)
    drawn = timeline.spans(events, g)
    kinds = {what for _, _, what in drawn}
    assert {"startup", "training", "checkpoint", "eval", "redone", "stop", "teardown", "queued"} <= kinds
    assert all(end >= start for start, end, _ in drawn)
    assert max(end for _, end, _ in drawn) == pytest.approx(g.segments[-1].end - g.segments[0].begin)
    out = tmp_path / "timeline.png"
    assert cli.main(["plot", str(run.run_dir), "--timeline", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(tmp_path), "--timeline"]) == 2  # no events: one line, exit 2
    assert "holds no segment yet" in capsys.readouterr().err


def test_a_sweep_shows_each_tasks_goodput(tmp_path):
    """`disttrain status SWEEP_DIR` has a goodput column: the same ratio `status RUN_DIR` reports for the
    task, and "-" for a task that has not started."""
    from disttrain import sweepdir
    from disttrain.commands import run_status, sweep_status
    from disttrain.launch.sweep import expand

    sweep = str(tmp_path / "sweep")
    tasks = expand(["seed=1,2"])
    sweepdir.write(sweep, [sweepdir.SweepTask(t.index, t.name, t.overrides, f"5_{t.index}") for t in tasks])
    run_dir = tmp_path / "sweep" / tasks[0].name
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in PREEMPTED_THEN_FINISHED))
    expected = run_status.collect(str(run_dir))["goodput"]["goodput"]
    report = sweep_status.collect(sweep, show=lambda _: None)  # SLURM cannot be asked here
    assert [t["goodput"] for t in report["tasks"]] == [expected, None] and 0.5 < expected < 1
    rows = sweep_status.render(report).splitlines()
    assert "goodput" in rows[1]
    assert f"{100 * expected:.1f}%" in rows[2] and rows[3].split()[-2] == "-"


# ----------------------------------------------------------------------------- waiting for stragglers


def _slow_for_two_intervals(waited: float, at_step: int = 60) -> list[dict]:
    """100 steps at 1 s, a 0.5 s save every 10; steps 41-60 took 1.5 s each (a rank slow for 20 steps:
    10 s beyond the pace), and a `straggler` event at `at_step` says the others waited `waited` s."""
    rows = [(0.0, "start", 0, {}), (0.0, "ready", 0, {"process_start": 0.0, "startup": {}})]
    t = 0.0
    for step in range(10, 101, 10):
        t += (15.0 if step in (50, 60) else 10.0) + 0.5
        rows.append((t, "checkpoint", step, {"seconds": 0.5, "reason": "periodic"}))
        if step == at_step:
            rows.append((t, "straggler", step, {"rank": 1, "host": "node2", "section": "forward",
                                                "ratio": 1.5, "waited_s": waited, "windows": 4}))  # fmt: skip
    rows.append((t, "finish", 100, {}))
    return _events(*rows)


@pytest.mark.parametrize(
    "waited, training, unexplained", [(8.0, 100.0, 2.0), (14.0, 96.0, 0.0)], ids=["within", "beyond-the-pace"]
)
def test_waiting_for_a_straggler_is_its_own_cause_taken_from_unexplained_first(waited, training, unexplained):
    g = goodput.compute(_slow_for_two_intervals(waited))
    _balanced(g)
    (seg,) = g.segments
    assert seg.pace_s == pytest.approx(1.0)  # the median interval: the slow ones are beyond the pace
    assert g.lost["stragglers"] == pytest.approx(waited)
    assert g.lost["unexplained"] == pytest.approx(unexplained) and g.training_s == pytest.approx(training)
    lost = goodput.render(g.as_dict())[1]
    assert f"stragglers {goodput.duration(waited)}" in lost, lost


def test_a_rank_slow_all_along_sets_the_pace_and_its_wait_comes_out_of_training():
    events = _events((0.0, "start", 0, {}), (0.0, "ready", 0, {"process_start": 0.0, "startup": {}}),
                     (60.0, "straggler", 50, {"rank": 1, "host": "n", "section": "data", "ratio": 2.0, "waited_s": 30.0}),
                     (120.0, "straggler", 100, {"rank": 1, "host": "n", "section": "data", "ratio": 2.0, "waited_s": 30.0}),
                     (120.0, "finish", 100, {}))  # fmt: skip
    g = goodput.compute(events)
    _balanced(g)
    assert g.lost["stragglers"] == pytest.approx(60.0) and g.training_s == pytest.approx(60.0)
    assert g.lost["unexplained"] == 0 and g.ratio == pytest.approx(0.5)


def test_the_wait_in_redone_steps_is_counted_once_as_redone():
    """Killed after step 60, resumed from the save at 50: the wait recorded at step 60 was in steps that
    were thrown away; it is in `redone` already, not in `stragglers` as well."""
    events = _slow_for_two_intervals(8.0)[:-5]  # up to the straggler event at step 60: killed there
    resumed = _events((100.0, "start", 50, {}), (100.0, "ready", 50, {"process_start": 100.0, "startup": {}}),
                      (150.0, "finish", 100, {}))  # fmt: skip
    g = goodput.compute(events + resumed)
    _balanced(g)
    killed = g.segments[0]
    assert (killed.kept, killed.reached) == (50, 60) and killed.lost["stragglers"] == 0
    assert killed.lost["redone"] > 0


def test_the_timeline_draws_the_wait_where_it_was_recorded_and_adds_it_up():
    pytest.importorskip("matplotlib")
    from disttrain.commands import timeline

    events = _slow_for_two_intervals(8.0)
    g = goodput.compute(events)
    event = next(e for e in events if e["event"] == "straggler")
    assert [s for s in timeline.spans(events, g) if s[2] == "stragglers"] == [
        (pytest.approx(event["time"] - 8.0), event["time"], "stragglers")
    ]
    assert timeline._sum([g, g]).lost["stragglers"] == pytest.approx(16.0)  # a sweep's bar adds tasks up
