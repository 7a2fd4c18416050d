"""Evaluation and test of a Trainer: exact metrics over a whole split (per-batch sums added over ranks
once), the buffers the checkpoint holds on every rank, the EMA weights when asked, and a stop agreed
mid-eval. Mixed into `disttrain.trainer.Trainer`; the attributes it reads are the trainer's, declared
below for the type checker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from disttrain import dist, phases
from disttrain.config import Config
from disttrain.data import ShardedEvalBatches, collate_or_empty, dataset_size, make_loader
from disttrain.features.ema import EMAHook
from disttrain.parallel import Strategy
from disttrain.pipelines import Pipeline
from disttrain.preemption import StopAgreement
from disttrain.writers import EventLog, RunFiles, Writer


class Evaluation:
    """`evaluate`, `run_eval` and `test`. Every one of them runs on all ranks."""

    cfg: Config
    rank: int
    world: int
    step: int
    datasets: dict[str, Any]
    pipeline: Pipeline
    module: torch.nn.Module
    strategy: Strategy
    agreement: StopAgreement
    ema: EMAHook | None
    events: EventLog
    writer: Writer
    files: RunFiles
    _call: Callable[..., None]
    _pin: Callable[[], bool]
    _to_device: Callable[[Any], Any]

    def run_eval(self, split: str) -> dict[str, float] | None:
        """Evaluate a split, log `{split}/...` and call after_eval. None if a stop was agreed mid-way
        (every rank sees the same). Must be called on all ranks."""
        t0 = time.perf_counter()
        metrics = self.evaluate(split, stoppable=True)
        cut = {} if metrics is not None else {"cut": True}  # a stop was agreed mid-way
        self.events.emit(
            "eval", step=self.step, split=split, seconds=round(time.perf_counter() - t0, 4), **cut
        )
        if metrics is None:
            return None
        self.writer.log(self.step, metrics)
        self._call("after_eval", metrics)
        return metrics

    def evaluate(self, split: str, stoppable: bool = False) -> dict[str, float] | None:
        """Exact metrics over the whole split: per-batch sums, added over ranks once. Must be called on all ranks."""
        dataset = self.datasets.get(split)
        if dataset is None:
            return None
        model = self.module
        # Buffers (BatchNorm statistics) drift apart between ranks in training: DDP hands rank 0's to
        # the others only at the next forward. Evaluate what a checkpoint holds (rank 0's) everywhere.
        dist.broadcast_tensors_from_main(list(model.buffers()))
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        size = dataset_size(dataset, split)
        batches = ShardedEvalBatches(size, self.cfg.data.eval_batch_size, self.rank, self.world)
        try:
            with torch.no_grad(), self.strategy.autocast(), self._eval_weights():
                for batch in make_loader(dataset, batches, self.cfg.data.num_workers, self._pin()):
                    if stoppable and self.agreement.poll("eval") is not None:
                        return None
                    self._eval_batch(model, batch, dataset, sums)
        finally:
            model.train(was_training)
        keys = dist.broadcast_from_main(sorted(sums))
        totals = dict(zip(keys, dist.all_reduce_sum([float(sums[k]) if k in sums else 0.0 for k in keys])))
        count = totals.pop("count", None) or 1.0
        return {f"{split}/{k}": v / count for k, v in totals.items()}

    def _eval_batch(self, model: torch.nn.Module, batch: Any, dataset: Any, sums: dict[str, Any]) -> None:
        if batch is None and self.strategy.eval_needs_every_rank():
            # A sharded forward is a collective: a rank whose slice is empty still runs one, on a
            # sample it then ignores, or the others would wait for it in the all-gather.
            self.pipeline.eval_step(model, self._to_device(collate_or_empty([dataset[0]])))
            return
        if batch is not None:
            for key, value in self.pipeline.eval_step(model, self._to_device(batch)).items():
                sums[key] = sums.get(key, 0) + value.detach().double()

    def test(self) -> dict[str, float]:
        """Evaluate the loaded weights on the test split (or eval, if there is none) and write
        RUN_DIR/test_metrics.json. Must be called on all ranks."""
        phases.resume_gc()  # start-up is over
        split = "test" if "test" in self.datasets else "eval"
        metrics = self.evaluate(split) or {}
        metrics = {k.replace(f"{split}/", "test/", 1): v for k, v in metrics.items()}
        self.files.write_test_metrics({"step": self.step, "split": split, **metrics})
        return metrics

    def _eval_weights(self) -> Any:
        """The EMA weights swapped in for eval when `ema.eval` asks for them."""
        use_ema = self.ema is not None and self.cfg.ema.eval
        return self.ema.swapped_in() if use_ema else contextlib.nullcontext()  # type: ignore[union-attr]
