"""What disttrain asks of SLURM and how it reads the answers: the one `scontrol` call, hostlists, the
rendezvous port of each attempt, and the requeue policy with its budget (tests/cluster/NOTES.md has
the experiments behind each rule).

Requeue: a job that exits cleanly inside its preemption grace time is COMPLETED, not requeued, so a
stopped SLURM job requeues itself. USR2 is the time-limit warning: requeue. SIGTERM is either
preemption (`scontrol show job` then shows PreemptTime) or a user's `scancel` / the time limit itself
(PreemptTime=None): only the first is requeued, so that scancel still cancels. The decision is rank 0's
(`stop.after_stop` runs it and shares it with every rank). With `--exclude-slow-nodes`, the requeued job
leaves out the nodes whose rank was slow for most of the attempt (`exclude`).

Stdlib only (submitit's hostlist parser is imported where it is used): the launcher, `disttrain
status` and a SLURM task before its heavy imports all use it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

MAX_REQUEUES_ENV = "DISTTRAIN_MAX_REQUEUES"
EXCLUDE_SLOW_ENV = (
    "DISTTRAIN_EXCLUDE_SLOW_NODES"  # srun python -m disttrain.main: "1" for --exclude-slow-nodes
)
DEFAULT_MAX_REQUEUES = 10
LEAVE_OUT_ENV = "DISTTRAIN_LEAVE_OUT_AFTER"  # in-job agents' ranks: --leave-out-after N
DEFAULT_LEAVE_OUT_AFTER = 2  # a node whose ranks failed this many times in one job is left out of it
SCONTROL_TIMEOUT_S = 30
PORT_BASE, PORT_SPAN = 15000, 15000  # rendezvous ports: 15000-29999, clear of Linux's ephemeral 32768+
PORT_STRIDE = 7919  # a prime: each attempt's port moves far from the last, and cycles through the span

# A job in one of these will not run again by itself (a requeue passes through COMPLETING, and briefly
# CANCELLED or PREEMPTED, keeping its id: a caller that waits should see a final state twice).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
JobInfo = dict[str, str]


# ---------------------------------------------------------------------------------------- scontrol


def scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `scontrol ARGS`; raises OSError (no scontrol) or TimeoutExpired (a slow controller).

    The child starts with SIGTERM blocked (a signal mask is inherited across fork and exec): right
    after `scontrol requeue` SLURM signals every process of the job's step, this call's children
    included, and an `scontrol update` that follows the requeue died with no word before it (seen on the
    loopback cluster). The call is short, and KillWait's SIGKILL still ends it. This thread's mask is
    restored at once; a SIGTERM meanwhile reaches the process's handler as usual (it only records)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def show_job(job_id: str) -> JobInfo | None:
    """`scontrol show job -o JOB` as {Key: value}. Three answers, which callers treat differently:
    the fields; {} when the controller does not know the job (never submitted, or gone since its end,
    after MinJobAge); None when it could not be asked (no scontrol or no SLURM config here, a
    controller that does not answer in time or at all)."""
    try:
        res = scontrol("show", "job", "-o", job_id)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:  # only "Invalid job id" says the controller answered and knows no such job
        return {} if "invalid job id" in (res.stderr + res.stdout).lower() else None
    return parse_scontrol(res.stdout)


def parse_scontrol(text: str) -> JobInfo:
    """`scontrol show job -o` output as {Key: value}; the first occurrence of a key wins (an array
    whose tasks are still pending is one record; one line per record)."""
    fields: JobInfo = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


# ---------------------------------------------------------------------------------------- hosts, port


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM hostlist: `gpu[01-03,07],a[1-2]b[3-4]` -> gpu01, gpu02, gpu03, gpu07, a1b3, a1b4,
    a2b3, a2b4. Uses submitit's parser (maintained, and already a dependency; imported here so this
    module stays importable without it). Like `scontrol show hostnames`, a range SLURM would not accept
    (`gpu-[a-b]`: ranges are numeric) raises ValueError."""
    from submitit.slurm.slurm import SlurmParseException, _parse_node_list

    try:
        return list(_parse_node_list(text.strip()))
    except SlurmParseException as err:
        raise ValueError(f"invalid SLURM hostlist {text!r} ({err.args[-1]})") from None


def attempt_port(base: int, attempt: int = 0) -> int:
    """The rendezvous port of an attempt, which every task of the attempt derives alike from `base` (a
    job id's digits, or the port torchrun's agent was given). Each attempt of a requeued or restarted
    job gets another: it may start on the same node while the previous attempt's rank 0 is still
    exiting and holding its store's port (EADDRINUSE, seen after a requeue)."""
    return PORT_BASE + (base + PORT_STRIDE * attempt) % PORT_SPAN


def port_for_job(job_id: str, attempt: int = 0) -> int:
    """attempt_port from a job id's digits (`4242`, `4242_3`), so that two jobs sharing a node rarely
    collide."""
    return attempt_port(int(re.sub(r"\D", "", job_id) or "0"), attempt)


# ---------------------------------------------------------------------------------------- requeue


class Attempt(Protocol):
    """What the requeue policy reads of a job (cluster.ClusterEnv has both)."""

    @property
    def job_id(self) -> str: ...

    @property
    def restart_count(self) -> int: ...


