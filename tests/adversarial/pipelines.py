"""Pipelines an adversary writes (they hold no tests): broken modules and constructors, empty data,
a rank that hangs, an error that quotes a credential."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

from disttrain.pipelines.digits import DigitsPipeline


class RaisingInit(DigitsPipeline):
    def __init__(self, **kwargs: Any):
        raise ValueError("the constructor of a user pipeline refused its arguments")


class TinyTrain(DigitsPipeline):
    """A train split of `n` samples (0: empty: no batch can be drawn)."""

    def __init__(self, n: int = 0):
        super().__init__()
        self.n = n

    def datasets(self):
        x = torch.zeros(self.n, 1, 8, 8)
        return {"train": TensorDataset(x, torch.zeros(self.n, dtype=torch.long))}


class HangingRank(DigitsPipeline):
    """Rank `rank` hangs (sleeps for good) in its first eval batch: a stuck rank its peers cannot see."""

    def __init__(self, rank: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.rank = rank

    def eval_step(self, model, batch):
        if os.environ.get("RANK") == str(self.rank):
            time.sleep(3600)
        return super().eval_step(model, batch)


class LeakyFailure(DigitsPipeline):
    """Fails in its loss with a message that quotes its credential and one from the environment."""

    def __init__(self, api_token: str = "", fail_at: int = 3):
        super().__init__()
        self.api_token, self.fail_at, self.calls = api_token, fail_at, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError(
                f"bucket refused token {self.api_token} (key {os.environ.get('WANDB_API_KEY', '')})"
            )
        return super().loss(model, batch)


class Slow(DigitsPipeline):
    """Digits with a delay per micro-batch, so a test can act while it trains."""

    def __init__(self, step_delay: float = 0.05):
        super().__init__()
        self.step_delay = step_delay

    def loss(self, model, batch):
        time.sleep(self.step_delay)
        return super().loss(model, batch)
