"""One run's lifecycle, the same on every launcher (one process, torchrun, a submitit task):
preflight, build the trainer, fit or test, the outcome, the requeue decision, the exit code.

`main.py` and the submitit job (`launch/job.py`) both call `start()`; everything that can be refused
is refused in `preflight()`, before anything is created on disk. The trainer (torch, accelerate) is
imported only once the input is valid.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disttrain import events as ev
from disttrain import fs, resume, slurm
from disttrain.cluster import ClusterEnv
from disttrain.config import Config, check_batch_divides
from disttrain.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, ConfigError
from disttrain.process import StopSignal, tie_to_launcher
from disttrain.rundir import MANIFEST, RunDir, is_committed, step_name

if TYPE_CHECKING:
    from disttrain.trainer import FitResult, Trainer

_UNUSED_PARAMETERS = "Expected to have finished reduction in the prior iteration"
# Writers that need an optional package: config key -> (module, pip extra).
_WRITER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


class Outcome(str, enum.Enum):
    FINISHED = "finished"
    ALREADY_DONE = "already_done"  # max_steps was reached by an earlier segment
    TESTED = "tested"
    STOPPED = "stopped"  # a stop signal, a checkpoint committed, no requeue (torchrun restarts it)
    REQUEUED = "requeued"  # stopped, and SLURM has the job again
    FAILED = "failed"
    BAD_INPUT = "bad_input"
    INTERRUPTED = "interrupted"  # Ctrl-C twice: out at once, without a save


@dataclass(frozen=True)
class RunResult:
    """How a run ended on this rank; the entry point maps it to an exit code or a job result."""

    outcome: Outcome
    step: int | None = None
    signal: str | None = None
    message: str = ""

    def exit_code(self) -> int:
        """0 done (or nothing left to do, or requeued: SLURM has the job again), 1 failure, 2 bad input,
        143 / 130 stopped by SIGTERM-USR2 / SIGINT after a synchronous checkpoint, so that
        `torchrun --max-restarts` brings the job back and it resumes."""
        if self.outcome in (Outcome.STOPPED, Outcome.INTERRUPTED):
            return 130 if self.signal == "SIGINT" else 143  # 128 + the signal a killed process reports
        if self.outcome is Outcome.FAILED:
            return EXIT_FAILURE
        return EXIT_BAD_INPUT if self.outcome is Outcome.BAD_INPUT else EXIT_OK


# ------------------------------------------------------------------------------------ preflight


def preflight(cfg: Config, world_size: int, *, restart_count: int = 0, test: bool = False) -> None:
    """Refuse whatever can be refused before anything is created or submitted. Raises ConfigError."""
    check_batch_divides(cfg, world_size)
    if restart_count > 0:
        resume.continue_after_restart(cfg)
    check_run_dir(cfg, test=test)
    check_writers(cfg)
    from disttrain.features.extend import check_features
    from disttrain.pipelines import load_pipeline  # imports torch: only once the cheap checks passed

    pipeline = load_pipeline(cfg.pipeline)  # a bad import path or pipeline.args: refused now, not after setup
    check_features(cfg, pipeline)  # hooks that do not import, blocks the pipeline does not name


def check_run_dir(cfg: Config, test: bool = False) -> None:
    """Refuse a run dir, resume or init_from that cannot work. Raises ConfigError."""
    try:
        _check_run_dir(cfg, test)
    except (RuntimeError, ValueError) as err:  # no filesystem for the URL's protocol, a malformed URL
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"run_dir: cannot open {cfg.run_dir!r}: {err}") from None


def _check_run_dir(cfg: Config, test: bool) -> None:
    layout = RunDir(cfg.run_dir)
    if fs.exists(layout.path) and not fs.isdir(layout.path):
        raise ConfigError(f"run_dir: {layout.path!r} is a file, not a directory; choose another run_dir=PATH")
    committed = layout.committed_steps()
    if cfg.resume == "never" and committed and not test:
        raise ConfigError(
            f"resume=never but {layout.path} already holds checkpoints ({step_name(committed[0])}); use a new "
            "run_dir, resume=auto to continue, or delete the old checkpoints"
        )
    for key in ("resume", "init_from"):
        path = getattr(cfg, key)
        if path not in ("auto", "never", ""):
            check_checkpoint_path(key, path)
    if fs.is_local(layout.path):
        check_creatable(layout.path)
    resume.preflight(cfg, committed)
    if test and cfg.resume == "auto" and not committed:
        raise ConfigError(
            f"--test: {layout.path} holds no committed checkpoint to evaluate; train first, point "
            "resume=PATH at a checkpoint, or add resume=never to evaluate the untrained initialisation"
        )


def check_checkpoint_path(key: str, path: str) -> None:
    """`resume=PATH` / `init_from=PATH` must name a committed checkpoint, or a run dir that holds one."""
    if not fs.exists(path):
        raise ConfigError(f"{key}: checkpoint {path!r} does not exist; give a checkpoints/step_N directory")
    if not is_committed(path) and not RunDir(path).committed_steps():
        raise ConfigError(
            f"{key}: {path!r} is neither a checkpoint (a checkpoints/step_N directory holding {MANIFEST}) nor "
            "a run dir that holds one; give the path of one"
        )


def check_creatable(path: str) -> None:
    """A local run dir must exist as a writable directory, or be creatable. Decided without leaving
    anything behind: the nearest existing parent gets a probe directory, removed at once (permissions,
    read-only mounts and pseudo filesystems like /proc all answer to that, and to nothing cheaper)."""
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    hint = "choose another run_dir=PATH"
    if not os.path.isdir(parent):
        what = "a broken symlink" if not os.path.exists(parent) else "not a directory"
        raise ConfigError(f"run_dir: cannot create {path!r}: {parent} is {what}; {hint}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".disttrain-probe-", dir=parent))
    except OSError as err:
        raise ConfigError(f"run_dir: cannot create {path!r} in {parent}: {err.strerror}; {hint}") from None


def check_writers(cfg: Config) -> None:
    """Refuse a config whose writers are not installed (cheap: nothing is imported). Raises ConfigError."""
    for key, (module, extra) in _WRITER_PACKAGES.items():
        if getattr(cfg.log, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"log.{key}=true but {module} is not installed: pip install 'disttrain[{extra}]', "
                f"or set log.{key}=false"
            )


def apply_threads(cfg: Config, env: ClusterEnv) -> None:
    """Make the intra-op thread count an explicit part of the run (CPU float results depend on it):
    trainer.threads, else $OMP_NUM_THREADS, else SLURM's cpus-per-task (1 when SLURM was not told).
    Exported too, so DataLoader workers and accelerate see the same. Left to torch on a laptop."""
    import torch

    n = cfg.trainer.threads or _int(os.environ.get("OMP_NUM_THREADS"))
    if not n and env.launcher == "slurm":
        n = _int(os.environ.get("SLURM_CPUS_PER_TASK")) or 1
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def apply_determinism(cfg: Config) -> None:
    """trainer.deterministic: pin the GPU kernels that may differ run to run (atomics in scatter/embedding
    backward, cuBLAS split-K workspaces, cuDNN autotuning). CPU kernels here are deterministic already at
    a fixed thread count (apply_threads). Must run before the first CUDA call (the cuBLAS variable is read
    when its handle is made)."""
    if not cfg.trainer.deterministic:
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _int(text: str | None) -> int:
    return int(text) if text and text.strip().isdigit() else 0


# ---------------------------------------------------------------------------------------- run


NO_REQUEUE = slurm.RequeuePolicy()  # off SLURM, or a caller that gives no policy


def start(
    cfg: Config,
    env: ClusterEnv,
    stop: StopSignal,
    *,
    test: bool = False,
    policy: slurm.RequeuePolicy = NO_REQUEUE,
) -> RunResult:
    """Preflight, then train (or test) on this rank. Must be called on all ranks."""
    from disttrain.secrets import mask_output, secret_values

    tie_to_launcher(env)  # a torchrun worker must not outlive its agent
    mask_output(secret_values(cfg))  # before anything is printed: tracebacks can quote a credential
    env = resume.late_joiner(env, cfg.run_dir)
    try:
        preflight(cfg, env.world_size, restart_count=env.restart_count, test=test)
    except ConfigError as err:
        return _bad_input(env, err)
    restarted_agent = env.slurm_agent and env.restart_count > 0 and policy.leave_out_after > 0
    failing = resume.failing_hosts(cfg.run_dir, env.job_id, policy.leave_out_after) if restarted_agent else []
    if failing:  # every rank reads the same records: all leave alike, rank 0 requeues without the node(s)
        times = "twice" if policy.leave_out_after == 2 else f"{policy.leave_out_after} times"
        why = f"node(s) {', '.join(failing)} failed {times} in this job"
        return requeue_without(cfg, env, policy, failing, why)
    final = resume.ended_for_good(cfg.run_dir) if env.restart_count > 0 and not test else None
    if final is not None:  # a restart (torchrun, in-job, requeue) after a non-finite stop: fail again at once
        if env.rank == 0:
            print(f"disttrain: error: {final}", file=sys.stderr)
        return RunResult(Outcome.FAILED, message=final)
    _setup_logging(env.rank)
    if env.launcher == "torchrun":
        _fresh_store_after_torchrun_restart(os.environ)
    if env.launcher in ("slurm", "local"):
        os.environ.update(env.torch_env())  # hand SLURM's (or submitit's) layout to torch.distributed
    return execute(cfg, env, stop, test=test, policy=policy)


def execute(
    cfg: Config,
    env: ClusterEnv,
    stop: StopSignal,
    *,
    test: bool = False,
    policy: slurm.RequeuePolicy = NO_REQUEUE,
) -> RunResult:
    """Build the trainer, fit or test, and decide what comes next. Must be called on all ranks.
    Reports problems on stderr; never raises for a training failure."""
    from disttrain import dist, phases
    from disttrain.build import build, start_strategy
    from disttrain.features.guard import NonFiniteError
    from disttrain.lease import RunLease
    from disttrain.trainer import Trainer  # heavy (torch, accelerate): only once input is valid

    phases.CLOCK.mark(phases.IMPORTS)
    apply_threads(cfg, env)
    apply_determinism(cfg)
    trainer, clean, lease = None, False, RunLease(cfg.run_dir, env)
    try:
        strategy = start_strategy(cfg)  # the process group: every rank learns the lease's outcome over it
        lease.acquire()  # one run per run dir, before anything there is read (a second run exits 2)
        trainer = Trainer(build(cfg, env, strategy, stop=stop))
        if test:
            metrics = trainer.test()
            trainer.say(" | ".join([f"step {trainer.step}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]))
            result = RunResult(Outcome.TESTED, trainer.step)
        else:
            result = _after_fit(trainer, trainer.fit(), env, policy)
        clean = True
        return result
    except ConfigError as err:
        return _bad_input(env, err)
    except NonFiniteError as err:  # agreed on every rank at the same step: a failure, never requeued
        clean = True
        if env.rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        return RunResult(Outcome.FAILED, err.step, message=str(err))
    except KeyboardInterrupt:
        return _interrupted(trainer, env)
    except Exception as err:  # a real failure: report it and keep every committed checkpoint as it is
        return _failed(trainer, cfg, env, err)
    finally:
        phases.resume_gc()  # a run that never reached its first step (test, failure) collects again
        segment = trainer.segment if trainer is not None else None
        if trainer is not None:
            trainer.close()  # before the process group goes: see Trainer.close
        if segment is not None:  # the last record, while the lease still fences this run's writes
            segment.exit(trainer.step if trainer is not None else 0)
        lease.release()  # also when the trainer was never built (bad input found after the lease)
        dist.destroy(clean=clean)


def _after_fit(trainer: Trainer, fit: FitResult, env: ClusterEnv, policy: slurm.RequeuePolicy) -> RunResult:
    """Map fit's outcome; after an agreed stop under SLURM, requeue when due (leaving out the nodes that
    were slow for most of this attempt, when the policy says so). All ranks."""
    if fit.stop is None:
        return RunResult(Outcome(fit.outcome), fit.step, message=fit.reason)
    files, events = trainer.segment.files, trainer.segment.events
    if not env.requeues_slurm:
        files.warn(stop_note(trainer.run_dir, fit.step, fit.stop.signal, env.launcher))
        return RunResult(Outcome.STOPPED, fit.step, fit.stop.signal)
    from disttrain.stop import after_stop

    slow = trainer.log.stragglers.slow_hosts() if policy.exclude_slow_nodes else []
    decision = after_stop(fit.stop, env, policy.max_requeues, slow)
    fields: dict[str, Any] = {"step": fit.step, "signal": decision.signal, "reason": decision.reason}
    if trainer.stop.signal.first_at is not None:
        fields["signal_time"] = round(trainer.stop.signal.first_at, 3)
    if decision.requeued:
        excluded = {"excluded": list(decision.excluded)} if decision.excluded else {}
        events.emit(ev.REQUEUE, budget_left=decision.budget_left, **fields, **excluded)
        note = f"requeued job {env.job_id} at step {fit.step}: {decision.reason}"
    else:
        events.emit(ev.REQUEUE_REFUSED, **fields)
        note = f"not requeued: {decision.reason}; submit the same command again to resume"
    files.warn(f"disttrain: {note}")
    outcome = Outcome.REQUEUED if decision.requeued else Outcome.STOPPED
    return RunResult(outcome, fit.step, decision.signal, decision.reason)


def requeue_without(
    cfg: Config, env: ClusterEnv, policy: slurm.RequeuePolicy, hosts: list[str], why: str,
    what: str = "failing",
) -> RunResult:  # fmt: skip
    """The job goes back to SLURM with `hosts` excluded (merged with --exclude), within --max-requeues,
    instead of training on them again: an in-job restart whose node(s) failed twice in this job (every
    rank returns the same outcome without training: exit 0, so torch's agent stops), or a node lost whole
    (the first node's SLURM task, launch/job.py; `hosts` may then be empty: requeued without exclusion).
    Rank 0 requeues; the `requeue` event names the nodes under `{what}_nodes`."""
    from disttrain.writers import EventLog

    nodes = ", ".join(hosts)
    if env.rank != 0:
        return RunResult(Outcome.REQUEUED, message=f"node(s) {nodes} left out")
    events = EventLog(cfg.run_dir, env.job_id, env.restart_count, cfg=cfg)
    used = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    fields: dict[str, Any] = {"signal": None, f"{what}_nodes": hosts}
    if used >= policy.max_requeues:
        reason = f"{why}, and the requeue budget is spent ({used} of --max-requeues)"
        events.emit(ev.REQUEUE_REFUSED, reason=reason, **fields)
        print(f"disttrain: error: {reason}", file=sys.stderr)
        return RunResult(Outcome.FAILED, message=reason)
    decision = slurm.Requeue(True, why, None, policy.max_requeues - used - 1)
    decision = slurm.requeue(env.job_id, decision)
    if decision.requeued and hosts:
        decision = slurm.exclude(env.job_id, hosts, decision, what=what)
    kind = ev.REQUEUE if decision.requeued else ev.REQUEUE_REFUSED
    excluded = {"excluded": list(decision.excluded)} if decision.excluded else {}
    events.emit(kind, reason=decision.reason, budget_left=decision.budget_left, **fields, **excluded)
    print(f"disttrain: {'requeued' if decision.requeued else 'not requeued'} job {env.job_id}: {decision.reason}",
          file=sys.stderr)  # fmt: skip
    return RunResult(Outcome.REQUEUED if decision.requeued else Outcome.FAILED, message=decision.reason)


def stop_note(run_dir: str, step: int, signal: str | None, launcher: str) -> str:
    """The one line a stopped run leaves (off SLURM, where the requeue note says it): where it stopped,
    that its checkpoint is committed (checked, not assumed), and how it comes back."""
    step_dir = RunDir(run_dir).step_dir(step)
    code = 130 if signal == "SIGINT" else 143
    stopped = f"disttrain: stopped by {signal or 'a stop request'} at step {step}"
    if not is_committed(step_dir):
        return f"{stopped}, but no checkpoint of step {step} is committed; resuming redoes the steps since the last one"
    again = "run the same command again to resume from it"
    how = (
        f"torchrun --max-restarts restarts it and it resumes from it (or {again})"
        if launcher == "torchrun"
        else again
    )
    return f"{stopped}; checkpoint {step_dir} is committed; {how} (exit {code})"


def _bad_input(env: ClusterEnv, err: ConfigError) -> RunResult:
    if env.rank == 0:
        print(f"disttrain: error: {err}", file=sys.stderr)
    return RunResult(Outcome.BAD_INPUT, message=str(err))


def _interrupted(trainer: Trainer | None, env: ClusterEnv) -> RunResult:
    """Ctrl-C twice: out at once, without a save, but the end is recorded (status must not say running)."""
    step = trainer.step if trainer is not None else None
    if trainer is not None:
        trainer.segment.events.emit(ev.INTERRUPTED, step=step, signal="SIGINT", saved=False)
    print(f"disttrain: rank {env.rank}: interrupted (Ctrl-C twice) at step {step}, without a checkpoint",
          file=sys.stderr)  # fmt: skip
    return RunResult(Outcome.INTERRUPTED, step, signal="SIGINT")


def _failed(trainer: Trainer | None, cfg: Config, env: ClusterEnv, err: Exception) -> RunResult:
    """Report a failure in one `disttrain:` line (last, after the traceback of an error in the user's
    code; disttrain's own failures, a storage or checkpoint problem or a dead peer, need none), and
    record it."""
    from disttrain import dist
    from disttrain.errors import CheckpointError

    message = f"{type(err).__name__}: {fs.first_line(err)}"
    if _UNUSED_PARAMETERS in str(err):  # DDP's own hint names a keyword the user cannot reach here
        traceback.print_exc()
        message = f"{message} (some parameters got no gradient): set trainer.find_unused_parameters=true"
    elif dist.is_collective_failure(err):
        message = _collective_failure(trainer, cfg, message)
    elif not isinstance(err, (CheckpointError, fs.StorageError)):
        traceback.print_exc()
    elif str(err).strip() != fs.first_line(err):  # the line below quotes the first line; log the rest
        logging.getLogger(__name__).error("%s", err)
    step = trainer.step if trainer is not None else None
    if trainer is not None:
        trainer.segment.events.emit(ev.ERROR, step=step, error=message)
    print(f"disttrain: rank {env.rank}: training failed: {message}", file=sys.stderr)
    return RunResult(Outcome.FAILED, step, message=message)


def _collective_failure(trainer: Trainer | None, cfg: Config, cause: str) -> str:
    """The line for a collective that gave up: which rank did not arrive, on which host, and where it
    was (from the stack files stalled ranks write, `hangs`); rank 0 records it as a `hang` event."""
    import time

    from disttrain import dist, hangs

    timeout = cfg.trainer.collective_timeout_s
    generic = (
        f"a collective failed ({cause}): another rank died or hangs "
        f"(trainer.collective_timeout_s={timeout}); see the other ranks' logs"
    )
    if trainer is None:
        return generic
    section = trainer.log.window.sections.current
    since = time.time() - timeout - 10  # the stall that ended in this failure, not an older one
    found = hangs.culprits(cfg.run_dir, dist.world_size(), dist.rank(), since, trainer.log.stragglers.hosts)
    if not found:
        return generic
    what, waited = hangs.waiting_for(section), time.monotonic() - trainer.log.window.sections.entered
    named = "; ".join(c.describe(what, waited) for c in found)
    stacks = RunDir(cfg.run_dir).stacks
    ranks = [{"rank": c.rank, "host": c.host, "frame": c.frame, "section": c.section} for c in found]
    events = trainer.segment.events
    survivors = [r for r in range(dist.world_size()) if r not in {c.rank for c in found}]
    if not events.enabled and survivors and dist.rank() == survivors[0]:
        # rank 0 is the one that died: the lowest rank left records it (a restart counts a node's
        # failures from these records, resume.failing_hosts), since rank 0 will write nothing more
        events = events.writable_here(cfg)
    events.emit(ev.HANG, step=trainer.step, waited_in=section, ranks=ranks)
    return f"a collective failed: {named} (stacks in {stacks}; trainer.collective_timeout_s={timeout})"


def tell_torchrun(result: RunResult) -> None:
    """Hand a failed rank's one line to the torchrun agent (its per-worker error file), so the summary it
    prints after ~40 lines of its own says what went wrong instead of "To enable traceback see: ...".
    The line itself is printed before the agent's output begins."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or result.exit_code() not in (EXIT_FAILURE, EXIT_BAD_INPUT) or not result.message:
        return
    kind = "error" if result.outcome is Outcome.BAD_INPUT else "training failed"
    record = {"message": f"disttrain: {kind}: {result.message}", "timestamp": int(time.time())}
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def _fresh_store_after_torchrun_restart(environ: Any) -> None:
    """torchrun's static rendezvous hands every restart the same TCPStore, still holding the previous
    attempt's process-group keys (`default_pg/...`): a restarted rank can read a dead peer's address and
    hang or fail in gloo/NCCL setup (seen with torch 2.13 and `--max-restarts`). From the first restart on,
    rank 0 hosts a fresh store instead, on a port every rank derives from the agent's port and the count
    (the same rule as a requeued SLURM attempt's)."""
    restart = int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        port = int(environ.get("MASTER_PORT") or 29500)
        environ["MASTER_PORT"] = str(slurm.attempt_port(port, restart))


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
