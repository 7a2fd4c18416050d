"""The callable submitit runs on every task of a SLURM job (or of `--cluster local`).

`TrainJob` carries the resolved config with secrets redacted, the requeue budget and the run dir,
nothing else. Secret values travel in the job's environment (sbatch exports the submitting
environment; disttrain.secrets), so they never land in submitit's pickles or scripts. The run itself
is disttrain.run's, the same as under `python -m disttrain.main`.

The trainer, torch and the run lifecycle are imported only inside the job, so `disttrain submit
--help` stays instant on a login node (DESIGN §2, §9).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disttrain import cluster as cluster_mod
from disttrain.cluster import ClusterEnv
from disttrain.config import Config, dump_yaml, load_config, to_dict
from disttrain.errors import ConfigError
from disttrain.launch.options import DEFAULT_RENDEZVOUS_TIMEOUT_S, SubmitOptions
from disttrain.secrets import SECRETS_ENV, redacted_keys, secret_overrides, take_secrets
from disttrain.slurm import DEFAULT_LEAVE_OUT_AFTER, RequeuePolicy

if TYPE_CHECKING:
    from disttrain.run import RunResult


def split_secrets(cfg: Config) -> tuple[str, list[str]]:
    """(the resolved config as YAML with secrets redacted, the secrets as `key=value` overrides): what
    travels in the job's pickle, and what travels in its environment (disttrain.secrets)."""
    return dump_yaml(cfg), secret_overrides(to_dict(cfg, redact=False))


# ------------------------------------------------------------------------------------------ job


