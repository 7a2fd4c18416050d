"""Sweeps as SLURM job arrays (`launch/submit.py --sweep ...`), as a user meets them on the loopback cluster:

- bad sweep specs exit 2 with one line before anything is submitted or created;
- `--dry-run` prints an array script that SLURM itself accepts, and every task's resolved overrides;
- a 4-task array, 2 running at a time, one task preempted: that task alone saves, requeues itself and
  resumes; every task finishes in its own run dir; `disttrain status SWEEP_DIR` has one row per task and
  `disttrain plot SWEEP_DIR` overlays the runs.

The sweep varies `checkpoint.keep_last` (retention only, no effect on the computation) across `seed`, so
every task has a twin with the same computation: the preempted task must end bit-identical to its twin,
which ran uninterrupted in the same array (the same guarantee as a single run, without a reference run).
The preempted task is the array's last one: SLURM gives it the array's own job id (NOTES §11), where
`scontrol requeue <that id>` would requeue every running task and `scontrol show job <that id>` would
describe another task.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_support import events, job_env, outcome, release, run_submit, wait_for_event

from tests.conftest import FAST, REPO, read_jsonl

PROBE = ("pipeline.target=tests.pipelines:ProbeDigits",)
# About 4 s of training per task: the preemption (SIGTERM about a second after the high job is
# submitted) lands mid-run, after the first checkpoint at step 5.
STEPS = 30
RUN = (*PROBE, f"trainer.max_steps={STEPS}", "pipeline.args.step_delay=0.12", "trainer.log_every=5",
       "checkpoint.every_steps=5", "trainer.eval_every=15", *FAST)  # fmt: skip
SWEEP = ("--sweep", "checkpoint.keep_last=2,3", "--sweep", "seed=1,2")
NAMES = ["checkpoint.keep_last=2,seed=1", "checkpoint.keep_last=2,seed=2",
         "checkpoint.keep_last=3,seed=1", "checkpoint.keep_last=3,seed=2"]  # fmt: skip
ONE_NODE_EACH = ("--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2")  # one task fills a node
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sweep", "optim.lr"], "--sweep 'optim.lr': write KEY=VALUE1,VALUE2"),
        (["--sweep", "optim.lr=1e-3,,3e-4"], "an empty value"),
        (["--sweep", "optim.lr=1e-3,1e-3"], "a value is given twice"),
        (["--sweep", "optim.lr=1e-3,0.001,1.0e-3"], "'1e-3' and '0.001' are the same value"),
        (["--sweep", "seed=1,2", "--sweep", "seed=3"], "seed is swept twice"),
        (["--sweep", "seed=1,2", "seed=5"], "seed is both swept and given as an override"),
        (
            ["--sweep", "optim.lrr=1e-3,3e-4"],
            "sweep task 0 (optim.lrr=1e-3): unknown config key optim.lrr: did you mean optim.lr?",
        ),
        (["--sweep", "optim.lr=1e-3,fast"], "sweep task 1 (optim.lr=fast): optim.lr"),
        (["--sweep", "data.batch_size=64,63", "--nodes", "2"], "sweep task 1 (data.batch_size=63)"),
        (["--sweep", "run_dir=/a,/b"], "the sweep decides each task's run_dir"),
        (["--sweep", "pipeline.args.api_token=a,b"], "a secret cannot be swept"),
        (["--sweep-file", "nosuch.yaml"], "--sweep-file 'nosuch.yaml' not found"),
        (["--array-parallelism", "2"], "--array-parallelism applies to a sweep"),
        (
            ["--sweep", "seed=1,2", "--array-parallelism", "0"],
            "--array-parallelism: 0 must be an integer >= 1",
        ),
        (["--sweep", "seed=1,2", "--wait"], "for a sweep, watch it with `disttrain status SWEEP_DIR`"),
        (["--sweep", "seed=1,2", "--cluster", "local"], "--sweep submits a SLURM job array"),
    ],
)
def test_bad_sweep_exits_2_with_one_line_and_creates_nothing(tmp_path, args, needle):
    run_dir = tmp_path / "sweep"
    proc = run_submit(None, *args, f"run_dir={run_dir}", *PROBE, env=job_env(None, SLURM_CONF="/nonexistent"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain submit: error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_file_that_is_not_a_list_of_mappings_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: [1e-3, 3e-4]\n")
    proc = run_submit(
        None, "--sweep-file", str(bad), f"run_dir={tmp_path / 'sweep'}", *PROBE, env=job_env(None)
    )
    assert proc.returncode == 2 and "expected a non-empty list of mappings" in proc.stderr, proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_dry_run_shows_every_task_and_an_array_script_sbatch_accepts(slurm, tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(
        "- {optim.lr: 1.0e-3, optim.betas: [0.9, 0.95]}\n- {optim.lr: 3.0e-4, optim.betas: [0.8, 0.9]}\n"
    )
    sweep_dir = tmp_path / "sweep"
    proc = run_submit(slurm, "--dry-run", "--sweep-file", str(rows), "--sweep", "seed=1,2,3", "--array-parallelism",
                      "2", *ONE_NODE_EACH, "--time", "5", f"run_dir={sweep_dir}", *PROBE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-5%2\n" in proc.stdout
    tasks = re.findall(r"#   task +(\d+)  (\S+)/  (.*)", proc.stdout)
    assert [int(i) for i, _, _ in tasks] == list(range(6))
    assert tasks[0][1:] == (
        "optim.lr=0.001,optim.betas=[0.9,0.95],seed=1",
        "optim.lr=0.001 optim.betas=[0.9, 0.95] seed=1",
    )
    assert tasks[5][2] == "optim.lr=0.0003 optim.betas=[0.8, 0.9] seed=3"
    assert f"run_dir: {sweep_dir}/{tasks[0][1]}" in proc.stdout
    body = proc.stdout[proc.stdout.index("#!/bin/bash") : proc.stdout.index("# sweep:")]
    message = slurm.sbatch_test_only(script=body)  # SLURM's own judgement; queues nothing
    assert "to start at" in message, message
    assert slurm.run(["squeue", "-h"]).stdout.strip() == ""
    assert not sweep_dir.exists()


def test_an_array_sbatch_refuses_exits_2_and_leaves_nothing(slurm, tmp_path):
    proc = run_submit(slurm, "--sweep", "seed=1,2", "--partition", "nosuch", "--time", "5",
                      f"run_dir={tmp_path / 'sweep'}", *PROBE)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Invalid partition name specified" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [] and slurm.run(["squeue", "-h"]).stdout.strip() == ""


def test_array_of_four_two_at_a_time_one_task_preempted_all_finish(slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    submitted = time.time()
    proc = run_submit(slurm, *SWEEP, "--array-parallelism", "2", *ONE_NODE_EACH, "--time", "5",
                      f"run_dir={sweep_dir}", *RUN)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    assert slurm.scontrol_show_job(f"{array}_0")["ArrayTaskThrottle"] == "2"
    runs = [sweep_dir / name for name in NAMES]
    last = f"{array}_3"

    wait_for_event(runs[3], lambda e: e["event"] == "checkpoint" and e["step"] >= 5, timeout=120)
    info = slurm.scontrol_show_job(last)
    assert info["JobId"] == array, "the last task holds the array's own id: the case a wrong id breaks"
    slurm.sbatch(
        "--partition=high", "--nodes=1", "--cpus-per-task=2", f"--nodelist={info['NodeList']}", wrap="sleep 1"
    )
    requeue = wait_for_event(
        runs[3], lambda e: e["event"] in ("requeue", "requeue_refused", "finish"), timeout=30
    )
    assert requeue["event"] == "requeue" and "preempted" in requeue["reason"], requeue
    assert requeue["job_id"] == last
    slurm.wait_state(last, "PENDING", timeout=30)
    release(slurm, last)
    for task in range(4):
        state = slurm.wait_state(f"{array}_{task}", DONE, timeout=120)
        assert state == "COMPLETED", f"task {task}: {state}"

    restarts = [slurm.scontrol_show_job(f"{array}_{t}")["Restarts"] for t in range(4)]
    assert restarts == ["0", "0", "0", "1"], "only the preempted task was requeued"
    _check_tasks(runs, requeue)
    assert _most_running_at_once(runs) <= 2
    assert outcome(runs[3], STEPS) == outcome(runs[1], STEPS), (
        "the preempted task equals its uninterrupted twin"
    )
    assert outcome(runs[2], STEPS) == outcome(runs[0], STEPS)
    _check_status_and_plot(sweep_dir, array)
    print(f"\nsweep timeline (s after submit): {_timeline(runs, submitted)}")


def _check_tasks(runs: list[Path], requeue: dict) -> None:
    for i, run in enumerate(runs):
        names = [e["event"] for e in events(run)]
        assert names[-2:] == ["finish", "exit"] and names.count("start") == (2 if i == 3 else 1), (
            run.name,
            names,
        )
        assert names.count("requeue") == (1 if i == 3 else 0)
    resume = next(e for e in events(runs[3]) if e["event"] == "resume")
    assert (resume["step"], resume["restart_count"]) == (requeue["step"], 1)


def _most_running_at_once(runs: list[Path]) -> int:
    """From the runs' own events: the most segments that were training at the same moment."""
    marks = []
    for run in runs:
        for e in events(run):
            if e["event"] == "start":
                marks.append((e["time"], 1))
            elif e["event"] in ("finish", "requeue"):
                marks.append((e["time"], -1))
    running = most = 0
    for _, delta in sorted(marks):
        running += delta
        most = max(most, running)
    return most


