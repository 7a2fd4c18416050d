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
