"""What a checkpoint holds of a Trainer, and loading it back: `resume` and `init_from`, the state every
rank shares (`app_state`), each rank's own (`rank_state`: RNG, log window, stream position) and a
sharded model's rows (`shard_state`). Mixed into `disttrain.trainer.Trainer`; the attributes it reads
are the trainer's, declared below for the type checker.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from disttrain.checkpoint import CheckpointManager, Loaded, Shards, capture_rank_state, restore_rank_state
from disttrain.ckpt_sharded import load_model, load_optimizer, parameter_names, split_state
from disttrain.config import Config, ConfigError, resume_conflicts, resume_refusal
from disttrain.data import DataCursor, StreamBatches
from disttrain.features.guard import NonFiniteGuard, check_state
from disttrain.features.metrics import StepMetrics
from disttrain.features.model import strip_compiled_names
from disttrain.hooks import Hook
from disttrain.optim import hyperparameters, reapply_hyperparameters
from disttrain.parallel import Strategy
from disttrain.writers import RunFiles


class TrainerState:
    """Checkpoint state in and out of a Trainer. Every method that loads runs on all ranks."""

    cfg: Config
    run_dir: str
    rank: int
    ckpt: CheckpointManager
    files: RunFiles
    strategy: Strategy
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int
    cursor: DataCursor
    ended: str
    guard: NonFiniteGuard
    hooks: list[Hook]
    stream: StreamBatches | None
    metrics: StepMetrics

    def _restore(self) -> Loaded | None:
        """Load what `resume` (or, on a fresh run, `init_from`) names. Must be called on all ranks."""
        mode = self.cfg.resume
        if mode == "never":
            loaded = None
        elif mode == "auto":
            loaded = self.ckpt.load_newest(self._load_state)
        else:
            loaded = self.ckpt.read(mode)
            self._load_state(loaded)
        if loaded is None and self.cfg.init_from:
            self._init_weights(self.cfg.init_from)
        return loaded

    def _init_weights(self, source: str) -> None:
        """Start from a checkpoint's weights only: fresh optimizer, schedule and step 0 (fine-tuning)."""
        loaded = CheckpointManager(self.run_dir, self.cfg.checkpoint).read(source)
        self._load_weights(loaded)
        self.files.say(f"initialised the weights from {source} (optimizer, schedule and step start fresh)")

    def _load_weights(self, loaded: Loaded) -> None:
        if loaded.sharded or self.strategy.sharded:  # into another layout: rows by name
            _check_shapes(self.module.state_dict(), loaded.saved(None).shapes("model/"), loaded.path)
            load_model(self.module, loaded.saved(None), loaded.path)
        else:
            _load_model(self.module, loaded.app["model"], loaded.path)

    def _load_state(self, loaded: Loaded) -> None:
        """Everything a checkpoint holds into this trainer (its model, optimizer, cursor, RNG)."""
        _check_compatible(self.cfg, loaded)
        app = loaded.app
        self._load_weights(loaded)
        configured = hyperparameters(self.optimizer)  # what the config asks for now
        if loaded.sharded or self.strategy.sharded:
            load_optimizer(
                self.optimizer, self.module, loaded.saved(parameter_names(self.module, self.optimizer))
            )
        else:
            self.optimizer.load_state_dict(app["optimizer"])
        self.scheduler.load_state_dict(app["scheduler"])
        reapply_hyperparameters(self.optimizer, self.scheduler, configured)
        if app.get("scaler") is not None and self.strategy.scaler is not None:
            self.strategy.scaler.load_state_dict(app["scaler"])
        state = app["trainer"]
        self.step = int(state["step"])
        self.cursor = DataCursor.from_state(state["cursor"])
        self.ended = str(state.get("ended", ""))
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        for hook in self.hooks:
            if type(hook).__name__ in app.get("hooks", {}):
                hook.load_state_dict(app["hooks"][type(hook).__name__])
        if self.stream is not None:  # a stream's position is per rank: only the same world size resumes it
            self.stream.restore(loaded.rank_state, int(loaded.manifest["world_size"]))
        if loaded.rank_state is not None:  # same world size: continue this rank's exact random streams
            restore_rank_state(loaded.rank_state["rng"])
            if "metrics" in loaded.rank_state:  # the log window in progress (a new one on older checkpoints)
                self.metrics.load_state_dict(loaded.rank_state["metrics"])
        else:  # new world size: no per-rank stream to continue; derive a fresh one from the step
            seed_all(self.cfg.seed * 1000 + 1 + self.rank + 7919 * self.step)

    def app_state(self) -> dict[str, Any]:
        """Everything shared by all ranks that a checkpoint holds (sharded: the part that is not sharded;
        `shard_state` has the rest)."""
        scaler = self.strategy.scaler
        if self.strategy.sharded:
            model_optim = split_state(self.module, self.optimizer)[2]
        else:
            model_optim = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            **model_optim,
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "trainer": {
                "step": self.step,
                "cursor": self.cursor.state_dict(),
                "samples_seen": self.step * self.cfg.data.batch_size,
                "guard": self.guard.state_dict(),
                "ended": self.ended,
            },
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if h.state_dict()},
        }

    def shard_state(self) -> Shards | None:
        """This rank's rows of the sharded tensors and their layout (None when nothing is sharded)."""
        if not self.strategy.sharded:
            return None
        rows, layout, _ = split_state(self.module, self.optimizer)
        return rows, layout

    def rank_state(self) -> dict[str, Any]:
        state = {"rng": capture_rank_state(), "metrics": self.metrics.state_dict()}
        return state if self.stream is None else {**state, "stream": self.stream.position}

    def checked_state(self) -> dict[str, Any]:
        """`app_state()` of weights that are all finite; raises NonFiniteError (on every rank) instead of
        letting a save publish them. Must be called on all ranks."""
        check_state(self, self.module)
        return self.app_state()


def _check_compatible(cfg: Config, loaded: Loaded) -> None:
    """Refuse a checkpoint whose run differs in a key that makes its state meaningless here."""
    changed = resume_conflicts(dict(loaded.manifest.get("fingerprint") or {}), cfg)
    if changed:
        raise ConfigError(resume_refusal(loaded.path, changed))


def _load_model(module: torch.nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing (as bad input, one line) a checkpoint whose tensors do not fit the model."""
    saved = strip_compiled_names(saved)
    _check_shapes(module.state_dict(), {k: tuple(v.shape) for k, v in saved.items()}, source)
    module.load_state_dict(saved)


def _check_shapes(current: dict[str, torch.Tensor], saved: dict[str, tuple[int, ...]], source: str) -> None:
    hint = "restore the config or code the checkpoint was made with, or start a new run_dir"
    for name, tensor in current.items():
        if name not in saved:
            raise ConfigError(f"the checkpoint {source} has no tensor {name!r} that the model has; {hint}")
        if tuple(saved[name]) != tuple(tensor.shape):
            raise ConfigError(
                f"the checkpoint {source} does not fit the model: {name} is {tuple(saved[name])} there "
                f"but {tuple(tensor.shape)} now; {hint}"
            )
    extra = sorted(set(saved) - set(current))
    if extra:
        raise ConfigError(f"the checkpoint {source} has a tensor {extra[0]!r} the model lacks; {hint}")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
