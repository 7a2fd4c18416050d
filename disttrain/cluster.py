"""Who am I: rank, local rank, world size, node, job id and rendezvous address, read from the
environment that torchrun, SLURM (srun / submitit) or nothing at all left for this process.

Stdlib only, so the launcher can use it on a login node without importing torch. What SLURM's values
mean (hostlists, the port of an attempt) is disttrain.slurm's.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from disttrain.slurm import expand_hostlist, port_for_job


@dataclass(frozen=True)
class ClusterEnv:
    """The process's place in the job."""

    launcher: str  # "torchrun" | "slurm" | "local" (submitit's local executor) | "single"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = ""  # what scontrol takes for this job: `A_T` for task T of array A (slurm_job_id)
    restart_count: int = 0
    # torchrun workers of a SLURM job's in-job agents (launch/agent.py): a stop requeues the job
    slurm_agent: bool = False

    @property
    def requeues_slurm(self) -> bool:
        """Whether an agreed stop hands the job back to SLURM (rank 0 requeues it)."""
        return self.launcher == "slurm" or self.slurm_agent

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and accelerate) read."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def host_name(env: Mapping[str, str] | None = None) -> str:
    """This node's name as the scheduler knows it (SLURM's NodeName, which `--exclude` takes), else the
    hostname: what attribution and hang records name a rank's host by."""
    env = os.environ if env is None else env
    return env.get("SLURMD_NODENAME") or socket.gethostname()


SLURM_AGENT_ENV = "DISTTRAIN_SLURM_AGENT"  # set by launch/agent.py for the workers of its torchrun


def detect(env: Mapping[str, str] | None = None) -> ClusterEnv:
    """torchrun's variables win (torchrun may itself run inside a SLURM allocation), then SLURM tasks."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    if "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        return _from_submitit_local(env)
    return ClusterEnv(launcher="single", job_id=slurm_job_id(env))


def _from_torchrun(env: Mapping[str, str]) -> ClusterEnv:
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return ClusterEnv(
        launcher="torchrun",
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=world,
        local_world_size=local_world,
        node_rank=int(env.get("GROUP_RANK", 0)),
        num_nodes=max(1, world // max(1, local_world)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
        job_id=slurm_job_id(env) or env.get("TORCHELASTIC_RUN_ID", ""),
        # torchrun inside a SLURM job: a requeued attempt is a restart too, whatever the agent counts
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)
        + int(env.get("SLURM_RESTART_COUNT") or 0),
        slurm_agent=env.get(SLURM_AGENT_ENV) == "1" and bool(slurm_job_id(env)),
    )


def _from_slurm(env: Mapping[str, str]) -> ClusterEnv:
    restarts = int(env.get("SLURM_RESTART_COUNT", 0))
    nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
    world = int(env["SLURM_NTASKS"])
    num_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", len(nodes) or 1)))
    return ClusterEnv(
        launcher="slurm",
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        world_size=world,
        local_world_size=_tasks_on_this_node(env, world, num_nodes),
        node_rank=int(env.get("SLURM_NODEID", 0)),
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
        # SLURM_JOB_ID is unique per array task, so tasks sharing a node get distinct ports; each attempt
        # of a requeued job gets another (port_for_job).
        master_port=int(env.get("MASTER_PORT") or port_for_job(env["SLURM_JOB_ID"], restarts)),
        job_id=slurm_job_id(env),
        restart_count=restarts,
    )


def _from_submitit_local(env: Mapping[str, str]) -> ClusterEnv:
    """submitit's local executor (`disttrain submit --cluster local`): N tasks on this machine."""
    job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "")
    world = int(env["SUBMITIT_LOCAL_NTASKS"])
    return ClusterEnv(
        launcher="local",
        rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
        local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
        world_size=world,
        local_world_size=world,
        master_addr="127.0.0.1",
        master_port=port_for_job(job_id),
        job_id=job_id,
    )


def slurm_job_id(env: Mapping[str, str]) -> str:
    """The id that names exactly this job to scontrol. For a task of a job array that is `A_T`
    (SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID), not SLURM_JOB_ID: one task of every array (the last to
    start) has SLURM_JOB_ID equal to the array's id, and `scontrol requeue A` requeues every running task
    of the array while `scontrol show job A` lists them all (tests/cluster/NOTES.md §11)."""
    array, task = env.get("SLURM_ARRAY_JOB_ID", ""), env.get("SLURM_ARRAY_TASK_ID", "")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID", "")


def _tasks_on_this_node(env: Mapping[str, str], world: int, num_nodes: int) -> int:
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"(\d+)", per_node)
    return int(match.group(1)) if match else max(1, world // max(1, num_nodes))


def parent_started(pid: int | None = None) -> float | None:
    """When this process's parent (a torchrun worker's agent) started, as a wall-clock time, from /proc
    (to a clock tick, plus the boot time's whole second); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid or os.getppid()}/stat", encoding="utf-8") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="utf-8") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None
