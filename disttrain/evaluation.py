"""Evaluation and test: exact metrics over a whole split (per-batch sums added over ranks once), the
buffers the checkpoint holds on every rank, the EMA weights when asked, and a stop agreed mid-eval.
`Evaluator` is the service; `EvalHook` runs it every `eval_every` steps and at the end, and `--test`
calls it once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from disttrain import dist, phases
from disttrain import events as ev
from disttrain.data import ShardedEvalBatches, collate_or_empty, dataset_size, make_loader
from disttrain.features.ema import EMAHook
from disttrain.features.metrics import TrainLog
from disttrain.hooks import Hook, Loop
from disttrain.parallel import Strategy
from disttrain.pipelines import Pipeline
from disttrain.sections import EVAL
from disttrain.stop import Stopping
from disttrain.writers import EventLog, RunFiles


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation needs of the config."""

    batch_size: int
    num_workers: int
    use_ema: bool  # ema.eval: evaluate the EMA weights instead of the trained ones


class Evaluator:
    """`run` (eval during training), `evaluate` (metrics of a split) and `test`. Every one of them runs a
    collective: call it on all ranks."""

    def __init__(
        self,
        spec: EvalSpec,
        splits: dict[str, Any],
        pipeline: Pipeline,
        strategy: Strategy,
        stopping: Stopping,
        ema: EMAHook | None,
        events: EventLog,
        files: RunFiles,
        verdict: Callable[[], None] = lambda: None,
    ):
        self.spec, self.splits, self.pipeline, self.strategy = spec, splits, pipeline, strategy
        self.verdict = verdict  # the guard's verdict still in flight, acted on before weights are judged
        self.stopping, self.ema, self.events, self.files = stopping, ema, events, files

    def run(self, split: str, step: int) -> dict[str, float] | None:
        """Evaluate a split during training and record it; None if a stop was agreed mid-way (every
        rank sees the same). A non-finite metric is said, and recorded with the eval."""
        self.verdict()
        t0 = time.perf_counter()
        metrics = self.evaluate(split, stoppable=True)
        fields: dict[str, Any] = {"step": step, "split": split, "seconds": round(time.perf_counter() - t0, 4)}
        if metrics is None:
            fields["cut"] = True  # a stop was agreed mid-way: redone after the resume
        bad = sorted(k for k, v in (metrics or {}).items() if not math.isfinite(v))
        if bad:
            fields["nonfinite"] = bad
            self.files.warn(
                f"disttrain: warning: {', '.join(bad)} not finite at step {step} (the model's outputs on the "
                f"{split} split overflow or are NaN); early stopping does not count this eval"
            )
        self.events.emit(ev.EVAL, **fields)
        return metrics

    def evaluate(self, split: str, stoppable: bool = False) -> dict[str, float] | None:
        """Exact metrics over the whole split: per-batch sums, added over ranks once. Must be called on all ranks."""
        dataset = self.splits.get(split)
        if dataset is None:
            return None
        model = self.strategy.module
        # Buffers (BatchNorm statistics) drift apart between ranks in training: DDP hands rank 0's to
        # the others only at the next forward. Evaluate what a checkpoint holds (rank 0's) everywhere.
        dist.broadcast_tensors_from_main(list(model.buffers()))
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        size = dataset_size(dataset, split)
        batches = ShardedEvalBatches(size, self.spec.batch_size, *self.strategy.data_parallel())
        pin = self.strategy.device.type == "cuda"
        try:
            with torch.no_grad(), self.strategy.autocast(), self._weights():
                for batch in make_loader(dataset, batches, self.spec.num_workers, pin):
                    if stoppable and self.stopping.agreed_in_eval():
                        return None
                    self._batch(model, batch, dataset, sums)
        finally:
            model.train(was_training)
        keys = dist.broadcast_from_main(sorted(sums))
        totals = dict(zip(keys, dist.all_reduce_sum([float(sums[k]) if k in sums else 0.0 for k in keys])))
        count = totals.pop("count", None) or 1.0
        return {f"{split}/{k}": v / count for k, v in totals.items()}

    def _batch(self, model: torch.nn.Module, batch: Any, dataset: Any, sums: dict[str, Any]) -> None:
        if batch is None and self.strategy.eval_needs_every_rank():
            # A sharded forward is a collective: a rank whose slice is empty still runs one, on a
            # sample it then ignores, or the others would wait for it in the all-gather.
            self.pipeline.eval_step(model, self.strategy.to_device(collate_or_empty([dataset[0]])))
            return
        if batch is not None:
            for key, value in self.pipeline.eval_step(model, self.strategy.to_device(batch)).items():
                sums[key] = sums.get(key, 0) + value.detach().double()

    def test(self, step: int) -> dict[str, float]:
        """Evaluate the loaded weights on the test split (or eval, if there is none) and write
        RUN_DIR/test_metrics.json. Must be called on all ranks."""
        phases.resume_gc()  # start-up is over
        split = "test" if "test" in self.splits else "eval"
        metrics = self.evaluate(split) or {}
        metrics = {k.replace(f"{split}/", "test/", 1): v for k, v in metrics.items()}
        self.files.write_test_metrics({"step": step, "split": split, **metrics})
        return metrics

    def _weights(self) -> Any:
        """The EMA weights swapped in for eval when `ema.eval` asks for them."""
        if self.ema is not None and self.spec.use_ema:
            return self.ema.swapped_in()
        return contextlib.nullcontext()


class EvalHook(Hook):
    """Evaluates every `every` steps and at the end. An eval cut short by a stop request is redone first
    thing after resume, so a resumed run logs the same eval metrics."""

    def __init__(self, evaluator: Evaluator, log: TrainLog, every: int, max_steps: int) -> None:
        self.evaluator, self.log, self.every, self.max_steps = evaluator, log, every, max_steps
        self.last_eval_step = -1
        self.sections = log.window.sections

    def _due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.max_steps

    def before_train(self, loop: Loop) -> None:
        if loop.step > 0 and self._due(loop.step) and self.last_eval_step < loop.step:
            self._run(loop)

    def after_step(self, loop: Loop) -> None:
        if self._due(loop.step) and not loop.stopping:
            self._run(loop)

    def _run(self, loop: Loop) -> None:
        with self.sections.section(EVAL):
            metrics = self.evaluator.run("eval", loop.step)
        if metrics is not None:
            self.last_eval_step = loop.step
            self.log.write(loop.step, metrics)
            loop.eval_done(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_eval_step = int(state["last_eval_step"])
