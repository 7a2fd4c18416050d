"""disttrain jobs on the real two-node loopback cluster: CPU ranks over gloo, submitted with
`launch/submit.py --nodes 2 --gpus-per-node 0`, one rank per node.

- a run completes; metrics, events and checkpoints are written once; a planted secret is in no file;
- the time-limit warning (USR2) makes the job save, requeue itself, resume and finish, with final
  weights and every logged number bit-identical to an uninterrupted `torchrun --nproc_per_node 2` run;
- preemption by a `high` job (SIGTERM with PreemptTime set) does the same, within the grace time;
- --max-requeues is honoured (a second preemption is refused), and a pipeline that raises is not
  requeued and reports its error;
- `--cluster local` runs the same job through submitit's local executor.

Timings (signal to job off the nodes, job start to the first resumed step) are printed (`-s`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from launch_support import (
    WHOLE_CLUSTER,
    Reference,
    events,
    job_logs,
    outcome,
    release,
    run_submit,
    submit,
    wait_finished,
    wait_for_event,
)

from tests.conftest import FAST, read_jsonl

TWO_NODES = ("--nodes", "2", "--gpus-per-node", "0")
PROBE = ("pipeline.target=tests.pipelines:ProbeDigits",)


def probe_run(steps: int, delay: float, every: int) -> tuple[str, ...]:
    return (
        *PROBE, f"trainer.max_steps={steps}", f"pipeline.args.step_delay={delay}", "trainer.log_every=5",
        f"checkpoint.every_steps={every}", "trainer.eval_every=50", "checkpoint.keep_last=2",
    )  # fmt: skip


# The time-limit run must still be training when the warning comes. The controller checks limits every
# 30 s and sends USR2@D at the first check that finds at most D + 30 s left (NOTES §3): with --time 1
# --signal-delay 20 that is 10-40 s after the job started, so the run trains for about 45 s.
TIME_LIMIT_STEPS, TIME_LIMIT_RUN = 145, probe_run(145, 0.3, 20)
PREEMPT_STEPS, PREEMPT_RUN = 40, probe_run(40, 0.2, 10)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, started at once so that they overlap the cluster tests (mostly sleep)."""
    base = tmp_path_factory.mktemp("references")
    refs = {
        "time_limit": Reference(base / "time_limit", TIME_LIMIT_RUN, TIME_LIMIT_STEPS),
        "preempt": Reference(base / "preempt", PREEMPT_RUN, PREEMPT_STEPS),
        "preempt_fsdp": Reference(
            base / "preempt_fsdp", (*PREEMPT_RUN, "trainer.strategy=fsdp"), PREEMPT_STEPS
        ),
    }
    yield refs
    for ref in refs.values():
        ref.stop()


def kinds(run_dir: Path) -> list[str]:
    return [e["event"] for e in events(run_dir)]


def show(slurm, job) -> dict:
    return slurm.scontrol_show_job(job)


def test_two_node_job_runs_to_completion_and_writes_everything_once(slurm, tmp_path, references):
    secret = "s3cr3t-" + tmp_path.name[-12:]
    run_dir = tmp_path / "run"
    args = ("pipeline.target=cluster_pipelines:FailingProbe", f"pipeline.args.api_token={secret}",
            "trainer.max_steps=12", "trainer.log_every=2", "trainer.eval_every=6", "checkpoint.every_steps=4")  # fmt: skip
    job = submit(slurm, run_dir, "--profile", "configs/slurm_loopback.yaml", "--nodes", "2", *args)
    wait_finished(slurm, job, run_dir, timeout=90)
    info = show(slurm, job)
    assert info["NodeList"] == "node[1-2]" and info["NumTasks"] == "2" and info["Restarts"] == "0"
    assert (info["Partition"], info["TimeLimit"]) == ("low", "00:10:00")  # from the profile

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r["step"] for r in records if "train/loss" in r]
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert (train, evals) == ([2, 4, 6, 8, 10, 12], [6, 12]), "each step logged once, by rank 0 only"
    assert kinds(run_dir).count("start") == 1 and kinds(run_dir)[-2:] == ["finish", "exit"]
    start = next(e for e in events(run_dir) if e["event"] == "start")
    assert (start["world_size"], start["job_id"], start["restart_count"]) == (2, str(job), 0)
    saved = [e["step"] for e in events(run_dir) if e["event"] == "checkpoint"]
    assert saved == [4, 8, 12]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]
    slurm_dir = run_dir / "slurm"
    assert {f"{job}_0_result.pkl", f"{job}_1_result.pkl", f"{job}_submitted.pkl"} <= {
        p.name for p in slurm_dir.iterdir()
    }

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in files) and any(
        p.name.endswith(".sh") for p in files
    )
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"the secret override landed in {leaked}"
    assert "***REDACTED***" in (run_dir / "config.yaml").read_text()


