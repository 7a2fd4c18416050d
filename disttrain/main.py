"""`python -m disttrain.main [--config PATH] [key=value ...]`: one process, or one of many under
torchrun or SLURM (the same module, unchanged).

Exit codes: 0 done (or nothing left to do), 1 failure (committed checkpoints stay intact),
2 bad input (one line on stderr, nothing created on disk), 143 / 130 stopped by SIGTERM-USR2 / SIGINT
after a synchronous checkpoint (so `torchrun --max-restarts` brings the job back and it resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from disttrain import cluster as cluster_mod
from disttrain import fs
from disttrain.config import Config, ConfigError, check_batch_divides, load_config

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_STOPPED = {"SIGINT": 130}
EXIT_STOPPED_DEFAULT = 143  # 128 + SIGTERM, what a process killed by SIGTERM would report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m disttrain.main", description="Train a YAML-configured pipeline.")
    parser.add_argument("--config", help="YAML config (default: the built-in digits example)")
    parser.add_argument(
        "--test", action="store_true", help="evaluate the checkpoint `resume` selects on the test split"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    return parser


def preflight(argv: Sequence[str] | None) -> tuple[Config, cluster_mod.ClusterEnv, bool]:
    """Everything that can be refused is refused here, before anything is created on disk."""
    args = build_parser().parse_intermixed_args(argv)  # flags may sit between overrides
    cfg = load_config(args.config, args.overrides)
    env = cluster_mod.detect()
    check_batch_divides(cfg, env.world_size)
    check_run_dir(cfg, test=args.test)
    from disttrain.pipelines import load_pipeline

    load_pipeline(cfg.pipeline)  # bad import path or pipeline.args: refused now, not after setup
    return cfg, env, args.test


def check_run_dir(cfg: Config, test: bool) -> None:
    run_dir = cfg.run_dir
    if fs.exists(run_dir) and not fs.isdir(run_dir):
        raise ConfigError(f"run_dir: {run_dir!r} is a file, not a directory; choose another run_dir=PATH")
    checkpoints = fs.join(run_dir, "checkpoints")
    committed = [n for n in fs.listdir(checkpoints) if n.startswith("step_") and ".tmp" not in n]
    if cfg.resume == "never" and committed and not test:
        raise ConfigError(
            f"resume=never but {run_dir} already holds checkpoints ({committed[-1]}); use a new run_dir, "
            "resume=auto to continue, or delete the old checkpoints"
        )
    if cfg.resume not in ("auto", "never") and not fs.exists(cfg.resume):
        raise ConfigError(f"resume: checkpoint {cfg.resume!r} does not exist; give a checkpoints/step_N directory")


def main(argv: Sequence[str] | None = None) -> int:
    rank = cluster_mod.detect().rank
    try:
        cfg, env, test = preflight(argv)
    except ConfigError as err:
        if rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging(rank)
    if env.launcher == "slurm":
        os.environ.update(env.torch_env())  # srun tasks: hand SLURM's layout to torch.distributed
    return run(cfg, env, test)


def run(cfg: Config, env: cluster_mod.ClusterEnv, test: bool = False) -> int:
    from disttrain import dist
    from disttrain.trainer import Trainer  # heavy (torch, accelerate): only once input is valid

    trainer, clean = None, False
    try:
        trainer = Trainer(cfg, env)
        if test:
            trainer.test()
            clean = True
            return EXIT_OK
        outcome = trainer.fit()
        clean = True
        if outcome == "stopped":
            return EXIT_STOPPED.get(trainer.signal.received or "", EXIT_STOPPED_DEFAULT)
        return EXIT_OK
    except ConfigError as err:
        if env.rank == 0:
            print(f"disttrain: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"disttrain: rank {env.rank}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a real failure: report it and keep every committed checkpoint as it is
        traceback.print_exc()
        if trainer is not None and getattr(trainer, "events", None) is not None:
            trainer.events.emit("error", step=trainer.step, error=f"{type(err).__name__}: {err}")
        print(f"disttrain: rank {env.rank}: training failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        dist.destroy(clean=clean)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
