"""In-job restarts (`disttrain submit --in-job-restarts N`): one SLURM task per node runs torch's own
elastic agent (`python -m torch.distributed.run`, c10d rendezvous), which spawns that node's ranks. A rank
that crashes makes every node's agent restart its workers inside the same allocation, up to N times,
without a trip through the queue; the restarted ranks resume from the local tier (checkpoint.local) or
the newest durable checkpoint, exactly as under `torchrun --max-restarts`.

What this task process does, and nothing more:
- starts the node's agent with the run's layout: `--nnodes` = the job's training nodes (`--nodes`; with
  `--spare-nodes K` the job holds K more, whose agents torch's rendezvous keeps waiting until a node is
  lost and the next restart admits one), `--nproc-per-node` = the
  node's ranks, the rendezvous on the job's first node at a port every node derives from the job id and
  the SLURM attempt (slurm.port_for_job), `--max-restarts N`;
- hands the workers the requeue policy (slurm.RequeuePolicy.from_env), the marker that makes a stopped
  run requeue its SLURM job (cluster.SLURM_AGENT_ENV), the secrets (secrets.SECRETS_ENV, never on a
  command line) and one intra-op thread count;
- keeps SLURM's time-limit warning (USR2) from killing the agent (torch's agent does not handle USR2:
  it is started with USR2 ignored; its ranks install their own handler), and passes every stop signal
  this task gets on to the ranks (`_pass_on` says why not to the agent);
- reads how the run ended from its events when the agent returns: finished (the job's result),
  requeued by rank 0 (exit without a result, as TrainJob does), anything else a JobError.

A run that uses up its restarts fails as before (exit 1, not requeued). Bad input fails every attempt at
once. After a non-finite stop, each restarted attempt fails at once without training
(resume.ended_for_good); after a node's ranks failed twice, the restart requeues the job without that
node (resume.failing_hosts, run.requeue_without). torch's agent itself is not told which failures to
retry: it restarts, and the restarted ranks decide.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from disttrain import events as ev
from disttrain import slurm
from disttrain.cluster import SLURM_AGENT_ENV, ClusterEnv
from disttrain.launch.options import DEFAULT_RENDEZVOUS_TIMEOUT_S
from disttrain.process import StopSignal
from disttrain.secrets import SECRETS_ENV

POLL_S = 0.2


def agent_command(
    env: ClusterEnv, ranks_per_node: int, restarts: int, config_path: str, nodes: int | None = None,
    join_timeout: int = DEFAULT_RENDEZVOUS_TIMEOUT_S,
) -> list[str]:  # fmt: skip
    """The node's `torch.distributed.run` command line (no secret on it). `nodes`: how many of the job's
    nodes train (default all); the agents of the others wait as spares (`--spare-nodes`). `join_timeout`:
    how long a rendezvous round waits for all of them (the first, and each after a restart)."""
    endpoint = f"{env.master_addr}:{slurm.port_for_job(env.job_id, env.restart_count)}"
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes or env.num_nodes),
        "--nproc-per-node", str(ranks_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "--rdzv-id", f"{env.job_id}-{env.restart_count}", "--max-restarts", str(restarts),
        # Who hosts the rendezvous store is decided here, not by matching host names (on a test cluster
        # every node is the same machine). A node that died holds its place until 3 missed heartbeats.
        "--rdzv-conf",
        f"is_host={int(env.node_rank == 0)},keep_alive_interval=2,keep_alive_max_attempt=3,join_timeout={join_timeout}",
        # torch's default monitor interval (0.1 s): a dead rank is seen sooner than at the 0.5 s used before
        "--monitor-interval", "0.1", "-m", "disttrain.main", "--config", config_path,
    ]  # fmt: skip


def agent_env(
    base: dict[str, str], policy: slurm.RequeuePolicy, secrets: list[str], ranks_per_node: int
) -> dict[str, str]:
    env = dict(base)
    env.update({slurm.MAX_REQUEUES_ENV: str(policy.max_requeues), SLURM_AGENT_ENV: "1",
                # a surviving rank-0 agent would not publish a shared store again in the next round
                # (tests/multiproc/test_two_nodes.py says what was seen)
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # fmt: skip
    if policy.exclude_slow_nodes:
        env[slurm.EXCLUDE_SLOW_ENV] = "1"
    env[slurm.LEAVE_OUT_ENV] = str(policy.leave_out_after)
    if secrets:
        env[SECRETS_ENV] = json.dumps(secrets)
    if "OMP_NUM_THREADS" not in env:  # the task's CPUs shared by its ranks, as one task per rank gets them
        cpus = int(env.get("SLURM_CPUS_PER_TASK") or 0)
        env["OMP_NUM_THREADS"] = str(max(1, cpus // max(1, ranks_per_node)))
    return env


@dataclass(frozen=True)
class AgentExit:
    code: int
    gave_up_waiting: bool  # the agent's rendezvous timed out: a node did not come (back) in time


def run_node(
    config_yaml: str, secrets: list[str], env: ClusterEnv, stop: StopSignal, *, ranks_per_node: int,
    nodes: int, restarts: int, policy: slurm.RequeuePolicy, join_timeout: int = DEFAULT_RENDEZVOUS_TIMEOUT_S,
) -> AgentExit:  # fmt: skip
    """Run this node's agent to its end. Stop signals are passed on meanwhile."""
    with tempfile.TemporaryDirectory(prefix="disttrain-agent-") as tmp:
        config_path = os.path.join(tmp, "config.yaml")  # the resolved config, secrets redacted
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(config_yaml)
        error_file = os.path.join(tmp, "agent_error.json")  # torch's agent records its own exception here
        proc = subprocess.Popen(
            agent_command(env, ranks_per_node, restarts, config_path, nodes, join_timeout),
            env={
                **agent_env(dict(os.environ), policy, secrets, ranks_per_node),
                "TORCHELASTIC_ERROR_FILE": error_file,
            },
            preexec_fn=_ignore_usr2,  # the agent must outlive the warning; its workers handle it
        )
        forwarded = 0
        while proc.poll() is None:
            time.sleep(POLL_S)
            for name in stop.received[forwarded:]:
                _pass_on(proc, name)
            forwarded = len(stop.received)
        return AgentExit(int(proc.returncode), proc.returncode != 0 and _timed_out(error_file))