def test_time_limit_warning_saves_requeues_and_resumes_bit_identically(slurm, tmp_path, references):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, *TWO_NODES, "--time", "1", "--signal-delay", "20", *TIME_LIMIT_RUN)
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", timeout=100, slurm=slurm, job=job)
    assert requeue["signal"] == "SIGUSR2" and 0 < requeue["step"] < TIME_LIMIT_STEPS, requeue
    assert requeue["budget_left"] == 9
    slurm.wait_state(job, "PENDING", timeout=30)
    off_nodes = time.time()
    info = show(slurm, job)
    assert (info["Restarts"], info["Reason"]) == ("1", "BeginTime"), info
    # Give the second attempt room to finish, rather than a second warning after another controller
    # cycle (that path is the same one again; the test would only take longer).
    slurm.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"])
    release(slurm, job)
    wait_finished(slurm, job, run_dir, timeout=120)

    resumed = _check_requeued_run(run_dir, job, requeue)
    _report("time limit", requeue, off_nodes, slurm.scontrol_show_job(job), resumed)
    assert outcome(run_dir, TIME_LIMIT_STEPS) == references["time_limit"].outcome()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_preempted_job_saves_requeues_itself_and_resumes_bit_identically(
    slurm, tmp_path, references, strategy
):
    run_dir = tmp_path / "run"
    run = (*PREEMPT_RUN, f"trainer.strategy={strategy}")
    job = submit(slurm, run_dir, *TWO_NODES, "--cpus-per-task", "2", "--time", "5", *run)
    wait_for_event(run_dir, lambda e: e["event"] == "checkpoint" and e["step"] >= 10, 60, slurm, job)
    t0 = time.monotonic()
    high = slurm.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", timeout=30, slurm=slurm, job=job)
    slurm.wait_state(job, "PENDING", timeout=30)
    off_nodes = time.time()
    assert time.monotonic() - t0 < slurm.grace_time_s, "must requeue within the grace time, not after it"
    assert requeue["signal"] == "SIGTERM" and "preempted" in requeue["reason"], requeue
    assert show(slurm, job)["Restarts"] == "1"
    assert slurm.wait_state(high, "COMPLETED", timeout=30) == "COMPLETED"  # the preemptor got the nodes
    release(slurm, job)
    wait_finished(slurm, job, run_dir, timeout=90)

    resumed = _check_requeued_run(run_dir, job, requeue)
    _report(f"preemption ({strategy})", requeue, off_nodes, slurm.scontrol_show_job(job), resumed)
    assert (
        outcome(run_dir, PREEMPT_STEPS)
        == references["preempt" if strategy == "ddp" else "preempt_fsdp"].outcome()
    )


