"""`disttrain submit` / `python launch/submit.py`: validate a run, submit it to SLURM through submitit,
print where to look, and return at once (or follow it with --wait).

Exit codes: 0 submitted (with --wait: the run finished), 1 the run failed or stopped (--wait) or the
submission failed, 2 bad input, refused before anything is submitted or created on disk.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from disttrain.config import REDACTED, Config, ConfigError, load_config
from disttrain.launch.options import SubmitOptions, parse
from disttrain.rundir import SLURM

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Plan:
    """A validated submission: options, the config, and where everything goes."""

    opts: SubmitOptions
    cfg: Config
    folder: str  # submitit's job files and logs
    job_name: str


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse(list(sys.argv[1:] if argv is None else argv))
        if opts.is_sweep:  # one job array, one task per combination (launch/array.py)
            from disttrain.launch import array

            sweep = array.prepare(opts)
            return array.print_dry_run(sweep) if opts.dry_run else array.submit(sweep)
        plan = prepare(opts)
    except ConfigError as err:
        print(f"disttrain submit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if plan.opts.dry_run:
        print_dry_run(plan)
        return EXIT_OK
    return submit(plan)


def prepare(opts: SubmitOptions) -> Plan:
    """Validate everything (the config, run dir, pipeline) for parsed options. Raises ConfigError."""
    cfg = load_config(opts.config, opts.overrides)
    if "://" not in cfg.run_dir:
        cfg.run_dir = os.path.abspath(cfg.run_dir)  # the job may start in another directory
    check_config(cfg, opts.world_size)
    folder = log_folder(opts, cfg.run_dir)
    name = opts.job_name or cfg.name or os.path.basename(cfg.run_dir.rstrip("/")) or "disttrain"
    return Plan(opts, cfg, folder, name)


def log_folder(opts: SubmitOptions, run_dir: str) -> str:
    """Where submitit's files go (default RUN_DIR/slurm); also checks that sbatch is there to take them."""
    folder = opts.log_dir or (os.path.join(run_dir, SLURM) if "://" not in run_dir else None)
    if folder is None:
        raise ConfigError(f"run_dir {run_dir} is remote: give --log-dir on a filesystem the nodes share")
    if opts.cluster == "slurm" and not opts.dry_run and not shutil.which("sbatch"):
        raise ConfigError("sbatch not found: submit from a SLURM login node, or use --cluster local")
    return os.path.abspath(folder)


def check_config(cfg: Config, world_size: int) -> None:
    """What the job would refuse at startup (the same preflight), refused now rather than after hours
    in a queue, or inside SLURM where nobody reads it."""
    from disttrain.launch.job import redacted_keys
    from disttrain.run import preflight

    if redacted_keys(cfg):  # e.g. --config RUN_DIR/config.yaml, whose secrets are masked
        raise ConfigError(f"{redacted_keys(cfg)[0]} is {REDACTED!r}: give the real value as an override")
    preflight(cfg, world_size)


def print_dry_run(plan: Plan) -> None:
    from disttrain.config import dump_yaml
    from disttrain.launch.executor import local_parameters, sbatch_script

    if plan.opts.cluster == "slurm":
        print("# sbatch script (submitit writes it as <job id>_submission.sh)")
        print(sbatch_script(plan.opts, plan.folder, plan.job_name))
    else:
        print(f"# submitit local executor, folder {plan.folder}: {local_parameters(plan.opts)}")
    print(f"# resolved config (secrets redacted), world size {plan.opts.world_size}")
    print(dump_yaml(plan.cfg), end="")


def submit(plan: Plan) -> int:
    from disttrain.launch.executor import make_executor
    from disttrain.launch.job import TrainJob, secrets_in_environment, split_secrets

    opts, run_dir = plan.opts, plan.cfg.run_dir
    config_yaml, secrets = split_secrets(plan.cfg)
    created = first_missing(plan.folder)
    try:
        executor = make_executor(opts, plan.folder, plan.job_name)
        # submitit echoes sbatch's stderr on failure; the error below carries it, on one line
        with secrets_in_environment(secrets), contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(TrainJob(config_yaml, opts.max_requeues, run_dir))
    except Exception as err:  # sbatch refused (bad partition, account...): say why, leave nothing behind
        return not_submitted(err, created)
    print_submitted(plan, job.job_id)
    if not opts.wait:
        return EXIT_OK
    from disttrain.launch.follow import follow_local, follow_slurm

    if opts.cluster == "local":
        return follow_local(job, run_dir)
    return follow_slurm(str(job.job_id), run_dir)


def print_submitted(plan: Plan, job_id: str) -> None:
    o = plan.opts
    ranks = (
        f"{o.gpus_per_node} GPU rank(s)" if o.gpus_per_node else f"{o.ranks_per_node} CPU rank(s) over gloo"
    )
    log = os.path.join(plan.folder, f"{job_id}_0_log")
    print(f"submitted job {job_id} ({o.cluster}): {o.nodes} node(s) x {ranks}, time {o.time}, "
          f"USR2 {o.signal_delay}s before the limit, up to {o.max_requeues} requeue(s)")  # fmt: skip
    print(f"  run dir  {plan.cfg.run_dir}")
    print(f"  logs     {log}.out  {log}.err  (rank r: {job_id}_<r>_log.*)")
    print(f"  status   disttrain status {plan.cfg.run_dir}")
    sys.stdout.flush()


def not_submitted(err: Exception, created: str | None) -> int:
    """sbatch refused: remove what this submission created, say why on one line, exit 2."""
    if created:
        shutil.rmtree(created, ignore_errors=True)
    reason = " ".join(str(err).split())[-600:]
    print(f"disttrain submit: error: the job was not submitted: {reason}", file=sys.stderr)
    return EXIT_BAD_INPUT


def first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (what a failed submit must remove)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing
