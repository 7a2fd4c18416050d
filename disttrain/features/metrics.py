"""The train window behind the `train/*` metrics: loss, learning rate, throughput in samples and
tokens, model FLOPs utilisation, gradient norm, peak memory, skipped steps, and the pipeline's own
training metrics (`Pipeline.log_metric`).

Per step this costs device-side adds only (no host read, no collective): the loss and the gradient
norm that the clip computes anyway are summed where they live. On the log cadence one all-reduce (the
one train/loss always had) carries every rank's share at once: the loss, the token count, the
pipeline's sums and counts, and each rank's peak memory in its own slot, so that a sum yields all of
them (the largest memory is the one reported).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from disttrain import dist
from disttrain.config import Config, TrainerConfig
from disttrain.data import TrainData
from disttrain.features.guard import NonFiniteGuard
from disttrain.features.stragglers import Stragglers
from disttrain.hooks import Hook, Loop
from disttrain.optim import Schedule
from disttrain.parallel import Strategy
from disttrain.pipelines import Pipeline
from disttrain.sections import SECTIONS, Sections
from disttrain.writers import NullWriter, Writer, build_writer

# Dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from NVIDIA's data sheets, by a fragment of
# the device name: (bf16, fp16, tf32, fp32). The first fragment found in the name wins.
PEAK_TFLOPS: dict[str, tuple[float, float, float, float]] = {
    "GB200": (2500.0, 2500.0, 1250.0, 80.0),
    "B200": (2250.0, 2250.0, 1100.0, 75.0),
    "H200 NVL": (835.0, 835.0, 418.0, 60.0),
    "H100 NVL": (835.0, 835.0, 418.0, 60.0),
    "H100 PCIe": (756.0, 756.0, 378.0, 51.0),
    "H200": (989.0, 989.0, 494.5, 67.0),  # H200 SXM; GH200 matches here too (the same Hopper die)
    "H100": (989.0, 989.0, 494.5, 67.0),  # H100 SXM (reported as "H100 80GB HBM3")
    "A100": (312.0, 312.0, 156.0, 19.5),
    "L40S": (362.0, 362.0, 183.0, 91.6),
    "L4": (121.0, 121.0, 60.0, 30.3),
}
_COLUMNS = {"bf16": 0, "fp16": 1, "tf32": 2, "fp32": 3}


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """The device's dense peak in FLOP/s for the precision the matmuls run in; None on a CPU or a GPU
    not in the table (then train/mfu is not reported)."""
    if device.type != "cuda":
        return None
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision)
    if precision is None:  # fp32 weights: tensor cores only when TF32 matmuls are allowed
        precision = "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    return peak_for(torch.cuda.get_device_name(device), precision)


def peak_for(device_name: str, precision: str) -> float | None:
    """PEAK_TFLOPS' entry for a CUDA device name, in FLOP/s; None when the device is not listed."""
    row = next((peaks for fragment, peaks in PEAK_TFLOPS.items() if fragment in device_name), None)
    return None if row is None else row[_COLUMNS[precision]] * 1e12


def max_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: CUDA's max allocated on a GPU, the max resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def grad_norm(strategy: Strategy, cfg: TrainerConfig, step: int, guard_on: bool) -> torch.Tensor | None:
    """The global gradient norm before clipping, of the reduced gradients (the same on every rank), at
    the optimizer step that ends as `step`. The clip computes it anyway; without clipping it is computed
    only when the guard or the log needs it."""
    if cfg.grad_clip <= 0 and not (guard_on or step % cfg.log_every == 0 or step == cfg.max_steps):
        return None
    return strategy.grad_norm(cfg.grad_clip)


