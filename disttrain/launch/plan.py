"""What a submission is before it is submitted, and the checks and clean-up a single run and a sweep
share: the validated plan, where submitit's files go, the job's own preflight run on the login node,
and a refused submission that leaves nothing behind.

`submit.py` (one job) and `array.py` (a sweep's job array) both build on this; neither imports the
other's command. Stdlib + config only: `--dry-run` answers on a login node.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from disttrain.config import Config, load_config, to_dict
from disttrain.errors import EXIT_BAD_INPUT, ConfigError
from disttrain.launch.options import SubmitOptions
from disttrain.rundir import SLURM
from disttrain.secrets import REDACTED, redacted_keys


@dataclass
class Plan:
    """A validated submission: options, the config, and where everything goes."""

    opts: SubmitOptions
    cfg: Config
    folder: str  # submitit's job files and logs
    job_name: str


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
    from disttrain.run import preflight

    missing = redacted_keys(to_dict(cfg, redact=False))
    if missing:  # e.g. --config RUN_DIR/config.yaml, whose secrets are masked
        raise ConfigError(f"{missing[0]} is {REDACTED!r}: give the real value as an override")
    preflight(cfg, world_size)


def first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (what a failed submit must remove)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def not_submitted(err: Exception, created: str | None) -> int:
    """sbatch refused: remove what this submission created, say why on one line, exit 2."""
    if created:
        shutil.rmtree(created, ignore_errors=True)
    reason = " ".join(str(err).split())[-600:]
    print(f"disttrain submit: error: the job was not submitted: {reason}", file=sys.stderr)
    return EXIT_BAD_INPUT
