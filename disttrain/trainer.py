"""The training loop over HuggingFace accelerate: DDP when launched distributed, mixed precision,
gradient accumulation, clipping, eval with exact distributed metrics, test, hooks, exact resume.

Steps are global optimizer steps. Every public method that runs a collective says so: call it on all
ranks, never behind a rank check. Rank roles are decided by the objects the trainer holds (writers,
run files, event log, checkpoint manager), never here.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device

from disttrain import __version__, dist, phases
from disttrain.checkpoint import (
    CheckpointManager,
    Loaded,
    SaveResult,
    Shards,
    capture_rank_state,
    restore_rank_state,
)
from disttrain.ckpt_sharded import load_model, load_optimizer, parameter_names, split_state
from disttrain.cluster import ClusterEnv
from disttrain.config import (
    Config,
    ConfigError,
    config_hash,
    resume_conflicts,
    resume_fingerprint,
    resume_refusal,
)
from disttrain.data import (
    DataCursor,
    ResumableBatchSampler,
    ShardedEvalBatches,
    StreamBatches,
    advance,
    check_train_split,
    collate_or_empty,
    dataset_size,
    make_loader,
)
from disttrain.features.ema import EMAHook
from disttrain.features.extend import config_hooks, feature_hooks
from disttrain.features.guard import NonFiniteGuard, check_state, report
from disttrain.features.metrics import StepMetrics, grad_norm
from disttrain.features.model import after_wrap, before_wrap, strip_compiled_names, uncompiled
from disttrain.hooks import Hook, default_hooks
from disttrain.lease import RunLease
from disttrain.optim import build_optimizer, build_scheduler, hyperparameters, reapply_hyperparameters
from disttrain.parallel import build_strategy
from disttrain.pipelines import load_pipeline
from disttrain.preemption import StopAgreement, StopRequest, StopSignal
from disttrain.stream import as_stream
from disttrain.writers import EventLog, NullWriter, Writer, build_run_files, build_writer


@dataclass(frozen=True)
class FitResult:
    """How `fit()` ended, the same on every rank: what the caller needs to decide what comes next."""

    outcome: str  # finished | stopped | already_done
    step: int
    stop: StopRequest | None = None  # the agreed stop (its signals), when stopped
    reason: str = ""  # why a run finished before max_steps (early stopping)


class Trainer:
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
            raise ConfigError(f"early_stop.metric is set but {cfg.pipeline.target} has no 'eval' split to watch")
        _seed_all(cfg.seed)  # same on every rank: every rank builds identical initial weights
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
        _seed_all(cfg.seed * 1000 + 1 + self.rank)  # per-rank stream for dropout & co
        self.step, self.cursor = 0, DataCursor()
        self._bar = _use_bar(cfg) and dist.is_main()
        self.hooks = feature_hooks(cfg) + default_hooks(self._bar, config_hooks(cfg) + list(hooks or []))
        self.ema = EMAHook.find(self.hooks, self.module)
        self.signal = stop or StopSignal()
        hang_after = cfg.trainer.collective_timeout_s if self.world > 1 else None
        self.agreement = StopAgreement(self.signal, hang_after=hang_after, on_hang=self._record_hang)
        self.guard = NonFiniteGuard(cfg.trainer, self.device, self.strategy.scaler is not None, self.agreement)
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

    # ------------------------------------------------------------------------------------ resume

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
            load_optimizer(self.optimizer, self.module, loaded.saved(parameter_names(self.module, self.optimizer)))
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
            _seed_all(self.cfg.seed * 1000 + 1 + self.rank + 7919 * self.step)

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
            self.events.emit("signal", step=self.step, signal=request.signal, signals=list(request.signals), **received)
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
            self.step, self.checked_state(), self.rank_state(), sync=True, reason=reason, shards=self.shard_state()
        )
        self._saved(result)

    def _saved(self, result: SaveResult | None) -> None:
        if result is not None:
            self.events.emit("checkpoint", **result.fields())

    # ------------------------------------------------------------------------------------ eval

    def run_eval(self, split: str) -> dict[str, float] | None:
        """Evaluate a split, log `{split}/...` and call after_eval. None if a stop was agreed mid-way
        (every rank sees the same). Must be called on all ranks."""
        t0 = time.perf_counter()
        metrics = self.evaluate(split, stoppable=True)
        cut = {} if metrics is not None else {"cut": True}  # a stop was agreed mid-way
        self.events.emit("eval", step=self.step, split=split, seconds=round(time.perf_counter() - t0, 4), **cut)
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
            self.files.say(f"note: config changed since the checkpoint, applied from step {self.step}: {'; '.join(changed)}")
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

    def _eval_weights(self) -> Any:
        """The EMA weights swapped in for eval when `ema.eval` asks for them."""
        use_ema = self.ema is not None and self.cfg.ema.eval
        return self.ema.swapped_in() if use_ema else contextlib.nullcontext()  # type: ignore[union-attr]

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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _use_bar(cfg: Config) -> bool:
    return cfg.trainer.progress == "bar" or (cfg.trainer.progress == "auto" and sys.stdout.isatty())


def _resume_cause(cluster: ClusterEnv) -> str:
    if cluster.restart_count > 0:
        return f"{cluster.launcher} restart {cluster.restart_count}"
    return "restart"
