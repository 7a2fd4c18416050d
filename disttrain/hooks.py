"""Hooks: the five points where behaviour plugs into the loop, and the stock hooks built on them.

Hooks run on every rank, in registration order. A hook that calls a collective (eval, checkpoint,
agreement, metric reduction) relies on that: never put one behind a rank check. Stateful hooks
implement state_dict / load_state_dict and are saved in checkpoints under their class name.
"""

from __future__ import annotations

import sys
import time
from typing import Any

Trainer = Any  # the trainer imports hooks, not the other way round (DESIGN §2 layers)


class Hook:
    """Override any of these; each receives the trainer."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LogHook(Hook):
    """Reduces the training window (loss, throughput) every `log_every` steps and writes it."""

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % trainer.cfg.trainer.log_every == 0 or trainer.step == trainer.cfg.trainer.max_steps:
            trainer.log_train_window()


class EvalHook(Hook):
    """Evaluates every `eval_every` steps and at the end. An eval cut short by a stop request is
    redone first thing after resume, so a resumed run logs the same eval metrics."""

    def __init__(self) -> None:
        self.last_eval_step = -1

    def _due(self, trainer: Trainer) -> bool:
        every, step = trainer.cfg.trainer.eval_every, trainer.step
        return (every > 0 and step % every == 0) or step == trainer.cfg.trainer.max_steps

    def before_train(self, trainer: Trainer) -> None:
        if trainer.step > 0 and self._due(trainer) and self.last_eval_step < trainer.step:
            self._run(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if self._due(trainer) and not trainer.stopping:
            self._run(trainer)

    def _run(self, trainer: Trainer) -> None:
        if trainer.run_eval("eval") is not None:
            self.last_eval_step = trainer.step

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_eval_step = int(state["last_eval_step"])


class CheckpointHook(Hook):
    """Periodic saves (the manager decides when), and the final save."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.maybe_checkpoint()

    def after_train(self, trainer: Trainer) -> None:
        if not trainer.stopping:
            trainer.maybe_checkpoint(final=True)


class StopHook(Hook):
    """Polls the cross-rank stop agreement at every step boundary (one overlapped all-reduce); once a
    stop is agreed the trainer saves and the loop ends after this step."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.poll_stop()


class ProgressHook(Hook):
    """A tqdm bar on rank 0 when stdout is a terminal; otherwise the console writer's log lines."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self._last = 0.0

    def before_train(self, trainer: Trainer) -> None:
        if self.enabled:
            from tqdm import tqdm

            total = trainer.cfg.trainer.max_steps
            self.bar = tqdm(
                total=total, initial=trainer.step, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def after_step(self, trainer: Trainer) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.step - self.bar.n)
        now = time.monotonic()
        if trainer.last_train_metrics and now - self._last > 0.5:
            self.bar.set_postfix(postfix(trainer.last_train_metrics), refresh=False)
            self._last = now

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# What the bar shows of the train metrics, short: (metric, label, format). Absent metrics are left out.
_BAR = (
    ("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"), ("train/samples_per_sec", "sps", "{:.0f}"),
    ("train/tokens_per_sec", "tok/s", "{:.0f}"), ("train/mfu", "mfu", "{:.1%}"), ("train/grad_norm", "gnorm", "{:.3g}"),
    ("train/max_mem_mb", "mem", "{:.0f}MB"), ("train/skipped", "skipped", "{:.0f}"),
)  # fmt: skip


def postfix(metrics: dict[str, float]) -> dict[str, str]:
    return {label: fmt.format(metrics[key]) for key, label, fmt in _BAR if key in metrics}


def default_hooks(progress_bar: bool, user: list[Hook] | None = None) -> list[Hook]:
    """Order matters: log and eval see the finished step; the user's hooks come next, so that what they
    change at a step is in that step's checkpoint (a resumed run then continues them exactly); the
    checkpoint captures eval's and their state; the stop check comes last so a stop saves everything
    the step produced."""
    return [ProgressHook(progress_bar), LogHook(), EvalHook(), *(user or []), CheckpointHook(), StopHook()]