@dataclass(frozen=True)
class TrainJob:
    """The callable submitit runs on every task: `config_yaml` is the resolved config, secrets redacted."""

    config_yaml: str
    max_requeues: int
    run_dir: str
    exclude_slow_nodes: bool = False  # --exclude-slow-nodes: a requeue leaves out the nodes that were slow
    in_job_restarts: int = 0  # > 0: this task is a node's elastic agent (launch/agent.py), not a rank
    ranks_per_node: int = 1  # the ranks that agent spawns
    nodes: int = 0  # the nodes that train (--nodes); the job's others are spares (--spare-nodes). 0: all
    rendezvous_timeout: int = DEFAULT_RENDEZVOUS_TIMEOUT_S  # the agents' wait for every node
    leave_out_after: int = DEFAULT_LEAVE_OUT_AFTER  # a node failing this many times is left out; 0: never

    @classmethod
    def of(cls, o: SubmitOptions, config_yaml: str, run_dir: str) -> TrainJob:
        """The job of one submission (or one task of a sweep), flags left unset taking their defaults."""
        return cls(
            config_yaml, o.max_requeues, run_dir, o.exclude_slow_nodes, o.in_job_restarts, o.ranks_per_node,
            o.nodes, o.rendezvous_timeout or DEFAULT_RENDEZVOUS_TIMEOUT_S,
            DEFAULT_LEAVE_OUT_AFTER if o.leave_out_after is None else o.leave_out_after,
        )  # fmt: skip

    def __call__(self) -> dict[str, Any]:
        from disttrain.process import StopSignal

        # First thing: SLURM's USR2 must reach neither its default action (death) nor submitit's
        # handler (it counts a warning with timeout_min <= 10 as a timeout and gives up; NOTES §3).
        stop = StopSignal().install()
        from disttrain import phases, run

        phases.pause_gc()  # until the first step (disttrain.phases)

        env = cluster_mod.detect()
        try:
            cfg = self.config()
        except ConfigError as err:
            return self.finish(run.RunResult(run.Outcome.BAD_INPUT, message=str(err)), env)
        policy = RequeuePolicy(self.max_requeues, self.exclude_slow_nodes, self.leave_out_after)
        if self.in_job_restarts and env.launcher == "slurm":
            return self.run_agent(cfg, env, stop, policy)
        return self.finish(run.start(cfg, env, stop, policy=policy), env)

    def run_agent(self, cfg: Config, env: ClusterEnv, stop: Any, policy: RequeuePolicy) -> dict[str, Any]:
        """This node's elastic agent, to its end; then the run's outcome as `finish` reports it."""
        from disttrain.launch import agent

        secrets = secret_overrides(to_dict(cfg, redact=False))
        done = agent.run_node(self.config_yaml, secrets, env, stop, ranks_per_node=self.ranks_per_node,
                              nodes=self.nodes or env.num_nodes, restarts=self.in_job_restarts, policy=policy,
                              join_timeout=self.rendezvous_timeout)  # fmt: skip
        code = done.code
        ended, record = agent.how_it_ended(self.run_dir, env.job_id)
        if ended == "other" and done.gave_up_waiting and env.node_rank == 0:
            return self.finish(self.without_lost_nodes(cfg, env, policy), env)
        if code != 0 and ended in ("finished", "requeued"):  # a spare's agent loses its rendezvous at the end
            print(f"disttrain: node {env.node_rank}: torchrun exited {code} after the run {ended} (an agent "
                  "still waiting as a spare loses the rendezvous when the others leave); the run's outcome "
                  "stands", file=sys.stderr, flush=True)  # fmt: skip
        if ended == "finished":
            return {"outcome": "finished", "step": record and record.get("step"), "run_dir": self.run_dir}
        if ended == "requeued":
            raise SystemExit(0)  # as after a rank's own requeue: the next attempt writes the result
        what = ev_name(record)
        raise JobError(f"job {env.job_id} node {env.node_rank}: torchrun exited {code} (up to {self.in_job_restarts} "
                       f"in-job restart(s)); the run's last end: {what} (events: {self.run_dir}/events.jsonl)")  # fmt: skip

    def without_lost_nodes(self, cfg: Config, env: ClusterEnv, policy: RequeuePolicy) -> RunResult:
        """A node was lost whole (its agent gone) and no spare took its place: the agents left waited
        `rendezvous_timeout` seconds for it in vain. The first node's task (which hosts the rendezvous)
        requeues the job without the node(s) its ranks' last failure named, within --max-requeues."""
        from disttrain import resume, run

        hosts = resume.lost_hosts(self.run_dir, env.job_id)
        nodes = ", ".join(hosts) if hosts else "a node"
        why = f"{nodes} did not come back to the rendezvous within {self.rendezvous_timeout} s (--rendezvous-timeout)"
        return run.requeue_without(cfg, env, policy, hosts, why, what="lost")

    def config(self) -> Config:
        with tempfile.TemporaryDirectory(prefix="disttrain-job-") as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(self.config_yaml)
            cfg = load_config(path, take_secrets())
        missing = redacted_keys(to_dict(cfg, redact=False))
        if missing:  # e.g. a cluster whose sbatch does not export the submitting environment
            raise ConfigError(f"secret {', '.join(missing)} did not reach the job (${SECRETS_ENV}); resubmit")
        return cfg

    def finish(self, result: RunResult, env: ClusterEnv) -> dict[str, Any]:
        """Return a result for submitit to record, exit without one after a requeue, or raise."""
        if result.outcome in ("finished", "already_done"):
            return {"outcome": result.outcome.value, "step": result.step, "run_dir": self.run_dir}
        if result.outcome == "requeued":
            # No result file for this attempt (the next one writes it), and a clean exit on every rank:
            # SystemExit passes through submitit's handler, unlike an exception.
            raise SystemExit(0)
        raise JobError(
            f"job {env.job_id} rank {env.rank}: {result.outcome.value} at step {result.step}"
            + (f": {result.message}" if result.message else "")
            + f" (events: {self.run_dir}/events.jsonl)"
        )


def ev_name(record: dict[str, Any] | None) -> str:
    if record is None:
        return "none recorded"
    return f"{record.get('event')} at step {record.get('step')}"


class JobError(RuntimeError):
    """The run did not finish: failed, or stopped without a requeue. submitit records the message."""
