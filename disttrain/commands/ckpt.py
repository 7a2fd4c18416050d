"""`disttrain ckpt ls|verify|export RUN_DIR`: inspect, check and export a run's checkpoints.

Exit codes: 0 fine, 1 a checkpoint failed (the message names the file), 2 bad input (one line, no
traceback). Works on local run dirs and fsspec URLs (s3://bucket/prefix).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import yaml

from disttrain import fs
from disttrain.ckpt_read import CheckpointInfo
from disttrain.ckpt_write import CheckpointManager
from disttrain.config import CheckpointConfig
from disttrain.errors import CheckpointError, ConfigError
from disttrain.pipelines import pipeline_class
from disttrain.rundir import RunDir


class BadInput(Exception):
    """Maps to exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="disttrain ckpt", description="Inspect, verify and export checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("ls", help="list committed checkpoints: step, size, time, verified (sha256)")
    ls.add_argument("run_dir")
    verify = sub.add_parser("verify", help="check every file against its manifest; exit 1 on a mismatch")
    verify.add_argument("run_dir")
    verify.add_argument("--step", type=int, help="only this step (default: all committed checkpoints)")
    export = sub.add_parser("export", help="write the model weights alone as one safetensors file")
    export.add_argument("run_dir")
    export.add_argument("--step", type=int, help="which step (default: the newest that verifies)")
    export.add_argument(
        "--out", required=True, help="output path, e.g. model.safetensors (with --hf: a folder)"
    )
    export.add_argument(
        "--hf", action="store_true", help="write a folder transformers' from_pretrained loads (HF pipelines)"
    )
    export.add_argument(
        "--ema", action="store_true", help="the EMA of the weights (a run with ema.decay > 0)"
    )
    return parser


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        manager = _manager(args.run_dir)
        return {"ls": _ls, "verify": _verify, "export": _export}[args.command](manager, args)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _manager(run_dir: str) -> CheckpointManager:
    try:
        found = fs.exists(run_dir)
    except (RuntimeError, ValueError) as err:  # no filesystem for that protocol, malformed URL
        raise BadInput(f"cannot open {run_dir}: {err}") from None
    if not found:
        raise BadInput(f"run dir {run_dir} does not exist")
    return CheckpointManager(run_dir, CheckpointConfig())


def _infos(manager: CheckpointManager, step: int | None = None) -> list[CheckpointInfo]:
    infos = manager.list(full=True)
    if step is not None:
        infos = [i for i in infos if i.step == step]
        if not infos:
            raise BadInput(f"no committed checkpoint step {step} under {manager.dir}")
    return infos


def _ls(manager: CheckpointManager, args: argparse.Namespace) -> int:
    infos = _infos(manager)
    if not infos:
        print(f"no committed checkpoints under {manager.dir}")
        return 0
    print(f"{'step':>10}  {'size':>10}  {'time':<19}  {'layout':<14}  verified")
    for info in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.time)) if info.time else "?"
        status = "yes" if info.verified else f"NO: {info.problem}"
        layout = f"fsdp, {info.world_size} shards" if info.strategy == "fsdp" else "whole"
        print(f"{info.step:>10}  {fs.human_size(info.bytes):>10}  {when:<19}  {layout:<14}  {status}")
    return 0


def _verify(manager: CheckpointManager, args: argparse.Namespace) -> int:
    infos = _infos(manager, args.step)
    if not infos:
        print(f"no committed checkpoints under {manager.dir}", file=sys.stderr)
        return 1
    for info in infos:
        print(f"step {info.step}: OK" if info.verified else f"step {info.step}: FAILED: {info.problem}")
    return 0 if all(i.verified for i in infos) else 1


def _export(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if args.step is not None:
        _infos(manager, args.step)  # a step that does not exist is bad input, not a failed check
    if args.hf and args.ema:
        raise BadInput("--hf and --ema: choose one (export the EMA weights as safetensors with --ema)")
    if args.hf:
        return _export_hf(manager, args)
    if args.ema:
        step = _export_ema(manager, args.out, args.step)
    else:
        step = manager.export(args.out, args.step)
    print(f"exported the {'EMA ' if args.ema else ''}model weights of step {step} to {args.out}")
    return 0


def _export_hf(manager: CheckpointManager, args: argparse.Namespace) -> int:
    """The run's pipeline writes the folder (`Pipeline.export_pretrained`): only it knows the model's
    config and its tied weights. By default, a pipeline whose model is a transformers PreTrainedModel."""
    target, pipe_args = _run_pipeline(manager.run_dir)
    if not fs.is_local(args.out) or fs.isfile(args.out):
        raise BadInput(f"--hf --out {args.out}: give a local folder (from_pretrained reads a folder)")
    try:
        export = pipeline_class(target).export_pretrained
        step, weights = manager.read_weights(args.step)
        export(pipe_args, weights, args.out)
    except ConfigError as err:
        raise BadInput(str(err)) from None
    print(f"exported step {step} as a transformers model to {args.out} (load it with from_pretrained)")
    return 0


def _run_pipeline(run_dir: str) -> tuple[str, dict[str, Any]]:
    """The pipeline target and args of the run, from its config.yaml."""
    try:
        raw = yaml.safe_load(fs.read_text(RunDir(run_dir).config))
        pipeline = raw["pipeline"]
        return str(pipeline["target"]), dict(pipeline.get("args") or {})
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise BadInput(f"{run_dir}: no readable config.yaml with a pipeline section ({err})") from None


def _export_ema(manager: CheckpointManager, out: str, step: int | None) -> int:
    """The EMA weights (with the model's buffers) of a verified checkpoint as one safetensors file."""
    import safetensors.torch

    from disttrain.features.ema import ema_weights

    loaded = manager.read(step)  # every file verified against the manifest before it is unpickled
    weights = ema_weights(loaded.app)
    if weights is None:
        raise BadInput(f"{loaded.path} holds no EMA (the run had ema.decay=0); export without --ema")
    fs.atomic_write(out, safetensors.torch.save({k: v.contiguous() for k, v in weights.items()}))
    return loaded.step
