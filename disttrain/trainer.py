"""The training loop over HuggingFace accelerate: DDP when launched distributed, mixed precision,
gradient accumulation, clipping, eval with exact distributed metrics, test, hooks, exact resume.

Steps are global optimizer steps. Every public method that runs a collective says so: call it on all
ranks, never behind a rank check. Rank roles are decided by the objects the trainer holds (writers,
run files, event log, checkpoint manager), never here.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, send_to_device

from disttrain import __version__, dist, phases
from disttrain.checkpoint import CheckpointManager, Loaded, SaveResult, capture_rank_state, restore_rank_state
from disttrain.cluster import ClusterEnv
from disttrain.config import Config, ConfigError, config_hash, resume_fingerprint
from disttrain.data import (
    DataCursor,
    ResumableBatchSampler,
    ShardedEvalBatches,
    advance,
    check_train_split,
    dataset_size,
    make_loader,
)
from disttrain.hooks import Hook, default_hooks
from disttrain.optim import build_optimizer, build_scheduler
from disttrain.pipelines import load_pipeline
from disttrain.preemption import StopAgreement, StopRequest, StopSignal
from disttrain.writers import EventLog, NullWriter, Writer, build_run_files, build_writer


@dataclass(frozen=True)
class FitResult:
    """How `fit()` ended, the same on every rank: what the caller needs to decide what comes next."""

    outcome: str  # finished | stopped | already_done
    step: int
    stop: StopRequest | None = None  # the agreed stop (its signals), when stopped


class Trainer:
    """Builds everything a run needs from a validated Config; `fit()` trains, `test()` evaluates.

    Construction must happen on all ranks (it initialises the process group and may load a checkpoint).
    `stop` is the entry point's StopSignal; a Trainer built without one installs its own during fit().
    """

    def __init__(
        self, cfg: Config, cluster: ClusterEnv, hooks: list[Hook] | None = None, stop: StopSignal | None = None
    ):
        self.cfg, self.cluster, self.run_dir = cfg, cluster, cfg.run_dir
        phases.CLOCK.begin_segment()
        self.accelerator = _make_accelerator(cfg)
        phases.CLOCK.mark(phases.PROCESS_GROUP)
        self.device = self.accelerator.device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.pipeline = load_pipeline(cfg.pipeline)
        self.datasets = self.pipeline.datasets()
        if "train" not in self.datasets:
            raise ConfigError(f"{cfg.pipeline.target}.datasets() returned no 'train' split; add one")
        self.train_size = dataset_size(self.datasets["train"], "train")
        check_train_split(self.train_size, cfg.data.batch_size)  # before anything is built
        _seed_all(cfg.seed)  # same on every rank: every rank builds identical initial weights
        model = self.pipeline.build_model()
        optimizer = build_optimizer(cfg.optim, model, on_cuda=self.device.type == "cuda")
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self._module = self.accelerator.unwrap_model(self.model)  # the pipeline's model, inside DDP
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer.optimizer, cfg.trainer.max_steps)
        _seed_all(cfg.seed * 1000 + 1 + self.rank)  # per-rank stream for dropout & co
        self.step, self.cursor = 0, DataCursor()
        self._bar = _use_bar(cfg) and dist.is_main()
        self.hooks = default_hooks(progress_bar=self._bar) + list(hooks or [])
        self.signal = stop or StopSignal()
        self.agreement = StopAgreement(self.signal)
        self.stop_request: StopRequest | None = None
        self.began = False  # whether this segment began training (recorded its start), for its end event
        self.last_train_metrics: dict[str, float] = {}
        self._window_loss = torch.zeros((), device=self.device)
        self._window_steps, self._window_start = 0, time.perf_counter()
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
            loaded = self.ckpt.load_newest()
        else:
            loaded = self.ckpt.read(mode)
        if loaded is None:
            if self.cfg.init_from:
                self._init_weights(self.cfg.init_from)
            return None
        _check_compatible(self.cfg, loaded)
        self._load_state(loaded)
        return loaded

    def _init_weights(self, source: str) -> None:
        """Start from a checkpoint's weights only: fresh optimizer, schedule and step 0 (fine-tuning)."""
        app, _ = CheckpointManager(self.run_dir, self.cfg.checkpoint).load(source)
        _load_model(self._module, app["model"], source)
        self.files.say(f"initialised the weights from {source} (optimizer, schedule and step start fresh)")

    def _load_state(self, loaded: Loaded) -> None:
        app = loaded.app
        _load_model(self._module, app["model"], loaded.path)
        self.optimizer.optimizer.load_state_dict(app["optimizer"])
        self.scheduler.load_state_dict(app["scheduler"])
        if app.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(app["scaler"])
        state = app["trainer"]
        self.step = int(state["step"])
        self.cursor = DataCursor.from_state(state["cursor"])
        for hook in self.hooks:
            if type(hook).__name__ in app.get("hooks", {}):
                hook.load_state_dict(app["hooks"][type(hook).__name__])
        if loaded.rank_state is not None:  # same world size: continue this rank's exact random streams
            restore_rank_state(loaded.rank_state["rng"])
            self._window_loss = torch.tensor(loaded.rank_state["window_loss"], device=self.device)
            self._window_steps = int(state["window_steps"])
        else:  # new world size: no per-rank stream to continue; derive a fresh one from the step
            _seed_all(self.cfg.seed * 1000 + 1 + self.rank + 7919 * self.step)

    def app_state(self) -> dict[str, Any]:
        """Everything shared by all ranks that a checkpoint holds."""
        scaler = self.accelerator.scaler
        return {
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "trainer": {
                "step": self.step,
                "cursor": self.cursor.state_dict(),
                "window_steps": self._window_steps,
                "samples_seen": self.step * self.cfg.data.batch_size,
            },
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if h.state_dict()},
        }

    def rank_state(self) -> dict[str, Any]:
        return {"rng": capture_rank_state(), "window_loss": float(self._window_loss.item())}

    # ------------------------------------------------------------------------------------- train

    def fit(self) -> FitResult:
        """Train to max_steps or until a stop is agreed. Must be called on all ranks."""
        if self.step >= self.cfg.trainer.max_steps:
            self.files.say(
                f"run in {self.run_dir} already reached step {self.step} >= trainer.max_steps; nothing to do"
            )
            return FitResult("already_done", self.step)
        own_handlers = not self.signal.installed
        if own_handlers:
            self.signal.install()
        self._start_segment()
        train_iter = iter(self._train_loader())
        self.events.emit("ready", step=self.step, **phases.CLOCK.ready_fields())  # start-up ends here
        phases.resume_gc()
        try:
            self._call("before_train")
            while self.step < self.cfg.trainer.max_steps and not self.stopping:
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
            self.events.emit("finish", step=self.step)
            return FitResult("finished", self.step)
        self.events.emit("stopped", step=self.step, signal=self.stop_request.signal)
        return FitResult("stopped", self.step, self.stop_request)

    def train_step(self, batches: Any) -> None:
        """One optimizer step over grad_accum micro-batches (gradients all-reduced on the last only)."""
        if not self._module.training:  # eval restores the mode; walking every module each step costs
            self.model.train()
        for _ in range(self.cfg.trainer.grad_accum):
            batch = self._to_device(next(batches))
            with self.accelerator.accumulate(self.model):
                loss = self.pipeline.loss(self.model, batch)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self._optimizer_step()
            self._window_loss += loss.detach()
        self.scheduler.step()
        self.step += 1
        self._window_steps += 1
        self.cursor = advance(self.cursor, self.cfg.data.batch_size, self.train_size)
        self.ckpt.check()

    def _optimizer_step(self) -> None:
        """Clip, step and zero, on the micro-batch that ends an optimizer step.

        accelerate's optimizer wrapper asks importlib on every call whether an optional package is
        installed (two sys.path scans) and inspects a signature: ~0.12 ms a step (bench/RESULTS.md).
        Without a grad scaler (fp16) it only forwards the call, so call the torch optimizer directly."""
        if self.cfg.trainer.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        optimizer = self.optimizer if self.accelerator.scaler is not None else self.optimizer.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def log_train_window(self) -> None:
        """Reduce the window's mean loss over ranks and write it. Must be called on all ranks."""
        steps = max(1, self._window_steps)
        loss_sum = self._window_loss.item() / (steps * self.cfg.trainer.grad_accum)
        (loss_total,) = dist.all_reduce_sum([loss_sum])
        elapsed = max(1e-9, time.perf_counter() - self._window_start)
        self.last_train_metrics = {
            "train/loss": loss_total / self.world,
            "train/lr": float(self.scheduler.get_last_lr()[0]) if self.step else self.cfg.optim.lr,
            "train/samples_per_sec": steps * self.cfg.data.batch_size / elapsed,
            "train/epoch": self.cursor.epoch + self.cursor.offset / self.train_size,
        }
        self.writer.log(self.step, self.last_train_metrics)
        self._window_loss.zero_()
        self._window_steps, self._window_start = 0, time.perf_counter()

    def poll_stop(self) -> bool:
        """Step boundary: read the agreement; once a stop is agreed, save synchronously and leave the
        loop after this step. Must be called on all ranks, at every step boundary."""
        if self.stop_request is None and (request := self.agreement.poll()) is not None:
            self.stop_request = request
            received = {} if self.signal.first_at is None else {"received": round(self.signal.first_at, 3)}
            self.events.emit("signal", step=self.step, signal=request.signal, signals=list(request.signals), **received)
            self.save_checkpoint(reason="stop")
        return self.stopping

    # -------------------------------------------------------------------------------- checkpoints

    def maybe_checkpoint(self, final: bool = False) -> None:
        """Let the manager decide whether this step saves. Must be called on all ranks."""
        self._saved(self.ckpt.maybe_save(self.step, self.app_state, self.rank_state, final=final))

    def save_checkpoint(self, reason: str = "manual") -> None:
        """Save now, synchronously (hooks may call this on demand); a step already saved is not saved
        again. Must be called on all ranks."""
        if self.ckpt.last_step == self.step:
            self.ckpt.wait()
            return
        self._saved(self.ckpt.save(self.step, self.app_state(), self.rank_state(), sync=True, reason=reason))

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
        model = self._module
        # Buffers (BatchNorm statistics) drift apart between ranks in training: DDP hands rank 0's to
        # the others only at the next forward. Evaluate what a checkpoint holds (rank 0's) everywhere.
        dist.broadcast_tensors_from_main(list(model.buffers()))
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        size = dataset_size(dataset, split)
        batches = ShardedEvalBatches(size, self.cfg.data.eval_batch_size, self.rank, self.world)
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for batch in make_loader(dataset, batches, self.cfg.data.num_workers, self._pin()):
                    if stoppable and self.agreement.poll() is not None:
                        return None
                    if batch is not None:
                        for key, value in self.pipeline.eval_step(model, self._to_device(batch)).items():
                            sums[key] = sums.get(key, 0) + value.detach().double()
        finally:
            model.train(was_training)
        keys = dist.broadcast_from_main(sorted(sums))
        totals = dict(zip(keys, dist.all_reduce_sum([float(sums[k]) if k in sums else 0.0 for k in keys])))
        count = totals.pop("count", None) or 1.0
        return {f"{split}/{k}": v / count for k, v in totals.items()}

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
        self.accelerator.free_memory()
        del self.model, self.optimizer, self.scheduler
        gc.collect()

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
            self.files.say(f"note: config changed since the checkpoint (allowed on resume): {'; '.join(changed)}")
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

    def _note_threads(self, saved: Any) -> None:
        now = torch.get_num_threads()
        if isinstance(saved, int) and saved != now:
            self.files.say(
                f"note: this segment computes with {now} intra-op thread(s), the checkpoint's with {saved}: "
                f"CPU float results are no longer bit-identical to an uninterrupted run "
                f"(trainer.threads={saved} would keep them)"
            )

    def _train_loader(self) -> Any:
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
        seed = self.cfg.seed * 1000 + self.rank + 7919 * self.step  # worker seeds differ per rank and segment
        return make_loader(self.datasets["train"], sampler, self.cfg.data.num_workers, self._pin(), seed)

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, batch: Any) -> Any:
        return batch if self.device.type == "cpu" else send_to_device(batch, self.device, non_blocking=True)

    def _call(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)


