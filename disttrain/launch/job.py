"""The job: what runs on every rank, under `python -m disttrain.main` and inside a submitit job alike.

`run_training` builds the trainer, trains, and after a stop under SLURM hands over to the requeue
protocol (disttrain.preemption). `TrainJob` is the callable submitit pickles: the resolved config with
secrets redacted, the requeue budget, nothing else. Secret values travel in the job's environment
(sbatch exports the submitting environment), so they never land in submitit's pickles or scripts.

The trainer, torch and the preemption machinery are imported only inside functions that run in the
job, so `disttrain submit --help` stays instant on a login node (DESIGN §2, §9).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from disttrain import cluster as cluster_mod
from disttrain.cluster import ClusterEnv
from disttrain.config import (
    REDACTED,
    SECRET_KEY_PATTERN,
    Config,
    ConfigError,
    check_batch_divides,
    load_config,
    to_dict,
)

SECRETS_ENV = "DISTTRAIN_SECRET_OVERRIDES"  # JSON list of `key=value` overrides, read once by the job
# How a peer's death or hang surfaces from gloo (plain RuntimeError) and NCCL (DistBackendError).
_COLLECTIVE_FAILURES = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL")


@dataclass(frozen=True)
class RunResult:
    """How a run ended on this rank; the entry point maps it to an exit code or a job result."""

    outcome: str  # finished | already_done | tested | stopped | requeued | failed | bad_input | interrupted
    step: int | None = None
    signal: str | None = None
    message: str = ""


def check_run_dir(cfg: Config, test: bool = False) -> None:
    """Refuse a run dir that cannot work, before anything is created or submitted. Raises ConfigError."""
    from disttrain import fs

    run_dir = cfg.run_dir
    if fs.exists(run_dir) and not fs.isdir(run_dir):
        raise ConfigError(f"run_dir: {run_dir!r} is a file, not a directory; choose another run_dir=PATH")
    checkpoints = fs.join(run_dir, "checkpoints")
    # Committed means a manifest was written (DESIGN section 4); a save killed half way does not count.
    steps = [n for n in fs.listdir(checkpoints) if n.startswith("step_") and ".tmp" not in n]
    committed = [n for n in steps if fs.exists(fs.join(checkpoints, n, "manifest.json"))]
    if cfg.resume == "never" and committed and not test:
        raise ConfigError(
            f"resume=never but {run_dir} already holds checkpoints ({committed[-1]}); use a new run_dir, "
            "resume=auto to continue, or delete the old checkpoints"
        )
    if cfg.resume not in ("auto", "never") and not fs.exists(cfg.resume):
        raise ConfigError(
            f"resume: checkpoint {cfg.resume!r} does not exist; give a checkpoints/step_N directory"
        )


def continue_after_restart(cfg: Config, env: ClusterEnv) -> None:
    """A restarted attempt (a SLURM requeue, a torchrun restart) continues from the run's own newest
    checkpoint, whatever `resume` said for the first attempt: `never` meant "nothing there before this
    run", and a path is where the run started from, not where it got to."""
    from disttrain import fs

    checkpoints = fs.join(cfg.run_dir, "checkpoints")
    if (
        env.restart_count > 0
        and cfg.resume != "auto"
        and any(n.startswith("step_") for n in fs.listdir(checkpoints))
    ):
        cfg.resume = "auto"


