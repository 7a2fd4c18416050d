"""Early stopping on an eval metric (`early_stop.metric`, `mode`, `patience`, `min_delta`).

After every eval the metric either improves on the best so far by more than `min_delta` or counts one
more eval without improvement; at `patience` of those the run ends as *finished*, with the reason in its
`finish` event. The decision is part of the checkpoint (the trainer records why it ended), so a job
that is requeued or resubmitted after it early-stopped does nothing. Eval metrics are the same on every
rank (reduced once, DESIGN §7), so every rank decides alike without a collective.
"""

from __future__ import annotations

import math
from typing import Any

from disttrain.config import EarlyStopConfig
from disttrain.errors import ConfigError
from disttrain.hooks import Hook, Loop


class EarlyStopHook(Hook):
    def __init__(self, cfg: EarlyStopConfig):
        self.cfg = cfg
        self.best = math.inf if cfg.mode == "min" else -math.inf
        self.best_step = 0
        self.bad_evals = 0

    def improved(self, value: float) -> bool:
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def after_eval(self, loop: Loop, metrics: dict[str, float]) -> None:
        name = self.cfg.metric
        if name not in metrics:
            raise ConfigError(
                f"early_stop.metric: {name!r} is not among the eval metrics ({', '.join(sorted(metrics))}); "
                "choose one of them"
            )
        value = metrics[name]
        if not math.isfinite(value):
            return  # no result: neither an improvement nor a bad eval (the evaluator reported it)
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, loop.step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.patience and loop.step < loop.max_steps:
            loop.end_early(
                f"early stop: {name} did not improve by more than {self.cfg.min_delta:g} for {self.bad_evals} "
                f"evals (best {self.best:.6g} at step {self.best_step})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])
