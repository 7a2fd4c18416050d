"""An exponential moving average of the weights (`ema.decay`), updated after every applied optimizer
step, saved in checkpoints, used for eval and `--test` with `ema.eval`, and exported with
`disttrain ckpt export --ema`.

It averages the parameters the trainer exposes (the unwrapped module's; under FSDP each rank's shard),
on their device, with one fused lerp per step. Buffers (BatchNorm statistics) are not averaged: the
EMA weights are evaluated with the model's current buffers, as timm and Composer do by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from disttrain.hooks import Hook, Loop

STATE_KEY = "EMAHook"  # where a checkpoint's state.pt keeps it: hooks are saved under their class name


class EMAHook(Hook):
    """`shadow = decay * shadow + (1 - decay) * param` after each applied step (skipped ones leave it),
    with the decay ramped linearly from 0 over `warmup_steps`."""

    def __init__(self, decay: float, warmup_steps: int = 0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []
        self.updates = 0
        self.ready = False  # the shadow holds an average (loaded, or started from the weights)

    @staticmethod
    def find(hooks: list[Hook], module: nn.Module) -> EMAHook | None:
        """The EMA among the hooks, tracking `module`'s parameters (before any resume loads its state)."""
        ema = next((h for h in hooks if isinstance(h, EMAHook)), None)
        if ema is not None:
            ema.attach(module)
        return ema

    def attach(self, module: nn.Module) -> None:
        """Track the module's parameters (called once the model is built, before any resume)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    def before_train(self, loop: Loop) -> None:
        """A run (or a resume from a checkpoint without an EMA) starts the average from its weights."""
        if not self.ready:
            with torch.no_grad():
                torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])
            self.ready = True

    def current_decay(self) -> float:
        if self.warmup_steps and self.updates < self.warmup_steps:
            return self.decay * self.updates / self.warmup_steps
        return self.decay

    def after_step(self, loop: Loop) -> None:
        if not loop.update_applied:  # a skipped step (non-finite, or fp16 overflow) moved no weight
            return
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the module's parameters for the duration (eval); the trained ones after.
        Before there is an average (a --test of a checkpoint without one) the weights stay as they are."""
        if not self.ready:
            yield
            return
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, kept)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["shadow"]
        missing = [n for n in self.names if n not in saved]
        if missing:  # a checkpoint of another model: _load_model has refused it before this runs
            raise KeyError(f"EMA state lacks {missing[0]!r}")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow):
                shadow.copy_(saved[name])
        self.updates, self.ready = int(state["updates"]), True


def ema_weights(app: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The model's tensors with the EMA in place of the parameters it averages, from a checkpoint's
    shared state (`read_checkpoint`'s first value); None if the run kept no EMA."""
    state = (app.get("hooks") or {}).get(STATE_KEY)
    if not state:
        return None
    return {**app["model"], **state["shadow"]}