class StepMetrics:
    """The window since the last log: what `reduce` turns into train/* metrics. Its state (this rank's
    share) goes into the rank's checkpoint state, so a resumed run logs the same numbers."""

    def __init__(self, cfg: Config, device: torch.device, pipeline: Any):
        self.device, self.pipeline = device, pipeline
        self.sections = Sections()  # this rank's time per section, carried by the window's all-reduce
        self.grad_accum, self.batch_size = cfg.trainer.grad_accum, cfg.data.batch_size
        self.names = tuple(getattr(pipeline, "train_metrics", ()))
        self.peak = peak_flops(device, cfg.trainer.mixed_precision)
        self.flops = pipeline.flops_per_sample() if self.peak else None
        self._count_tokens = _overrides(pipeline, "num_tokens")
        self.reset()
        self._step_loss: torch.Tensor | None = None

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # summed micro-batch losses of applied steps
        self.norm = torch.zeros((), device=self.device)  # summed gradient norms of applied steps
        self.steps = self.applied = self.norms = 0
        self.tokens: float | torch.Tensor = 0.0
        self.user: dict[str, list[Any]] = {}  # name -> [sum, count]
        self.start = time.perf_counter()

    def micro_batch(self, loss: torch.Tensor, batch: Any) -> None:
        detached = loss.detach()
        self._step_loss = detached if self._step_loss is None else self._step_loss + detached
        if self._count_tokens:
            self.tokens = self.tokens + self.pipeline.num_tokens(batch)

    def step_done(self, applied: bool, norm: torch.Tensor | None) -> None:
        """Close the step: an applied one joins the averages; a skipped one (non-finite) counts for
        throughput only. The pipeline's logged metrics of the step follow the same rule."""
        self.steps += 1
        logged = self.pipeline.take_logged()
        if applied and self._step_loss is not None:
            self.loss += self._step_loss
            self.applied += 1
            if norm is not None:
                self.norm += norm.detach()
                self.norms += 1
            for name, (value, count) in logged.items():
                entry = self.user.setdefault(name, [0.0, 0])
                entry[0], entry[1] = entry[0] + value, entry[1] + count
        self._step_loss = None

    def reduce(self, world: int) -> tuple[dict[str, float], list[list[float]]]:
        """train/* of the window, reduced over ranks (one all-reduce), then a new window; and every
        rank's seconds per section in the window (rows in `sections.SECTIONS` order). Must be called on
        all ranks."""
        elapsed = max(1e-9, time.perf_counter() - self.start)
        rank, width = dist.rank(), len(SECTIONS)
        mine = [0.0] * world
        mine[rank] = max_memory_mb(self.device)
        timings = [0.0] * (world * width)  # each rank fills its own row: a sum hands every row to all
        timings[rank * width : (rank + 1) * width] = self.sections.take()
        sums = [float(self.user[n][0]) if n in self.user else 0.0 for n in self.names]
        counts = [float(self.user[n][1]) if n in self.user else 0.0 for n in self.names]
        loss = self.loss.item() / max(1, self.applied * self.grad_accum)
        totals = dist.all_reduce_sum([loss, float(self.tokens), *sums, *counts, *mine, *timings])
        out = self._derived(totals[0] / world, totals[1], elapsed)
        k = len(self.names)
        for name, total, count in zip(self.names, totals[2 : 2 + k], totals[2 + k : 2 + 2 * k]):
            if count:
                out[f"train/{name}"] = total / count
        out["train/max_mem_mb"] = max(totals[2 + 2 * k : 2 + 2 * k + world])
        flat = totals[2 + 2 * k + world :]
        self.reset()
        return out, [flat[r * width : (r + 1) * width] for r in range(world)]

    def _derived(self, loss: float, tokens: float, elapsed: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.applied:
            out["train/loss"] = loss
        samples_per_sec = self.steps * self.batch_size / elapsed
        out["train/samples_per_sec"] = samples_per_sec
        if self._count_tokens:
            out["train/tokens_per_sec"] = tokens / elapsed
        if self.norms:
            out["train/grad_norm"] = self.norm.item() / self.norms  # the same on every rank: not reduced
        if self.flops and self.peak:
            out["train/mfu"] = samples_per_sec * self.flops / (self.peak * dist.world_size())
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the window, as plain numbers."""
        return {
            "loss": float(self.loss.item()), "norm": float(self.norm.item()), "steps": self.steps,
            "applied": self.applied, "norms": self.norms, "tokens": float(self.tokens),
            "user": {k: [float(v[0]), int(v[1])] for k, v in self.user.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss = torch.tensor(state["loss"], device=self.device)
        self.norm = torch.tensor(state["norm"], device=self.device)
        self.steps, self.applied, self.norms = int(state["steps"]), int(state["applied"]), int(state["norms"])
        self.tokens = float(state["tokens"])
        self.user = {k: [torch.tensor(v[0], device=self.device), int(v[1])] for k, v in state["user"].items()}


def _overrides(pipeline: Any, method: str) -> bool:
    """Whether the pipeline defines `method` itself (the base class's means "not provided")."""
    return getattr(type(pipeline), method, None) is not getattr(Pipeline, method)


class TrainLog:
    """The train/* log: the window's metrics reduced over ranks every `log_every` steps, and the writers
    (metrics.jsonl, console, TensorBoard, wandb; null writers off rank 0) every metric goes to. Opened
    when a segment starts training, closed at its end."""

    def __init__(
        self,
        cfg: Config,
        window: StepMetrics,
        schedule: Schedule,
        data: TrainData,
        guard: NonFiniteGuard,
        stragglers: Stragglers,
    ):
        self.cfg, self.window, self.schedule, self.data, self.guard = cfg, window, schedule, data, guard
        self.stragglers = stragglers
        self.writer: Writer = NullWriter()
        self.last: dict[str, float] = {}  # the latest train window, as logged

    def open(self, step: int, bar: bool) -> None:
        self.writer = build_writer(self.cfg, self.cfg.run_dir, resumed_step=step, use_tqdm=bar)

    @property
    def logged_through(self) -> int | None:
        """The highest step an earlier segment logged (where an interruption happened), if known."""
        return self.writer.logged_through

    def log_window(self, step: int) -> None:
        """Reduce the window's metrics over ranks and write them. Must be called on all ranks."""
        window, per_rank = self.window.reduce(dist.world_size())
        window.update(self.stragglers.window(step, per_rank))
        lr = self.schedule.last_lr() if step else self.cfg.optim.lr
        head = {k: window.pop(k) for k in ("train/loss",) if k in window}
        last = {
            **head, "train/lr": lr, "train/samples_per_sec": window.pop("train/samples_per_sec"),
            "train/epoch": self.data.epoch, **window,
        }  # fmt: skip
        if self.guard.mode == "skip":
            last["train/skipped"] = float(self.guard.skipped)
        self.last = last
        self.writer.log(step, last)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.log(step, metrics)

    def close(self, step: int) -> None:
        self.stragglers.flush(step)  # what a straggler cost since its last record
        self.writer.close()


class LogHook(Hook):
    """Logs the train window every `log_every` steps and at the last step."""

    def __init__(self, log: TrainLog, every: int, max_steps: int):
        self.log, self.every, self.max_steps = log, every, max_steps

    def after_step(self, loop: Loop) -> None:
        if loop.step % self.every == 0 or loop.step == self.max_steps:
            self.log.log_window(loop.step)
