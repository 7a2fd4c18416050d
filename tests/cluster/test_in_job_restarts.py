"""`--in-job-restarts` on the two-node loopback cluster: one task per node runs torch's elastic agent,
which spawns that node's rank. A rank killed with SIGKILL is restarted inside the same allocation (no
requeue: SLURM shows Restarts=0), both ranks resume from their local pieces (checkpoint.local), and the
run ends with the weights and logged numbers of an uninterrupted `torchrun --nproc_per_node 2` run."""

from __future__ import annotations

import os
import signal
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
    submit,
    wait_finished,
    wait_for_event,
)

from disttrain.commands.run_status import collect

STEPS = 40
RUN = (
    "pipeline.target=tests.pipelines:ProbeDigits", f"trainer.max_steps={STEPS}", "pipeline.args.step_delay=0.15",
    "trainer.log_every=5", "trainer.eval_every=20", "checkpoint.keep_last=2",
)  # fmt: skip
LOCAL_EVERY = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run", RUN, STEPS)
    yield ref
    ref.stop()


def workers(job: int) -> dict[int, int]:
    """{rank: pid} of the job's training processes (disttrain.main under torchrun), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.split(b"=", 1)
                for item in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except OSError:
            continue
        ours = environ.get(b"SLURM_JOB_ID") == str(job).encode() and b"RANK" in environ
        if ours and b"disttrain.main" in cmdline and b"torch.distributed.run" not in cmdline:
            found[int(environ[b"RANK"])] = int(entry)
    return found


def pieces(local: Path, rank: int) -> list[int]:
    folder = local / f"rank_{rank:05d}"
    return sorted(int(p.parent.name[5:]) for p in folder.glob("step_*/manifest.json") if ".tmp" not in str(p))


def test_a_killed_rank_is_restarted_inside_the_allocation_and_ends_bit_identical(slurm, tmp_path, reference):
    run_dir, local = tmp_path / "run", tmp_path / "local"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--in-job-restarts", "2",
                 *RUN, f"checkpoint.local.every_steps={LOCAL_EVERY}", f"checkpoint.local.dir={local}",
                 "checkpoint.every_steps=1000")  # fmt: skip
    deadline = time.monotonic() + 120
    while not all(pieces(local, r) and pieces(local, r)[-1] >= 2 * LOCAL_EVERY for r in (0, 1)):
        assert time.monotonic() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING"), job_logs(
            run_dir
        )
        time.sleep(0.05)
    ranks = workers(job)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    wait_finished(slurm, job, run_dir, timeout=150)

    info = slurm.scontrol_show_job(job)
    assert info["Restarts"] == "0" and info["NumTasks"] == "2", (
        "restarted inside the allocation, not requeued"
    )
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert [s["restart_count"] for s in starts] == [0, 1] and all(s["job_id"] == str(job) for s in starts)
    resumed = [e for e in events(run_dir) if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["tier"] == "local" and resumed[0]["step"] >= 2 * LOCAL_EVERY, (
        resumed
    )
    assert "requeue" not in [e["event"] for e in events(run_dir)]
    assert outcome(run_dir, STEPS) == reference.outcome()


def test_preemption_under_the_agents_saves_requeues_and_resumes_bit_identical(slurm, tmp_path, reference):
    """SIGTERM from a preempting `high` job reaches each node's task; it hands it to torch's agent, which
    stops its rank: both ranks save at the same step, rank 0 requeues the job, the next attempt resumes."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "5",
                 "--in-job-restarts", "2", *RUN, "checkpoint.every_steps=10")  # fmt: skip
    wait_for_event(run_dir, lambda e: e["event"] == "checkpoint" and e["step"] >= 10, 90, slurm, job)
    slurm.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", timeout=30, slurm=slurm, job=job)
    assert requeue["signal"] == "SIGTERM" and 10 <= requeue["step"] < STEPS, requeue
    slurm.wait_state(job, "PENDING", timeout=30)
    assert slurm.scontrol_show_job(job)["Restarts"] == "1"
    release(slurm, job)
    wait_finished(slurm, job, run_dir, timeout=120)
    resumed = [e for e in events(run_dir) if e["event"] == "resume"]
    assert [e["step"] for e in resumed] == [requeue["step"]], resumed
    assert outcome(run_dir, STEPS) == reference.outcome()


def test_a_nonfinite_stop_is_not_trained_again_by_a_restart(slurm, tmp_path):
    """trainer.nonfinite=stop under --in-job-restarts: the restarted ranks see how the run ended and fail
    at once, without a step; the job fails (exit 1), is not requeued, and the checkpoints stay."""
    from disttrain.data import epoch_order

    poisoned = int(epoch_order(1259, 0, 0, True)[3 * 64 + 32])  # rank 1's first sample at step 4
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--in-job-restarts", "2",
                 "trainer.max_steps=20", "pipeline.target=tests.pipelines:PoisonDigits",
                 f"pipeline.args.poison=[{poisoned}]", "checkpoint.every_steps=2")  # fmt: skip
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=150)
    assert state == "FAILED" and slurm.scontrol_show_job(job)["Restarts"] == "0", job_logs(run_dir)
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds.count("nonfinite") == 1 and kinds.count("start") == 1, kinds
    assert "requeue" not in kinds
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob("*.err"))
    assert "is not trained again" in logs, logs[-3000:]


def test_the_time_limit_warning_reaches_the_ranks_through_their_agent(slurm, tmp_path):
    """USR2 (the time-limit warning) goes to the node's task; torch's agent would die of it, so the task
    keeps it from the agent and hands it to the ranks: they save at the same step and rank 0 requeues."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--time", "1", "--signal-delay", "20",
                 "--in-job-restarts", "1", *RUN[:1], "trainer.max_steps=400", "pipeline.args.step_delay=0.3",
                 "trainer.log_every=5", "checkpoint.every_steps=50")  # fmt: skip
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", timeout=100, slurm=slurm, job=job)
    assert requeue["signal"] == "SIGUSR2" and 0 < requeue["step"] < 400, requeue
    slurm.wait_state(job, "PENDING", timeout=30)
    info = slurm.scontrol_show_job(job)
    assert info["Restarts"] == "1", info
    stopped = [e for e in events(run_dir) if e["event"] == "stopped"]
    assert stopped and stopped[-1]["step"] == requeue["step"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{requeue['step']:08d}"
    slurm.cancel(job)


def node_worker(job: int, node: str) -> int | None:
    """The pid of the job's training process on `node` (SLURMD_NODENAME), if one runs now."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        mine = {f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode()} <= environ
        if mine and b"disttrain.main" in cmdline and any(item.startswith(b"RANK=") for item in environ):
            return int(entry)
    return None


def test_a_node_whose_ranks_fail_twice_is_left_out_of_the_requeued_job(slurm, tmp_path):
    """Rank processes on node2 killed twice: the second restart does not train on node2 again; rank 0
    requeues the job with node2 excluded (ExcNodeList), and the events name the node. (The test cluster
    has no third node, so the requeued job waits; a real one would start on the others.)"""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--in-job-restarts", "5",
                 *RUN[:1], "trainer.max_steps=2000", "pipeline.args.step_delay=0.1", "trainer.log_every=5",
                 "checkpoint.every_steps=20")  # fmt: skip
    for restart in (0, 1):
        wait_for_event(
            run_dir, lambda e, r=restart: e["event"] == "ready" and e["restart_count"] == r, 120, slurm, job
        )
        deadline = time.monotonic() + 30
        while (pid := node_worker(job, "node2")) is None:
            assert time.monotonic() < deadline, job_logs(run_dir)
            time.sleep(0.1)
        time.sleep(1.0)  # a few steps in, so that the survivor names the rank it lost
        os.kill(pid, signal.SIGKILL)
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", 120, slurm, job)
    assert requeue["excluded"] == ["node2"] and requeue["failing_nodes"] == ["node2"], requeue
    assert "node(s) node2 failed twice in this job" in requeue["reason"], requeue
    pending_without_node2(slurm, job)
    hangs = [e for e in events(run_dir) if e["event"] == "hang"]
    assert len(hangs) == 2 and all(r["host"] == "node2" for e in hangs for r in e["ranks"]), hangs
    assert "requeued without node(s) node2" in collect(str(run_dir))["detail"]
    cancel_pending(slurm, job)


