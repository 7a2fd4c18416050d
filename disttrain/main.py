"""`python -m disttrain.main [--config PATH] [--test] [key=value ...]`: one process, or one of many under
torchrun or SLURM (the same module, unchanged). The run's lifecycle is disttrain.run's; this module
parses, installs the stop signal, and returns the exit code (RunResult.exit_code says which).

Under SLURM (srun tasks) a stopped job requeues itself when the scheduler asked for the stop (time-limit
warning, preemption) and the budget allows ($DISTTRAIN_MAX_REQUEUES, default 10); then every rank exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# Light imports only up to the moment main() ties this process to its launcher: fsspec, yaml and
# torch come after (disttrain.run, disttrain.config), so an agent killed a fraction of a second after
# spawning its workers does not leave them training (process.tie_to_launcher).
from disttrain import cluster
from disttrain.process import StopSignal, tie_to_launcher


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        from disttrain.errors import ConfigError

        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m disttrain.main", description="Train a YAML-configured pipeline.")
    parser.add_argument("--config", help="YAML config (default: the built-in digits example)")
    parser.add_argument(
        "--test", action="store_true", help="evaluate the checkpoint `resume` selects on the test split"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # First, before any heavy import: a stop signal must only set a flag, from the first moment (SLURM's
    # USR2 would otherwise kill the task while torch is still importing). The one handler of the run.
    stop = StopSignal().install()
    env = cluster.detect()
    tie_to_launcher(env)  # a torchrun worker must not outlive its agent, nor start after it died
    from disttrain import phases, run
    from disttrain.config import load_config
    from disttrain.errors import ConfigError
    from disttrain.secrets import mask_output, secret_values, take_secrets
    from disttrain.slurm import RequeuePolicy

    phases.pause_gc()  # until the first step: start-up is the lever of goodput (disttrain.phases)
    mask_output(secret_values())  # credentials from the environment, in anything printed from now on
    try:
        args = build_parser().parse_intermixed_args(argv)  # flags may sit between overrides
        # Secrets arrive in the environment (an in-job agent's workers: launch/agent.py), never as arguments
        cfg = load_config(args.config, [*args.overrides, *take_secrets()])
    except ConfigError as err:
        if env.rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        result = run.RunResult(run.Outcome.BAD_INPUT, message=str(err))
    else:
        result = run.start(cfg, env, stop, test=args.test, policy=RequeuePolicy.from_env())
    run.tell_torchrun(result)
    return result.exit_code()


def _exit(code: int) -> None:
    """Skip the interpreter's teardown where it can only do harm; everything disttrain owns is closed,
    and every file written, by now.

    - After storage failed: s3fs would close its sessions through the stalled endpoint, a second at a
      time.
    - After a process group: its gloo threads still run (dist.destroy says why), and a teardown that
      frees C++ objects under them is the likely cause of a rank of a finished run aborting at exit
      ("terminate called without an active exception", SIGABRT: torchrun then reports the job
      FAILED; seen in 1 run in 21 under load, issue 19)."""
    import logging

    from disttrain import fs

    grouped = "disttrain.dist" in sys.modules and sys.modules["disttrain.dist"].had_process_group()
    if fs.storage_degraded() or grouped:
        logging.shutdown()  # what the interpreter's teardown would have flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
