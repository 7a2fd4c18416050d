"""The baseline of the step figures: a hand-written torch training loop doing the trainer's math.

The same model init (the pipeline's build_model after seeding with cfg.seed), AdamW with the same
parameter groups, the same LR schedule function, clip_grad_norm_, the same global sample order
(disttrain.data.epoch_order) and the same per-rank reseeding after the model is built; DDP when a
process group is up, bf16 autocast and fused AdamW when the config asks. What is left out is what the
trainer adds around the math, which is what the step figures measure.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from disttrain.data import epoch_order
from disttrain.optim import lr_factor
from disttrain.pipelines import load_pipeline


def seed_all(seed: int) -> None:
    """What the trainer seeds: Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_order_batches(
    n: int, batch: int, rank: int, world: int, seed: int, shuffle: bool
) -> Iterator[list[int]]:
    """This rank's slice of each global batch, in disttrain's global order (grad_accum 1), endlessly."""
    micro, epoch = batch // world, 0
    while True:
        order = epoch_order(n, seed, epoch, shuffle)
        for begin in range(0, (n // batch) * batch, batch):
            yield order[begin + rank * micro : begin + (rank + 1) * micro].tolist()
        epoch += 1


class PlainLoop:
    """Built and stepped exactly as the trainer builds and steps; `step()` is one optimizer step."""

    def __init__(self, cfg: Any, device: torch.device, compile_model: bool = False):
        assert cfg.trainer.grad_accum == 1 and cfg.optim.name == "adamw", "the baseline covers only these"
        rank, world = (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)
        self.pipeline, self.device = load_pipeline(cfg.pipeline), device
        train = self.pipeline.datasets()["train"]
        seed_all(cfg.seed)
        self.model = self.pipeline.build_model().to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        fused = {"fused": True} if cfg.optim.fused and device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), **fused)
        steps = cfg.trainer.max_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg.scheduler, steps, s))
        self.net = self._wrap(cfg, world)
        self.net = torch.compile(self.net) if compile_model else self.net
        seed_all(cfg.seed * 1000 + 1 + rank)
        self.batches = iter(self._loader(cfg, train, rank, world))
        self.clip = cfg.trainer.grad_clip
        self.bf16 = cfg.trainer.mixed_precision == "bf16"
        self.net.train()

    def _wrap(self, cfg: Any, world: int) -> Any:
        return torch.nn.parallel.DistributedDataParallel(self.model) if world > 1 else self.model

    def _loader(self, cfg: Any, train: Any, rank: int, world: int) -> DataLoader:
        workers = cfg.data.num_workers
        d = cfg.data
        batches = global_order_batches(len(train), d.batch_size, rank, world, cfg.seed, d.shuffle)
        # A private generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
        # which would shift the dropout stream (disttrain's make_loader does the same, for exact resume).
        return DataLoader(train, batch_sampler=batches, collate_fn=default_collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    def step(self) -> None:
        batch = next(self.batches)
        if self.device.type != "cpu":
            batch = [t.to(self.device, non_blocking=True) for t in batch]
        if self.bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.pipeline.loss(self.net, batch)
        else:
            loss = self.pipeline.loss(self.net, batch)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()


class AccelerateLoop(PlainLoop):
    """The loop a user writes with HuggingFace accelerate, as its documentation shows it: the model and
    optimizer through `accelerator.prepare`, each step inside `accelerator.accumulate`, then
    `accelerator.backward`, `accelerator.clip_grad_norm_` and the prepared optimizer's step and
    zero_grad. The data loader is the plain loop's (not prepared, so the sample order, and with it the
    math, is the same), and the schedule steps once per optimizer step."""

    def _wrap(self, cfg: Any, world: int) -> Any:
        from accelerate import Accelerator

        self.accelerator = Accelerator(
            mixed_precision=cfg.trainer.mixed_precision, cpu=self.device.type == "cpu",
            step_scheduler_with_optimizer=False,
        )  # fmt: skip
        net, self.opt = self.accelerator.prepare(self.model, self.opt)
        return net

    def step(self) -> None:
        batch = next(self.batches)
        if self.device.type != "cpu":
            batch = [t.to(self.device, non_blocking=True) for t in batch]
        with self.accelerator.accumulate(self.net):
            loss = self.pipeline.loss(self.net, batch)  # the prepared model autocasts when asked to
            self.accelerator.backward(loss)
            if self.clip > 0:
                self.accelerator.clip_grad_norm_(self.net.parameters(), self.clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