def _timeline(runs: list[Path], t0: float) -> dict[str, list[str]]:
    keep = ("start", "requeue", "finish")
    return {f"task {i}": [f"{e['event']} {e['time'] - t0:.1f}" for e in events(run) if e["event"] in keep]
            for i, run in enumerate(runs)}  # fmt: skip


def _check_status_and_plot(sweep_dir: Path, array: str) -> None:
    cli = [sys.executable, "-m", "disttrain.cli"]
    proc = subprocess.run(
        [*cli, "status", str(sweep_dir), "--json"], capture_output=True, text=True, cwd=str(REPO), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["tasks"]
    assert [r["name"] for r in rows] == NAMES and report["counts"] == {"finished": 4}
    assert [r["job_id"] for r in rows] == [f"{array}_{t}" for t in range(4)]
    assert [r["requeues"] for r in rows] == [0, 0, 0, 1] and {r["step"] for r in rows} == {STEPS}
    assert all(0 < r["goodput"] <= 1 for r in rows), (
        rows
    )  # each task's share of its running time that trained
    for row, name in zip(rows, NAMES):
        accuracy = [
            m["eval/accuracy"] for m in read_jsonl(sweep_dir / name / "metrics.jsonl") if "eval/accuracy" in m
        ]
        assert row["best"] == {
            "metric": "eval/accuracy",
            "value": max(accuracy),
            "step": row["best"]["step"],
            "mode": "max",
        }
    text = subprocess.run(
        [*cli, "status", str(sweep_dir)], capture_output=True, text=True, cwd=str(REPO), timeout=60
    )
    assert text.returncode == 0 and all(name in text.stdout for name in NAMES), text.stdout + text.stderr
    print(f"\n$ disttrain status {sweep_dir.name}\n{text.stdout}")
    plot = subprocess.run(
        [*cli, "plot", str(sweep_dir)], capture_output=True, text=True, cwd=str(REPO), timeout=120
    )
    assert plot.returncode == 0, plot.stderr
    png = sweep_dir / "curves.png"
    assert plot.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(sweep_dir: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "disttrain.cli", "status", str(sweep_dir), "--json"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["tasks"]


def test_a_task_that_has_not_started_shows_what_slurm_says_and_a_cancelled_one_says_so(slurm, tmp_path):
    """issue 19: a task showed "not started" while squeue said R, and "not started" for ever once it was
    cancelled while pending. Without events, a task's row asks SLURM about its job (`A_T`, also while
    the array's pending tasks are still one record)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_submit(slurm, "--sweep", "seed=1,2", "--array-parallelism", "1", *ONE_NODE_EACH, "--time", "5",
                      f"run_dir={sweep_dir}", *RUN)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1] not in ("running", "finished"):  # task 0: SLURM's states, then its events
        assert time.monotonic() < deadline, seen
        first, second = _rows(sweep_dir)
        assert second["state"] == "pending", second  # behind task 0: --array-parallelism 1
        if not seen or seen[-1] != first["state"]:
            seen.append(first["state"])
    assert set(seen) <= {"pending", "starting", "running", "finished"}, seen
    slurm.cancel(f"{array}_1")
    slurm.wait_state(f"{array}_1", "CANCELLED", timeout=30)
    assert _rows(sweep_dir)[1]["state"] == "cancelled"
    print(f"\ntask 0 as status saw it: {' -> '.join(seen)}")
