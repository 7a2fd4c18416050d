"""Proposed changes to disttrain, written as subclasses so the harness can time them against the stock
trainer in the same run (interleaved). Each mirrors a unified diff in bench/proposed/; keep them equal.

  stop_every  bench/proposed/02-stop-agreement-cadence.diff: agree on stopping about every 0.1 s of
              step boundaries instead of at every one; rank 0 picks the cadence and it travels inside the
              same all-reduce, so every rank polls at the same boundaries.
  nostop      ablation only, not a proposal: no stop agreement at all (what the agreement costs).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from disttrain import dist
from disttrain.trainer import Trainer

MAX_SKIP = 1000


class PendingMax:
    """02-stop-agreement-cadence.diff, disttrain/dist.py: an elementwise-max all-reduce in flight."""

    def __init__(self, values: list[int]):
        self.tensor = torch.tensor(values, dtype=torch.int64, device=dist._device())
        self.work = (
            torch.distributed.all_reduce(self.tensor, op=torch.distributed.ReduceOp.MAX, async_op=True)
            if dist.initialized()
            else None
        )

    def result(self) -> list[int]:
        if self.work is not None:
            self.work.wait()
        return [int(v) for v in self.tensor.tolist()]


class CadencedStopAgreement:
    """02-stop-agreement-cadence.diff, disttrain/preemption.py: StopAgreement (the diff also makes the
    trainer's eval loop poll with kind="eval"; the timed runs here have no eval inside them)."""

    def __init__(self, local: Any, interval_s: float = 0.1):
        self.local = local
        self.interval_s = interval_s
        self._pending: PendingMax | None = None
        self._skip = 0  # boundaries to pass before reading the pending result: the same on every rank
        self._kind = "step"
        self._started: float | None = None  # when the last agreement started (rank 0's clock)
        self._boundaries = 0  # boundaries polled since then
        self.agreed = False

    def poll(self, kind: str = "step") -> bool:
        if self.agreed:
            return True
        switched = kind != self._kind
        if switched:
            self._kind, self._skip, self._started = kind, 0, None
        self._boundaries += 1
        if self._skip > 0:
            self._skip -= 1
            return False
        if self._pending is not None:
            stop, skip = self._pending.result()
            self._pending = None
            if stop:
                self.agreed = True
                return True
            self._skip = 0 if switched else skip
        self._pending = PendingMax([int(self.local.requested), self._proposal()])
        return False

    def _proposal(self) -> int:
        now = time.monotonic()
        started, boundaries = self._started, self._boundaries
        self._started, self._boundaries = now, 0
        if started is None or not dist.is_main():
            return 0
        per_boundary = (now - started) / max(1, boundaries)
        return min(MAX_SKIP, int(self.interval_s / max(per_boundary, 1e-6)))

    def drain(self) -> None:
        if self._pending is not None:
            self.agreed = bool(self._pending.result()[0]) or self.agreed
            self._pending = None


class StopEvery(Trainer):
    """02-stop-agreement-cadence.diff"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_agreement = CadencedStopAgreement(self.signal)


class NoStopPoll(Trainer):
    """Ablation only (not a proposal): the stock trainer without the per-step stop agreement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from disttrain.hooks import StopHook

        self.hooks = [h for h in self.hooks if not isinstance(h, StopHook)]


TRAINERS: dict[str, type[Trainer]] = {"stop_every": StopEvery, "nostop": NoStopPoll}
