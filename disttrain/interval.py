"""`checkpoint.interval: auto`: save at the interval that minimises the expected time lost, re-evaluated
as the run goes.

The rule (Young 1974; Daly 2006 to first order): with saves costing C seconds of blocked training and
unclean interruptions (kill -9, a lost node, a crash: everything since the last save is redone) arriving
on average every M seconds, the expected loss per unit time, C / T + T / (2 M), is smallest at

    T = sqrt(2 x M x C)

- C: the median of this run's last few measured saves (its checkpoint events, then this segment's own
  saves). A run that has never measured one saves at its second step: to measure (C spans orders of
  magnitude, a guess could put the first save beyond the first interruption, and then a run that is
  interrupted often never saves at all), and because nothing else protects its start yet.
- M: (prior + running time) / (1 + unclean interruptions), over every segment of the run so far and the
  current one. The prior (checkpoint.mtbi_prior_minutes) counts as one interruption's worth of
  evidence: a new run assumes it, and its own history takes over as interruptions and hours add up.
  Clean stops (preemption, the time-limit warning) save on the way out and lose nothing, so they do
  not count; with the local tier on (checkpoint.local), neither do the crashes a restart resumed from
  it (own node or a peer's copy): the durable tier only has to cover what the local one cannot (a node
  lost with its peers, a requeue onto other nodes).

When (the steps): rank 0 decides from its clock; every rank learns the decision at a step all of them
know in advance (one small broadcast, about one per save), so no other step pays a collective.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from disttrain import events, goodput
from disttrain.config import CheckpointConfig
from disttrain.goodput import History
from disttrain.rundir import RunDir

DEFAULT_SAVE_S = 1.0  # what the rule assumes before a save was measured (it saves at once to measure)
RECENT_SAVES = 5  # the save time is the median of this many latest saves


@dataclass(frozen=True)
class Estimate:
    """The interval in force and the inputs that gave it (recorded with every save under auto)."""

    seconds: float
    mtbi_s: float
    save_s: float
    unclean: int
    running_s: float
    prior_s: float
    local_served: int = 0  # unclean interruptions the local tier served, left out of the MTBI

    def fields(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def young_daly(mtbi_s: float, save_s: float) -> float:
    """The checkpoint interval minimising expected loss, sqrt(2 M C), and never shorter than a save."""
    return max(save_s, math.sqrt(2.0 * mtbi_s * save_s))


def estimate(
    past: History, running_now_s: float, saves_now: list[float], prior_s: float, local: bool = False
) -> Estimate:
    """The interval from the run's past segments, the current segment's running time and its saves.
    `local`: the local tier is on, so the crashes it served before do not count."""
    running = past.running_s + running_now_s
    served = past.local_served if local else 0
    unclean = past.unclean - served
    mtbi = (prior_s + running) / (1 + unclean)
    recent = (past.save_s + saves_now)[-RECENT_SAVES:]
    save = statistics.median(recent) if recent else DEFAULT_SAVE_S
    return Estimate(young_daly(mtbi, save), mtbi, save, unclean, running, prior_s, served)


class AutoInterval:
    """Decides at which steps an auto-interval run saves. `due(step)` must be called on all ranks at
    every step; `saved(seconds)` after every save, whatever its reason. `past` is rank 0's (the other
    ranks pass None: they only learn decisions)."""

    def __init__(
        self, past: History | None, prior_s: float, clock: Callable[[], float] = time.monotonic,
        local: bool = False,
    ):  # fmt: skip
        self.past = past or History(0.0, 0, [])
        self.prior_s, self.clock, self.local = prior_s, clock, local
        self.began = self.last_save = clock()
        self.saves: list[float] = []
        self.next_check: int | None = None  # the step of the next decision (None: the first step)
        self.checked: tuple[int, float] | None = None  # (step, time) of the previous decision
        self.current: Estimate | None = None

    def due(self, step: int) -> bool:
        """Whether this step saves. Must be called on all ranks, every step (a collective at decisions)."""
        if self.next_check is not None and step < self.next_check:
            return False
        from disttrain import dist

        save, self.next_check = dist.from_main(lambda: self.decide(step))
        return bool(save)

    def decide(self, step: int) -> tuple[bool, int]:
        """(save now?, the step of the next decision), from this process's clock (rank 0's)."""
        now = self.clock()
        self.current = estimate(self.past, now - self.began, self.saves, self.prior_s, self.local)
        pace = (now - self.checked[1]) / max(1, step - self.checked[0]) if self.checked else None
        self.checked = (step, now)
        since = now - self.last_save
        if pace is None:  # no pace yet (the first step carries warm-up): decide again at the next step
            return False, step + 1
        unmeasured = not (self.past.save_s or self.saves)  # measure first: see the module's doc
        save = unmeasured or since >= self.current.seconds - pace / 2  # the nearest step to the interval
        left = self.current.seconds - (0.0 if save else since)
        return save, step + max(1, round(left / pace)) if pace > 0 else step + 1

    def saved(self, seconds: float) -> None:
        """A save just finished (any reason): it costs `seconds`, and the interval starts again. The next
        step decides anew, with this save's time in the estimate (the same on every rank: all save)."""
        self.saves.append(seconds)
        self.last_save = self.clock()
        self.next_check = None
        if self.checked is not None:  # the save's time is not step time: keep it out of the pace
            self.checked = (self.checked[0], self.checked[1] + seconds)


def for_run(layout: RunDir, cfg: CheckpointConfig) -> AutoInterval | None:
    """The scheduler of a run with checkpoint.interval=auto (None otherwise). Must be called on all
    ranks; rank 0 reads the run's history from its events.jsonl (every earlier segment has ended)."""
    if cfg.interval != "auto":
        return None
    from disttrain import dist

    past = dist.on_main(lambda: goodput.history(events.read(layout.path)))
    return AutoInterval(past, cfg.mtbi_prior_minutes * 60, local=cfg.local.every_steps > 0)
