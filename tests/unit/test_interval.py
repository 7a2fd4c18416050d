"""checkpoint.interval=auto: the Young/Daly rule, its inputs from a run's own history, the steps at which
it decides, and a real run that records the interval in force and why."""

from __future__ import annotations

import json
import math
import signal
import subprocess

import pytest

from disttrain import cli, goodput
from disttrain.goodput import History
from disttrain.interval import DEFAULT_SAVE_S, AutoInterval, estimate, young_daly
from tests.conftest import FAST, child_env, main_cmd, run_main
from tests.unit.writers_support import wait_until


def test_young_daly_is_the_minimum_of_the_expected_loss():
    mtbi, save = 120.0, 0.5
    best = young_daly(mtbi, save)
    assert best == pytest.approx(math.sqrt(2 * 120 * 0.5))

    def loss_rate(t):  # time saving per unit time + time redone per unit time (half an interval a failure)
        return save / t + t / (2 * mtbi)

    assert all(loss_rate(best) <= loss_rate(best * f) for f in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0))
    assert young_daly(0.1, 10.0) == 10.0  # never shorter than a save


def test_a_new_run_assumes_the_prior_and_its_history_takes_over():
    fresh = estimate(History(0.0, 0, []), 0.0, [], prior_s=3600)
    assert (fresh.mtbi_s, fresh.save_s) == (3600, DEFAULT_SAVE_S)
    assert fresh.seconds == pytest.approx(math.sqrt(2 * 3600 * DEFAULT_SAVE_S))
    # ten kills in 1200 s of running, saves of 0.2 s: the prior weighs as one interruption
    seasoned = estimate(History(1200.0, 10, [0.2, 0.2, 0.2]), 0.0, [], prior_s=3600)
    assert seasoned.mtbi_s == pytest.approx(4800 / 11) and seasoned.save_s == 0.2
    assert seasoned.seconds == pytest.approx(math.sqrt(2 * 4800 / 11 * 0.2))
    # a thousand kills a minute apart: the estimate converges on what the run sees
    assert estimate(History(60_000.0, 1000, [0.2]), 0.0, [], 3600).mtbi_s == pytest.approx(63.5, rel=0.01)
    # time without an interruption lengthens the interval as the run goes; the latest saves count most
    later = estimate(History(1200.0, 10, [0.2] * 3), 2400.0, [1.0, 1.0, 1.0], 3600)
    assert later.mtbi_s > seasoned.mtbi_s and later.save_s == 1.0


def test_clean_stops_are_not_interruptions_kills_and_failures_are():
    events = [
        {"time": 0.0, "event": "start", "step": 0},
        {"time": 10.0, "event": "checkpoint", "step": 100, "seconds": 0.3, "reason": "periodic"},
        {"time": 12.0, "event": "signal", "step": 120, "signal": "SIGTERM"},
        {"time": 12.5, "event": "stopped", "step": 120},  # preempted: saved on the way out
        {"time": 20.0, "event": "start", "step": 120},
        {"time": 30.0, "event": "checkpoint", "step": 220, "seconds": 0.5, "reason": "periodic"},
        {"time": 40.0, "event": "start", "step": 220},  # the one before was killed
        {"time": 45.0, "event": "error", "step": 260, "error": "RuntimeError: NCCL"},
    ]
    h = goodput.history(events)
    assert (h.unclean, h.save_s) == (2, [0.3, 0.5]) and h.running_s > 0


