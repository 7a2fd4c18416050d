"""Rank discovery from torchrun, SLURM and plain environments."""

import pytest

from disttrain.cluster import detect
from disttrain.slurm import expand_hostlist, port_for_job


def test_single_process_defaults():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.is_distributed) == ("single", 0, 1, False)


def test_torchrun_env():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2"})  # fmt: skip
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.num_nodes) == ("torchrun", 3, 1, 8, 4)
    assert (env.master_addr, env.master_port, env.restart_count) == ("10.0.0.1", 1234, 2)


def test_slurm_env_derives_master_from_nodelist_and_port_from_job():
    raw = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    env = detect(raw)
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("slurm", 5, 1, 8)
    assert (env.master_addr, env.master_port, env.job_id, env.restart_count) == (
        "gpu07",
        port_for_job("4242", 1),
        "4242",
        1,
    )
    assert env.torch_env()["MASTER_ADDR"] == "gpu07" and env.torch_env()["WORLD_SIZE"] == "8"


def test_torchrun_inside_slurm_uses_torchrun_ranks():
    env = detect(
        {"RANK": "1", "WORLD_SIZE": "2", "SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )
    assert (env.launcher, env.rank, env.job_id) == ("torchrun", 1, "9")


def test_torchrun_under_an_in_job_agent_requeues_and_counts_slurm_attempts():
    """The workers of launch/agent.py: torchrun's ranks, a stop requeues the SLURM job, and a requeued
    attempt counts as a restart even though the new agent counts none."""
    base = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
            "TORCHELASTIC_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    plain = detect(base)
    assert (plain.launcher, plain.restart_count, plain.requeues_slurm) == ("torchrun", 1, False)
    agent = detect({**base, "DISTTRAIN_SLURM_AGENT": "1", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (agent.launcher, agent.restart_count, agent.requeues_slurm) == ("torchrun", 3, True)
    assert not detect({"RANK": "0", "WORLD_SIZE": "2", "DISTTRAIN_SLURM_AGENT": "1"}).requeues_slurm


HOSTLISTS = {
    "node1": ["node1"],
    "node[1-3]": ["node1", "node2", "node3"],
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "a[1-2]b[3-4]": ["a1b3", "a1b4", "a2b3", "a2b4"],
    "gpu-[1-2]-[7-8]": ["gpu-1-7", "gpu-1-8", "gpu-2-7", "gpu-2-8"],
    "node[01-02],a[1-2]b[3-4],login1": ["node01", "node02", "a1b3", "a1b4", "a2b3", "a2b4", "login1"],
}


@pytest.mark.parametrize("text", sorted(HOSTLISTS))
def test_hostlist_expansion(text):
    assert expand_hostlist(text) == HOSTLISTS[text]


def test_hostlist_with_a_letter_range_is_refused_as_slurm_refuses_it():
    # `scontrol show hostnames 'gpu-[1-4]-[a-b]'` says "Invalid range: `a-b'": SLURM ranges are numeric.
    with pytest.raises(ValueError):
        expand_hostlist("gpu-[1-4]-[a-b]")


def test_port_is_deterministic_and_outside_ephemeral_range():
    assert port_for_job("123") == port_for_job("123") != port_for_job("124")
    assert all(1024 < port_for_job(str(j)) < 32768 for j in range(0, 100000, 997))


def test_an_array_task_is_named_by_array_and_task_id_and_gets_a_port_of_its_own():
    """scontrol needs `A_T` for one task of array A: the array's last task has SLURM_JOB_ID == A, and
    `scontrol requeue A` would requeue every running task (tests/cluster/test_sweep_array.py)."""
    task = {"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1"}  # fmt: skip
    sibling = {**task, "SLURM_JOB_ID": "44", "SLURM_ARRAY_TASK_ID": "2"}
    assert (detect(task).job_id, detect(sibling).job_id) == ("41_3", "41_2")
    assert detect(task).master_port == port_for_job("41") != detect(sibling).master_port
    assert detect({**task, "RANK": "0", "WORLD_SIZE": "1"}).job_id == "41_3"  # torchrun inside an array task


def test_each_attempt_of_a_requeued_job_rendezvous_on_a_port_of_its_own():
    # A requeued job can start again on the same node while the previous attempt's rank 0 is still
    # exiting and holds its store's port: bench/goodput.py saw EADDRINUSE on the 14th attempt of a job.
    raw = {"SLURM_JOB_ID": "15", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[1-2]"}
    ports = [detect({**raw, "SLURM_RESTART_COUNT": str(n)}).master_port for n in range(20)]
    assert len(set(ports)) == 20 and all(1024 < p < 32768 for p in ports)
    assert ports[3] == port_for_job("15", attempt=3)  # every task of an attempt derives the same


def test_one_port_rule_for_a_slurm_attempt_and_a_torchrun_restart():
    """slurm.attempt_port is the rule both a requeued SLURM job (from its id) and a restarted torchrun
    job (from the agent's port, run.py) follow: a port per attempt, below the ephemeral range."""
    from disttrain.slurm import attempt_port

    assert port_for_job("4242_3", 2) == attempt_port(42423, 2)
    restarts = [attempt_port(29500, n) for n in range(1, 30)]
    assert len(set(restarts)) == len(restarts) and all(15000 <= p < 30000 for p in restarts)


def test_a_worker_whose_agent_joined_after_the_first_round_counts_the_restart_of_the_ranks_it_joins(tmp_path):
    """A spare node's torchrun counts no restart; the records its job wrote since that agent started
    say it joined a later round, so it continues the run as the others do (resume.late_joiner)."""
    import json
    import time

    from disttrain.cluster import ClusterEnv, parent_started
    from disttrain.resume import late_joiner

    started = parent_started()
    assert started is not None and started <= time.time()
    env = ClusterEnv(launcher="torchrun", rank=1, world_size=2, job_id="peers")
    events = tmp_path / "events.jsonl"

    def records(*rows: tuple[str, float, int]) -> None:
        events.write_text("".join(json.dumps({"time": t, "event": "start", "job_id": j, "restart_count": r}) + "\n"
                                  for j, t, r in rows))  # fmt: skip

    assert late_joiner(env, str(tmp_path)) == env  # no records: a first round
    records(("peers", started - 60, 0))  # an earlier invocation reusing the id, before this agent started
    assert late_joiner(env, str(tmp_path)).restart_count == 0
    records(("other", time.time(), 2))  # another job
    assert late_joiner(env, str(tmp_path)).restart_count == 0
    records(("peers", started - 60, 0), ("peers", time.time(), 0), ("peers", time.time(), 2))
    assert late_joiner(env, str(tmp_path)).restart_count == 2
    records(("peers", time.time(), 0))  # the round before the one it joined: still a restart
    assert late_joiner(env, str(tmp_path)).restart_count == 1
    restarted = ClusterEnv(launcher="torchrun", job_id="peers", restart_count=3)
    assert late_joiner(restarted, str(tmp_path)) == restarted


def test_a_lost_node_is_told_from_torchs_error_file_and_named_by_the_survivors_hang_records(tmp_path):
    import json

    from disttrain.launch.agent import _timed_out
    from disttrain.resume import lost_hosts

    error = tmp_path / "agent_error.json"
    assert not _timed_out(str(error))  # no file: the agent did not record an exception
    error.write_text(json.dumps({"message": {"message": "RendezvousTimeoutError: ", "extraInfo": {}}}))
    assert _timed_out(str(error))
    error.write_text(json.dumps({"message": {"message": "ChildFailedError: rank 1 exited 1"}}))
    assert not _timed_out(str(error))  # its ranks failed: not a lost node

    hang = lambda job, restart, host: {"time": 1.0, "event": "hang", "job_id": job, "restart_count": restart,  # noqa: E731
                                       "ranks": [{"rank": 1, "host": host}]}  # fmt: skip
    (tmp_path / "events.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (hang("7", 0, "node3"), hang("7", 1, "node2"), hang("8", 2, "node9"))
        )
    )
    assert lost_hosts(str(tmp_path), "7") == ["node2"]  # the job's newest segment only
    assert lost_hosts(str(tmp_path), "5") == []


def test_how_many_failures_leave_a_node_out_travels_to_the_ranks_and_counts_segments(tmp_path):
    import json

    from disttrain.resume import failing_hosts
    from disttrain.slurm import LEAVE_OUT_ENV, RequeuePolicy

    assert RequeuePolicy.from_env({}).leave_out_after == 2
    assert RequeuePolicy.from_env({LEAVE_OUT_ENV: "0"}).leave_out_after == 0
    hang = lambda restart: {"time": 1.0, "event": "hang", "job_id": "7", "restart_count": restart,  # noqa: E731
                            "ranks": [{"rank": 1, "host": "node2"}]}  # fmt: skip
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(hang(r)) + "\n" for r in (0, 1, 1)))
    assert failing_hosts(str(tmp_path), "7") == ["node2"]  # two segments: twice
    assert failing_hosts(str(tmp_path), "7", times=3) == []
