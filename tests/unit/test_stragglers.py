"""Straggler verdicts from per-rank section rows (features.stragglers), without processes: which rank,
which section, what it cost, when an event is due, and which nodes a requeue would leave out."""

from __future__ import annotations

import pytest

from disttrain import events as ev
from disttrain.features.stragglers import Stragglers, slowest
from disttrain.launch.options import parse
from disttrain.sections import SECTIONS
from disttrain.slurm import exclude_slow_from_env
from disttrain.writers import EventLog

HOSTS = ["node1", "node2"]


def row(**seconds: float) -> list[float]:
    return [seconds.get(name, 0.0) for name in SECTIONS]


EVEN = [row(data=0.1, forward=1.0, backward=0.5, optimizer=0.2)] * 2
SLOW_FORWARD = [
    row(data=0.1, forward=1.0, backward=1.0, optimizer=0.2),
    row(data=0.1, forward=1.5, optimizer=0.2),
]


def test_the_slow_rank_its_section_and_what_the_others_waited():
    found = slowest(SLOW_FORWARD)
    assert found is not None
    assert (found.rank, found.section) == (1, "forward")
    assert found.ratio == pytest.approx(1.8 / 1.3)
    assert found.waited_s == pytest.approx(0.5)  # busy 1.8 s against 1.3 s: rank 0 waited in backward


def test_a_single_rank_has_no_straggler():
    assert slowest([row(forward=1.0)]) is None


def recorded(tmp_path) -> list[dict]:
    return [e for e in ev.read(str(tmp_path)) if e["event"] == ev.STRAGGLER]


def test_an_event_only_after_enough_slow_windows_with_their_summed_cost(tmp_path):
    judge = Stragglers(HOSTS, ratio=1.2, windows=3, events=EventLog(str(tmp_path)))
    for step in (10, 20):
        metrics = judge.window(step, SLOW_FORWARD)
        assert metrics["train/slowest_rank"] == 1.0
    assert recorded(tmp_path) == []  # two windows: not yet a straggler
    judge.window(30, SLOW_FORWARD)
    [event] = recorded(tmp_path)
    assert (event["step"], event["rank"], event["host"], event["section"]) == (30, 1, "node2", "forward")
    assert event["waited_s"] == pytest.approx(1.5) and event["windows"] == 3
    judge.window(40, SLOW_FORWARD)
    judge.flush(50)  # the segment ends: the window since the last record is recorded too
    assert [e["waited_s"] for e in recorded(tmp_path)] == pytest.approx([1.5, 0.5])


def test_an_even_run_records_nothing_and_names_no_slow_node(tmp_path):
    judge = Stragglers(HOSTS, ratio=1.2, windows=3, events=EventLog(str(tmp_path)))
    for step in range(10, 110, 10):
        judge.window(step, EVEN)
    judge.flush(110)
    assert recorded(tmp_path) == [] and judge.slow_hosts() == []


def test_a_node_slow_for_most_of_the_segment_is_left_out_a_passing_one_is_not(tmp_path):
    mostly = Stragglers(HOSTS, ratio=1.2, windows=3, events=EventLog(str(tmp_path / "a")))
    for step in range(10):
        mostly.window(step, EVEN if step == 0 else SLOW_FORWARD)  # 9 of 10 windows
    assert mostly.slow_hosts() == ["node2"]
    passing = Stragglers(HOSTS, ratio=1.2, windows=3, events=EventLog(str(tmp_path / "b")))
    for step in range(10):
        passing.window(step, SLOW_FORWARD if step < 5 else EVEN)  # half the segment
    assert passing.slow_hosts() == []
    short = Stragglers(HOSTS, ratio=1.2, windows=3, events=EventLog(str(tmp_path / "c")))
    for step in range(2):
        short.window(step, SLOW_FORWARD)  # every window, but fewer than straggler_windows
    assert short.slow_hosts() == []


def test_exclude_slow_nodes_is_a_submit_flag_a_profile_key_and_an_environment_switch(tmp_path):
    assert parse(["--exclude-slow-nodes"]).exclude_slow_nodes is True
    assert parse([]).exclude_slow_nodes is False
    profile = tmp_path / "p.yaml"
    profile.write_text("exclude-slow-nodes: true\n")
    assert parse(["--profile", str(profile)]).exclude_slow_nodes is True
    profile.write_text("exclude-slow-nodes: sometimes\n")
    with pytest.raises(ValueError, match="exclude_slow_nodes: 'sometimes' must be true or false"):
        parse(["--profile", str(profile)])
    assert exclude_slow_from_env({"DISTTRAIN_EXCLUDE_SLOW_NODES": "1"}) is True
    assert exclude_slow_from_env({}) is False
