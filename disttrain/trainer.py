"""The training loop over HuggingFace accelerate: DDP when launched distributed, mixed precision,
gradient accumulation, clipping, eval with exact distributed metrics, test, hooks, exact resume.

Steps are global optimizer steps. Every public method that runs a collective says so: call it on all
ranks, never behind a rank check.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, send_to_device

from disttrain import __version__, dist, fs
from disttrain.checkpoint import CheckpointManager, capture_rank_state, restore_rank_state
from disttrain.cluster import ClusterEnv
from disttrain.config import Config, ConfigError, config_hash, dump_yaml, resume_fingerprint, to_dict
from disttrain.data import DataCursor, ResumableBatchSampler, ShardedEvalBatches, advance, make_loader
from disttrain.hooks import Hook, default_hooks
from disttrain.optim import build_optimizer, build_scheduler
from disttrain.pipelines import load_pipeline
from disttrain.preemption import StopAgreement, StopSignal
from disttrain.writers import EventLog, build_writer

log = logging.getLogger("disttrain")


class Trainer:
    """Builds everything a run needs from a validated Config; `fit()` trains, `test()` evaluates.

    Construction must happen on all ranks (it initialises the process group and may load a checkpoint).
    """

    def __init__(self, cfg: Config, cluster: ClusterEnv, hooks: list[Hook] | None = None):
        self.cfg, self.cluster, self.run_dir = cfg, cluster, cfg.run_dir
        self.accelerator = _make_accelerator(cfg)
        self.device = self.accelerator.device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.pipeline = load_pipeline(cfg.pipeline)
        self.datasets = self.pipeline.datasets()
        if "train" not in self.datasets:
            raise ConfigError(f"{cfg.pipeline.target}.datasets() returned no 'train' split; add one")
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
        self.signal = StopSignal()
        self.stop_agreement = StopAgreement(self.signal)
        self.stopping = False
        self.stop_signals: list[str] = []  # every rank's stop signals, shared once a stop is agreed
        self.last_train_metrics: dict[str, float] = {}
        self._window_loss = torch.zeros((), device=self.device)
        self._window_steps, self._window_start = 0, time.perf_counter()
        self._last_saved_step = -1
        self.ckpt = CheckpointManager(
            self.run_dir,
            cfg.checkpoint,
            config_hash=config_hash(cfg),
            fingerprint=resume_fingerprint(cfg),
            versions={"disttrain": __version__, "torch": torch.__version__},
        )
        self.resumed_from = self._maybe_resume()
        self.events = EventLog(self.run_dir, cluster.job_id, cluster.restart_count, cfg=cfg)
        self.writer: Any = None

    # ------------------------------------------------------------------------------------ resume

    def _maybe_resume(self) -> int | None:
        """Load the checkpoint `resume` names, if any. Must be called on all ranks."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = self.ckpt.load_newest()
            if found is None:
                return None
            info, app_state, rank_state = found
            self._check_compatible(self.ckpt.saved_fingerprint(info))
        else:
            app_state, rank_state = self.ckpt.load(mode)
        self._load_state(app_state, rank_state)
        return self.step

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        now = resume_fingerprint(self.cfg)
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(
                f"cannot resume from {self.run_dir}: {detail} changed since the checkpoint; restore the "
                "old values, or start a new run_dir (or resume=never in an empty one)"
            )

    def _load_state(self, app: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(app["model"])
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
        if rank_state is not None:  # same world size: continue this rank's exact random streams
            restore_rank_state(rank_state["rng"])
            self._window_loss = torch.tensor(rank_state["window_loss"], device=self.device)
            self._window_steps = int(state["window_steps"])
        else:  # new world size: no per-rank stream to continue; derive a fresh one from the step
            _seed_all(self.cfg.seed * 1000 + 1 + self.rank + 7919 * self.step)

    def app_state(self) -> dict[str, Any]:
        """Everything shared by all ranks that a checkpoint holds."""
        scaler = self.accelerator.scaler
        return {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
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

    def fit(self) -> str:
        """Train to max_steps or until a stop is agreed. Returns "finished", "stopped" or "already_done".
        Must be called on all ranks."""
        if self.step >= self.cfg.trainer.max_steps:
            if dist.is_main():
                print(
                    f"run in {self.run_dir} already reached step {self.step} >= trainer.max_steps; nothing to do"
                )
            return "already_done"
        self._start_run_dir()
        self.signal.install()
        train_iter = iter(self._train_loader())
        try:
            self._call("before_train")
            while self.step < self.cfg.trainer.max_steps and not self.stopping:
                self._call("before_step")
                self.train_step(train_iter)
                self._call("after_step")
            self.stop_agreement.drain()
            self._call("after_train")
            self.ckpt.wait()
        finally:
            self.signal.uninstall()
            self.writer.close()
        outcome = "stopped" if self.stopping else "finished"
        signal = self.stop_signals[0] if self.stop_signals else None
        self.events.emit("finish" if outcome == "finished" else "stopped", step=self.step, signal=signal)
        return outcome

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
        self.cursor = advance(self.cursor, self.cfg.data.batch_size, len(self.datasets["train"]))
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
            "train/lr": self.scheduler.get_last_lr()[0] if self.step else self.cfg.optim.lr,
            "train/samples_per_sec": steps * self.cfg.data.batch_size / elapsed,
            "train/epoch": self.cursor.epoch + self.cursor.offset / len(self.datasets["train"]),
        }
        self.writer.log(self.step, self.last_train_metrics)
        self._window_loss.zero_()
        self._window_steps, self._window_start = 0, time.perf_counter()

    def request_stop(self) -> None:
        """Called on all ranks once the stop is agreed: save synchronously, then leave the loop."""
        self.stopping = True
        # The signal may have reached only some ranks (torchrun forwards to one worker, a user kills
        # one pid): record what every rank received, not just rank 0's view.
        gathered = dist.gather_to_main(list(self.signal.all_received))
        union = sorted({name for names in gathered or [] for name in names})
        self.stop_signals = dist.broadcast_from_main(union)
        signal = self.stop_signals[0] if self.stop_signals else None
        self.events.emit("signal", step=self.step, signal=signal, signals=self.stop_signals)
        self.save_checkpoint(sync=True, reason="stop")

    # -------------------------------------------------------------------------------- checkpoints

    def maybe_checkpoint(self, final: bool = False) -> None:
        """Let the manager decide whether this step saves. Must be called on all ranks."""
        if final and self._last_saved_step == self.step:
            return
        t0 = time.perf_counter()
        if self.ckpt.maybe_save(self.step, self.app_state, self.rank_state, final=final):
            self._saved(t0, reason="final" if final else "periodic")

    def save_checkpoint(self, sync: bool = True, reason: str = "manual") -> None:
        """Save now (hooks may call this on demand). Must be called on all ranks."""
        if self._last_saved_step == self.step:
            self.ckpt.wait()
            return
        t0 = time.perf_counter()
        self.ckpt.save(self.step, self.app_state(), self.rank_state(), sync=sync)
        self._saved(t0, reason)

    def _saved(self, t0: float, reason: str) -> None:
        self._last_saved_step = self.step
        fields = {"step": self.step, "seconds": round(time.perf_counter() - t0, 4), "reason": reason}
        if self.ckpt.committed and self.ckpt.committed[0] == self.step:  # written (not still in flight)
            fields["bytes"] = self.ckpt.committed[1]
        self.events.emit("checkpoint", **fields)

    # ------------------------------------------------------------------------------------ eval

    def run_eval(self, split: str) -> dict[str, float] | None:
        """Evaluate a split, log `{split}/...` and call after_eval. None if a stop was agreed mid-way
        (every rank sees the same). Must be called on all ranks."""
        metrics = self.evaluate(split, stoppable=True)
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
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = ShardedEvalBatches(len(dataset), self.cfg.data.eval_batch_size, self.rank, self.world)
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for batch in make_loader(dataset, batches, self.cfg.data.num_workers, self._pin()):
                    if stoppable and self.stop_agreement.poll():
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
        split = "test" if "test" in self.datasets else "eval"
        metrics = self.evaluate(split) or {}
        metrics = {k.replace(f"{split}/", "test/", 1): v for k, v in metrics.items()}
        if dist.is_main():
            fs.makedirs(self.run_dir)
            record = {"step": self.step, "split": split, **metrics}
            fs.atomic_write(fs.join(self.run_dir, "test_metrics.json"), json.dumps(record, indent=2) + "\n")
        return metrics

    def close(self) -> None:
        """Release the model, optimizer and DDP reducer. Call before the process group is destroyed.

        DDP's reducer keeps its last gloo work objects, which hold tensors. Left to interpreter
        shutdown, freeing them needs the GIL while it is being torn down, and the process aborts
        ("terminate called without an active exception") after a run that otherwise succeeded.
        """
        self.accelerator.free_memory()
        self.model = self.optimizer = self.scheduler = None
        gc.collect()

    # ---------------------------------------------------------------------------------- helpers

    def _start_run_dir(self) -> None:
        changed: list[str] = []
        if dist.is_main():
            fs.makedirs(self.run_dir)
            if self.resumed_from is not None:
                changed = self._config_changes()
            fs.atomic_write(fs.join(self.run_dir, "config.yaml"), dump_yaml(self.cfg))
        dist.barrier()  # nobody writes into run_dir before it exists
        self.writer = build_writer(self.cfg, self.run_dir, resumed_step=self.step, use_tqdm=self._bar)
        self.events.emit("start", step=self.step, world_size=self.world, max_steps=self.cfg.trainer.max_steps)
        if changed:
            print(
                f"note: config changed since the checkpoint (allowed on resume): {'; '.join(changed)}",
                flush=True,
            )
            self.events.emit("config_changed", step=self.step, changes=changed)
        if self.resumed_from is not None:
            # interrupted_at: the last step logged before the interruption, so `disttrain status` and the
            # curves can say exactly how many steps a kill -9 cost.
            interrupted_at = getattr(self.writer, "logged_through", None)
            self.events.emit(
                "resume",
                step=self.resumed_from,
                cause=_resume_cause(self.cluster),
                interrupted_at=interrupted_at,
            )
            if dist.is_main():
                print(f"resumed from step {self.resumed_from}", flush=True)

    def _config_changes(self) -> list[str]:
        """`key: old -> new` for every key that differs from the previous segment's config.yaml."""
        path = fs.join(self.run_dir, "config.yaml")
        if not fs.exists(path):
            return []
        old = _flatten(yaml.safe_load(fs.read_text(path)) or {})
        new = _flatten(to_dict(self.cfg))
        return [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]

    def _train_loader(self) -> Any:
        sampler = ResumableBatchSampler(
            len(self.datasets["train"]),
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


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "args":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
