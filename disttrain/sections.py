"""Where each rank's time goes, section by section, for attribution (which rank is slow, and at what;
DESIGN §7b): the loop and the services mark section boundaries; the log window's all-reduce carries
every rank's totals; rank 0 names the slowest (`features.stragglers`), and a hung rank's last section
goes into its stack file (`hangs`).

A mark is one `time.perf_counter()` and a float add: a step marks about six, a few microseconds in all.
Sections are host time. On a GPU, device work runs asynchronously and lands in the section that waits
for it; a rank stuck in Python (a loss, a data loader) is attributed exactly either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# The sections of a step. "busy" ones run without waiting for other ranks, so a slow rank shows there;
# the others wait for peers (the gradient reduction in backward, the stop agreement) or are saves.
DATA, FORWARD, BACKWARD, OPTIMIZER = "data", "forward", "backward", "optimizer"
AGREEMENT, CHECKPOINT, EVAL, OTHER = "agreement", "checkpoint", "eval", "other"
SECTIONS = (DATA, FORWARD, BACKWARD, OPTIMIZER, AGREEMENT, CHECKPOINT, EVAL, OTHER)
BUSY = (DATA, FORWARD, OPTIMIZER)
# What a rank waiting in a section is waiting for, in words (for the line that names a hung peer).
WAITING_FOR = {
    BACKWARD: "the gradient all-reduce",
    AGREEMENT: "the stop agreement",
    CHECKPOINT: "the checkpoint save",
    EVAL: "the eval",
    OPTIMIZER: "the gradient norm",
}


class Sections:
    """This rank's time per section since the last `take()`, and the section it is in now."""

    def __init__(self) -> None:
        self.current = OTHER
        self.entered = time.monotonic()  # when the current section began (monotonic: the hang watch reads it)
        self._t = time.perf_counter()
        self._totals = dict.fromkeys(SECTIONS, 0.0)

    def enter(self, name: str) -> str:
        """Close the current section and open `name`; returns the one closed."""
        now = time.perf_counter()
        previous = self.current
        self._totals[previous] += now - self._t
        self._t, self.current, self.entered = now, name, time.monotonic()
        return previous

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """`name` for the duration, then back to the section it interrupted. An exception leaves it in
        `name`: the line that reports a failed collective says where this rank was waiting, and since when."""
        previous = self.enter(name)
        yield
        self.enter(previous)

    def take(self) -> list[float]:
        """Seconds per section (in SECTIONS order) since the last take; starts a new window."""
        self.enter(self.current)
        out = [self._totals[name] for name in SECTIONS]
        self._totals = dict.fromkeys(SECTIONS, 0.0)
        return out
