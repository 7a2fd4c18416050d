"""Optimizers and learning-rate schedules from config."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from disttrain.config import OptimConfig, SchedulerConfig


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, on_cuda: bool, pipeline: Any = None
) -> torch.optim.Optimizer:
    """The pipeline's own optimizer if it builds one; else optim.name over the pipeline's parameter
    groups, or by default weight decay on matrices and embeddings only (decaying biases and norm gains
    hurts)."""
    own = pipeline.build_optimizer(model) if pipeline is not None else None
    if own is not None:
        return own
    groups = pipeline.param_groups(model) if pipeline is not None else None
    if groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    extra = {"fused": True} if cfg.fused and on_cuda else {}
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay, **extra)


def lr_factor(cfg: SchedulerConfig, max_steps: int, step: int) -> float:
    """Multiplier of optim.lr for the update made at 0-based optimizer step `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, max_steps, step))


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings (lr, initial_lr, betas, weight_decay, momentum, ...) without its tensors."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reapply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, configured: list[dict[str, Any]]
) -> None:
    """After a checkpoint's optimizer and scheduler state were loaded: the settings the config asks for
    now (`configured`, taken from the freshly built optimizer before the load) override the saved ones.

    Loading restores every param group's lr, initial_lr, betas, weight_decay, ... and the scheduler's
    base_lrs, so a changed optim.lr would otherwise be written to config.yaml and never used. The
    moments and step counts (the state) are kept; the schedule continues at its step from the new peak.
    With an unchanged config this recomputes exactly the values that were saved."""
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update({k: v for k, v in settings.items() if k != "lr"})
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = [
        base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (and so train/lr in the logs) reports


class Schedule:
    """The learning-rate schedule as a checkpoint part: loading it re-applies what the config asks for
    now (`reapply_hyperparameters`), so it must load after the optimizer's state. The settings are
    taken from the freshly built optimizer, before any checkpoint is loaded."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: LambdaLR):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.configured = hyperparameters(optimizer)

    def step(self) -> None:
        self.scheduler.step()

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        reapply_hyperparameters(self.optimizer, self.scheduler, self.configured)