def test_max_requeues_is_honoured(slurm, tmp_path):
    """--max-requeues 1: the first preemption requeues, the second is refused and the job ends."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, *TWO_NODES, "--cpus-per-task", "2", "--time", "5", "--max-requeues", "1",
                 *probe_run(400, 0.1, 50))  # fmt: skip
    for attempt in (0, 1):
        wait_for_event(
            run_dir, lambda e, a=attempt: e["event"] == "start" and e["restart_count"] == a, 60, slurm, job
        )
        slurm.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")
        if attempt == 0:
            wait_for_event(run_dir, lambda e: e["event"] == "requeue", 30, slurm, job)
            slurm.wait_state(job, "PENDING", timeout=30)
            time.sleep(2)  # let the preemptor take the nodes and finish first
            release(slurm, job)
    refused = wait_for_event(run_dir, lambda e: e["event"] == "requeue_refused", 30, slurm, job)
    assert (
        refused["restart_count"] == 1 and "budget is spent (1 of --max-requeues 1 used)" in refused["reason"]
    )
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert state == "FAILED" and show(slurm, job)["Restarts"] == "1", "a refused requeue is the end"
    assert kinds(run_dir).count("requeue") == 1
    assert "not requeued" in (run_dir / "slurm" / f"{job}_0_log.err").read_text()


def test_a_pipeline_that_raises_is_not_requeued_and_reports_the_error(slurm, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_submit(
        slurm, "--wait", *TWO_NODES, "--time", "5", f"run_dir={run_dir}", *FAST,
        "pipeline.target=cluster_pipelines:FailingProbe", "pipeline.args.fail_after=5", "trainer.max_steps=20",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "did not finish (FAILED): error at step 5" in proc.stdout and "planted failure" in proc.stdout
    job = int(proc.stdout.split("submitted job ")[1].split()[0])
    assert show(slurm, job)["Restarts"] == "0"
    error = [e for e in events(run_dir) if e["event"] == "error"]
    assert len(error) == 1 and "planted failure in the pipeline's loss" in error[0]["error"]
    assert "requeue" not in kinds(run_dir) and "requeue_refused" not in kinds(run_dir)


def test_a_nan_loss_on_one_rank_fails_the_job_and_is_not_requeued(slurm, tmp_path):
    """trainer.nonfinite=stop: both ranks stop at the step, nothing is saved, exit 1, and the job is a
    failure SLURM shows as FAILED, with no requeue (a preemption would be requeued)."""
    from disttrain.data import epoch_order

    poisoned = int(epoch_order(1259, 0, 0, True)[3 * 64 + 32])  # rank 1's first sample at step 4
    run_dir = tmp_path / "run"
    proc = run_submit(
        slurm, "--wait", *TWO_NODES, "--time", "5", f"run_dir={run_dir}", *FAST, "trainer.max_steps=20",
        "pipeline.target=tests.pipelines:PoisonDigits", f"pipeline.args.poison=[{poisoned}]", "checkpoint.every_steps=2",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "did not finish (FAILED)" in proc.stdout, proc.stdout
    job = int(proc.stdout.split("submitted job ")[1].split()[0])
    assert show(slurm, job)["Restarts"] == "0"
    found = [(e["step"], e["quantity"], e["action"]) for e in events(run_dir) if e["event"] == "nonfinite"]
    assert found == [(4, "loss", "stop")]
    assert "requeue" not in kinds(run_dir) and "requeue_refused" not in kinds(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_local_cluster_runs_the_same_job_on_this_machine(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_submit(
        None, "--cluster", "local", "--tasks-per-node", "2", "--time", "5", "--wait", f"run_dir={run_dir}",
        *FAST, *PROBE, "trainer.max_steps=8", "trainer.log_every=4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr + job_logs(run_dir)
    assert "finished at step 8" in proc.stdout
    start = next(e for e in events(run_dir) if e["event"] == "start")
    assert start["world_size"] == 2 and kinds(run_dir)[-2:] == ["finish", "exit"]


def _check_requeued_run(run_dir: Path, job: int, requeue: dict) -> dict:
    """Two segments of one job: stopped + requeued at step N, resumed from step N, finished."""
    evs = events(run_dir)
    names = [e["event"] for e in evs]
    assert names.count("start") == 2 and names[-2:] == ["finish", "exit"] and names.count("requeue") == 1, (
        names
    )
    stop_save = [e for e in evs if e["event"] == "checkpoint" and e.get("reason") == "stop"]
    assert [e["step"] for e in stop_save] == [requeue["step"]]
    resume = next(e for e in evs if e["event"] == "resume")
    assert (resume["step"], resume["restart_count"], resume["job_id"]) == (requeue["step"], 1, str(job))
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)), "no step logged twice across the requeue"
    return next(e for e in evs if e["event"] == "start" and e["restart_count"] == 1)


def _report(what: str, requeue: dict, off_nodes: float, info: dict, resumed: dict) -> None:
    start = time.mktime(time.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    timings = {
        "signal_to_requeued_s": round(requeue["time"] - requeue["signal_time"], 2),
        "signal_to_off_the_nodes_s": round(off_nodes - requeue["signal_time"], 2),
        "job_start_to_resumed_training_s": round(resumed["time"] - start, 2),
    }
    print(f"\n{what}: {json.dumps(timings)}")
