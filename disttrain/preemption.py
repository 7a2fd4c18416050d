"""What follows an agreed stop under SLURM (the requeue), and a torchrun worker's tie to its agent. The
stop itself (signal flag, agreement, hang watch) is `stop.py`'s.

Requeue (tests/cluster/NOTES.md has the experiments behind each rule): a job that exits cleanly inside
its preemption grace time is COMPLETED, not requeued, so a stopped SLURM job requeues itself. USR2 is the
time-limit warning: requeue. SIGTERM is either preemption (`scontrol show job` then shows PreemptTime)
or a user's `scancel` / the time limit itself (PreemptTime=None): only the first is requeued, so that
scancel still cancels. Rank 0 alone runs `scontrol requeue`, once, after the checkpoint is committed.

`disttrain.dist` (torch) is imported only where a collective runs, so that a SLURM task can install
its handlers before any heavy import: USR2's default action would kill the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from disttrain.cluster import ClusterEnv, parse_scontrol

MAX_REQUEUES_ENV = "DISTTRAIN_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 10
SCONTROL_TIMEOUT_S = 30


def tie_to_launcher(cluster: ClusterEnv) -> None:
    """A torchrun worker dies with its agent. torchrun starts each worker in a session of its own, so a
    kill -9 of the agent reaches only the agent, and its orphaned ranks would go on training and
    committing checkpoints into a run dir that a relaunch then shares with them. Linux's parent-death
    signal makes the kernel SIGKILL the worker the moment the agent goes: nothing is written after
    that, and a kill -9 leaves every committed checkpoint intact (DESIGN §4). (The agent forks its
    workers from its main thread, which lives as long as the agent.)"""
    if cluster.launcher != "torchrun" or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"disttrain: warning: could not tie this rank to torchrun (prctl errno {ctypes.get_errno()})",
              file=sys.stderr)  # fmt: skip


# --------------------------------------------------------------------------------------- requeue


@dataclass(frozen=True)
class Requeue:
    """What a stopped SLURM job does next: decided by rank 0, the same on every rank."""

    requeued: bool
    reason: str  # why, in words, for events.jsonl and the log
    signal: str | None  # the stop signal, as any rank received it
    budget_left: int  # requeues still allowed after this one


def max_requeues_from_env(environ: dict[str, str] | None = None) -> int:
    """The requeue budget of a job launched without `disttrain submit` (srun python -m disttrain.main)."""
    value = (os.environ if environ is None else environ).get(MAX_REQUEUES_ENV, "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_REQUEUES


def decide(sig: str | None, cluster: ClusterEnv, max_requeues: int, show_job=None) -> Requeue:
    """The requeue policy, on rank 0. `show_job(job_id) -> {Key: value}` reads `scontrol show job`."""
    used = cluster.restart_count  # SLURM_RESTART_COUNT: every requeue so far, ours or SLURM's own
    left = max(0, max_requeues - used - 1)

    def no(reason: str) -> Requeue:
        return Requeue(False, reason, sig, max(0, max_requeues - used))

    if not cluster.job_id:
        return no("not a SLURM job")
    if sig == "SIGUSR2":
        cause = "time limit warning (SIGUSR2)"
    elif sig == "SIGTERM":
        info = (show_job or show_slurm_job)(cluster.job_id)
        preempt_time = info.get("PreemptTime", "None")
        if preempt_time in ("None", "Unknown", ""):
            state = info.get("JobState", "unknown")
            return no(
                f"stopped by scancel or the time limit (SIGTERM, JobState={state}, no PreemptTime): not requeued"
            )
        cause = f"preempted (SIGTERM, PreemptTime={preempt_time})"
    else:
        return no(f"stopped by {sig or 'a stop request'}: not a scheduler signal, not requeued")
    if used >= max_requeues:
        return no(f"{cause}, but the requeue budget is spent ({used} of --max-requeues {max_requeues} used)")
    return Requeue(True, cause, sig, left)


def requeue(job_id: str, decision: Requeue) -> Requeue:
    """`scontrol requeue JOB` on rank 0. SLURM kills the job's tasks right after (KillWait later SIGKILL),
    keeps the job id, and starts it again once eligible; the tasks then resume from the checkpoint."""
    try:
        res = _scontrol("requeue", job_id)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Requeue(
            False, f"{decision.reason}; scontrol requeue failed: {err}", decision.signal, decision.budget_left
        )
    if res.returncode == 0:
        return decision
    detail = (res.stderr or res.stdout).strip()
    if "pending" in detail.lower():  # SLURM (or a previous attempt) already requeued it: that is the goal
        return Requeue(
            True, f"{decision.reason}; already requeued by SLURM", decision.signal, decision.budget_left
        )
    return Requeue(
        False, f"{decision.reason}; scontrol requeue failed: {detail}", decision.signal, decision.budget_left
    )


def show_slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as {Key: value}; empty when scontrol fails."""
    try:
        res = _scontrol("show", "job", "-o", job_id)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if res.returncode != 0:
        return {}
    return parse_scontrol(res.stdout)


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
