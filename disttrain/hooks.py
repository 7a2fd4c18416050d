"""Hooks: the five points where behaviour plugs into the loop, and what a hook sees of the loop.

Hooks run on every rank, in registration order. A hook that calls a collective (eval, checkpoint,
agreement, metric reduction) relies on that: never put one behind a rank check. Stateful hooks
implement state_dict / load_state_dict and are saved in checkpoints under their class name.

The stock hooks live beside the service they drive and hold it (`checkpoint.CheckpointHook`,
`stop.StopHook`, `evaluation.EvalHook`, `features.metrics.LogHook`, `features.progress.ProgressHook`);
`build.py` puts them in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # importing hooks stays cheap: the stop path imports it before torch (stop.py)
    from torch import nn


class Loop(Protocol):
    """What a hook sees of the training loop: read the progress, ask for a save or an early end."""

    @property
    def step(self) -> int:
        """Optimizer steps done (after_step: including the one that just ended)."""
        ...

    @property
    def max_steps(self) -> int: ...

    @property
    def stopping(self) -> bool:
        """Whether a stop (a signal on some rank) was agreed: the loop ends after this step."""
        ...

    @property
    def update_applied(self) -> bool:
        """Whether the last step's update reached the weights (not skipped as non-finite or by fp16)."""
        ...

    @property
    def module(self) -> nn.Module:
        """The pipeline's own model (its state-dict names), under any wrapper. A shard of it under fsdp."""
        ...

    @property
    def run_dir(self) -> str: ...

    def save_checkpoint(self) -> None:
        """Save now, synchronously (a step already saved is not saved again). Must be called on all ranks."""
        ...

    def end_early(self, reason: str) -> None:
        """End the run as finished after this step. Must be called on all ranks alike."""
        ...

    def eval_done(self, metrics: dict[str, float]) -> None:
        """Hand an evaluation's metrics to every hook's after_eval."""
        ...

    def say(self, text: str) -> None:
        """A line on rank 0's stdout."""
        ...


class Hook:
    """Override any of these; each receives the loop."""

    def before_train(self, loop: Loop) -> None:
        pass

    def before_step(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def after_eval(self, loop: Loop, metrics: dict[str, float]) -> None:
        pass

    def after_train(self, loop: Loop) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
