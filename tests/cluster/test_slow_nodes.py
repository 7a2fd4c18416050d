"""Stragglers on the real loopback cluster: the slow rank's host is named by its SLURM node name
(node1/node2, what `--exclude` takes), and with `--exclude-slow-nodes` a preempted job requeues with
that node excluded and its next attempt runs elsewhere.

One job of two ranks on one node (rank 1 sleeps an extra 50 ms a step): excluding the node of a
two-node job would leave it nothing to run on in a two-node cluster.
"""

from __future__ import annotations

from launch_support import WHOLE_CLUSTER, events, release, submit, wait_finished, wait_for_event

NODES = ("node1", "node2")
STEPS = 300
SLOW_RUN = (
    "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "5", "--exclude-slow-nodes",
    "pipeline.target=tests.pipelines:SlowRank", "pipeline.args.rank=1", "pipeline.args.delay=0.05",
    "pipeline.args.base=0.01", "trainer.log_every=2", "trainer.straggler_windows=2", "trainer.eval_every=0",
    f"trainer.max_steps={STEPS}", "checkpoint.every_steps=100",
)  # fmt: skip


def test_a_slow_node_is_named_and_left_out_of_the_requeue(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, *SLOW_RUN)
    first = wait_for_event(run_dir, lambda e: e["event"] == "straggler", timeout=90, slurm=slurm, job=job)
    assert first["rank"] == 1 and first["host"] in NODES and first["section"] == "forward", first
    slow_node = first["host"]
    assert slurm.scontrol_show_job(job)["NodeList"] == slow_node  # the job's one node

    wait_for_event(run_dir, lambda e: e["event"] == "straggler" and e["step"] >= 20, 60, slurm, job)
    slurm.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")  # preempts: SIGTERM, PreemptTime
    requeue = wait_for_event(run_dir, lambda e: e["event"] == "requeue", timeout=30, slurm=slurm, job=job)
    assert requeue.get("excluded") == [slow_node], requeue
    assert f"slow node(s) {slow_node} left out" in requeue["reason"]
    slurm.wait_state(job, "PENDING", timeout=30)
    assert slurm.scontrol_show_job(job)["ExcNodeList"] == slow_node

    release(slurm, job)  # after the preemptor's second: the requeued job now starts on the other node
    wait_finished(slurm, job, run_dir, timeout=120)
    other = next(n for n in NODES if n != slow_node)
    assert slurm.scontrol_show_job(job)["NodeList"] == other
    later = [e for e in events(run_dir) if e["event"] == "straggler" and e["restart_count"] == 1]
    assert later and all(e["host"] == other for e in later), later  # still slow (the delay is rank 1's)
