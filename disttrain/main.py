"""`python -m disttrain.main [--config PATH] [key=value ...]`: one process, or one of many under
torchrun or SLURM (the same module, unchanged).

Exit codes: 0 done (or nothing left to do), 1 failure (committed checkpoints stay intact),
2 bad input (one line on stderr, nothing created on disk), 143 / 130 stopped by SIGTERM-USR2 / SIGINT
after a synchronous checkpoint (so `torchrun --max-restarts` brings the job back and it resumes).
Under SLURM (srun tasks) a stopped job requeues itself when the scheduler asked for the stop (time-limit
warning, preemption) and the budget allows ($DISTTRAIN_MAX_REQUEUES, default 10); then every rank exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from disttrain import cluster as cluster_mod
from disttrain.config import Config, ConfigError, check_batch_divides, load_config
from disttrain.launch.job import check_run_dir, continue_after_restart, run_training

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_STOPPED = {"SIGINT": 130}
EXIT_STOPPED_DEFAULT = 143  # 128 + SIGTERM, what a process killed by SIGTERM would report
EXIT_CODES = {
    "finished": EXIT_OK,
    "already_done": EXIT_OK,
    "tested": EXIT_OK,
    "requeued": EXIT_OK,  # SLURM has the job again; this attempt ends cleanly on every rank
    "failed": EXIT_FAILURE,
    "bad_input": EXIT_BAD_INPUT,
    "interrupted": 130,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
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


def preflight(argv: Sequence[str] | None) -> tuple[Config, cluster_mod.ClusterEnv, bool]:
    """Everything that can be refused is refused here, before anything is created on disk."""
    args = build_parser().parse_intermixed_args(argv)  # flags may sit between overrides
    cfg = load_config(args.config, args.overrides)
    env = cluster_mod.detect()
    check_batch_divides(cfg, env.world_size)
    continue_after_restart(cfg, env)
    check_run_dir(cfg, test=args.test)
    from disttrain.pipelines import load_pipeline

    load_pipeline(cfg.pipeline)  # bad import path or pipeline.args: refused now, not after setup
    return cfg, env, args.test


def main(argv: Sequence[str] | None = None) -> int:
    launched = cluster_mod.detect()
    if launched.launcher == "slurm":
        # Before any heavy import: SLURM's USR2 (time-limit warning) would otherwise kill the task.
        from disttrain.preemption import SLURM_SIGNALS, StopSignal

        StopSignal(SLURM_SIGNALS).install()
    rank = launched.rank
    try:
        cfg, env, test = preflight(argv)
    except ConfigError as err:
        if rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging(rank)
    if env.launcher == "torchrun":
        _fresh_store_after_torchrun_restart(os.environ)
    if env.launcher == "slurm":
        os.environ.update(env.torch_env())  # srun tasks: hand SLURM's layout to torch.distributed
    return run(cfg, env, test)


def run(cfg: Config, env: cluster_mod.ClusterEnv, test: bool = False) -> int:
    """Train (or test) on this rank and map how it ended to an exit code. Must be called on all ranks."""
    from disttrain.preemption import max_requeues_from_env

    result = run_training(cfg, env, test, max_requeues=max_requeues_from_env())
    if result.outcome == "stopped":
        return EXIT_STOPPED.get(result.signal or "", EXIT_STOPPED_DEFAULT)
    return EXIT_CODES[result.outcome]


def _fresh_store_after_torchrun_restart(environ) -> None:
    """torchrun's static rendezvous hands every restart the same TCPStore, still holding the previous
    attempt's process-group keys (`default_pg/...`): a restarted rank can read a dead peer's address and
    hang or fail in gloo/NCCL setup (seen with torch 2.13 and `--max-restarts`). From the first restart on,
    rank 0 hosts a fresh store instead, on a port every rank derives from the agent's port and the count."""
    restart = int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        port = int(environ.get("MASTER_PORT") or 29500)
        environ["MASTER_PORT"] = str(15000 + (port + 7919 * restart) % 15000)  # below the ephemeral range


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


if __name__ == "__main__":
    raise SystemExit(main())
