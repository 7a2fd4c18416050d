"""The stop path of a training segment (DESIGN §5): this process's signal flag, the agreement of every
rank on it, the stop they agreed, and the stock hook that polls it at every step boundary and saves
before the loop ends.

The flag, the agreement and the hang watch themselves are `preemption`'s; this is the service the loop
and the evaluator hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from disttrain.hooks import Hook, Loop
from disttrain.preemption import StopAgreement, StopRequest, StopSignal
from disttrain.writers import EventLog


class Stopping:
    """The agreed stop of this segment, the same on every rank once agreed."""

    def __init__(self, signal: StopSignal, agreement: StopAgreement, events: EventLog):
        self.signal, self.agreement, self.events = signal, agreement, events
        self.request: StopRequest | None = None
        self._own_handlers = False

    @property
    def stopping(self) -> bool:
        return self.request is not None

    def begin(self) -> None:
        """Training starts: handle the stop signals (unless the entry point already does) and watch for
        a rank that reaches no boundary in time."""
        self._own_handlers = not self.signal.installed
        if self._own_handlers:
            self.signal.install()
        self.agreement.arm()

    def end(self) -> None:
        if self._own_handlers:
            self.signal.uninstall()
            self._own_handlers = False

    def poll(self, step: int) -> bool:
        """A step boundary: whether a stop was agreed at this one (it is recorded once, as a `signal`
        event). Must be called on all ranks, at every step boundary."""
        if self.request is not None:
            return False
        request = self.agreement.poll()
        if request is None:
            return False
        self.request = request
        received = {} if self.signal.first_at is None else {"received": round(self.signal.first_at, 3)}
        self.events.emit(
            "signal", step=step, signal=request.signal, signals=list(request.signals), **received
        )
        return True

    def agreed_in_eval(self) -> bool:
        """Between eval batches: whether a stop is agreed (the next step boundary acts on it). Must be
        called on all ranks, between the same batches."""
        return self.agreement.poll("eval") is not None

    def drain(self) -> None:
        """Finish the exchange in flight on every rank, so no collective is left dangling."""
        self.agreement.drain()

    def close(self) -> None:
        self.agreement.close()


class Saver(Protocol):
    def save(self, reason: str = "manual") -> None: ...


class StopHook(Hook):
    """Polls the cross-rank stop agreement at every step boundary (one overlapped all-reduce about every
    0.1 s); once a stop is agreed, saves synchronously, and the loop ends after this step. `late_check`
    runs between the poll and the save: a verdict learned from the exchange (fp16's non-finite loss) may
    end the run there, and then nothing is saved."""

    def __init__(self, stopping: Stopping, checkpoints: Saver, late_check: Callable[[int], None]):
        self.stopping, self.checkpoints, self.late_check = stopping, checkpoints, late_check

    def after_step(self, loop: Loop) -> None:
        agreed = self.stopping.poll(loop.step)
        self.late_check(loop.step)
        if agreed:
            self.checkpoints.save(reason="stop")