def redacted_keys(cfg: Config) -> list[str]:
    """Keys whose value is the redaction marker: a secret that did not reach this process."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif node == REDACTED:
            found.append(prefix.rstrip("."))

    walk(to_dict(cfg, redact=False), "")
    return found


def run_training(
    cfg: Config, env: ClusterEnv, test: bool = False, max_requeues: int | None = None
) -> RunResult:
    """Train (or test) to the end or to an agreed stop; under SLURM, requeue a stopped job when due.
    Must be called on all ranks. Reports problems on stderr; never raises for a training failure."""
    from disttrain import dist
    from disttrain.trainer import Trainer  # heavy (torch, accelerate): only once input is valid

    trainer, clean = None, False
    try:
        trainer = Trainer(cfg, env)
        if test:
            trainer.test()
            clean = True
            return RunResult("tested", trainer.step)
        outcome = trainer.fit()
        result = RunResult(outcome, trainer.step, (trainer.stop_signals or [None])[0])
        if outcome == "stopped" and env.launcher == "slurm":
            result = _requeue_if_due(trainer, env, max_requeues)
        clean = True
        return result
    except ConfigError as err:
        if env.rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        return RunResult("bad_input", message=str(err))
    except KeyboardInterrupt:
        print(f"disttrain: rank {env.rank}: interrupted", file=sys.stderr)
        return RunResult("interrupted", signal="SIGINT")
    except Exception as err:  # a real failure: report it and keep every committed checkpoint as it is
        return _failed(trainer, env, err)
    finally:
        if trainer is not None:
            trainer.close()  # before the process group goes: see Trainer.close
        dist.destroy(clean=clean)


def _requeue_if_due(trainer: Any, env: ClusterEnv, max_requeues: int | None) -> RunResult:
    """After the stop checkpoint is committed (fit waited for it): decide, requeue, record. All ranks."""
    from disttrain import preemption

    budget = preemption.max_requeues_from_env() if max_requeues is None else max_requeues
    decision = preemption.after_stop(trainer.stop_signals or trainer.signal.all_received, env, budget)
    fields = {"step": trainer.step, "signal": decision.signal, "reason": decision.reason}
    if trainer.signal.received_at is not None:
        fields["signal_time"] = round(trainer.signal.received_at, 3)
    if decision.requeued:
        trainer.events.emit("requeue", budget_left=decision.budget_left, **fields)
        note = f"requeued job {env.job_id} at step {trainer.step}: {decision.reason}"
    else:
        trainer.events.emit("requeue_refused", **fields)
        note = f"not requeued: {decision.reason}; submit the same command again to resume"
    if env.rank == 0:
        print(f"disttrain: {note}", file=sys.stderr, flush=True)
    outcome = "requeued" if decision.requeued else "stopped"
    return RunResult(outcome, trainer.step, decision.signal, decision.reason)


def _failed(trainer: Any, env: ClusterEnv, err: Exception) -> RunResult:
    traceback.print_exc()
    message = f"{type(err).__name__}: {err}"
    if _is_collective_failure(err):
        timeout = trainer.cfg.trainer.collective_timeout_s if trainer is not None else None
        message = (
            f"a collective failed ({message.splitlines()[0]}): another rank died or hangs "
            f"(trainer.collective_timeout_s={timeout}); see the other ranks' logs"
        )
    if trainer is not None and getattr(trainer, "events", None) is not None:
        trainer.events.emit("error", step=trainer.step, error=message)
    print(f"disttrain: rank {env.rank}: training failed: {message}", file=sys.stderr)
    return RunResult("failed", trainer.step if trainer is not None else None, message=message)


def _is_collective_failure(err: Exception) -> bool:
    import torch.distributed as tdist

    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    return any(marker in str(err) for marker in _COLLECTIVE_FAILURES)


# ------------------------------------------------------------------------------------- secrets


def split_secrets(cfg: Config) -> tuple[str, list[str]]:
    """(the resolved config as YAML with secrets redacted, the secrets as `key=value` overrides)."""
    from disttrain.config import dump_yaml

    secrets: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if SECRET_KEY_PATTERN.search(str(key)) and value not in (None, ""):
                    secrets.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML: types survive
                else:
                    walk(value, f"{prefix}{key}.")

    walk(to_dict(cfg, redact=False), "")
    return dump_yaml(cfg), secrets


@contextlib.contextmanager
def secrets_in_environment(secrets: list[str]) -> Iterator[None]:
    """Export the secret overrides for the duration of a submission: sbatch (and submitit's local
    executor) copy the submitting environment into the job, and nothing of it into job files."""
    old = os.environ.get(SECRETS_ENV)
    os.environ[SECRETS_ENV] = json.dumps(secrets)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SECRETS_ENV, None)
        else:
            os.environ[SECRETS_ENV] = old


def _take_secrets() -> list[str]:
    """The job's secret overrides; removed from os.environ so child processes do not inherit them."""
    text = os.environ.pop(SECRETS_ENV, "") or "[]"
    try:
        items = json.loads(text)
    except ValueError:
        raise ConfigError(f"{SECRETS_ENV} is not a JSON list; resubmit the job") from None
    return [str(i) for i in items]


# ------------------------------------------------------------------------------------------ job


@dataclass(frozen=True)
class TrainJob:
    """The callable submitit runs on every task: `config_yaml` is the resolved config, secrets redacted."""

    config_yaml: str
    max_requeues: int
    run_dir: str

    def __call__(self) -> dict[str, Any]:
        from disttrain.preemption import SLURM_SIGNALS, StopSignal

        # First thing: SLURM's USR2 must reach neither its default action (death) nor submitit's
        # handler (it counts a warning with timeout_min <= 10 as a timeout and gives up; NOTES §3).
        StopSignal(SLURM_SIGNALS).install()
        cfg = self.config()
        env = cluster_mod.detect()
        check_batch_divides(cfg, env.world_size)
        continue_after_restart(cfg, env)
        if env.launcher in ("slurm", "local"):
            os.environ.update(env.torch_env())  # hand SLURM's layout to torch.distributed
        return self.finish(run_training(cfg, env, max_requeues=self.max_requeues), env)

    def config(self) -> Config:
        with tempfile.TemporaryDirectory(prefix="disttrain-job-") as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(self.config_yaml)
            cfg = load_config(path, _take_secrets())
        missing = redacted_keys(cfg)
        if missing:  # e.g. a cluster whose sbatch does not export the submitting environment
            raise ConfigError(f"secret {', '.join(missing)} did not reach the job (${SECRETS_ENV}); resubmit")
        return cfg

    def finish(self, result: RunResult, env: ClusterEnv) -> dict[str, Any]:
        """Return a result for submitit to record, exit without one after a requeue, or raise."""
        if result.outcome in ("finished", "already_done"):
            return {"outcome": result.outcome, "step": result.step, "run_dir": self.run_dir}
        if result.outcome == "requeued":
            # No result file for this attempt (the next one writes it), and a clean exit on every rank:
            # SystemExit passes through submitit's handler, unlike an exception.
            raise SystemExit(0)
        raise JobError(
            f"job {env.job_id} rank {env.rank}: {result.outcome} at step {result.step}"
            + (f": {result.message}" if result.message else "")
            + f" (events: {self.run_dir}/events.jsonl)"
        )


class JobError(RuntimeError):
    """The run did not finish: failed, or stopped without a requeue. submitit records the message."""
