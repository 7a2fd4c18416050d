"""The loopback SLURM cluster itself: multi-node steps, preemption, requeue, release.

These pin down the cluster behaviour that disttrain's launcher and preemption protocol rely on
(tests/cluster/NOTES.md): preemption signals the job's tasks with SIGTERM, SLURM requeues a job
that is still running after GraceTime, a job that exits cleanly is COMPLETED (so it must requeue
itself), and a requeued job keeps its id, counts Restarts and waits for BeginTime unless released.
"""

import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmError

# Fills both nodes (2 CPUs each) so that a `high` job needing them must preempt.
WHOLE_CLUSTER = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2")


def wait_for_file(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(
        f"{path} never contained {text!r}; has: {path.read_text() if path.exists() else '(missing)'}"
    )


def low_job_script(log: Path, on_term: str) -> str:
    """A batch script whose tasks log each start and run `on_term` when SIGTERM arrives."""
    task = (
        f'echo "start $SLURM_PROCID restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}; '
        f"trap '{on_term}' TERM; "
        "for i in $(seq 600); do sleep 0.2; done"
    )
    return f"#!/bin/bash\nsrun bash -c {_quote(task)}\n"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def preempt(slurm, job_id) -> int:
    """Submit a short `high` job that needs the whole cluster; returns its id."""
    return slurm.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")


def test_cluster_has_two_idle_nodes_and_two_partitions(slurm):
    out = slurm.run(["sinfo", "-h", "-o", "%P %D %T"]).stdout.split("\n")
    assert "low* 2 idle" in out
    assert "high 2 idle" in out


def test_two_node_srun_runs_one_task_per_node(slurm, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={out}",
        wrap="srun hostname && srun printenv SLURMD_NODENAME SLURM_PROCID",
    )
    assert slurm.wait_state(job, {"COMPLETED", "FAILED"}, timeout=60) == "COMPLETED", out.read_text()
    lines = out.read_text().split()
    # hostname is the real host's name on both "nodes"; SLURMD_NODENAME tells them apart
    assert {"node1", "node2"} <= set(lines)
    assert {"0", "1"} <= set(lines)
    assert slurm.scontrol_show_job(job)["NodeList"] == "node[1-2]"


def test_preempted_job_is_requeued_by_slurm_after_grace_time(slurm, tmp_path):
    """Tasks that ignore SIGTERM are killed after GraceTime; SLURM requeues the job."""
    log = tmp_path / "starts.log"
    low = slurm.sbatch(
        *WHOLE_CLUSTER,
        f"--output={tmp_path}/low.out",
        script=low_job_script(log, on_term=f"echo TERM $SLURM_PROCID >> {log}"),
    )
    wait_for_file(log, "start 1 restart=0")
    high = preempt(slurm, low)
    wait_for_file(log, "TERM 0")  # the signal comes at once; the kill after GraceTime
    slurm.wait_state(low, "PENDING", timeout=slurm.grace_time_s + 60)
    info = slurm.scontrol_show_job(low)
    assert info["Restarts"] == "1"
    assert info["Reason"] in {"BeginTime", "Resources", "Priority"}
    assert slurm.wait_state(high, "COMPLETED", timeout=30) == "COMPLETED"
    slurm.release_now(low)
    slurm.wait_state(low, "RUNNING", timeout=30)
    wait_for_file(log, "start 0 restart=1")  # same job id, SLURM_RESTART_COUNT incremented


def test_job_that_requeues_itself_during_grace_time_is_requeued(slurm, tmp_path):
    """The disttrain protocol: on SIGTERM rank 0 runs `scontrol requeue` on its own job."""
    log = tmp_path / "starts.log"
    on_term = (
        f'[ "$SLURM_PROCID" = 0 ] && scontrol requeue $SLURM_JOB_ID; echo TERM $SLURM_PROCID >> {log}; exit 0'
    )
    low = slurm.sbatch(
        *WHOLE_CLUSTER, f"--output={tmp_path}/low.out", script=low_job_script(log, on_term=on_term)
    )
    wait_for_file(log, "start 1 restart=0")
    t0 = time.monotonic()
    preempt(slurm, low)
    slurm.wait_state(low, "PENDING", timeout=30)
    assert time.monotonic() - t0 < slurm.grace_time_s, "requeue should not wait for GraceTime"
    info = slurm.scontrol_show_job(low)
    assert (info["Restarts"], info["Reason"]) == ("1", "BeginTime"), info
    # The high job runs first; once it is done the released job starts again at once.
    deadline = time.monotonic() + 30
    while slurm.squeue(low) != "RUNNING" and time.monotonic() < deadline:
        slurm.release_now(low)
        time.sleep(1)
    wait_for_file(log, "start 0 restart=1")


def test_job_that_exits_cleanly_on_preemption_is_completed_not_requeued(slurm, tmp_path):
    log = tmp_path / "starts.log"
    low = slurm.sbatch(
        *WHOLE_CLUSTER, f"--output={tmp_path}/low.out", script=low_job_script(log, on_term="exit 0")
    )
    wait_for_file(log, "start 1 restart=0")
    preempt(slurm, low)
    assert slurm.wait_state(low, {"COMPLETED", "PENDING"}, timeout=30) == "COMPLETED"
    assert slurm.scontrol_show_job(low)["Restarts"] == "0"


def test_sbatch_test_only_validates_without_submitting(slurm):
    script = "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --partition=high\nsrun true\n"
    message = slurm.sbatch_test_only(script=script)
    assert "to start at" in message and "node[1-2]" in message and "high" in message
    with pytest.raises(SlurmError, match="Requested node configuration is not available"):
        slurm.sbatch_test_only("--nodes=3", script=script)
    with pytest.raises(SlurmError, match="Invalid partition name"):
        slurm.sbatch_test_only("--partition=nosuch", script=script)
    assert slurm.run(["squeue", "-h"]).stdout.strip() == ""


def test_submitit_job_sees_two_ranks(slurm, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=1, timeout_min=5, slurm_partition="low")

    def rank_and_node():  # nested, so cloudpickle ships it by value (tests/ is not importable)
        import os

        return os.environ["SLURM_PROCID"], os.environ["SLURMD_NODENAME"]

    job = executor.submit(rank_and_node)
    assert sorted(job.results()) == [("0", "node1"), ("1", "node2")]