def _make_accelerator(cfg: Config) -> Accelerator:
    handlers = [
        # A rank that dies or hangs must not leave the others blocked forever in a collective.
        InitProcessGroupKwargs(timeout=dist.timeout(cfg.trainer.collective_timeout_s)),
    ]
    return Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        # accelerate only sets up CPU DDP (gloo) when told cpu=True; without a GPU, say so.
        cpu=cfg.trainer.cpu or not torch.cuda.is_available(),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )


def _check_compatible(cfg: Config, loaded: Loaded) -> None:
    """Refuse a checkpoint whose run differs in a key that makes its state meaningless here."""
    saved = dict(loaded.manifest.get("fingerprint") or {})
    now = resume_fingerprint(cfg)
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume from {loaded.path}: {detail} changed since the checkpoint; restore the old "
            "values, start a new run_dir, or use init_from=PATH to start from its weights only"
        )


def _load_model(module: torch.nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing (as bad input, one line) a checkpoint whose tensors do not fit the model."""
    current = module.state_dict()
    hint = "restore the config or code the checkpoint was made with, or start a new run_dir"
    for name, tensor in current.items():
        if name not in saved:
            raise ConfigError(f"the checkpoint {source} has no tensor {name!r} that the model has; {hint}")
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"the checkpoint {source} does not fit the model: {name} is {tuple(saved[name].shape)} there "
                f"but {tuple(tensor.shape)} now; {hint}"
            )
    extra = sorted(set(saved) - set(current))
    if extra:
        raise ConfigError(f"the checkpoint {source} has a tensor {extra[0]!r} the model lacks; {hint}")
    module.load_state_dict(saved)


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
