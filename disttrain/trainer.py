"""The training loop: `fit` runs steps until max_steps or an agreed stop, `train_step` runs one
optimizer step over grad_accum micro-batches, `_optimizer_step` clips, judges and applies it, and
hooks run at five points. Everything else is a part the loop holds (`build.Parts`): the strategy
(DDP through accelerate, or FSDP2), the data, the schedule, the non-finite guard, the train log,
checkpoints, the stop path, eval.

Steps are global optimizer steps. Every public method that runs a collective says so: call it on all
ranks, never behind a rank check. Rank roles are decided by the parts (writers, run files, event log,
checkpoint manager), never here.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from disttrain import dist, phases
from disttrain.build import Parts, build, start_strategy
from disttrain.cluster import ClusterEnv
from disttrain.config import Config
from disttrain.features.guard import NonFiniteError
from disttrain.features.metrics import grad_norm
from disttrain.hooks import Hook
from disttrain.process import StopSignal
from disttrain.sections import BACKWARD, DATA, FORWARD, OPTIMIZER, OTHER
from disttrain.state import worker_seed
from disttrain.stop import StopRequest


@dataclass(frozen=True)
class FitResult:
    """How `fit()` ended, the same on every rank: what the caller needs to decide what comes next."""

    outcome: str  # finished | stopped | already_done
    step: int
    stop: StopRequest | None = None  # the agreed stop (its signals), when stopped
    reason: str = ""  # why a run finished before max_steps (early stopping)


class Trainer:
    """The loop over built parts. `fit()` trains, `test()` evaluates; hooks see it as a `hooks.Loop`."""

    def __init__(self, parts: Parts):
        self.cfg = parts.cfg
        self.strategy, self.pipeline, self.model = parts.strategy, parts.pipeline, parts.model
        self.data, self.schedule, self.progress = parts.data, parts.schedule, parts.progress
        self.guard, self.log, self.checkpointing = parts.guard, parts.log, parts.checkpointing
        self.stop, self.evaluator, self.segment = parts.stopping, parts.evaluator, parts.segment
        self.hooks = parts.hooks
        self.update_applied = True  # whether the last step's update reached the weights

    # -------------------------------------------------------------------------- the loop view

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def max_steps(self) -> int:
        return self.cfg.trainer.max_steps

    @property
    def stopping(self) -> bool:
        return self.stop.stopping

    @property
    def module(self) -> nn.Module:
        return self.strategy.module

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def save_checkpoint(self, reason: str = "manual") -> None:
        """Save now, synchronously (hooks may call this on demand). Must be called on all ranks."""
        self.checkpointing.save(reason)

    def end_early(self, reason: str) -> None:
        """End the run as finished after this step (early stopping); the reason goes into its `finish`
        event and its checkpoints, so a restarted job does nothing. Must be called on all ranks alike."""
        self.progress.ended = reason

    def eval_done(self, metrics: dict[str, float]) -> None:
        self._call("after_eval", metrics)

    def say(self, text: str) -> None:
        self.segment.say(text)

    # ---------------------------------------------------------------------------------- train

    def fit(self) -> FitResult:
        """Train to max_steps or until a stop is agreed. Must be called on all ranks."""
        progress = self.progress
        if progress.step >= self.max_steps or progress.ended:
            why = progress.ended or f"already reached step {progress.step} >= trainer.max_steps"
            self.say(f"run in {self.run_dir} {why}; nothing to do")
            return FitResult("already_done", progress.step, reason=progress.ended)
        batches = iter(self.data.loader(worker_seed(self.cfg.seed, dist.rank(), progress.step)))
        self.segment.begin(progress.step, self.checkpointing.resumed)
        self.stop.begin()  # from here a rank that reaches no step boundary in time ends itself
        self.segment.ready(progress.step)
        phases.resume_gc()
        try:
            self._call("before_train")
            while progress.step < self.max_steps and not (self.stop.stopping or progress.ended):
                self._call("before_step")
                self.train_step(batches)
                self._call("after_step")
            self.guard.flush()  # the last step's verdict, where it is read a step late (GPU, stop)
            self.stop.drain()
            self._call("after_train")
            self.checkpointing.wait()
        finally:
            self.stop.end()
            self.log.close(progress.step)
        request = self.stop.request
        if request is None:
            self.segment.finished(progress.step, progress.ended, self.guard.skipped)
            return FitResult("finished", progress.step, reason=progress.ended)
        self.segment.stopped(progress.step, request.signal)
        return FitResult("stopped", progress.step, request)

    def train_step(self, batches: Any) -> None:
        """One optimizer step over grad_accum micro-batches (gradients all-reduced on the last only).
        Each part is a section of this rank's time (`sections`: which rank is slow, and at what)."""
        if not self.module.training:  # eval restores the mode; walking every module each step costs
            self.model.train()
        accum, window = self.cfg.trainer.grad_accum, self.log.window
        at = window.sections.enter
        for micro in range(accum):
            at(DATA)
            batch = self.strategy.to_device(next(batches))
            with self.strategy.accumulate(last=micro == accum - 1):
                at(FORWARD)
                loss = self.pipeline.loss(self.model, batch)
                at(BACKWARD)  # holds the gradient all-reduce on the last micro-batch: waiting for peers
                self.strategy.backward(self.guard.fold(loss))
            window.micro_batch(loss, batch)
        at(OPTIMIZER)
        applied, norm = self._optimizer_step()
        window.step_done(applied, norm)
        self.schedule.step()
        self.progress.step += 1
        self.data.advance()
        at(OTHER)

    def _optimizer_step(self) -> tuple[bool, torch.Tensor | None]:
        """Clip (or only measure), check, step and zero, on the micro-batch that ends an optimizer step.
        Returns whether the update was applied, and the global gradient norm before clipping."""
        norm = grad_norm(self.strategy, self.cfg.trainer, self.progress.step + 1, self.guard.on)
        # The same verdict on every rank: the norm is of reduced gradients (a GPU stop-mode run reads it
        # at the next boundary instead, and this is the previous step's verdict acted on: guard.py).
        bad = self.guard.bad_step(norm, self.progress.step + 1)
        if bad:
            self.guard.act(self.progress.step + 1, *self.guard.judge())  # raises on "stop", before any update
            self.strategy.drop_step()
        else:
            self.strategy.step()
        self.update_applied = not (bad or self.strategy.step_was_skipped())
        return not bad, norm

    def test(self) -> dict[str, float]:
        """Evaluate the loaded weights on the test split (or eval). Must be called on all ranks."""
        return self.evaluator.test(self.progress.step)

    def close(self) -> None:
        """Release the model, optimizer and DDP reducer. Call before the process group is destroyed.

        DDP's reducer keeps its last gloo work objects, which hold tensors. Left to interpreter
        shutdown, freeing them needs the GIL while it is being torn down, and the process aborts
        ("terminate called without an active exception") after a run that otherwise succeeded.
        Both collections (accelerate's, then ours once the last references are gone) take milliseconds:
        the start-up's objects are frozen by then (phases.resume_gc), so no collection walks them again.
        """
        self.stop.close()
        self.strategy.close()
        # The last references to the model and optimizer (the forward wrapper, the schedule, hooks such
        # as the EMA, the services that hold the strategy): DDP's reducer goes with them.
        del self.model, self.schedule, self.hooks, self.checkpointing, self.evaluator
        gc.collect()

    def _call(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)


def build_trainer(
    cfg: Config, cluster: ClusterEnv, *, hooks: list[Hook] | None = None, stop: StopSignal | None = None
) -> Trainer:
    """A Trainer for `cfg`, without a run-dir lease (run.py takes one; tests and benchmarks that own
    their run dir need none). Must be called on all ranks."""
    return Trainer(build(cfg, cluster, start_strategy(cfg), stop=stop, hooks=hooks))


__all__ = ["FitResult", "NonFiniteError", "Trainer", "build_trainer"]