@dataclass(frozen=True)
class RequeuePolicy:
    """What a job was told about requeues: its budget, and whether to leave slow nodes out."""

    max_requeues: int = 0
    exclude_slow_nodes: bool = False
    leave_out_after: int = DEFAULT_LEAVE_OUT_AFTER  # failures of a node's ranks in a job; 0: never

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RequeuePolicy:
        """A job launched without `disttrain submit` (srun python -m disttrain.main), or the ranks an
        in-job agent spawns (launch/agent.py hands them the policy in these variables)."""
        value = (os.environ if environ is None else environ).get(LEAVE_OUT_ENV, "").strip()
        leave_out = int(value) if value.isdigit() else DEFAULT_LEAVE_OUT_AFTER
        return cls(max_requeues_from_env(environ), exclude_slow_from_env(environ), leave_out)


@dataclass(frozen=True)
class Requeue:
    """What a stopped SLURM job does next: decided by rank 0, the same on every rank."""

    requeued: bool
    reason: str  # why, in words, for events.jsonl and the log
    signal: str | None  # the stop signal, as any rank received it
    budget_left: int  # requeues still allowed after this one
    excluded: tuple[str, ...] = ()  # nodes the requeued job now avoids (--exclude-slow-nodes)


def max_requeues_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The requeue budget of a job launched without `disttrain submit` (srun python -m disttrain.main)."""
    value = (os.environ if environ is None else environ).get(MAX_REQUEUES_ENV, "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_REQUEUES


def exclude_slow_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a job launched without `disttrain submit` asked for --exclude-slow-nodes."""
    return (os.environ if environ is None else environ).get(EXCLUDE_SLOW_ENV, "") == "1"


def deciding_signal(signals: tuple[str, ...]) -> str | None:
    """One signal for the job from every rank's. SIGTERM first: if it came from a scancel, the user
    wants the job gone even if the time-limit warning came before; if from preemption, it requeues too."""
    return next((name for name in ("SIGTERM", "SIGUSR2", "SIGINT") if name in signals), None)


def decide(
    sig: str | None,
    job: Attempt,
    max_requeues: int,
    show: Callable[[str], JobInfo | None] = show_job,
) -> Requeue:
    """The requeue policy, on rank 0. `show` reads `scontrol show job` (a test passes its own)."""
    used = job.restart_count  # SLURM_RESTART_COUNT: every requeue so far, ours or SLURM's own

    def no(reason: str) -> Requeue:
        return Requeue(False, reason, sig, max(0, max_requeues - used))

    if not job.job_id:
        return no("not a SLURM job")
    if sig == "SIGUSR2":
        cause = "time limit warning (SIGUSR2)"
    elif sig == "SIGTERM":
        info = show(job.job_id) or {}  # unknown or unanswered: no PreemptTime, so never requeued
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
    return Requeue(True, cause, sig, max(0, max_requeues - used - 1))


def requeue(job_id: str, decision: Requeue) -> Requeue:
    """`scontrol requeue JOB` on rank 0. SLURM kills the job's tasks right after (KillWait later SIGKILL),
    keeps the job id, and starts it again once eligible; the tasks then resume from the checkpoint."""
    try:
        res = scontrol("requeue", job_id)
    except (OSError, subprocess.TimeoutExpired) as err:
        return _failed(decision, f"scontrol requeue failed: {err}")
    if res.returncode == 0:
        return decision
    detail = (res.stderr or res.stdout).strip()
    if "pending" in detail.lower():  # SLURM (or a previous attempt) already requeued it: that is the goal
        return Requeue(
            True, f"{decision.reason}; already requeued by SLURM", decision.signal, decision.budget_left
        )
    return _failed(decision, f"scontrol requeue failed: {detail}")


def _failed(decision: Requeue, why: str) -> Requeue:
    return Requeue(False, f"{decision.reason}; {why}", decision.signal, decision.budget_left)


def exclude(job_id: str, nodes: list[str], decision: Requeue, what: str = "slow") -> Requeue:
    """Rank 0, right after `requeue` (a pending job's ExcNodeList can be changed, a running one's not):
    add `nodes` to the job's excluded nodes, keeping those it had (--exclude). The requeue stands either
    way; the reason says when the nodes could not be left out."""
    info = show_job(job_id) or {}
    had = info.get("ExcNodeList", "(null)")
    current = [] if had in ("(null)", "") else expand_hostlist(had)
    merged = sorted({*current, *nodes})
    try:
        res = scontrol("update", f"JobId={job_id}", f"ExcNodeList={','.join(merged)}")
    except (OSError, subprocess.TimeoutExpired) as err:
        return _excluded_failed(decision, nodes, str(err), what)
    if res.returncode != 0:
        return _excluded_failed(
            decision, nodes, (res.stderr or res.stdout).strip() or f"exit {res.returncode}", what
        )
    reason = f"{decision.reason}; {what} node(s) {', '.join(nodes)} left out of the next attempt"
    return Requeue(True, reason, decision.signal, decision.budget_left, tuple(nodes))


def _excluded_failed(decision: Requeue, nodes: list[str], why: str, what: str) -> Requeue:
    reason = f"{decision.reason}; could not leave out {what} node(s) {', '.join(nodes)}: {why}"
    return Requeue(True, reason, decision.signal, decision.budget_left)
