"""The progress bar: on a terminal, rank 0 shows one tqdm bar with the latest train window's figures
(loss, lr, throughput, MFU, gradient norm, memory, skipped steps) instead of the plain log lines a log
file gets (`trainer.progress`). The bar's figures are those of the window logged at this very step:
the hook runs after the log hook.
"""

from __future__ import annotations

import sys
from typing import Any

from disttrain.features.metrics import TrainLog
from disttrain.hooks import Hook, Loop


class ProgressHook(Hook):
    def __init__(self, log: TrainLog, enabled: bool, max_steps: int) -> None:
        self.log, self.enabled, self.max_steps = log, enabled, max_steps
        self.bar: Any = None
        self._shown: dict[str, float] | None = None

    def before_train(self, loop: Loop) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.max_steps, initial=loop.step, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def after_step(self, loop: Loop) -> None:
        if self.bar is None:
            return
        last = self.log.last
        if last is not self._shown:  # a window was logged at this step: show its figures with it
            self._shown = last
            self.bar.set_postfix(postfix(last), refresh=False)
        self.bar.update(loop.step - self.bar.n)

    def after_train(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# What the bar shows of the train metrics, short: (metric, label, format). Absent metrics are left out.
_BAR = (
    ("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"), ("train/samples_per_sec", "sps", "{:.0f}"),
    ("train/tokens_per_sec", "tok/s", "{:.0f}"), ("train/mfu", "mfu", "{:.1%}"), ("train/grad_norm", "gnorm", "{:.3g}"),
    ("train/max_mem_mb", "mem", "{:.0f}MB"), ("train/skipped", "skipped", "{:.0f}"),
)  # fmt: skip


def postfix(metrics: dict[str, float]) -> dict[str, str]:
    return {label: fmt.format(metrics[key]) for key, label, fmt in _BAR if key in metrics}
