"""submitit executor setup: the sbatch parameters of a submission, its script (for --dry-run), and the
submission itself.

What disttrain asks of SLURM and why:
- one task per GPU (or per CPU rank), `--ntasks-per-node`; ranks come from SLURM_PROCID & co (cluster.py);
  with `--in-job-restarts N`, one task per node instead (its CPUs: --cpus-per-task x the node's ranks),
  whose torch elastic agent spawns the node's ranks (launch/agent.py);
- `--signal=USR2@N`: the time-limit warning that lets the job save and requeue before the limit;
- `--requeue`: the job may be requeued even where the cluster's JobRequeue default says otherwise;
- with `--spare-nodes K`, K more nodes (`--nodes` N+K) whose agents wait in the rendezvous, and
  `--no-kill` for sbatch and srun: a failed node must not end the job or its step (the spare replaces it);
- `--open-mode=append` (submitit's default): every attempt of a requeued job appends to the same logs.
submitit's own signal handling is not used for training: disttrain's handlers own SIGTERM/USR2 while the
job runs, and disttrain requeues (tests/cluster/NOTES.md §3-4 say why).
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from disttrain.launch.options import SubmitOptions


def slurm_parameters(o: SubmitOptions, job_name: str) -> dict[str, Any]:
    """Keyword arguments for submitit's SlurmExecutor.update_parameters (sbatch names)."""
    agent = o.in_job_restarts > 0  # one task per node: its elastic agent spawns the node's ranks
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": o.nodes + o.spare_nodes,
        "ntasks_per_node": 1 if agent else o.ranks_per_node,
        "time": o.time_minutes,  # submitit keeps minutes for itself; the exact text goes below
        "signal_delay_s": o.signal_delay,
        "additional_parameters": {"requeue": True, "time": o.time},
    }
    if o.gpus_per_node:
        params["gpus_per_node"] = o.gpus_per_node
    optional = {
        "cpus_per_task": o.cpus_per_task * o.ranks_per_node if agent and o.cpus_per_task else o.cpus_per_task,
        "mem": o.mem,
        "partition": o.partition,
        "account": o.account,
        "qos": o.qos,
        "constraint": o.constraint,
        "exclude": o.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    srun_args = [f"--container-image={o.container_image}"] if o.container_image else []
    if agent and o.spare_nodes:
        params["additional_parameters"]["no-kill"] = True
        srun_args.append("--no-kill")
    if srun_args:
        params["srun_args"] = srun_args
    return params


def local_parameters(o: SubmitOptions) -> dict[str, Any]:
    """Keyword arguments for submitit's LocalExecutor (one machine; USR2 `signal_delay` before the end)."""
    return {
        "tasks_per_node": o.ranks_per_node,
        "gpus_per_node": o.gpus_per_node,
        "timeout_min": o.time_seconds / 60,
        "signal_delay_s": o.signal_delay,
    }


def sbatch_script(o: SubmitOptions, folder: str, job_name: str, array_size: int = 0) -> str:
    """The exact script `sbatch` would receive, without creating anything (for --dry-run). With
    `array_size`, the script of a job array of that many tasks (`#SBATCH --array=0-N%P`)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    params = slurm_parameters(o, job_name)
    if array_size > 1:  # submitit submits a single task as a plain job
        params.update(map_count=array_size, array_parallelism=o.array_parallelism or array_size)
    return _make_sbatch_string(command=command, folder=folder, **params)


def make_executor(o: SubmitOptions, folder: str, job_name: str, array_size: int = 0) -> Any:
    """A configured submitit executor. Creates `folder`. With `array_size`, for `submit_array` of that
    many tasks, at most `--array-parallelism` of them running at once (default: all)."""
    import submitit

    executor: Any
    if o.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(**local_parameters(o))
        return executor
    # max_num_timeout only matters to submitit's own USR2 handler, which disttrain replaces at once.
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=o.max_requeues)
    executor.update_parameters(**slurm_parameters(o, job_name))
    if array_size:
        executor.update_parameters(array_parallelism=o.array_parallelism or array_size)
    return executor
