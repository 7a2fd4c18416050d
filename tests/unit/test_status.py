"""`disttrain status`: state, progress, checkpoints and interruption history, from the run dir alone."""

from __future__ import annotations

import json
import os
import time

import pytest

from disttrain import cli
from disttrain.commands.run_status import collect
from tests.unit.writers_support import MAX_STEPS, shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def _status_json(run_dir, capsys) -> dict:
    assert cli.main(["status", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- the real run


def test_status_of_the_interrupted_then_finished_run(run, capsys):
    report = _status_json(run.run_dir, capsys)
    assert report["state"] == "finished" and report["step"] == report["max_steps"] == MAX_STEPS
    assert report["segments"] == 4 and report["eta_s"] == 0
    assert report["last_train"]["step"] == MAX_STEPS and "train/loss" in report["last_train"]
    assert report["last_eval"]["step"] == MAX_STEPS and "eval/accuracy" in report["last_eval"]
    steps = [c["step"] for c in report["checkpoints"]]
    assert steps[-1] == MAX_STEPS and steps == sorted(steps) and len(steps) == 3  # keep_last=3
    assert all(c["bytes"] > 100_000 and c["time"] > 0 for c in report["checkpoints"])
    killed, failed, stopped = report["interruptions"]
    assert (killed["by"], killed["resumed_from"]) == ("killed (no stop recorded)", 20)
    assert killed["interrupted_at"] >= 20  # exact once the trainer records interrupted_at on resume
    assert failed["by"] == "error" and (failed["interrupted_at"], failed["resumed_from"]) == (50, 40)
    assert failed["steps_lost"] == 10
    assert "planted failure" in failed["error"]
    assert stopped["by"] == "SIGTERM" and stopped["steps_lost"] == 0 and stopped["resumed_from"] >= 60
    assert report["steps_lost"] == sum(i["steps_lost"] for i in report["interruptions"])


def test_status_while_the_run_was_running(run):
    report = run.status_while_running  # taken in segment 1, just before its kill -9
    assert report["state"] == "running" and report["step"] >= 30 and report["max_steps"] == MAX_STEPS
    assert report["steps_per_s"] > 0 and report["eta_s"] > 0
    assert report["checkpoints"][0]["step"] == 20


def test_human_view(run, capsys):
    assert cli.main(["status", str(run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "state        finished" in out and f"step         {MAX_STEPS} / {MAX_STEPS} (100%)" in out
    assert "3 interruption(s)" in out and "error at step 50, resumed from 40 (10 lost" in out


# ----------------------------------------------------------------------------- every state, by hand


def _run_dir(tmp_path, events, metrics=(), max_steps=100):
    now = time.time()
    (tmp_path / "config.yaml").write_text(
        f"name: demo\ntrainer:\n  max_steps: {max_steps}\n  log_every: 10\ndata:\n  batch_size: 64\n"
    )
    lines = [
        {"time": now + t, "event": e, "job_id": "7", "restart_count": 0, "step": s, **extra}
        for t, e, s, extra in events
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 4')
    last = lines[-1]["time"]
    os.utime(tmp_path / "metrics.jsonl", (last, last))  # metrics written along with the last event
    return tmp_path


@pytest.mark.parametrize(
    ("events", "state"),
    [
        ([(-20, "start", 0, {}), (-1, "checkpoint", 40, {"seconds": 0.1, "reason": "periodic"})], "running"),
        ([(-3600, "start", 0, {}), (-3000, "checkpoint", 40, {"seconds": 0.1, "reason": "periodic"})], "running-or-died"),
        ([(-9, "start", 0, {}), (-1, "error", 12, {"error": "ValueError: bad batch"})], "failed"),
        ([(-9, "start", 0, {}), (-2, "signal", 30, {"signal": "SIGUSR2"}), (-1, "stopped", 30, {"signal": "SIGUSR2"})], "stopped-awaiting-requeue"),
        ([(-9, "start", 0, {}), (-2, "signal", 30, {"signal": "SIGTERM"}), (-1, "requeue", 30, {}), (0, "stopped", 30, {})], "requeued"),
        ([(-9, "start", 0, {}), (-1, "finish", 100, {})], "finished"),
    ],
)  # fmt: skip
def test_state_follows_the_last_lifecycle_event(tmp_path, events, state):
    metrics = [{"step": 10, "train/loss": 2.0, "train/samples_per_sec": 640.0}]
    report = collect(str(_run_dir(tmp_path, events, metrics)), now=time.time() + 1)
    assert report["state"] == state, report["detail"]
    assert report["name"] == "demo" and report["max_steps"] == 100
    if state == "failed":
        assert report["detail"] == "ValueError: bad batch"


def test_requeue_history_and_steps_lost(tmp_path):
    events = [
        (-100, "start", 0, {}),
        (-90, "checkpoint", 20, {"seconds": 0.1, "reason": "periodic"}),
        (-80, "start", 20, {"restart_count": 1}),  # the first segment was killed after step 20
        (-80, "resume", 20, {"cause": "slurm restart 1", "interrupted_at": 27}),
        (-50, "signal", 45, {"signal": "SIGTERM"}),
        (-50, "checkpoint", 45, {"seconds": 0.2, "reason": "stop"}),
        (-49, "requeue", 45, {}),
        (-49, "stopped", 45, {"signal": "SIGTERM"}),
        (-10, "start", 45, {}),
        (-10, "resume", 45, {"cause": "slurm restart 2"}),
    ]
    report = collect(str(_run_dir(tmp_path, events)), now=time.time())
    assert report["state"] == "running" and report["segments"] == 3 and len(report["requeues"]) == 1
    first, second = report["interruptions"]
    assert (first["interrupted_at"], first["resumed_from"], first["steps_lost"]) == (27, 20, 7)
    assert (second["by"], second["interrupted_at"], second["steps_lost"]) == ("SIGTERM", 45, 0)
    assert report["steps_lost"] == 7


def test_eta_from_the_recent_step_rate(tmp_path):
    events = [(-100, "start", 0, {}), (-50, "checkpoint", 50, {"seconds": 0.1, "reason": "periodic"})]
    report = collect(str(_run_dir(tmp_path, events, max_steps=200)), now=time.time())
    assert report["step"] == 50 and report["steps_per_s"] == pytest.approx(1.0, rel=0.05)
    assert report["eta_s"] == pytest.approx(150, rel=0.05)  # 150 steps left at 1 step/s


def test_missing_or_empty_run_dir_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli.main(["status", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no events.jsonl" in err


def test_a_stop_is_reported_at_the_step_it_happened_not_the_last_logged_one(tmp_path, capsys):
    """The stop came at step 233; the last metrics were logged at 230 (what `interrupted_at` records)."""
    events = [
        (-100, "start", 0, {}),
        (-50, "signal", 233, {"signal": "SIGTERM"}),
        (-50, "checkpoint", 233, {"seconds": 0.2, "reason": "stop"}),
        (-49, "stopped", 233, {"signal": "SIGTERM"}),
        (-10, "start", 233, {}),
        (-10, "resume", 233, {"cause": "torchrun restart 1", "interrupted_at": 230}),
    ]
    report = collect(str(_run_dir(tmp_path, events, max_steps=300)), now=time.time())
    [stop] = report["interruptions"]
    assert (stop["by"], stop["interrupted_at"], stop["resumed_from"], stop["steps_lost"]) == (
        "SIGTERM",
        233,
        233,
        0,
    )
    assert cli.main(["status", str(tmp_path)]) == 0
    assert "SIGTERM at step 233, resumed from 233 (0 lost" in capsys.readouterr().out


def test_no_eta_while_the_job_waits_to_be_requeued(tmp_path, capsys):
    events = [
        (-30, "start", 0, {}),
        (-3, "signal", 30, {"signal": "SIGUSR2"}),
        (-3, "checkpoint", 30, {"seconds": 0.2, "reason": "stop"}),
        (-2, "stopped", 30, {"signal": "SIGUSR2"}),
        (-2, "requeue", 30, {"budget_left": 9}),
        (-1, "exit", 30, {}),
    ]
    metrics = [{"step": 30, "train/loss": 2.0, "train/samples_per_sec": 640.0}]
    report = collect(str(_run_dir(tmp_path, events, metrics, max_steps=100)), now=time.time())
    assert report["state"] == "requeued" and report["steps_per_s"] > 0
    assert report["eta_s"] is None and "waiting for SLURM" in report["detail"]
    assert cli.main(["status", str(tmp_path)]) == 0
    assert "eta" not in capsys.readouterr().out.split("step ", 1)[1].splitlines()[0]


def test_a_stop_that_was_not_requeued_is_not_running(tmp_path):
    events = [(-9, "start", 0, {}), (-2, "stopped", 30, {"signal": "SIGTERM"}),
              (-1, "requeue_refused", 30, {"signal": "SIGTERM", "reason": "stopped by scancel"})]  # fmt: skip
    report = collect(str(_run_dir(tmp_path, events)), now=time.time())
    assert report["state"] == "stopped-awaiting-requeue" and report["eta_s"] is None


@pytest.mark.parametrize("skipped, loud", [(3, False), (40, True)])
def test_skipped_steps_are_a_share_of_the_run_and_a_large_one_is_said_loudly(tmp_path, capsys, skipped, loud):
    """trainer.nonfinite=skip: every `nonfinite` record carries the run's count so far."""
    skips = [(-50 + i * 0.1, "nonfinite", 10 + i, {"action": "skip", "quantity": "loss", "skipped": i + 1})
             for i in range(skipped)]  # fmt: skip
    events = [(-60, "start", 0, {}), *skips, (-1, "finish", 100, {})]
    report = collect(str(_run_dir(tmp_path, events)), now=time.time())
    assert report["state"] == "finished"
    assert report["skipped_steps"] == skipped and report["skipped_share"] == pytest.approx(skipped / 100)
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"skipped      {skipped} step(s) ({skipped / 100:.1%} of the 100 trained)" in out
    assert ("WARNING      40% of the steps were skipped" in out) is loud
    assert out.splitlines()[2].startswith("WARNING") is loud, "the warning comes right under the state"


def test_a_sweep_task_without_events_is_what_slurm_says_of_its_job(tmp_path, capsys):
    """Before a task's run writes its first event, its row is its job's state (scontrol show job): the
    cluster tests ask a real SLURM; here a stand-in answers as scontrol would."""
    from disttrain import sweepdir
    from disttrain.commands import sweep_status

    names = ["seed=1", "seed=2", "seed=3", "seed=4", "seed=5"]
    sweep = str(tmp_path / "sweep")
    sweepdir.write(sweep, [sweepdir.SweepTask(i, n, (n,), f"9_{i}") for i, n in enumerate(names)])
    (tmp_path / "sweep" / names[0]).mkdir()
    _run_dir(tmp_path / "sweep" / names[0], [(-5, "start", 0, {})])  # task 0 has started
    answers = {"9_1": {"JobState": "RUNNING"}, "9_2": {"JobState": "PENDING"}, "9_3": {"JobState": "CANCELLED"},
               "9_4": {}}  # fmt: skip
    asked: list[str] = []

    def show(job_id):
        asked.append(job_id)
        return answers[job_id]

    report = sweep_status.collect(sweep, show=show)
    states = [row["state"] for row in report["tasks"]]
    assert states == ["running", "starting", "pending", "cancelled", "gone (never started)"]
    assert asked == ["9_1", "9_2", "9_3", "9_4"], "a task with events is read from its run dir, not SLURM"
    assert report["counts"]["cancelled"] == 1

    asked.clear()
    unreachable = sweep_status.collect(sweep, show=lambda job_id: asked.append(job_id))  # returns None
    assert [row["state"] for row in unreachable["tasks"]][1:] == ["not started"] * 4
    assert asked == ["9_1"], "once SLURM cannot be asked, the other tasks are not asked either"


# ----------------------------------------------------------------------------- which rank, which host


def _straggler(t, step, rank, host, waited, windows=3, ratio=1.5, section="forward"):
    return (t, "straggler", step, {"rank": rank, "host": host, "section": section, "ratio": ratio,
                                   "waited_s": waited, "windows": windows})  # fmt: skip


SLOW_RANKS = [
    (-100, "start", 0, {"world_size": 4}),
    _straggler(-80, 15, 1, "node2", 3.0, windows=3, ratio=1.5),
    _straggler(-70, 20, 3, "node3", 1.0, windows=3, ratio=1.3, section="data"),
    _straggler(-60, 20, 1, "node2", 2.0, windows=2, ratio=1.7),
    _straggler(-50, 30, 2, "node2", 0.5, windows=3, ratio=1.25),
    (-1, "finish", 100, {}),
]


def test_status_names_the_slow_ranks_and_hosts_with_what_they_cost(tmp_path, capsys):
    report = _status_json(_run_dir(tmp_path, SLOW_RANKS), capsys)["stragglers"]
    assert report["waited_s"] == pytest.approx(6.5)
    first, second, third = report["ranks"]  # costliest first
    assert (first["rank"], first["host"], first["waited_s"], first["windows"]) == (1, "node2", 5.0, 5)
    assert (first["section"], first["ratio"], first["first_step"], first["last_step"]) == (
        "forward",
        1.5,
        15,
        20,
    )
    assert (second["rank"], second["section"], third["rank"]) == (3, "data", 2)
    assert [(h["host"], h["waited_s"], h["ranks"]) for h in report["hosts"]] == [
        ("node2", 5.5, [1, 2]), ("node3", 1.0, [3])]  # fmt: skip
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        "stragglers   rank 1 on node2: the others waited 5.00s for it, 1.50x their median, in forward "
        "(5 window(s), steps 15-20)"
    ) in out
    assert "             rank 3 on node3: the others waited 1.00s for it, 1.30x their median, in data " \
           "(3 window(s), step 20)" in out  # fmt: skip
    assert "  by host    node2 5.50s (rank 1, 2); node3 1.00s (rank 3)" in out
    lost = next(line for line in out if line.startswith("  lost"))
    assert "stragglers 6.50s" in lost, "goodput counts the same seconds as its own cause"


def test_status_names_a_hung_rank_its_host_section_and_frame(tmp_path, capsys):
    events = [
        (-100, "start", 0, {}),
        (-20, "hang", 9, {"waited_in": "backward", "ranks": [
            {"rank": 1, "host": "node2", "section": "forward", "frame": "my_pipeline.py:41 loss()"},
            {"rank": 2, "host": "node3", "section": "data", "frame": "my_data.py:7 __getitem__()"},
            {"rank": 3, "host": "node3", "section": "", "frame": ""}]}),
        (-20, "error", 9, {"error": "a collective failed: rank 1 on node2 did not reach ..."}),
        (-10, "start", 0, {}),
        # rank 0 hung itself: its own watch wrote the record, its section beside the rank
        (-5, "hang", 4, {"section": "data", "rank": 0, "host": "node1", "frame": "x.py:3 fetch()",
                         "ranks": [{"rank": 0, "host": "node1", "frame": "x.py:3 fetch()"}]}),
        (-5, "error", 4, {"error": "hung"}),
    ]  # fmt: skip
    report = _status_json(_run_dir(tmp_path, events), capsys)
    first, second = report["hangs"]
    assert first["step"] == 9 and first["waited_in"] == "backward" and len(first["ranks"]) == 3
    assert second["ranks"] == [{"rank": 0, "host": "node1", "section": "data", "frame": "x.py:3 fetch()"}]
    assert report["stragglers"]["ranks"] == []
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    hang = [line for line in out if line.startswith("hang")]
    assert hang == [
        "hang         step 9: rank 1 on node2 did not reach the gradient all-reduce; it was in section forward at my_pipeline.py:41 loss()",
        "hang         step 9: rank 2 on node3 did not reach the gradient all-reduce; it was waiting for its data loader at my_data.py:7 __getitem__()",
        "hang         step 9: rank 3 on node3 did not reach the gradient all-reduce: it died or is frozen (it wrote no stack)",
        "hang         step 4: rank 0 on node1 hung past trainer.collective_timeout_s; it was waiting for its data loader at x.py:3 fetch()",
    ]  # fmt: skip
    assert not any(line.startswith("stragglers") for line in out)


def test_an_even_run_shows_no_straggler_and_no_hang(tmp_path, capsys):
    events = [(-100, "start", 0, {}), (-50, "checkpoint", 50, {"seconds": 0.1, "reason": "periodic"}),
              (-1, "finish", 100, {})]  # fmt: skip
    report = _status_json(_run_dir(tmp_path, events), capsys)
    assert report["stragglers"] == {"waited_s": 0, "ranks": [], "hosts": []} and report["hangs"] == []
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stragglers   " not in out and "hang " not in out and "by host" not in out


def test_the_sweep_view_shows_each_tasks_slowest_rank_and_a_blank_for_none(tmp_path):
    from disttrain import sweepdir
    from disttrain.commands import sweep_status

    names = ["seed=1", "seed=2"]
    sweep = str(tmp_path / "sweep")
    sweepdir.write(sweep, [sweepdir.SweepTask(i, n, (n,), f"9_{i}") for i, n in enumerate(names)])
    for name, events in zip(names, [SLOW_RANKS, [(-5, "start", 0, {}), (-1, "finish", 100, {})]]):
        (tmp_path / "sweep" / name).mkdir()
        _run_dir(tmp_path / "sweep" / name, events)
    report = sweep_status.collect(sweep, show=lambda _: None)
    slow, even = report["tasks"]
    assert (slow["slowest"]["rank"], slow["slowest"]["host"], slow["slowest"]["waited_s"]) == (
        1,
        "node2",
        5.0,
    )
    assert even["slowest"] is None
    header, slow_row, even_row = sweep_status.render(report).splitlines()[1:4]
    column = header.index("slowest rank")
    assert slow_row[column:].startswith("r1@node2 5.00s ") and slow_row.endswith(" seed=1")
    assert even_row[column:].strip() == "seed=2", "blank where no rank was slow"


def test_history_says_which_checkpoint_tier_a_restart_resumed_from_and_why_not_the_local_one(
    tmp_path, capsys
):
    events = [
        (-100, "start", 0, {}),
        (-90, "checkpoint", 8, {"seconds": 0.2, "reason": "periodic"}),
        (-60, "start", 12, {"restart_count": 1}),
        (-60, "resume", 12, {"cause": "torchrun restart 1", "interrupted_at": 13, "tier": "local"}),
        (-30, "start", 8, {"restart_count": 2}),
        (
            -30,
            "tier_fallback",
            8,
            {
                "tier": "local",
                "step": None,
                "served": "durable",
                "reason": "rank 1 on node2: no verified piece (folder missing)",
            },
        ),  # fmt: skip
        (-30, "resume", 8, {"cause": "torchrun restart 2", "interrupted_at": 15, "tier": "durable"}),
    ]
    report = collect(str(_run_dir(tmp_path, events, max_steps=300)), now=time.time())
    local, durable = report["interruptions"]
    assert (local["tier"], local["fallback"], local["steps_lost"]) == ("local", None, 1)
    assert durable["tier"] == "durable" and "rank 1 on node2" in durable["fallback"]
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed from 12 (1 lost; torchrun restart 1; local tier)" in out
    assert (
        "resumed from 8 (7 lost; torchrun restart 2; durable tier: rank 1 on node2: no verified piece" in out
    )