def test_crashes_the_local_tier_served_do_not_shorten_the_durable_interval():
    """Two kills: the first resumed from the local tier, the second from the durable one. With the local
    tier on, only the second counts towards the durable tier's MTBI; with it off, both do."""
    events = [
        {"time": 0.0, "event": "start", "step": 0},
        {"time": 10.0, "event": "checkpoint", "step": 100, "seconds": 0.3, "reason": "periodic"},
        {"time": 30.0, "event": "start", "step": 180, "restart_count": 1},  # killed before
        {"time": 31.0, "event": "resume", "step": 180, "tier": "local"},
        {"time": 60.0, "event": "start", "step": 100, "restart_count": 2},  # killed again, local lost
        {"time": 61.0, "event": "resume", "step": 100, "tier": "durable"},
        {"time": 90.0, "event": "finish", "step": 400},
    ]
    h = goodput.history(events)
    assert (h.unclean, h.local_served) == (2, 1)
    on, off = estimate(h, 0.0, [], 3600, local=True), estimate(h, 0.0, [], 3600, local=False)
    assert (on.unclean, on.local_served, off.unclean) == (1, 1, 2)
    assert on.mtbi_s == pytest.approx((3600 + h.running_s) / 2) and on.seconds > off.seconds
    assert "(1 more served by the local tier)" in goodput.describe_interval(on.fields())


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_decisions_land_on_the_step_nearest_the_interval_and_are_few():
    clock = FakeClock()
    auto = AutoInterval(History(0.0, 0, []), prior_s=50.0, clock=clock)  # sqrt(2 x 50 x 1) = 10 s at first
    saves, decisions, last, saving = [], 0, 0.0, 0.0
    for step in range(1, 601):  # 0.1 s a step, plus the time spent saving
        clock.now = step * 0.1 + saving
        if auto.next_check is not None and step < auto.next_check:
            continue
        decisions += 1
        save, auto.next_check = auto.decide(step)
        if save:
            assert auto.current is not None
            saves.append((step, clock.now - last, auto.current.seconds))
            saving += 0.5  # what each save takes (the rule assumed 1 s before it measured one)
            clock.now += 0.5
            auto.saved(0.5)
            last = clock.now
    assert saves[0][0] == 2  # nothing measured: it saves at once, to measure
    assert saves[1][2] == pytest.approx(math.sqrt(2 * (50 + saves[1][0] * 0.1 + 0.5) * 0.5), rel=0.01)
    assert len(saves) >= 6
    for _, gap, interval in saves[1:]:  # then on the step nearest the interval in force
        assert abs(gap - interval) <= 0.05 + 1e-9
    intervals = [interval for _, _, interval in saves[1:]]
    assert intervals == sorted(intervals) and intervals[-1] > intervals[0]  # no interruption: MTBI grows
    assert decisions <= 3 * len(saves) + 2  # a few per save; no collective on the other ~590 steps


# ----------------------------------------------------------------------------- a real run

ARGS = ("pipeline.target=tests.pipelines:ProbeDigits", "pipeline.args.step_delay=0.02", "trainer.eval_every=0",
        "trainer.log_every=10", "checkpoint.interval=auto", "checkpoint.mtbi_prior_minutes=0.02", *FAST)  # fmt: skip


def test_a_run_with_auto_interval_records_it_and_learns_from_a_kill(tmp_path, capsys):
    """prior 1.2 s: a save at step 2 to measure, then, with saves of ~0.05 s, one about every second;
    after a kill the history counts one interruption."""
    run_dir, path = tmp_path / "run", tmp_path / "run" / "events.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(main_cmd(f"run_dir={run_dir}", "trainer.max_steps=100000", *ARGS),
                                stdout=log, stderr=subprocess.STDOUT, env=child_env())  # fmt: skip
    saves = '"event": "checkpoint"'
    wait_until(lambda: path.exists() and path.read_text().count(saves) >= 3, proc, "three saves")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    done = run_main(f"run_dir={run_dir}", f"trainer.max_steps={reached + 40}", *ARGS)  # resumed
    assert done.returncode == 0, done.stderr[-3000:]

    events = [json.loads(line) for line in path.read_text().splitlines()]
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    assert len(starts) == 2
    first, second = events[: starts[1]], events[starts[1] :]
    periodic = [e for e in first if e["event"] == "checkpoint"]
    assert len(periodic) >= 3 and all(e["interval"]["unclean"] == 0 for e in periodic)
    assert periodic[0]["step"] == 2  # nothing measured yet: it saves at once, to measure
    assert all(e["interval"]["save_s"] < 1.0 for e in periodic[1:])  # its own measured saves from then on
    later = [e["interval"] for e in second if e["event"] == "checkpoint"]
    assert later and later[-1]["unclean"] == 1  # the kill is in the history now
    assert later[-1]["mtbi_s"] == pytest.approx((1.2 + later[-1]["running_s"]) / 2, rel=0.01)
    assert cli.main(["status", str(run_dir)]) == 0
    assert "  interval   auto, " in capsys.readouterr().out
