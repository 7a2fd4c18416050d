"""What happens to the model around its wrapping (DDP today, FSDP soon): activation checkpointing of the
pipeline's blocks before, torch.compile after, and the one rule that keeps checkpoints portable: the
weights are always saved and loaded under the module's own names, never a compiled wrapper's
(`_orig_mod.`).

The wrapping code calls `before_wrap(model)` on the bare model and `after_wrap(wrapped)` on what it
built; the trainer keeps `uncompiled(...)` of the unwrapped model for state dicts, EMA and eval.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn

from disttrain.config import TrainerConfig
from disttrain.errors import ConfigError
from disttrain.parallel import uncompiled


def before_wrap(model: nn.Module, cfg: TrainerConfig, pipeline: Any) -> nn.Module:
    """Activation checkpointing of `pipeline.blocks(model)`, when asked for. Returns the model."""
    if cfg.activation_checkpointing:
        blocks = pipeline.blocks(uncompiled(model))
        if not blocks:
            raise ConfigError(
                f"trainer.activation_checkpointing=true but {type(pipeline).__name__}.blocks() returned no "
                "modules; return the model's repeated layers, or set trainer.activation_checkpointing=false"
            )
        for block in blocks:
            checkpoint_activations(block)
    return model


def after_wrap(wrapped: nn.Module, cfg: TrainerConfig) -> nn.Module:
    """torch.compile over the wrapped model (DDP's bucketing then splits the graph where gradients are
    reduced), when asked for. The parameters, and so the optimizer and checkpoints, are unchanged."""
    if not cfg.compile:
        return wrapped
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    compiled = torch.compile(wrapped, mode=mode, backend=cfg.compile_backend)
    return cast(nn.Module, compiled)  # an OptimizedModule, typed by torch as the callable it wraps


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute `block`'s forward in backward instead of storing its activations. The block's own
    forward is wrapped on the instance, so parameter names and the state dict do not change. Non-reentrant
    checkpointing: works with DDP, torch.compile and blocks taking keyword arguments; the RNG state is
    replayed, so dropout recomputes the same mask and results are bitwise those without it."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward
