"""The training loop: the model distributed by a Strategy (`parallel`: DDP through accelerate, or FSDP2),
mixed precision, gradient accumulation, clipping, the non-finite guard, hooks, stops agreed across ranks.
What a checkpoint holds and how it loads back is `trainer_state`; eval and test are `evaluation`.

Steps are global optimizer steps. Every public method that runs a collective says so: call it on all
ranks, never behind a rank check. Rank roles are decided by the objects the trainer holds (writers,
run files, event log, checkpoint manager), never here.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device

from disttrain import __version__, dist, phases
from disttrain.checkpoint import (
    CheckpointManager,
    Loaded,
    SaveResult,
)
from disttrain.cluster import ClusterEnv
from disttrain.config import (
    Config,
    ConfigError,
    config_hash,
    resume_fingerprint,
)
from disttrain.data import (
    DataCursor,
    ResumableBatchSampler,
    StreamBatches,
    advance,
    check_train_split,
    dataset_size,
    make_loader,
)
from disttrain.evaluation import Evaluation
from disttrain.features.ema import EMAHook
from disttrain.features.extend import config_hooks, feature_hooks
from disttrain.features.guard import NonFiniteGuard, report
from disttrain.features.metrics import StepMetrics, grad_norm
from disttrain.features.model import after_wrap, before_wrap, uncompiled
from disttrain.hooks import Hook, default_hooks
from disttrain.lease import RunLease
from disttrain.optim import build_optimizer, build_scheduler
from disttrain.parallel import build_strategy
from disttrain.pipelines import load_pipeline
from disttrain.preemption import StopAgreement, StopRequest, StopSignal
from disttrain.stream import as_stream
from disttrain.trainer_state import TrainerState, seed_all
from disttrain.writers import EventLog, NullWriter, Writer, build_run_files, build_writer


@dataclass(frozen=True)
class FitResult:
    """How `fit()` ended, the same on every rank: what the caller needs to decide what comes next."""

    outcome: str  # finished | stopped | already_done
    step: int
    stop: StopRequest | None = None  # the agreed stop (its signals), when stopped
    reason: str = ""  # why a run finished before max_steps (early stopping)


class Trainer(TrainerState, Evaluation):
    """Builds everything a run needs from a validated Config; `fit()` trains, `test()` evaluates.

    Construction must happen on all ranks (it initialises the process group and may load a checkpoint).
    `stop` is the entry point's StopSignal; a Trainer built without one installs its own during fit().
    """

    def __init__(
        self,
        cfg: Config,
        cluster: ClusterEnv,
        hooks: list[Hook] | None = None,
        stop: StopSignal | None = None,
        lease: RunLease | None = None,
    ):
        self.cfg, self.cluster, self.run_dir = cfg, cluster, cfg.run_dir
        phases.CLOCK.begin_segment()
        self.strategy = build_strategy(cfg)  # initialises the process group
        phases.CLOCK.mark(phases.PROCESS_GROUP)
        self.device = self.strategy.device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.pipeline = load_pipeline(cfg.pipeline)
        self.datasets = self.pipeline.datasets()
        if "train" not in self.datasets:
            raise ConfigError(f"{cfg.pipeline.target}.datasets() returned no 'train' split; add one")
        self.stream, self.train_size = _train_stream(cfg, self.datasets, self.rank, self.world), 0
        if self.stream is None:  # a map-style train split
            self.train_size = dataset_size(self.datasets["train"], "train")
            check_train_split(self.train_size, cfg.data.batch_size)  # before anything is built
        if cfg.early_stop.metric and "eval" not in self.datasets:
            raise ConfigError(
                f"early_stop.metric is set but {cfg.pipeline.target} has no 'eval' split to watch"
            )
        seed_all(cfg.seed)  # same on every rank: every rank builds identical initial weights
        model = before_wrap(self.pipeline.build_model(), cfg.trainer, self.pipeline)
        on_cuda = self.device.type == "cuda"
        units = self.pipeline.shard_units(model) if cfg.trainer.strategy == "fsdp" else []
        self.strategy.setup(model, lambda m: build_optimizer(cfg.optim, m, on_cuda, self.pipeline), units)
        # Forward on the wrapped model (and any compile wrapper around it); state dicts, EMA and eval use
        # the pipeline's own module, under its own names.
        self.model = after_wrap(self.strategy.model, cfg.trainer)
        self.module = uncompiled(self.strategy.module)
        self.optimizer = self.strategy.optimizer
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, cfg.trainer.max_steps)
        seed_all(cfg.seed * 1000 + 1 + self.rank)  # per-rank stream for dropout & co
        self.step, self.cursor = 0, DataCursor()
        self._bar = _use_bar(cfg) and dist.is_main()
        self.hooks = feature_hooks(cfg) + default_hooks(self._bar, config_hooks(cfg) + list(hooks or []))
        self.ema = EMAHook.find(self.hooks, self.module)
        self.signal = stop or StopSignal()
        hang_after = cfg.trainer.collective_timeout_s if self.world > 1 else None
        self.agreement = StopAgreement(self.signal, hang_after=hang_after, on_hang=self._record_hang)
        self.guard = NonFiniteGuard(
            cfg.trainer, self.device, self.strategy.scaler is not None, self.agreement
        )
        self.stop_request: StopRequest | None = None
        self.ended = ""  # why the run ended before max_steps (a hook's end_early); kept in checkpoints
        self.update_applied = True  # whether the last step's update reached the weights
        self.began = False  # whether this segment began training (recorded its start), for its end event
        self.last_train_metrics: dict[str, float] = {}
        self.metrics = StepMetrics(cfg, self.device, self.pipeline)
        self.files = build_run_files(self.run_dir)
        self.events = EventLog(self.run_dir, cluster.job_id, cluster.restart_count, cfg=cfg)
        self.writer: Writer = NullWriter()
        self.ckpt = CheckpointManager(
            self.run_dir,
            cfg.checkpoint,
            config_hash=config_hash(cfg),
            fingerprint=resume_fingerprint(cfg),
            versions={"disttrain": __version__, "torch": torch.__version__},
        )
        self.lease = lease or RunLease(self.run_dir, cluster)
        self.lease.acquire()  # one run per run dir, before anything there is read (a second run exits 2)
        phases.CLOCK.mark(phases.BUILD)
        self.resumed: Loaded | None = self._restore()
        phases.CLOCK.mark(phases.CHECKPOINT)

    @property
    def stopping(self) -> bool:
        return self.stop_request is not None

    # ------------------------------------------------------------------------------------- train

    def fit(self) -> FitResult:
        """Train to max_steps or until a stop is agreed. Must be called on all ranks."""
        if self.step >= self.cfg.trainer.max_steps or self.ended:
            why = self.ended or f"already reached step {self.step} >= trainer.max_steps"
            self.files.say(f"run in {self.run_dir} {why}; nothing to do")
            return FitResult("already_done", self.step, reason=self.ended)
        if self.stream is not None:
            self.stream.check()  # positions restored for this world size, before anything is written
        own_handlers = not self.signal.installed
        if own_handlers:
            self.signal.install()
        self._start_segment()
        self.agreement.arm()  # from here a rank that reaches no step boundary in time ends itself
        train_iter = iter(self._train_loader())
        self.events.emit("ready", step=self.step, **phases.CLOCK.ready_fields())  # start-up ends here
        phases.resume_gc()
        try:
            self._call("before_train")
            while self.step < self.cfg.trainer.max_steps and not (self.stopping or self.ended):
                self._call("before_step")
                self.train_step(train_iter)
                self._call("after_step")
            self.agreement.drain()
            self._call("after_train")
            self.ckpt.wait()
        finally:
            if own_handlers:
                self.signal.uninstall()
            self.writer.close()
        if self.stop_request is None:
            self.events.emit("finish", step=self.step, **({"reason": self.ended} if self.ended else {}))
            if self.ended:
                self.files.say(f"finished at step {self.step}: {self.ended}")
            return FitResult("finished", self.step, reason=self.ended)
        self.events.emit("stopped", step=self.step, signal=self.stop_request.signal)
        return FitResult("stopped", self.step, self.stop_request)

    def train_step(self, batches: Any) -> None:
        """One optimizer step over grad_accum micro-batches (gradients all-reduced on the last only)."""
        if not self.module.training:  # eval restores the mode; walking every module each step costs
            self.model.train()
        accum = self.cfg.trainer.grad_accum
        for micro in range(accum):
            batch = self._to_device(next(batches))
            with self.strategy.accumulate(last=micro == accum - 1):
                loss = self.pipeline.loss(self.model, batch)
                self.strategy.backward(self.guard.fold(loss))
            self.metrics.micro_batch(loss, batch)
        applied, norm = self._optimizer_step()
        self.metrics.step_done(applied, norm)
        self.scheduler.step()
        self.step += 1
        if self.stream is None:  # a stream's position moves as its batches are taken
            self.cursor = advance(self.cursor, self.cfg.data.batch_size, self.train_size)
        self.ckpt.check()

    def _optimizer_step(self) -> tuple[bool, torch.Tensor | None]:
        """Clip (or only measure), check, step and zero, on the micro-batch that ends an optimizer step.
        Returns whether the update was applied, and the global gradient norm before clipping."""
        norm = grad_norm(self)
        bad = self.guard.bad_step(norm)  # the same verdict on every rank: the norm is of reduced gradients
        if bad:
            report(self, self.step + 1, *self.guard.judge())  # raises on "stop", before any update
            self.strategy.drop_step()
        else:
            self.strategy.step()
        self.update_applied = not (bad or self.strategy.step_was_skipped())
        return not bad, norm

    def log_train_window(self) -> None:
        """Reduce the window's metrics over ranks and write them. Must be called on all ranks."""
        window = self.metrics.reduce(self.world)
        lr = float(self.scheduler.get_last_lr()[0]) if self.step else self.cfg.optim.lr
        head = {k: window.pop(k) for k in ("train/loss",) if k in window}
        self.last_train_metrics = {
            **head, "train/lr": lr, "train/samples_per_sec": window.pop("train/samples_per_sec"),
            "train/epoch": self._epoch(), **window,
        }  # fmt: skip
        if self.guard.mode == "skip":
            self.last_train_metrics["train/skipped"] = float(self.guard.skipped)
        self.writer.log(self.step, self.last_train_metrics)

    def poll_stop(self) -> bool:
        """Step boundary: read the agreement; once a stop is agreed, save synchronously and leave the
        loop after this step. Must be called on all ranks, at every step boundary."""
        request = None
        if self.stop_request is None and (request := self.agreement.poll()) is not None:
            self.stop_request = request
            received = {} if self.signal.first_at is None else {"received": round(self.signal.first_at, 3)}
            self.events.emit(
                "signal", step=self.step, signal=request.signal, signals=list(request.signals), **received
            )
        if (late := self.guard.late_verdict()) is not None:  # fp16: a loss some rank saw, agreed now
            report(self, self.step, *late)  # before the save: a run stopped for it saves nothing
        if request is not None:
            self.save_checkpoint(reason="stop")
        return self.stopping

    def end_early(self, reason: str) -> None:
        """End the run as finished after this step (early stopping); the reason goes into its `finish`
        event and its checkpoints, so a restarted job does nothing. Must be called on all ranks alike."""
        self.ended = reason

    # -------------------------------------------------------------------------------- checkpoints

    def maybe_checkpoint(self, final: bool = False) -> None:
        """Let the manager decide whether this step saves. Must be called on all ranks."""
        saved = self.ckpt.maybe_save(
            self.step, self.checked_state, self.rank_state, final=final, shards=self.shard_state
        )
        self._saved(saved)

    def save_checkpoint(self, reason: str = "manual") -> None:
        """Save now, synchronously (hooks may call this on demand); a step already saved is not saved
        again. Must be called on all ranks."""
        if self.ckpt.last_step == self.step:
            self.ckpt.wait()
            return
        result = self.ckpt.save(
            self.step,
            self.checked_state(),
            self.rank_state(),
            sync=True,
            reason=reason,
            shards=self.shard_state(),
        )
        self._saved(result)

    def _saved(self, result: SaveResult | None) -> None:
        if result is not None:
            self.events.emit("checkpoint", **result.fields())

    def close(self) -> None:
        """Release the model, optimizer and DDP reducer. Call before the process group is destroyed.

        DDP's reducer keeps its last gloo work objects, which hold tensors. Left to interpreter
        shutdown, freeing them needs the GIL while it is being torn down, and the process aborts
        ("terminate called without an active exception") after a run that otherwise succeeded.
        Both collections (accelerate's, then ours once the last references are gone) take milliseconds:
        the start-up's objects are frozen by then (phases.resume_gc), so no collection walks them again.
        """
        self.agreement.close()
        self.strategy.close()
        del self.model, self.optimizer, self.scheduler
        gc.collect()
        self.lease.release()

    # ---------------------------------------------------------------------------------- helpers

    def _start_segment(self) -> None:
        """Create the run dir, write config.yaml, open the writers and record the start (and resume)."""
        self.files.create()
        changed = self.files.write_config(self.cfg)
        if self.resumed is None:
            changed = []  # a config.yaml without a checkpoint is from a run that never committed one
        dist.barrier()  # nobody writes into run_dir before it exists
        self.writer = build_writer(self.cfg, self.run_dir, resumed_step=self.step, use_tqdm=self._bar)
        self.events.emit("start", step=self.step, world_size=self.world, max_steps=self.cfg.trainer.max_steps)
        self.began = True
        if changed:
            self.files.say(
                f"note: config changed since the checkpoint, applied from step {self.step}: {'; '.join(changed)}"
            )
            self.events.emit("config_changed", step=self.step, changes=changed)
        if self.resumed is not None:
            self._note_threads(self.resumed.manifest.get("num_threads"))
            # interrupted_at: the last step logged before the interruption, so `disttrain status` and the
            # curves can say exactly how many steps a kill -9 cost.
            self.events.emit(
                "resume",
                step=self.step,
                cause=_resume_cause(self.cluster),
                interrupted_at=self.writer.logged_through,
            )
            self.files.say(f"resumed from step {self.step}")

    def _record_hang(self, why: str) -> None:
        self.events.emit("error", step=self.step, error=why)

    def _note_threads(self, saved: Any) -> None:
        now = torch.get_num_threads()
        if isinstance(saved, int) and saved != now:
            self.files.say(
                f"note: this segment computes with {now} intra-op thread(s), the checkpoint's with {saved}: "
                f"CPU float results are no longer bit-identical to an uninterrupted run "
                f"(trainer.threads={saved} would keep them)"
            )

    def _epoch(self) -> float:
        if self.stream is not None:
            return float(self.stream.epoch)  # passes over this rank's part (rank 0's is logged)
        return self.cursor.epoch + self.cursor.offset / self.train_size

    def _train_loader(self) -> Any:
        seed = self.cfg.seed * 1000 + self.rank + 7919 * self.step  # worker seeds differ per rank and segment
        if self.stream is not None:
            return self.stream.batches(seed)
        sampler = ResumableBatchSampler(
            self.train_size,
            self.cfg.data.batch_size,
            rank=self.rank,
            world_size=self.world,
            grad_accum=self.cfg.trainer.grad_accum,
            seed=self.cfg.seed,
            shuffle=self.cfg.data.shuffle,
            start=self.cursor,
        )
        return make_loader(self.datasets["train"], sampler, self.cfg.data.num_workers, self._pin(), seed)

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, batch: Any) -> Any:
        return batch if self.device.type == "cpu" else send_to_device(batch, self.device, non_blocking=True)

    def _call(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)


def _train_stream(cfg: Config, splits: dict[str, Any], rank: int, world: int) -> StreamBatches | None:
    """This rank's reader of a streamed train split, None for a map-style one. Eval and test splits are
    read whole at every eval, so they must be map-style. Raises ConfigError."""
    for split in ("eval", "test"):
        if split in splits:
            dataset_size(splits[split], split)
    stream = as_stream(splits["train"], "train")
    if stream is None:
        return None
    micro = cfg.data.batch_size // (world * cfg.trainer.grad_accum)
    return StreamBatches(stream, rank=rank, world_size=world, micro=micro, num_workers=cfg.data.num_workers)


def _use_bar(cfg: Config) -> bool:
    return cfg.trainer.progress == "bar" or (cfg.trainer.progress == "auto" and sys.stdout.isatty())


def _resume_cause(cluster: ClusterEnv) -> str:
    if cluster.restart_count > 0:
        return f"{cluster.launcher} restart {cluster.restart_count}"
    return "restart"