def pending_without_node2(slurm, job: int) -> None:
    """The job went back to the queue once, with node2 excluded."""
    slurm.wait_state(job, "PENDING", timeout=60)
    info = slurm.scontrol_show_job(job)
    assert (info["ExcNodeList"], info["Restarts"]) == ("node2", "1"), info


def cancel_pending(slurm, job: int) -> None:
    """Cancel a requeued job; the nodes SLURM planned for it must be idle for the next test."""
    slurm.cancel(job)
    slurm.wait_state(job, {"CANCELLED"}, timeout=30)
    deadline = time.monotonic() + 30
    while "planned" in slurm.run(["sinfo", "-h", "-o", "%t"]).stdout and time.monotonic() < deadline:
        time.sleep(0.5)


def test_a_spare_nodes_agent_waits_through_the_run_and_the_job_completes(slurm, tmp_path):
    """--nodes 1 --spare-nodes 1: the job holds both nodes; one agent trains (world size 1), the other's
    agent waits in the rendezvous as a spare the whole run. When the run finishes the spare's task ends
    too, and the job completes rather than failing or hanging on the agent that never trained."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "1", "--spare-nodes", "1", "--gpus-per-node", "0", "--time", "5",
                 "--in-job-restarts", "1", *RUN[:1], "trainer.max_steps=20", "pipeline.args.step_delay=0.1",
                 "data.batch_size=32")  # fmt: skip
    wait_finished(slurm, job, run_dir, timeout=150)
    info = slurm.scontrol_show_job(job)
    assert (info["NumNodes"], info["NumTasks"], info["Restarts"]) == ("2", "2", "0"), info
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert [(s["world_size"], s["restart_count"]) for s in starts] == [(1, 0)], starts
    assert [e["event"] for e in events(run_dir)][-2:] == ["finish", "exit"]
    spare_log = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob("*_log.err"))
    assert "after the run finished" in spare_log and "the run's outcome stands" in spare_log, spare_log[
        -3000:
    ]


def node_processes(job: int, node: str) -> list[int]:
    """Every python process of the job on `node`: its SLURM task, the task's torch agent, the ranks."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        mine = {f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode()} <= environ
        if mine and b"python" in cmdline.split(b"\0")[0]:
            found.append(int(entry))
    return found


def test_a_node_lost_whole_without_a_spare_requeues_the_job_without_it(slurm, tmp_path):
    """Every process of the job on node2 killed -9 (the node lost: its agent gone too). node1's agent
    restarts its rank, and the new rendezvous round waits for node2 in vain; after --rendezvous-timeout
    the first node's task requeues the job with node2 excluded, and the events and status name it."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--in-job-restarts", "3",
                 "--rendezvous-timeout", "15", *RUN[:1], "trainer.max_steps=2000", "pipeline.args.step_delay=0.1",
                 "trainer.log_every=5", "checkpoint.every_steps=20")  # fmt: skip
    wait_for_event(run_dir, lambda e: e["event"] == "ready", 120, slurm, job)
    deadline = time.monotonic() + 30
    while node_worker(job, "node2") is None:
        assert time.monotonic() < deadline, job_logs(run_dir)
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps in
    doomed = node_processes(job, "node2")
    assert len(doomed) >= 3, doomed  # the task, its agent, the rank
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", 120, slurm, job)
    assert requeue["lost_nodes"] == ["node2"] and requeue["excluded"] == ["node2"], requeue
    assert "node2 did not come back to the rendezvous within 15 s" in requeue["reason"], requeue
    pending_without_node2(slurm, job)
    assert "requeued without node2, lost during the job" in collect(str(run_dir))["detail"]
    assert [e["event"] for e in events(run_dir)].count("requeue") == 1, (
        "one requeue, by the first node's task"
    )
    cancel_pending(slurm, job)
