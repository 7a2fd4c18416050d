"""Stop requests from signals, and agreement between ranks on when to stop.

Handlers only set a flag (DESIGN §5): nothing else is safe in a signal handler, and a rank that saved
or exited on its own would leave the others blocked in a collective. The trainer polls the flag at
every step boundary and between eval batches; ranks agree with one all-reduce, so every rank stops
after the same step, saves, and exits.

Why these signals: SLURM sends `--signal=USR2@N` before the time limit (USR1 is claimed by NCCL), and
SIGTERM on preemption or `scancel`; torchrun forwards SIGTERM to its workers; SIGINT is Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

from disttrain import dist

STOP_SIGNALS = ("SIGTERM", "SIGUSR2", "SIGINT")


class StopSignal:
    """Records the first stop signal this process receives. A second SIGINT aborts at once."""

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS):
        self.names = names
        self.received: str | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now, not after a save
        if self.received is None:
            self.received, self.received_at = name, time.time()

    @property
    def requested(self) -> bool:
        return self.received is not None


class StopAgreement:
    """Turns per-rank stop flags into one decision all ranks share. `poll` must be called on all ranks,
    the same number of times; the first poll that returns True returns True on every rank."""

    def __init__(self, local: StopSignal):
        self.local = local
        self._pending: dist.PendingFlag | None = None
        self.agreed = False

    def poll(self) -> bool:
        if self.agreed:
            return True
        if self._pending is not None and self._pending.result():
            self.agreed = True
            self._pending = None
            return True
        self._pending = dist.start_any_flag(self.local.requested)
        return False

    def drain(self) -> None:
        """Finish the in-flight all-reduce (all ranks) so no collective is left dangling at exit."""
        if self._pending is not None:
            self.agreed = self._pending.result() or self.agreed
            self._pending = None