def _timed_out(error_file: str) -> bool:
    """Whether the agent ended on a rendezvous timeout (not on its ranks' failure): torch's error file
    names the exception it raised."""
    try:
        with open(error_file, encoding="utf-8") as fh:
            message = json.load(fh)["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return str(text).startswith("RendezvousTimeoutError")


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _pass_on(agent: subprocess.Popen, name: str) -> None:
    """A stop signal this task got, to the node's ranks (the agent's children), never to the agent. SLURM
    signals every process of the step on the test cluster (proctrack/linuxproc), so the ranks usually
    have it already and a second one changes nothing; where only the task is signalled, this is how they
    learn of it. A SIGTERM the agent got itself makes it stop its ranks and wait for them (up to 30 s);
    a second one in that wait would cut their save short, so none is sent to it from here."""
    for pid in children(agent.pid):
        _kill(pid, getattr(signal, name))


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        os.kill(pid, sig)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not readable
        if parent == pid:
            out.append(int(entry))
    return out


def how_it_ended(run_dir: str, job_id: str) -> tuple[str, dict[str, Any] | None]:
    """("finished" | "requeued" | "other", the record that ended the run's last segment)."""
    last = ev.last_end(ev.read(run_dir))
    if last is None:
        return "other", None
    if ev.kind(last) == ev.FINISH:
        return "finished", last
    if ev.kind(last) == ev.REQUEUE and str(last.get("job_id", job_id)) == job_id:
        return "requeued", last
    return "other", last
